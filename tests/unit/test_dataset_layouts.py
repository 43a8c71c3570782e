"""Loaders that refuse to guess: every declared mask layout is read as it means, and a folder
that could be read two ways, mixes layouts or contradicts its labels.csv is refused with the
files and the competing readings named. ``radlens dataset check`` prints what was read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from radlens.datasets.segmentation import DatasetError, read_segmentation_folder
from radlens.tasks.breast_us.datasets import LESION_MASKS, SegmentationDataset, load_cases
from radlens.tasks.breast_us.phantoms import generate, write_dataset
from tests.helpers import radlens_cli

SHAPE = (24, 32)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 200, SHAPE, dtype=np.uint8)


def _lesion(value: int | tuple[int, int, int]) -> np.ndarray:
    if isinstance(value, tuple):
        mask = np.zeros((*SHAPE, 3), np.uint8)
    else:
        mask = np.zeros(SHAPE, np.uint8)
    mask[6:14, 8:20] = value
    return mask


def _folder(root: Path, masks: dict[str, np.ndarray],
            labels: dict[str, str] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for number, (case, mask) in enumerate(masks.items()):
        Image.fromarray(_image(number)).save(root / "images" / f"{case}.png")
        Image.fromarray(mask).save(root / "masks" / f"{case}.png")
    if labels is not None:
        with open(root / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "patient_id", "label"])
            for case, label in labels.items():
                writer.writerow([case, f"P{case}", label])
    return root


def _read(root: Path, layout: str | None = None):
    return read_segmentation_folder(root, LESION_MASKS, layout=layout)


def test_class_index_masks_keep_their_classes(tmp_path):
    """0/1/2 masks (nnU-Net's convention): 4 of 4 such cases were once read as normal."""
    root = _folder(tmp_path, {"a": _lesion(1), "b": _lesion(2), "c": _lesion(2),
                              "d": np.zeros(SHAPE, np.uint8)})
    dataset = _read(root)
    assert dataset.layout == "class-index"
    assert [c.label for c in dataset.cases] == ["benign", "malignant", "malignant", "normal"]
    assert dataset.mask_values == {"0": 4 * 24 * 32 - 3 * 96, "1": 96, "2": 192}
    assert dataset.class_pixels["malignant"] == 192 and dataset.class_pixels["benign"] == 96
    item = SegmentationDataset(dataset.cases, size=32)[1]
    assert set(item["mask"].unique().tolist()) == {0, 2}


def test_binary_masks_need_labels_csv_and_take_their_class_from_it(tmp_path):
    masks = {"a": _lesion(255), "b": _lesion(255), "c": np.zeros(SHAPE, np.uint8)}
    with pytest.raises(DatasetError, match=r"binary \(0 and 255: a.png, b.png\).*labels.csv"):
        _read(_folder(tmp_path / "bare", masks))
    dataset = _read(_folder(tmp_path / "listed", masks,
                            {"a": "malignant", "b": "benign", "c": "normal"}))
    assert dataset.layout == "binary"
    assert [c.label for c in dataset.cases] == ["malignant", "benign", "normal"]
    item = SegmentationDataset(dataset.cases, size=32)[0]
    assert set(item["mask"].unique().tolist()) == {0, 2}  # the malignant label's class


def test_zero_one_masks_read_two_ways_are_refused_until_the_layout_is_said(tmp_path):
    root = _folder(tmp_path, {"a": _lesion(1), "b": _lesion(1), "c": np.zeros(SHAPE, np.uint8)})
    with pytest.raises(DatasetError) as refused:
        _read(root)
    message = str(refused.value)
    assert "a.png, b.png" in message and "reads two ways" in message
    assert "class indices every lesion is benign" in message and "--layout" in message
    assert [c.label for c in _read(root, "class-index").cases] == ["benign", "benign", "normal"]
    with pytest.raises(DatasetError, match="--layout binary needs labels.csv"):
        _read(root, "binary")


def test_labels_that_contradict_masks_are_refused_naming_the_cases(tmp_path):
    root = _folder(tmp_path, {"a": _lesion(2), "b": _lesion(1), "c": np.zeros(SHAPE, np.uint8)},
                   {"a": "benign", "b": "benign", "c": "malignant"})
    with pytest.raises(DatasetError) as refused:
        _read(root)
    message = str(refused.value)
    assert "a is labelled benign but its mask says malignant" in message
    assert "c is labelled malignant but its mask says normal" in message
    assert "b is" not in message


def test_mixed_and_unreadable_masks_are_refused(tmp_path):
    mixed = _folder(tmp_path / "mixed", {"a": _lesion((255, 0, 0)), "b": _lesion(2)})
    with pytest.raises(DatasetError, match=r"mixes colour masks \(a.png\) and greyscale masks "
                                           r"with lesion values \(b.png\)"):
        _read(mixed)
    smooth = _lesion(2)
    smooth[6, 8:20] = 128  # an anti-aliased edge
    resampled = _folder(tmp_path / "resampled", {"a": smooth})
    with pytest.raises(DatasetError, match=r"mask values \[128\] \(a.png\)"):
        _read(resampled)
    declared = _folder(tmp_path / "declared", {"a": _lesion((0, 255, 0))})
    with pytest.raises(DatasetError, match="--layout class-index, but these masks are in "
                                           "colour: a.png"):
        _read(declared, "class-index")


def test_colour_phantoms_read_as_before_with_their_spacing(tmp_path):
    phantoms = write_dataset(tmp_path, generate(6, seed=2, size=64))
    dataset = _read(tmp_path)
    assert dataset.layout == "colour" and dataset.how == "the masks are in colour"
    assert [c.label for c in dataset.cases] == [p.label for p in phantoms]
    assert all(c.spacing_mm == pytest.approx((p.pixel_spacing_mm,) * 2, abs=1e-6)
               for c, p in zip(dataset.cases, phantoms, strict=True))
    assert [c.case_id for c in load_cases(tmp_path)] == [p.case_id for p in phantoms]


def _nifti(path: Path, array: np.ndarray, spacing: tuple[float, float]) -> None:
    affine = np.diag([spacing[1], spacing[0], 1.0, 1.0])  # x = column, y = row
    nib.save(nib.Nifti1Image(array.T.copy(), affine), str(path))


def test_nifti_pairs_carry_their_spacing(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for case, value in (("a", 2), ("b", 1)):
        _nifti(tmp_path / "images" / f"{case}.nii.gz", _image(3).astype(np.float32), (0.3, 0.2))
        _nifti(tmp_path / "masks" / f"{case}.nii.gz", _lesion(value), (0.3, 0.2))
    dataset = _read(tmp_path)
    assert dataset.layout == "nifti"
    assert [c.label for c in dataset.cases] == ["malignant", "benign"]
    assert dataset.cases[0].spacing_mm == pytest.approx((0.3, 0.2))
    assert dataset.sizes == {"24 x 32": 2}
    item = SegmentationDataset(dataset.cases, size=32)[0]
    assert item["image"].shape == (1, 32, 32) and float(item["image"].max()) <= 1.0
    _nifti(tmp_path / "images" / "b.nii.gz", _image(3).astype(np.float32) * 20, (0.3, 0.2))
    with pytest.raises(DatasetError, match="outside 0-255"):
        SegmentationDataset(_read(tmp_path).cases, size=32)


def test_nnunet_raw_layout_maps_its_labels_by_name(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    # nnU-Net numbers its labels its own way: malignant 1, benign 2 here.
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "US"}, "labels": {"background": 0, "malignant": 1, "benign": 2},
        "numTraining": 2, "file_ending": ".png"}))
    for case, value in (("case_001", 1), ("case_002", 2)):
        Image.fromarray(_image(1)).save(tmp_path / "imagesTr" / f"{case}_0000.png")
        Image.fromarray(_lesion(value)).save(tmp_path / "labelsTr" / f"{case}.png")
    dataset = _read(tmp_path)
    assert dataset.layout == "nnunet"
    assert [c.label for c in dataset.cases] == ["malignant", "benign"]
    item = SegmentationDataset(dataset.cases, size=32)[0]
    assert set(item["mask"].unique().tolist()) == {0, 2}  # nnU-Net's 1 is our malignant, 2
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "US"}, "labels": {"background": 0, "cyst": 1},
        "file_ending": ".png"}))
    with pytest.raises(DatasetError, match=r"labels \['cyst'\] are not the task's classes"):
        _read(tmp_path)


