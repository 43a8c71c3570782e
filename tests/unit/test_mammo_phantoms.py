"""Phantom mammograms: deterministic, four views a patient, density set by fraction and texture
with neighbouring categories overlapping, the confounders marked, valid MG DICOM."""

from __future__ import annotations

import collections

import numpy as np
import pydicom

from radlens.tasks.mammo_density.dicom import write_mammo_study
from radlens.tasks.mammo_density.phantoms import (
    ARTIFACT,
    DENSITIES,
    PECTORAL,
    TISSUE,
    generate,
    make_patient,
    study_density,
    write_dataset,
)
from tests.helpers import dciodvfy_errors, folder_digest, radlens_cli


def test_same_seed_same_bytes_including_dicom(tmp_path):
    for run in ("a", "b"):
        made = radlens_cli("phantoms", "--kind", "mammo", "--out", str(tmp_path / run),
                           "--n", "3", "--seed", "5", "--size", "128", "--dicom",
                           "--tomosynthesis")
        assert made.returncode == 0, made.stderr
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert "wrote 3 patients, 12 views" in made.stdout
    other = write_dataset(tmp_path / "c", generate(3, 6, size=128))
    assert other[0].image.tobytes() != make_patient(5, 0, size=128)[0].image.tobytes()


def test_four_views_a_patient_and_the_study_takes_the_denser_breast():
    views = make_patient(0, 7, size=128)
    assert [(v.laterality, v.view) for v in views] == [("R", "CC"), ("L", "CC"),
                                                       ("R", "MLO"), ("L", "MLO")]
    assert len({v.patient_id for v in views}) == 1
    for view in views:
        assert view.image.shape == (128, 102) and view.image.dtype == np.uint8
        assert "marker" in view.confounders and (view.regions == ARTIFACT).any()
        tissue_columns = np.nonzero((view.regions == TISSUE).any(axis=0))[0]
        # the chest wall: image right for a right breast, left for a left one
        if view.laterality == "R":
            assert tissue_columns.max() >= 100
        else:
            assert tissue_columns.min() <= 1
    assert all((v.regions == PECTORAL).any() for v in views if v.view == "MLO")
    patients = list(generate(120, 3, size=64))
    lesser = [p for p in patients if len({v.density for v in p}) > 1]
    assert lesser  # some patients have one breast a category less dense
    for patient in lesser:
        assert study_density(patient) == max((v.density for v in patient),
                                             key=DENSITIES.index)


def test_density_follows_the_fraction_with_overlap_and_the_real_imbalance():
    views = [v for patient in generate(300, 11, size=64) for v in patient]
    counts = collections.Counter(v.density for v in views)
    assert counts["D"] < counts["B"] and counts["D"] < counts["C"]
    assert counts["A"] < counts["B"]
    fractions = {d: np.array([v.dense_fraction for v in views if v.density == d])
                 for d in DENSITIES}
    medians = [float(np.median(fractions[d])) for d in DENSITIES]
    assert medians == sorted(medians)  # denser categories hold more fibroglandular tissue
    for lower, upper in zip(DENSITIES, DENSITIES[1:], strict=False):
        # readers disagree between neighbours: the fraction ranges overlap
        assert fractions[lower].max() > fractions[upper].min(), (lower, upper)


def test_confounders_appear_at_their_rates():
    views = [v for patient in generate(400, 2, size=64) for v in patient]
    seen = collections.Counter(c for v in views for c in v.confounders)
    assert seen["marker"] == len(views)
    assert 0.2 * len(views) < seen["text"] < 0.5 * len(views)
    assert 0.12 * len(views) < seen["paddle"] < 0.38 * len(views)
    assert 0 < seen["clip"] < 0.15 * len(views)
    assert 0 < seen["implant"] < 0.08 * len(views)


def test_dicom_is_valid_mammography_with_laterality_and_view(tmp_path):
    write_dataset(tmp_path, generate(4, 0, size=128), dicom=True)
    files = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert len(files) == 16
    kinds = set()
    for path in files:
        errors = dciodvfy_errors(path)
        assert not errors, (path, errors)
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MG" and ds.BodyPartExamined == "BREAST"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert (ds.ImageLaterality, ds.ViewPosition) == (path.stem[0], path.stem[1:])
        assert ds.ViewCodeSequence[0].CodeValue in ("399162004", "399368009")
        assert ds.BurnedInAnnotation == "YES"
        kinds.add(tuple(ds.ImageType))
        assert ds.pixel_array.max() <= 4095
    assert ("DERIVED", "PRIMARY", "", "GENERATED_2D") in kinds and ("ORIGINAL", "PRIMARY") in kinds


def test_tomosynthesis_volumes_are_valid_and_in_focus_in_the_middle(tmp_path):
    views = list(generate(1, 2, size=128))[0]
    paths = write_mammo_study(tmp_path, views, uid_seed="tomo test", tomosynthesis=True)
    volumes = [p for p in paths if p.stem.endswith("_TOMO")]
    assert len(paths) == 8 and len(volumes) == 4
    for path in volumes:
        errors = dciodvfy_errors(path)
        assert not errors, (path, errors)
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.13.1.3" and ds.NumberOfFrames == 6
        frame = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
        assert frame.FrameLaterality == path.stem[0]
        planes = ds.pixel_array.astype(float)
        sharpness = [np.abs(np.diff(plane, axis=1)).mean() for plane in planes]
        assert int(np.argmax(sharpness)) in (2, 3)  # the focal plane is the middle one
        assert ds.StudyInstanceUID == pydicom.dcmread(paths[0]).StudyInstanceUID
