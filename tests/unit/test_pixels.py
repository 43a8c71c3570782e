from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space

from radlens.dicom_io.pixels import decode_dataset, decode_file, physical_spacing
from radlens.errors import UnsupportedImageError
from radlens.tasks.breast_us.dicom import us_instance
from tests.helpers import TEST_FILES


def test_monochrome1_is_inverted_so_larger_is_brighter():
    path = TEST_FILES / "dicomdirtests/77654033/CR1/6154"
    ds = pydicom.dcmread(path)
    decoded = decode_file(path)
    raw = ds.pixel_array.astype(np.float64)
    out = decoded.pixels[0, :, :, 0]
    # The darkest stored value (brightest in MONOCHROME1) must come out largest.
    assert out.flat[np.argmin(raw)] == out.max()
    assert out.flat[np.argmax(raw)] == out.min()
    slope = float(ds.RescaleSlope)
    assert out.max() - out.min() == pytest.approx((raw.max() - raw.min()) * slope, rel=1e-5)


def test_ybr_full_422_comes_out_as_rgb():
    path = TEST_FILES / "SC_ybr_full_422_uncompressed.dcm"
    ds = pydicom.dcmread(path)
    decoded = decode_file(path)
    stored = pydicom.pixels.pixel_array(ds, as_rgb=False)
    expected = convert_color_space(stored, "YBR_FULL", "RGB")
    assert decoded.info.channels == 3
    assert np.abs(decoded.pixels[0] - expected).max() <= 1


def test_palette_colour_is_rgb_on_the_8_bit_scale():
    decoded = decode_file(TEST_FILES / "examples_palette.dcm")
    assert decoded.pixels.shape == (1, 350, 800, 3)
    assert 200 < decoded.pixels.max() <= 255


def test_multiframe_shape_and_dtype():
    decoded = decode_file(TEST_FILES / "SC_rgb_rle_2frame.dcm")
    assert decoded.pixels.shape == (2, 100, 100, 3)
    assert decoded.pixels.dtype == np.float32
    assert not np.array_equal(decoded.pixels[0], decoded.pixels[1])


def test_rescale_is_applied_for_ct():
    decoded = decode_file(TEST_FILES / "CT_small.dcm")
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(decoded.pixels[0, :, :, 0], expected)


def _us(**region_changes) -> Dataset:
    ds = us_instance(study_uid="1.2", series_uid="1.3", instance_number=1, rows=8, columns=8,
                     spacing_cm=0.02)
    for key, value in region_changes.items():
        setattr(ds.SequenceOfUltrasoundRegions[0], key, value)
    return ds


def test_spacing_from_ultrasound_regions_in_mm():
    spacing = physical_spacing(_us())
    assert spacing is not None
    assert (spacing.row_mm, spacing.column_mm) == pytest.approx((0.2, 0.2))
    assert spacing.source == "SequenceOfUltrasoundRegions"


def test_spacing_is_none_when_regions_are_not_in_cm():
    assert physical_spacing(_us(PhysicalUnitsXDirection=4)) is None  # seconds: a Doppler axis
    assert physical_spacing(_us(RegionSpatialFormat=3)) is None  # spectral region


def test_largest_region_wins_when_regions_disagree():
    ds = _us()
    small = copy.deepcopy(ds.SequenceOfUltrasoundRegions[0])
    small.RegionLocationMaxX1, small.RegionLocationMaxY1 = 1, 1
    small.PhysicalDeltaX = small.PhysicalDeltaY = 0.5
    ds.SequenceOfUltrasoundRegions.append(small)
    assert physical_spacing(ds).row_mm == pytest.approx(0.2)


def test_spacing_from_functional_groups():
    ds = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.8]
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [group]
    spacing = physical_spacing(ds)
    assert (spacing.row_mm, spacing.column_mm, spacing.source) == \
        (0.7, 0.8, "PixelMeasuresSequence")


def test_spacing_never_guessed():
    ds = Dataset()
    ds.ImagerPixelSpacing = [0.1, 0.1]  # detector plane, not the patient: not used
    assert physical_spacing(ds) is None
    ds.PixelSpacing = [0, 0.1]
    assert physical_spacing(ds) is None


def test_unsupported_objects_say_why():
    with pytest.raises(UnsupportedImageError, match=r"no pixel data \(Comprehensive SR Storage\)"):
        decode_file(TEST_FILES / "test-SR.dcm")
    ds = _us()
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(UnsupportedImageError, match="unsupported photometric interpretation"):
        decode_dataset(ds)
    with pytest.raises(UnsupportedImageError, match="cannot decode pixel data"):
        decode_file(TEST_FILES / "JPEG-lossy.dcm")
