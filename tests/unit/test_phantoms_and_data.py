from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radlens.tasks.breast_us.datasets import (
    DatasetError,
    SegmentationDataset,
    decode_mask,
    folds,
    load_cases,
)
from radlens.tasks.breast_us.phantoms import generate, make_phantom, mask_to_rgb, write_dataset


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = write_dataset(tmp_path / "a", generate(6, seed=3, size=96), dicom=True)
    write_dataset(tmp_path / "b", generate(6, seed=3, size=96), dicom=True)
    write_dataset(tmp_path / "c", generate(6, seed=4, size=96))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert len(a) == 6 * 3 + 1  # image, mask, DICOM per case + labels.csv
    assert all(a[k] != c[k] for k in c if k.startswith("images/"))
    assert {p.label for p in first} <= {"normal", "benign", "malignant"}


def test_every_label_draws_its_lesion_and_masks_decode_to_the_right_class():
    for label, index in (("benign", 1), ("malignant", 2)):
        phantom = make_phantom(11, 0, size=128, label=label)
        assert phantom.label == label
        assert set(np.unique(phantom.mask)) == {0, index}
        decoded = decode_mask(mask_to_rgb(phantom.mask))
        assert np.array_equal(decoded, phantom.mask)
    normal = make_phantom(11, 1, size=128, label="normal")
    assert not normal.mask.any()


def test_lesions_are_darker_than_their_surroundings_on_average():
    # The cue the model must learn exists, but not trivially: check it on many cases.
    ratios = []
    for index in range(20):
        phantom = make_phantom(5, index, size=128, label="benign")
        inside = phantom.image[phantom.mask > 0].mean()
        outside = phantom.image[(phantom.mask == 0) & (phantom.image > 0)].mean()
        ratios.append(inside / outside)
    assert np.median(ratios) < 0.8


def test_loader_reads_bus_uclm_layout_with_patient_prefixes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, colour in (("ALWI_000", (255, 0, 0)), ("ALWI_001", (0, 255, 0)),
                         ("BOCA_000", None)):
        Image.fromarray(np.full((40, 50), 90, np.uint8)).save(tmp_path / "images" / f"{name}.png")
        mask = np.zeros((40, 50, 3), np.uint8)
        if colour:
            mask[10:20, 10:25] = colour
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    cases = load_cases(tmp_path)
    assert [(c.case_id, c.patient_id, c.label) for c in cases] == [
        ("ALWI_000", "ALWI", "malignant"), ("ALWI_001", "ALWI", "benign"),
        ("BOCA_000", "BOCA", "normal")]
    data = SegmentationDataset(cases, size=64)
    item = data[0]
    assert item["image"].shape == (1, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert set(item["mask"].unique().tolist()) == {0, 2}


def test_folds_keep_patients_apart(tmp_path):
    write_dataset(tmp_path, generate(40, seed=1, size=64))
    cases = load_cases(tmp_path)
    for train, val in folds(cases, 5, seed=0):
        assert not {cases[i].patient_id for i in train} & {cases[i].patient_id for i in val}
    with pytest.raises(DatasetError, match="cannot make 50 folds"):
        folds(cases, 50, seed=0)


def test_missing_mask_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "x.png")
    with pytest.raises(DatasetError, match="x.png has no mask"):
        load_cases(tmp_path)
