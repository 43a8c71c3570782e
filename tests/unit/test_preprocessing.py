"""One preprocessing: the same phantom, once as a training PNG and once as the DICOM the agent
receives, becomes the same tensor; cards from before the policy keep the agent's old input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from radlens.dicom_io import pixels
from radlens.models.cards import model_folder
from radlens.tasks.breast_us.datasets import SegmentationDataset, load_cases
from radlens.tasks.breast_us.dicom import write_phantom_study
from radlens.tasks.breast_us.infer import Segmenter
from radlens.tasks.breast_us.phantoms import generate, write_dataset
from radlens.tasks.breast_us.preprocess import BIT_DEPTH, bit_depth_top, policy_of, prepare


@pytest.fixture(scope="module")
def retrained_card_folder(tmp_path_factory):
    """The shipped weights with a card that records the bit-depth policy, as a model trained
    now would."""
    folder = tmp_path_factory.mktemp("weights") / "model"
    shutil.copytree(model_folder("default"), folder)
    card = json.loads((folder / "card.json").read_text())
    card["preprocessing"] = BIT_DEPTH
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_the_training_loader_and_the_agent_give_the_same_tensor(tmp_path, retrained_card_folder):
    phantoms = write_dataset(tmp_path / "data", generate(4, seed=8, size=200))
    dataset = SegmentationDataset(load_cases(tmp_path / "data"), size=256)
    segmenter = Segmenter(retrained_card_folder, device="cpu")
    for index, phantom in enumerate(phantoms):
        source = write_phantom_study(tmp_path / "dicom" / phantom.case_id, phantom.image,
                                     spacing_mm=0.2, case_id=phantom.case_id,
                                     patient_id=phantom.patient_id, uid_seed="same tensor")
        frame = pixels.decode_file(source).pixels[0]  # what the agent decodes
        agent = segmenter._prepare(frame)
        trained = dataset[index]["image"][None]
        assert agent.shape == trained.shape == (1, 1, 256, 256)
        assert torch.allclose(agent, trained, atol=1e-6), float((agent - trained).abs().max())


def test_cards_without_a_policy_keep_the_min_max_input_the_agent_always_gave():
    segmenter = Segmenter("default", device="cpu")
    assert segmenter.preprocessing["intensity"] == "min-max"
    image = np.random.default_rng(0).integers(30, 200, (90, 120)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy((image - image.min()) / (image.max() - image.min()))[None, None],
        size=(256, 256), mode="bilinear", align_corners=False)
    assert torch.equal(segmenter._prepare(image), expected)


def test_bit_depth_scaling_and_unknown_policies():
    assert bit_depth_top(np.array([0.0, 255.0])) == 255.0
    assert bit_depth_top(np.array([0.0, 1000.0])) == 1023.0
    twelve_bit = np.full((8, 8), 3000.0, dtype=np.float32)
    assert float(prepare(twelve_bit, (4, 4), BIT_DEPTH).max()) == pytest.approx(3000 / 4095)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        policy_of({"preprocessing": {"intensity": "z-score"}})
