"""Decode any image object into float32 pixels plus its physical spacing.

Greyscale comes out in modality units with MONOCHROME1 inverted (larger = brighter); colour
(RGB, YBR_*, PALETTE COLOR) comes out as RGB. Compressed syntaxes decode through pydicom's
pylibjpeg plugins. Spacing is read from PixelSpacing, the Pixel Measures functional group, or
the ultrasound regions; when none applies it is None, never guessed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut

from radlens.dicom_io.nesting import read_bounded
from radlens.errors import UnsupportedImageError
from radlens.findings import DecodedImage, ImageInfo, ImageRef, PixelSpacing
from radlens.logs import kv

log = logging.getLogger(__name__)

GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})
PALETTE = "PALETTE COLOR"
SUPPORTED_PHOTOMETRIC = GREYSCALE | COLOUR | {PALETTE}

DEFER_BYTES = 64 * 1024  # values larger than this (the pixels) are read when first used
_US_SPATIAL_2D = 1  # RegionSpatialFormat: 2D (tissue or flow)
_US_UNITS_CM = 3  # PhysicalUnitsX/YDirection: cm


def image_ref(ds: Dataset) -> ImageRef:
    return ImageRef(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
    )


def read_dataset(path: Path) -> Dataset:
    """The whole dataset with its large values (the pixels) read only when used, its nesting
    bounded (see radlens.dicom_io.nesting)."""
    try:
        return read_bounded(path, defer_size=DEFER_BYTES)
    except UnsupportedImageError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged files
        raise UnsupportedImageError(f"cannot read file: {type(exc).__name__}: {exc}") from exc


def decode_file(path: Path) -> DecodedImage:
    """Read and decode one file; raise UnsupportedImageError with a reason a person can act on."""
    return decode_dataset(read_dataset(path))


def describe(ds: Dataset) -> ImageInfo:
    """What an image object is, from its header alone (no pixel is decoded): for images that
    are not analysed, and the first step of decoding those that are."""
    if "PixelData" not in ds:
        kind = "float pixel data" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) \
            else "no pixel data"
        name = getattr(getattr(ds, "SOPClassUID", None), "name", "unknown SOP class")
        raise UnsupportedImageError(f"{kind} ({name})")
    try:
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        transfer_syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(
            ds, "file_meta", Dataset()) else pydicom.uid.ImplicitVRLittleEndian
        return ImageInfo(
            ref=image_ref(ds),
            modality=str(ds.Modality) if "Modality" in ds else None,
            photometric_interpretation=photometric or "unknown",
            transfer_syntax_uid=str(transfer_syntax),
            rows=rows, columns=columns, frames=frames,
            channels=3 if photometric == PALETTE or samples == 3 else 1,  # palette: RGB
            spacing=physical_spacing(ds),
        )
    except UnsupportedImageError:
        raise
    except Exception as exc:  # a header whose image attributes are missing or malformed
        raise UnsupportedImageError(
            f"unusable image header: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc


def decode_dataset(ds: Dataset, *, info: ImageInfo | None = None) -> DecodedImage:
    """Pixels of any supported image (``info``: its ``describe``, when already made). Every
    way real data can be wrong (pixel data of the wrong length, a frame count that disagrees
    with it, a broken LUT or palette, a rescale that is not a finite number) ends as
    UnsupportedImageError naming what was wrong."""
    info = info if info is not None else describe(ds)
    photometric = info.photometric_interpretation
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedImageError(f"unsupported photometric interpretation {photometric!r}")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric in GREYSCALE or photometric == PALETTE:
        if samples != 1:
            raise UnsupportedImageError(f"{photometric} with {samples} samples per pixel")
    elif samples != 3:
        raise UnsupportedImageError(f"{photometric} with {samples} samples per pixel")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise UnsupportedImageError(
            f"cannot decode pixel data ({pydicom.uid.UID(info.transfer_syntax_uid).name}): "
            f"{detail}") from exc
    try:
        if photometric == PALETTE:
            pixels = _palette_to_rgb(stored, ds)
        elif photometric in GREYSCALE:
            pixels = _greyscale(stored, ds, photometric)
        else:
            pixels = stored.astype(np.float32)  # pydicom already converted YBR_* to RGB
        pixels = pixels.reshape(info.frames, info.rows, info.columns, info.channels)
    except Exception as exc:
        raise UnsupportedImageError(
            f"pixel data do not fit the header ({info.frames} frame(s) of {info.rows}x"
            f"{info.columns}x{info.channels}): {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}") from exc
    if not np.isfinite(pixels).all():
        raise UnsupportedImageError("pixel values are not finite after the modality rescale "
                                    "(RescaleSlope/RescaleIntercept or the Modality LUT)")
    return DecodedImage(info=info, pixels=np.ascontiguousarray(pixels, dtype=np.float32))


def _palette_to_rgb(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """RGB on the 0-255 scale, whatever the palette's entry size (8 or 16 bits)."""
    rgb = apply_color_lut(stored, ds).astype(np.float32)
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    entry_bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 8
    if entry_bits == 16:
        rgb *= 255.0 / 65535.0
    return rgb


