"""Brain MRI datasets: a phantom folder read back, each slice with its neighbours as the
network's input, classes by whether the slice holds tumour core, and folders that cannot be
read refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from radlens.tasks.brain_mri import phantoms
from radlens.tasks.brain_mri.datasets import (
    NO_TUMOUR,
    BrainDataError,
    dataset_stacks,
    read_folder,
    volume_stacks,
)
from radlens.tasks.brain_mri.network import CLASSES


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("brains")
    cases = [phantoms.make_case(9, k, size=40, label=label)  # thick slices: few stacks
             for k, label in ((0, "glioma"), (4, "no tumour"))]
    phantoms.write_dataset(out, cases)
    return out, cases


def test_a_phantom_folder_becomes_stacks_labelled_by_their_slices(folder):
    out, cases = folder
    records = read_folder(out)
    assert [r.label for r in records] == ["glioma", "no tumour"]
    stacks = dataset_stacks(records, size=32)
    assert stacks.images.shape[1:] == (3, 32, 32) and stacks.images.dtype == torch.uint8
    glioma = [i for i, c in enumerate(stacks.cases) if c == cases[0].case_id]
    core_slices = {int(k) for k in np.nonzero(
        (sitk.GetArrayFromImage(cases[0].mask) == 1).any(axis=(1, 2)))[0]}
    for i in glioma:
        expected = CLASSES.index("glioma") if stacks.slices[i] in core_slices else NO_TUMOUR
        assert int(stacks.classes[i]) == expected
    assert any(int(stacks.classes[i]) == 0 for i in glioma)
    others = [i for i, c in enumerate(stacks.cases) if c == cases[1].case_id]
    assert others and all(int(stacks.classes[i]) == NO_TUMOUR for i in others)
    assert int(stacks.masks[glioma].max()) == 2  # the oedema is kept as its own segment


def test_the_middle_channel_is_the_slice_and_the_others_its_neighbours():
    volume = np.zeros((7, 16, 16), dtype=np.float32)
    volume[1:6, 2:14, 2:14] = 1000  # head on slices 1 to 5, air above and below
    for k in range(1, 6):
        volume[k, 6:10, 6:10] = 200 * k
    stacks = volume_stacks(volume, None, "no tumour", size=16)
    assert stacks.slices == [1, 2, 3, 4, 5]  # the slices of air are left out
    middle = stacks.images[2, :, 8, 8].tolist()  # slice 3, between 2 and 4
    assert middle[0] < middle[1] < middle[2]
    volume[0] = volume[1]
    edge = volume_stacks(volume, None, "no tumour", size=16).images[0, :, 8, 8].tolist()
    assert edge[0] == edge[1]  # the first slice is its own neighbour below


def test_folders_that_cannot_be_read_say_why(tmp_path, folder):
    with pytest.raises(BrainDataError, match="has no labels.csv"):
        read_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("case_id,patient_id,label\nX1,P1,lymphoma\n")
    with pytest.raises(BrainDataError, match="label 'lymphoma' is not one of glioma"):
        read_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("case_id,patient_id,label\nX1,P1,glioma\n")
    with pytest.raises(BrainDataError, match="has no volume for X1"):
        read_folder(tmp_path)
    with pytest.raises(BrainDataError, match=r"mask \(2, 4, 4\) does not match"):
        volume_stacks(np.zeros((3, 4, 4)), np.zeros((2, 4, 4)), "glioma", size=8)
