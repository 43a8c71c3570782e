"""Deterministic PNG: what every task's phantoms write their images and masks as."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    """PNG with no timestamp or text chunks, so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
