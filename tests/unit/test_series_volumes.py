"""A series is read as a volume only when its slices make one: each fault a scanner or a
transfer can introduce is refused with its own reason, and a good series in any order gives
its geometry."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from radlens.dicom_io.volumes import (
    MAX_VOXELS,
    SeriesRefused,
    check_multiframe,
    check_series,
)


def _slice(number: int, z: float, *, orientation=(1, 0, 0, 0, 1, 0), x: float = -100.0,
           rows: int = 64, image_type=("ORIGINAL", "PRIMARY", "OTHER")) -> Dataset:
    ds = Dataset()
    ds.InstanceNumber = number
    ds.ImageType = list(image_type)
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [x, -100.0, z]
    ds.PixelSpacing = [0.9, 0.9]
    ds.Rows, ds.Columns = rows, 64
    ds.FrameOfReferenceUID = "1.2.3"
    return ds


def _series(count: int = 20, spacing: float = 3.0) -> list[Dataset]:
    return [_slice(k + 1, -30.0 + k * spacing) for k in range(count)]


def test_a_regular_series_in_any_order_gives_its_geometry():
    shuffled = _series()
    np.random.default_rng(0).shuffle(shuffled)
    geometry = check_series(shuffled)
    assert (geometry.slices, geometry.rows, geometry.columns) == (20, 64, 64)
    assert geometry.spacing_mm == pytest.approx(3.0)
    assert geometry.normal == (0.0, 0.0, 1.0) and geometry.pixel_spacing_mm == (0.9, 0.9)
    sagittal = [_slice(k + 1, 0.0, orientation=(0, 1, 0, 0, 0, -1), x=k * 1.5)
                for k in range(10)]
    assert check_series(sagittal).spacing_mm == pytest.approx(1.5)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda s: s[:9] + s[10:], r"missing slices: 1 absent between -6\.00 and 0\.00 mm"),
    (lambda s: s[:7] + s[9:], r"missing slices: 2 absent"),
    (lambda s: s + [_slice(99, s[4].ImagePositionPatient[2])], r"duplicate slices: 2 images"),
    (lambda s: s[:5] + [_slice(6, s[5].ImagePositionPatient[2] + 1.1)] + s[6:],
     r"uneven spacing: from 1\.90 to 4\.10 mm"),
    (lambda s: s + [_slice(50, 0.0, orientation=(0, 1, 0, 0, 0, -1))], "mixed orientations"),
    (lambda s: s + [_slice(51, 100.0, image_type=("ORIGINAL", "PRIMARY", "OTHER",
                                                   "LOCALIZER"))],
     r"a localiser is mixed in \(1 of 21"),
    (lambda s: s[:3] + [_slice(4, s[3].ImagePositionPatient[2], x=-90.0)] + s[4:],
     "not stacked along their normal"),
    (lambda s: s[:3] + [_slice(4, s[3].ImagePositionPatient[2], rows=32)] + s[4:],
     r"mixed matrix sizes \(32x64, 64x64\)"),
    (lambda s: s[:2], "2 slices make no volume"),
])
def test_each_fault_is_refused_with_its_reason(change, reason):
    with pytest.raises(SeriesRefused, match=reason):
        check_series(change(_series()))


def test_a_slice_without_its_position_and_a_series_too_large_are_refused():
    series = _series()
    del series[3].ImagePositionPatient
    with pytest.raises(SeriesRefused, match="slice 4 has no usable ImagePositionPatient"):
        check_series(series)
    huge = [_slice(k + 1, k * 1.0, rows=4096) for k in range(MAX_VOXELS // (4096 * 64) + 1)]
    with pytest.raises(SeriesRefused, match="more than the"):
        check_series(huge)
    mixed = _series()
    mixed[2].FrameOfReferenceUID = "1.2.4"
    with pytest.raises(SeriesRefused, match="2 frames of reference"):
        check_series(mixed)


def test_a_multi_frame_image_too_large_for_a_volume_is_refused_from_its_header():
    ds = Dataset()
    ds.Rows, ds.Columns = 1024, 1024
    ds.NumberOfFrames = MAX_VOXELS // (1024 * 1024)
    check_multiframe(ds)
    ds.NumberOfFrames += 1
    with pytest.raises(SeriesRefused, match="257 frames of 1024x1024 are more than"):
        check_multiframe(ds)