def _greyscale(stored: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    if photometric == "MONOCHROME1":
        low, high = _output_range(ds, values)
        values = (low + high) - values
    return values


def _output_range(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """The range stored values can take after the modality LUT, for MONOCHROME1 inversion."""
    if "ModalityLUTSequence" in ds:
        return float(values.min()), float(values.max())
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def physical_spacing(ds: Dataset) -> PixelSpacing | None:
    """Millimetres per pixel from the attributes that state it; None when none does, or when
    they cannot be read (a region sequence with an unknown VR, say): never guessed."""
    try:
        return _stated_spacing(ds)
    except Exception as exc:
        log.warning("pixel spacing unreadable; treated as unknown",
                    extra=kv(sop=str(ds.get("SOPInstanceUID", "")),
                             error=f"{type(exc).__name__}: {exc}"[:200]))
        return None


def _stated_spacing(ds: Dataset) -> PixelSpacing | None:
    direct = _pair(ds.get("PixelSpacing"))
    if direct:
        return PixelSpacing(row_mm=direct[0], column_mm=direct[1], source="PixelSpacing")
    for group in ds.get("SharedFunctionalGroupsSequence", []) or []:
        for measures in group.get("PixelMeasuresSequence", []) or []:
            pair = _pair(measures.get("PixelSpacing"))
            if pair:
                return PixelSpacing(row_mm=pair[0], column_mm=pair[1],
                                    source="PixelMeasuresSequence")
    return _ultrasound_spacing(ds)


def _pair(value: object) -> tuple[float, float] | None:
    try:
        row, column = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if row > 0 and column > 0 and np.isfinite(row) and np.isfinite(column):
        return row, column
    return None


def _ultrasound_spacing(ds: Dataset) -> PixelSpacing | None:
    """PhysicalDeltaX/Y (cm) of the 2-D tissue regions; the largest region wins if they differ."""
    candidates: list[tuple[int, float, float]] = []
    for region in ds.get("SequenceOfUltrasoundRegions", []) or []:
        if (region.get("RegionSpatialFormat") != _US_SPATIAL_2D
                or region.get("PhysicalUnitsXDirection") != _US_UNITS_CM
                or region.get("PhysicalUnitsYDirection") != _US_UNITS_CM):
            continue
        try:
            delta_x = abs(float(region.PhysicalDeltaX))
            delta_y = abs(float(region.PhysicalDeltaY))
            width = int(region.RegionLocationMaxX1) - int(region.RegionLocationMinX0) + 1
            height = int(region.RegionLocationMaxY1) - int(region.RegionLocationMinY0) + 1
        except (AttributeError, TypeError, ValueError):
            continue
        if delta_x > 0 and delta_y > 0 and np.isfinite(delta_x) and np.isfinite(delta_y):
            candidates.append((width * height, delta_y, delta_x))
    if not candidates:
        return None
    if len({(dy, dx) for _, dy, dx in candidates}) > 1:
        log.info("ultrasound regions disagree on spacing; using the largest region")
    _, delta_y, delta_x = max(candidates)
    return PixelSpacing(row_mm=delta_y * 10.0, column_mm=delta_x * 10.0,
                        source="SequenceOfUltrasoundRegions")
