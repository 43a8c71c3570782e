"""Which torch device a model runs on: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

Shared by training and inference of every model, so neither imports the other for it.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a device, else the CPU; ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA device is available")
    return device
