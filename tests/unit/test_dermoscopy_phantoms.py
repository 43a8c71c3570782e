"""Phantom dermoscopy: deterministic, melanoma the minority, every descriptor recorded and
consistent, the classes separated by the ABC features as real lesions are, the confounders
marked, follow-up visits of the same lesion, valid DMS and XC DICOM."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest

from radlens.tasks.dermoscopy.descriptors import COMPLEMENTARY, DESCRIPTORS
from radlens.tasks.dermoscopy.dicom import (
    DERMOSCOPIC_PHOTOGRAPHY,
    VL_PHOTOGRAPHIC,
    write_dermoscopy_study,
)
from radlens.tasks.dermoscopy.features import measure_abc
from radlens.tasks.dermoscopy.phantoms import ARTIFACT, LESION, OUTSIDE, make_case
from tests.helpers import dciodvfy_errors, folder_digest, radlens_cli


@pytest.fixture(scope="module")
def cases():
    return [make_case(11, i, size=128) for i in range(80)]


def test_same_seed_same_bytes_including_dicom(tmp_path):
    for run in ("a", "b"):
        made = radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(tmp_path / run),
                           "--n", "4", "--seed", "5", "--size", "96", "--dicom",
                           "--visits", "2")
        assert made.returncode == 0, made.stderr
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert "wrote 4 lesions" in made.stdout and "2 visits" in made.stdout
    with open(tmp_path / "a" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {r["visit"] for r in rows} == {"1", "2"}
    for row in rows:
        assert (tmp_path / "a" / "images" / f"{row['case_id']}.png").is_file()
        assert (tmp_path / "a" / "masks" / f"{row['case_id']}.png").is_file()
        assert set(row["descriptors"].split(";")) <= set(DESCRIPTORS)
    assert len(list((tmp_path / "a" / "dicom").rglob("*.dcm"))) == 8
    checked = radlens_cli("dataset", "check", str(tmp_path / "a"), "--task", "dermoscopy")
    assert checked.returncode == 0, checked.stderr
    assert "8 cases of 2 patients, layout dermoscopy" in checked.stdout
    assert "symmetric shape" in checked.stdout and "without a mask" not in checked.stdout


def test_melanoma_is_the_minority_and_skin_spans_the_six_types(cases):
    labels = [c.label for c in cases]
    assert 0.08 < labels.count("melanoma") / len(labels) < 0.35
    more = [make_case(12, i, size=64).fitzpatrick for i in range(160)]
    assert set(more) == {1, 2, 3, 4, 5, 6}


def test_each_lesion_has_one_descriptor_of_each_pair_and_its_colours(cases):
    for case in cases:
        for first, second in COMPLEMENTARY:
            assert (first in case.descriptors) != (second in case.descriptors), case.case_id
        assert ("multiple colours" in case.descriptors) == (len(case.colours) >= 3)
        assert ("blue-gray areas" in case.descriptors) == ("blue-gray" in case.colours)
        assert case.image.shape == (128, 128, 3) and case.image.dtype == np.uint8
        assert case.mask.any() and (case.regions[case.mask & (case.regions != ARTIFACT)]
                                    == LESION).all()


def test_the_abc_features_of_the_true_masks_separate_the_classes(cases):
    """What the paper's features rest on: melanomas measure more asymmetric, more irregular
    and more varied in colour than nevi, and the recorded descriptors agree with the
    measurements."""
    measured = {c.case_id: measure_abc(c.image, c.mask, spacing_mm=c.pixel_spacing_mm)
                for c in cases}

    def median(attribute: str, keep) -> float:
        return float(np.median([getattr(measured[c.case_id], attribute) for c in cases
                                if keep(c)]))

    melanoma = lambda c: c.label == "melanoma"  # noqa: E731
    nevus = lambda c: c.label == "nevus"  # noqa: E731
    for attribute in ("asymmetry", "border_turns", "colour", "diameter_mm"):
        assert median(attribute, melanoma) > median(attribute, nevus), attribute
    assert median("asymmetry", lambda c: "asymmetric shape" in c.descriptors) > \
        median("asymmetry", lambda c: "symmetric shape" in c.descriptors)
    assert median("border_turns", lambda c: "irregular border" in c.descriptors) > \
        median("border_turns", lambda c: "regular border" in c.descriptors)


def test_confounders_are_drawn_and_marked(cases):
    seen = {name for c in cases for name in c.confounders}
    assert seen == {"hair", "ruler", "ink", "bubbles", "specular", "vignette"}
    for case in cases:
        if "vignette" in case.confounders:  # the corners lie outside the field of view
            assert case.regions[0, 0] == OUTSIDE and case.image[0, 0].max() < 30
        if {"hair", "ruler", "ink", "bubbles"} & set(case.confounders):
            assert (case.regions == ARTIFACT).any(), case.case_id
    hairy = [c for c in cases if "hair" in c.confounders]
    assert any((c.regions[c.mask] == ARTIFACT).any() for c in hairy)  # hair over the lesion


def test_a_later_visit_shows_the_same_lesion_a_melanoma_grown():
    for index in range(12):
        first, later = make_case(3, index, size=128), make_case(3, index, size=128, visit=3)
        assert (later.patient_id, later.lesion_id, later.label, later.site) == \
            (first.patient_id, first.lesion_id, first.label, first.site)
        assert later.study_date > first.study_date and later.case_id.endswith("_V3")
        growth = later.diameter_mm / first.diameter_mm
        if first.label == "melanoma":
            assert growth > 1.15
        else:
            assert 0.9 < growth < 1.1


def test_dicom_is_dermoscopic_photography_or_vl_photographic_and_valid(tmp_path, cases):
    written = [write_dermoscopy_study(tmp_path / c.case_id, c, uid_seed="test")
               for c in cases[:24]]
    classes, spacing, jpeg = set(), 0, 0
    for path, case in zip(written, cases, strict=False):
        assert dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path)
        classes.add(ds.SOPClassUID)
        assert ds.PatientID == case.patient_id and ds.StudyDate == case.study_date
        assert ds.AnatomicRegionSequence[0].CodingSchemeDesignator == "SCT"
        if ds.SOPClassUID == DERMOSCOPIC_PHOTOGRAPHY:
            assert ds.Modality == "DMS" and ds.ContactMethod == "CONTACT"
            assert ds.LightSourcePolarization and float(ds.OpticalMagnificationFactor) == 10
        else:
            assert ds.Modality == "XC"
        pixels = ds.pixel_array
        assert pixels.shape == case.image.shape
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            jpeg += 1
            assert ds.PhotometricInterpretation == "YBR_FULL_422"
            assert np.abs(pixels.astype(int) - case.image).mean() < 6  # lossy, near
        else:
            assert (pixels == case.image).all()
        spacing += "PixelSpacing" in ds
    assert classes == {DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC}
    assert 0 < spacing < len(written) and jpeg > 0
