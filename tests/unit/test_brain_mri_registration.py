"""Registration to the MNI152 template: a phantom head in its own pose is brought back to
within a couple of millimetres of the truth, the atlas placed on its grid names the
structures its tumour was put in, and a volume that is no head is refused."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from radlens.tasks.brain_mri import phantoms
from radlens.tasks.brain_mri.atlas import load_atlas, occupancy
from radlens.tasks.brain_mri.registration import RegistrationFailed, register


def test_a_phantom_head_is_registered_and_its_tumour_placed_in_the_atlas():
    atlas = load_atlas()
    case = phantoms.make_case(8, 0, size=64, label="glioma")
    registration = register(case.image, atlas)
    truth = phantoms.pose_transform(case.pose)
    brain = np.argwhere(sitk.GetArrayViewFromImage(atlas.template) > 0)[::4999]
    errors = []
    for plane, row, column in brain:
        point = atlas.template.TransformIndexToPhysicalPoint(
            (int(column), int(row), int(plane)))
        seen = truth.GetInverse().TransformPoint(point)  # where the scan shows it
        errors.append(np.linalg.norm(np.subtract(registration.transform.TransformPoint(seen),
                                                 point)))
    assert np.mean(errors) < 2.0 and np.max(errors) < 4.0
    assert registration.correlation > 0.6
    labels = registration.labels_on(atlas, case.image)
    assert labels.shape == sitk.GetArrayViewFromImage(case.image).shape
    found = occupancy(labels, sitk.GetArrayFromImage(case.mask) == phantoms.CORE,
                      atlas.structures)
    top = found[0][0]
    assert top is not None and top.label == case.structures[0][0]
    assert found[0][1] == pytest.approx(case.structures[0][1], abs=0.1)


def test_a_volume_that_is_no_head_is_refused_with_its_fit():
    noise = sitk.GetImageFromArray(
        np.random.default_rng(0).random((12, 24, 24)).astype(np.float32) * 1000)
    noise.SetSpacing((8.0, 8.0, 12.0))
    noise.SetOrigin((-96.0, -80.0, -60.0))
    with pytest.raises(RegistrationFailed, match=r"correlation -?0\.\d\d inside the brain"):
        register(noise, load_atlas())