def test_dataset_check_prints_what_it_read_and_refuses_what_it_cannot(tmp_path):
    root = _folder(tmp_path / "ok", {"a": _lesion(1), "b": _lesion(2)})
    checked = radlens_cli("dataset", "check", str(root), env={"COLUMNS": "200"})
    assert checked.returncode == 0, checked.stderr
    out = checked.stdout
    assert "2 cases of 2 patients, layout class-index" in out
    assert "mask values (pixels)" in out and "pixels per class" in out and "24 x 32" in out
    assert "not stated" in out  # no spacing in a bare PNG folder
    refused = radlens_cli("dataset", "check", str(_folder(tmp_path / "bin",
                                                          {"a": _lesion(255)})))
    assert refused.returncode == 1 and "labels.csv" in refused.stderr
    wrong = radlens_cli("dataset", "check", str(root), "--layout", "dicom")
    assert wrong.returncode == 2 and "unknown layout 'dicom'" in wrong.stderr


def test_a_density_folder_is_checked_as_training_reads_it(tmp_path):
    from radlens.tasks.base import TaskError
    from radlens.tasks.mammo_density import phantoms
    from radlens.tasks.registry import get_task

    phantoms.write_dataset(tmp_path, phantoms.generate(2, 5, size=96), dicom=False,
                           uid_seed="check", tomosynthesis=False)
    Image.fromarray(_image(0)).save(tmp_path / "images" / "stray.png")
    summary = get_task("mammo_density").check_dataset(tmp_path)
    assert summary.cases == 8 and summary.patients == 2 and sum(summary.labels.values()) == 8
    assert summary.tables["views"] == {"CC": 4, "MLO": 4}
    assert summary.tables["image sizes (rows x columns)"] == {"96 x 77": 8}  # 4:5 aspect
    assert any("1 image(s) in images/ are not in labels.csv" in n for n in summary.notes)
    with open(tmp_path / "labels.csv", "a") as handle:
        first = (tmp_path / "labels.csv").read_text().splitlines()[1]
        handle.write(first + "\n")
    with pytest.raises(TaskError, match="is listed twice"):
        get_task("mammo_density").check_dataset(tmp_path)


