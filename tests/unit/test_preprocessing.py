"""One preprocessing: the same phantom, once as a training PNG and once as the DICOM the agent
receives, becomes the same tensor, square or not; a frame that is not square keeps its aspect
ratio and the model's maps land back on the pixels they came from; cards from before the policy
keep the agent's old input."""

from __future__ import annotations

import dataclasses
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
from radlens.tasks.breast_us.phantoms import generate, make_phantom, write_dataset
from radlens.tasks.breast_us.preprocess import (
    BIT_DEPTH,
    MIN_MAX,
    bit_depth_top,
    placement,
    policy_of,
    prepare,
    prepare_mask,
    to_source,
)
from radlens.tasks.breast_us.saliency import METHODS, SaliencyExplainer


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


def _lesion_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(mask)
    return int(rows.min()), int(rows.max()), int(columns.min()), int(columns.max())


def _landscape(phantom, columns: int = 150):
    """The phantom cut to ``columns`` columns around its lesion: a frame that is not square."""
    lesion_columns = np.nonzero(phantom.mask.any(axis=0))[0]
    centre = int(lesion_columns.mean()) if lesion_columns.size else phantom.image.shape[1] // 2
    start = int(np.clip(centre - columns // 2, 0, phantom.image.shape[1] - columns))
    window = slice(start, start + columns)
    return dataclasses.replace(phantom, image=np.ascontiguousarray(phantom.image[:, window]),
                               mask=np.ascontiguousarray(phantom.mask[:, window]))


@pytest.mark.parametrize("shape", ["square", "not square"])
def test_the_training_loader_and_the_agent_give_the_same_tensor(tmp_path, retrained_card_folder,
                                                                 shape):
    phantoms = list(generate(4, seed=8, size=200))
    if shape == "not square":
        phantoms = [_landscape(phantom, 130) for phantom in phantoms]
    phantoms = write_dataset(tmp_path / "data", iter(phantoms))
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


def test_cards_without_a_policy_keep_the_min_max_input_the_agent_always_gave(tmp_path):
    """A card written before the policy was recorded (the shipped model's, as it was): the
    shipped weights with the card's preprocessing taken out."""
    folder = tmp_path / "old-card"
    shutil.copytree(model_folder("default"), folder)
    card = json.loads((folder / "card.json").read_text())
    card.pop("preprocessing", None)
    (folder / "card.json").write_text(json.dumps(card))
    segmenter = Segmenter(str(folder), device="cpu")
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
    with pytest.raises(ValueError, match="unknown preprocessing"):
        policy_of({"preprocessing": {"intensity": "bit-depth", "aspect": "crop"}})
    # A card from before the aspect policy was recorded was trained on stretched images.
    assert policy_of({"preprocessing": {"intensity": "bit-depth"}})["aspect"] == "stretch"


def test_padding_keeps_a_lesions_shape_and_maps_return_to_their_pixels():
    """A disc in a 4:3 frame stays a disc under ``pad`` (a stretched one becomes an ellipse a
    third wider), the padding is black and outside the box ``placement`` gives, and taking the
    input back through ``to_source`` returns the image."""
    image = np.zeros((120, 160), np.float32)
    rows, columns = np.mgrid[:120, :160]
    disc = (rows - 60) ** 2 + (columns - 70) ** 2 <= 30 ** 2
    image[disc] = 200
    padded = prepare(image, (256, 256), BIT_DEPTH)[0, 0]
    box = placement(image.shape, (256, 256), BIT_DEPTH)
    assert (box.top, box.left, box.height, box.width) == (32, 0, 192, 256)
    assert float(padded[:box.top].abs().max()) == 0.0
    assert float(padded[box.top + box.height:].abs().max()) == 0.0
    top, bottom, left, right = _lesion_box(padded.numpy() > 0.5)
    assert abs((bottom - top) - (right - left)) <= 2  # still round
    stretched = prepare(image, (256, 256), {**BIT_DEPTH, "aspect": "stretch"})[0, 0]
    top, bottom, left, right = _lesion_box(stretched.numpy() > 0.5)
    assert (bottom - top) / (right - left) == pytest.approx(4 / 3, rel=0.05)
    mask = prepare_mask(disc.astype(np.uint8), (256, 256), BIT_DEPTH)
    assert mask.shape == (256, 256) and not mask[:box.top].any()
    back = to_source(padded[None], image.shape, (256, 256), BIT_DEPTH)[0].numpy()
    assert back.shape == image.shape
    assert np.abs(back - image / 255).mean() < 0.01
    # A coarser grid over the same input (an encoder's map) maps back alike.
    coarse = torch.nn.functional.avg_pool2d(padded[None, None], 8)[0]
    assert ((to_source(coarse, image.shape, (256, 256), BIT_DEPTH)[0].numpy() > 0.5)
            == disc).mean() > 0.97
    # Pad with the old min-max intensities is a policy too; stretch has no padding to cut.
    assert prepare(image, (256, 256), {**MIN_MAX, "aspect": "pad"})[0, 0, :box.top].max() == 0


def test_predictions_and_saliency_of_a_frame_that_is_not_square_land_on_its_lesion(
        retrained_card_folder):
    """The agent's path end to end on frames cut to 256 x 150 around their lesion: the
    predicted lesion and each saliency method's hottest pixels lie on the phantom's lesion at
    the source size, which they cannot if the padding is not cut away on the way back."""
    segmenter = Segmenter(retrained_card_folder, device="cpu")
    assert segmenter.preprocessing["aspect"] == "pad"
    phantoms = [_landscape(make_phantom(123, index, label=label))
                for index, label in enumerate(("benign", "malignant"))]
    predictions = segmenter.predict([p.image for p in phantoms])
    explained = SaliencyExplainer(segmenter).explain_batch(
        [p.image for p in phantoms], [m for m in METHODS if m != "occlusion"])
    for phantom, prediction, maps in zip(phantoms, predictions, explained, strict=True):
        truth = phantom.mask > 0
        assert prediction.probabilities.shape == (3, *phantom.image.shape)
        found = prediction.classes > 0
        dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
        assert dice > 0.6, dice
        for saliency in maps:
            assert saliency.map.shape == phantom.image.shape
            hottest = saliency.map >= np.quantile(saliency.map, 0.99)
            assert (hottest & truth).sum() / hottest.sum() > 0.5, saliency.method
