"""Where a study's per-frame maps live (``results/<Study>/maps/*.npz``) and how they are packed.

Every analysis writes its maps here for the writers to read back; one module, so that the
pipeline and each model's analyser depend on it rather than on each other.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

MAPS_DIR = "maps"


def npz_bytes(arrays: dict[str, np.ndarray], base: bytes = b"") -> bytes:
    """An npz (a zip of .npy members, what ``np.load`` reads) holding ``base``'s members and
    ``arrays``, deflated at level 1: a third faster than ``np.savez_compressed`` for 2 %
    more bytes on these maps."""
    buffer = io.BytesIO(base)
    with zipfile.ZipFile(buffer, "a" if base else "w", compression=zipfile.ZIP_DEFLATED,
                         compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()