def _seg_for(image_path: Path, mask: np.ndarray, names: dict[int, str], out: Path) -> None:
    """A SEG of ``mask`` over one DICOM image, built by radlens's own SEG writer (segments
    named as ``names`` says)."""
    from radlens.dicom_io import pixels
    from radlens.dicom_io.writers.common import OutputKind, SeriesPlan
    from radlens.dicom_io.writers.seg import build_label_map_segmentation
    from radlens.findings import ModelRef
    from radlens.tasks.labels import LabelDefinition

    ds = pixels.read_dataset(image_path)
    written = build_label_map_segmentation(
        [ds], [pixels.describe(ds)], mask[None],
        [LabelDefinition(value=value, name=name) for value, name in names.items()],
        ModelRef(name="reader", version="1", architecture="hand"),
        SeriesPlan.new(OutputKind.SEG, 1), 1)
    written.dataset.save_as(out, enforce_file_format=True)


def test_dicom_images_with_dicom_seg_are_read_with_their_spacing(tmp_path):
    from radlens.tasks.breast_us.dicom import write_phantom_study
    from radlens.tasks.breast_us.phantoms import make_phantom

    root = tmp_path / "dicom"
    phantoms = [make_phantom(4, i, size=64, label=label)
                for i, label in enumerate(("malignant", "benign", "normal"))]
    paths = [write_phantom_study(root / p.case_id, p.image, spacing_mm=0.25, case_id=p.case_id,
                                 patient_id=p.patient_id, uid_seed="seg-layout")
             for p in phantoms]
    for path, phantom in list(zip(paths, phantoms, strict=True))[:2]:
        _seg_for(path, phantom.mask, {1: "benign lesion", 2: "malignant lesion"},
                 path.with_name("SEG.dcm"))
    with pytest.raises(DatasetError, match="no SEG covers it; segment it, or list it in "
                                           "labels.csv as normal"):
        _read(root)
    case_ids = [path.relative_to(root).with_suffix("").as_posix() for path in paths]
    (root / "labels.csv").write_text(f"case_id,label\n{case_ids[2]},normal\n")
    dataset = _read(root)
    assert dataset.layout == "dicom-seg"
    assert [c.label for c in dataset.cases] == ["malignant", "benign", "normal"]
    assert dataset.cases[0].spacing_mm == pytest.approx((0.25, 0.25))
    item = SegmentationDataset(dataset.cases, size=64)[0]
    assert np.array_equal(item["mask"][0].numpy(), phantoms[0].mask)  # the SEG's pixels
    _seg_for(paths[2], phantoms[0].mask, {2: "cyst"}, paths[2].with_name("SEG.dcm"))
    with pytest.raises(DatasetError, match=r"segments \['cyst'\] are not the task's classes"):
        _read(root)
