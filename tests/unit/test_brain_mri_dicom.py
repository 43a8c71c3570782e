"""The phantom brain study as a scanner sends it: four series, every file dciodvfy-clean,
the T1 after contrast built back into the case's volume by highdicom at the same points in
space, and the localiser's orthogonal slices making no volume."""

from __future__ import annotations

import subprocess
from collections import defaultdict

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from radlens.tasks.brain_mri import phantoms
from radlens.tasks.brain_mri.dicom import CONTRAST_AGENT, SERIES, write_brain_study
from tests.helpers import require_tool


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    case = phantoms.make_case(9, 0, size=40, label="glioma")  # 6 mm slices: few files
    folder = tmp_path_factory.mktemp("brain")
    files = write_brain_study(folder, case, uid_seed="test")
    by_series = defaultdict(list)
    for path in files:
        by_series[int(pydicom.dcmread(path, stop_before_pixels=True).SeriesNumber)].append(path)
    return case, files, by_series


def test_the_study_has_a_localiser_and_three_axial_series_of_the_case(study):
    case, files, by_series = study
    slices = case.image.GetSize()[2]
    assert sorted(by_series) == [number for number, *_ in SERIES]
    assert len(by_series[1]) == 3 and all(len(by_series[n]) == slices for n in (2, 3, 4))
    headers = {n: pydicom.dcmread(paths[0], stop_before_pixels=True)
               for n, paths in by_series.items()}
    assert headers[1].ImageType[3] == "LOCALIZER"
    assert headers[4].ContrastBolusAgent == CONTRAST_AGENT
    assert "ContrastBolusAgent" not in headers[3]
    assert len({h.StudyInstanceUID for h in headers.values()}) == 1
    assert len({h.SeriesInstanceUID for h in headers.values()}) == 4
    assert len({headers[n].FrameOfReferenceUID for n in (2, 3, 4)}) == 1
    # files are named by a hash, so a listing is in no slice order
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
               for p in sorted(by_series[4])]
    assert numbers != sorted(numbers)


def test_every_series_is_dciodvfy_clean(study):
    require_tool("dciodvfy")
    _, _, by_series = study
    for number, paths in by_series.items():
        for path in paths[:2]:
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                    timeout=60)
            complaints = [line for line in (result.stdout + result.stderr).splitlines()
                          if line.startswith(("Error", "Warning"))]
            assert complaints == [], f"series {number}: {complaints}"


def test_highdicom_builds_the_case_volume_back_at_the_same_points(study):
    case, _, by_series = study
    datasets = [pydicom.dcmread(p) for p in by_series[4]]
    volume = hd.get_volume_from_series(datasets, dtype="float32")
    truth = sitk.GetArrayFromImage(case.image)
    assert volume.shape == truth.shape
    rng = np.random.default_rng(0)
    for index in rng.integers(0, truth.shape, size=(50, 3)):
        point = volume.affine @ np.array([*index, 1.0])  # (slice, row, column) -> LPS mm
        column, row, plane = case.image.TransformPhysicalPointToIndex(tuple(point[:3]))
        assert volume.array[tuple(index)] == truth[plane, row, column]
    with pytest.raises(ValueError, match="orientation"):
        hd.get_volume_from_series([pydicom.dcmread(p) for p in by_series[1]])


def test_the_enhanced_study_is_one_clean_multi_frame_image_a_series_read_as_the_volume(
        tmp_path):
    """Each axial series as one Enhanced MR Image: dciodvfy-clean, and the agent's
    read_volume places its frames where the case's slices are."""
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian

    from radlens.agent.pipeline import read_volume
    from radlens.agent.queue import JobInstance
    from radlens.dicom_io import pixels
    from tests.helpers import dciodvfy_errors

    case = phantoms.make_case(9, 1, size=32, label="meningioma")
    files = write_brain_study(tmp_path, case, uid_seed="enhanced", enhanced=True)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    multi = [(p, h) for p, h in zip(files, headers, strict=True)
             if h.SOPClassUID == EnhancedMRImageStorage]
    assert len(multi) == 3 and len(files) == 6  # three enhanced series, three localiser slices
    slices = case.image.GetSize()[2]
    assert all(int(h.NumberOfFrames) == slices for _, h in multi)
    for path, _ in multi:
        assert dciodvfy_errors(path) == []
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                timeout=60)
        assert "Warning" not in result.stdout + result.stderr
    post = next(p for p, h in multi if "ContrastBolusAgentSequence" in h)
    instance = JobInstance(sop_instance_uid=str(pydicom.dcmread(post).SOPInstanceUID),
                           sop_class_uid=EnhancedMRImageStorage,
                           series_instance_uid="1", transfer_syntax_uid=ExplicitVRLittleEndian,
                           path=post, calling_aet="MR1")
    volume = read_volume([instance], [pixels.describe(pixels.read_dataset(post))]).volume
    truth = sitk.GetArrayFromImage(case.image)
    assert volume.shape == truth.shape
    for index in np.random.default_rng(1).integers(0, truth.shape, size=(50, 3)):
        point = volume.affine @ np.array([*index, 1.0])
        column, row, plane = case.image.TransformPhysicalPointToIndex(tuple(point[:3]))
        assert volume.array[tuple(index)] == truth[plane, row, column]
