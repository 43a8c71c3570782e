from __future__ import annotations

import numpy as np
import pytest

from radlens.analysis.lesions import measure_frame
from radlens.analysis.nifti import LabelMap, from_nifti, to_nifti


def test_nifti_round_trip_keeps_values_and_spacing(tmp_path):
    import nibabel as nib

    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:50] = 2
    path = tmp_path / "mask.nii.gz"
    nib.save(to_nifti(mask, (0.2, 0.3)), str(path))
    volume, spacing = from_nifti(path)
    assert volume.shape == (1, 40, 60)
    assert np.array_equal(volume[0], mask)
    assert spacing == pytest.approx((0.2, 0.3))
    header = nib.load(str(path)).header
    assert header.get_zooms()[:2] == pytest.approx((0.3, 0.2))  # x = column, y = row


def test_unknown_spacing_is_said_not_invented(tmp_path):
    import nibabel as nib

    path = tmp_path / "map.nii.gz"
    nib.save(to_nifti(np.ones((8, 8), np.float32), None), str(path))
    assert b"spacing unknown" in nib.load(str(path)).header["descrip"].tobytes()


def test_a_lesion_in_a_named_region_is_reported_there(tmp_path):
    import nibabel as nib

    labels = np.zeros((100, 100), np.int16)
    labels[:50, :] = 1  # upper half
    labels[50:, :] = 2  # lower half
    nib.save(to_nifti(labels, (0.5, 0.5)), str(tmp_path / "atlas.nii.gz"))
    (tmp_path / "names.csv").write_text("label,name\n1,fibroglandular tissue\n2,pectoral muscle\n")
    atlas = LabelMap.load(tmp_path / "atlas.nii.gz", tmp_path / "names.csv")
    classes = np.zeros((100, 100), np.uint8)
    classes[60:80, 20:40] = 1  # a lesion planted in the lower region
    (lesion,) = measure_frame(np.full((100, 100), 80.0), classes, None, spacing_mm=(0.5, 0.5))
    region = np.zeros((100, 100), bool)
    row0, col0, row1, col1 = lesion.bbox_px
    region[row0:row1 + 1, col0:col1 + 1] = classes[row0:row1 + 1, col0:col1 + 1] > 0
    (overlap,) = atlas.overlaps(region)
    assert overlap.name == "pectoral muscle" and overlap.fraction_of_mask == pytest.approx(1.0)
    straddling = np.zeros((100, 100), bool)
    straddling[40:60, 0:10] = True
    names = [(o.name, round(o.fraction_of_mask, 2)) for o in atlas.overlaps(straddling)]
    assert names == [("fibroglandular tissue", 0.5), ("pectoral muscle", 0.5)]
    with pytest.raises(ValueError, match="not on the label map's grid"):
        atlas.overlaps(np.zeros((10, 10), bool))
