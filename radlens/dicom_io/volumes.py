"""Whether a series of single-frame slices makes one regular volume, said with the reason when
it does not, before any pixel is read.

A task that reads a series as a volume must not be handed a guess. highdicom builds the
volume (``get_volume_from_series``) and refuses slices that make no regular grid, but its
errors name the arithmetic, not what happened at the scanner or on the way, and it reads
every pixel first. ``check_series`` reads the headers only and names the fault as a site
would: a localiser mixed in, mixed orientations, a missing or duplicated slice, uneven
spacing, slices not stacked along their normal, mixed matrices or frames of reference, too
few slices, or more voxels than ``MAX_VOXELS`` (which bounds the memory one series may take).
pydicom and highdicom have no such check (highdicom's ``sort_datasets`` and
``get_series_volume_positions`` sort and test regularity without saying which fault it is);
the tolerances follow highdicom's (a relative 1 % of the spacing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

MIN_SLICES = 3
MAX_VOXELS = 256 * 1024 * 1024  # one float32 volume of a gigabyte
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE = 0.01  # relative, of the median spacing
STACK_TOLERANCE_MM = 0.05  # how far a slice may sit beside the stack's axis


class SeriesRefused(ValueError):
    """The slices make no regular volume; the message says why, for the report."""


@dataclass(frozen=True)
class SeriesGeometry:
    """What the checked headers say of the volume they make."""

    slices: int
    rows: int
    columns: int
    spacing_mm: float  # between slices, along their normal
    pixel_spacing_mm: tuple[float, float]
    normal: tuple[float, float, float]


def _floats(ds: Dataset, keyword: str, count: int, number: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise SeriesRefused(f"slice {number} has no usable {keyword}")
    return values


def check_series(headers: Sequence[Dataset]) -> SeriesGeometry:
    """The geometry of the volume ``headers`` (one dataset a slice, any order, pixels not
    needed) make, or SeriesRefused saying why they make none."""
    count = len(headers)
    if count < MIN_SLICES:
        raise SeriesRefused(f"{count} slice{'s' if count != 1 else ''} make no volume (at "
                            f"least {MIN_SLICES} are needed)")
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in headers]
    if max(frames) > 1:
        raise SeriesRefused("a multi-frame image is mixed in with single slices")
    localisers = sum(1 for ds in headers
                     if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])])
    if localisers:
        raise SeriesRefused(f"a localiser is mixed in ({localisers} of {count} images have "
                            "ImageType LOCALIZER)")
    numbers = [int(ds.get("InstanceNumber", n + 1) or n + 1) for n, ds in enumerate(headers)]
    orientations = [_floats(ds, "ImageOrientationPatient", 6, k)
                    for ds, k in zip(headers, numbers, strict=True)]
    first = orientations[0]
    differing = sum(1 for o in orientations if np.abs(o - first).max() > ORIENTATION_TOLERANCE)
    if differing:
        raise SeriesRefused(f"mixed orientations ({differing} of {count} slices lie in another "
                            "plane than the first)")
    matrices = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in headers}
    if len(matrices) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(matrices))
        raise SeriesRefused(f"mixed matrix sizes ({shown})")
    spacings = {tuple(np.round(_floats(ds, "PixelSpacing", 2, k), 6))
                for ds, k in zip(headers, numbers, strict=True)}
    if len(spacings) > 1:
        raise SeriesRefused("mixed pixel spacing within the series")
    references = {str(ds.get("FrameOfReferenceUID", "")) for ds in headers}
    if len(references) > 1:
        raise SeriesRefused(f"{len(references)} frames of reference in one series")
    rows, columns = next(iter(matrices))
    if rows * columns * count > MAX_VOXELS:
        raise SeriesRefused(f"{count} slices of {rows}x{columns} are more than the "
                            f"{MAX_VOXELS} voxels one volume may hold")

    row, column = first[:3], first[3:]
    normal = np.cross(row, column)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, k)
                          for ds, k in zip(headers, numbers, strict=True)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    beside = positions - np.outer(along, normal)
    if np.abs(beside - beside[0]).max() > STACK_TOLERANCE_MM:
        raise SeriesRefused("the slices are not stacked along their normal (shifted in "
                            "plane, or a tilted gantry)")
    steps = np.diff(along)
    positive = steps[steps > 1e-3]
    if positive.size == 0:
        raise SeriesRefused("every slice lies at the same position")
    step = float(np.median(positive))
    duplicates = int((steps <= SPACING_TOLERANCE * step).sum())
    if duplicates:
        at = float(along[1:][steps <= SPACING_TOLERANCE * step][0])
        raise SeriesRefused(f"duplicate slices: {duplicates + 1} images at {at:.2f} mm along "
                            "the normal")
    gaps = steps > (1.0 + SPACING_TOLERANCE) * step
    if gaps.any():
        widest = int(np.argmax(steps))
        missing = int(round(float(steps[widest]) / step)) - 1
        if missing >= 1 and abs(steps[widest] - (missing + 1) * step) <= SPACING_TOLERANCE * \
                step * (missing + 1):
            raise SeriesRefused(f"missing slices: {missing} absent between {along[widest]:.2f} "
                                f"and {along[widest + 1]:.2f} mm, where the spacing is "
                                f"{step:.2f} mm")
    if (np.abs(steps - step) > SPACING_TOLERANCE * step).any():
        raise SeriesRefused(f"uneven spacing: from {steps.min():.2f} to {steps.max():.2f} mm "
                            "between slices")
    pixel_spacing = next(iter(spacings))
    return SeriesGeometry(slices=count, rows=rows, columns=columns, spacing_mm=step,
                          pixel_spacing_mm=(float(pixel_spacing[0]), float(pixel_spacing[1])),
                          normal=(float(normal[0]), float(normal[1]), float(normal[2])))


def check_multiframe(ds: Dataset) -> None:
    """A multi-frame image read as a volume: within ``MAX_VOXELS`` (highdicom places its
    frames from their functional groups and refuses what it cannot place)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns * frames > MAX_VOXELS:
        raise SeriesRefused(f"{frames} frames of {rows}x{columns} are more than the "
                            f"{MAX_VOXELS} voxels one volume may hold")
