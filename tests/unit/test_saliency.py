"""Saliency on held-out phantoms with the shipped model (trained on phantoms of another seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from radlens.tasks.breast_us.infer import Segmenter
from radlens.tasks.breast_us.phantoms import make_phantom
from radlens.tasks.breast_us.saliency import METHODS, SaliencyExplainer, agreement

HELD_OUT_SEED = 123  # the shipped model was trained on seed 20261122


@pytest.fixture(scope="module")
def explained():
    segmenter = Segmenter("default", device="cpu")
    explainer = SaliencyExplainer(segmenter)
    cases = []
    for index, label in enumerate(("benign", "malignant", "benign", "malignant")):
        phantom = make_phantom(HELD_OUT_SEED, index, label=label)
        cases.append((phantom, explainer.explain(phantom.image, METHODS),
                      segmenter.predict([phantom.image])[0]))
    return cases


def test_every_method_returns_a_normalised_map_at_source_size(explained):
    """Each map explains the class the model found: the lesion class covering most of its
    predicted lesion (not the phantom's truth, which the model may miss: its accuracy is
    test_models' business)."""
    for phantom, maps, prediction in explained:
        classes = prediction.probabilities.argmax(axis=0)
        lesion = classes > 0
        found = int(np.bincount(classes[lesion], minlength=3)[1:].argmax()) + 1
        assert [m.method for m in maps] == list(METHODS)
        for saliency in maps:
            assert saliency.map.shape == phantom.image.shape
            assert saliency.map.min() == 0.0 and saliency.map.max() == pytest.approx(1.0)
            assert saliency.target_class == found


@pytest.mark.parametrize("method", METHODS)
def test_each_method_concentrates_on_the_planted_lesion(explained, method):
    dice, enrichment = [], []
    for phantom, maps, _ in explained:
        (saliency,) = [m for m in maps if m.method == method]
        lesion = phantom.mask > 0
        radius = int(round(np.sqrt(lesion.sum() / np.pi)))
        near = ndimage.binary_dilation(lesion, iterations=radius)
        dice.append(agreement(saliency.map, lesion).dice)
        enrichment.append(agreement(saliency.map, near).mass_inside / near.mean())
    assert np.mean(dice) >= 0.5, dice  # the hottest pixels are the lesion's
    assert min(enrichment) >= 2.0, enrichment  # mass near the lesion at least twice its share


def test_prototype_puts_most_mass_inside_and_narrows_stage_by_stage(explained):
    inside = []
    for phantom, maps, _ in explained:
        (prototype,) = [m for m in maps if m.method == "prototype"]
        inside.append(agreement(prototype.map, phantom.mask > 0).mass_inside)
        assert len(prototype.stages) == 3 and len(prototype.per_depth) >= 3
        hot_area = [float((stage > 0.5).mean()) for stage in prototype.stages]
        assert hot_area[0] > hot_area[1] > hot_area[2], hot_area
    assert np.mean(inside) > 0.5, inside


def test_agreement_figures_on_known_maps():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    perfect = mask.astype(np.float32)
    result = agreement(perfect, mask)
    assert result.dice == pytest.approx(1.0) and result.mass_inside == pytest.approx(1.0)
    elsewhere = np.zeros((20, 20), np.float32)
    elsewhere[12:17, 12:17] = 1
    assert agreement(elsewhere, mask).mass_inside == 0.0


def test_unknown_method_is_refused():
    explainer = SaliencyExplainer(Segmenter("default", device="cpu"))
    with pytest.raises(ValueError, match="unknown saliency methods"):
        explainer.explain(np.zeros((64, 64), np.uint8), ["lime"])


def test_each_method_puts_most_mass_inside_the_planted_lesion():
    """The issue's criterion, literally: on held-out phantoms whose lesion covers at least 3 % of
    the frame (the first four of seed 123), every method puts most of its mass inside the lesion,
    on average and on the largest of them. Smaller lesions are held to the concentration test."""
    explainer = SaliencyExplainer(Segmenter("default", device="cpu"))
    phantoms = [make_phantom(HELD_OUT_SEED, index) for index in range(12)]
    phantoms = [p for p in phantoms if (p.mask > 0).mean() >= 0.03][:4]
    assert len(phantoms) == 4
    inside = np.array([[agreement(m.map, p.mask > 0).mass_inside
                        for m in explainer.explain(p.image, METHODS)] for p in phantoms])
    largest = int(np.argmax([(p.mask > 0).mean() for p in phantoms]))
    for column, method in enumerate(METHODS):
        assert inside[:, column].mean() > 0.5, (method, inside[:, column])
        assert inside[largest, column] > 0.5, (method, inside[largest, column])


def test_a_constant_floor_carries_no_mass():
    """A CAM's spatially constant floor is removed before normalising, so it cannot spread the
    mass over the frame; without that, one cold pixel leaves less than half of it in the lesion."""

    from radlens.tasks.breast_us.saliency import _normalise, _remove_floor

    mask = np.zeros((64, 64), bool)
    mask[24:40, 24:40] = True
    raw = np.full((64, 64), 0.1, np.float32)
    raw[mask] = 1.0
    assert agreement(_normalise(raw), mask).mass_inside == pytest.approx(1.0)  # min is the floor
    raw[0, 0] = 0.0  # one cold pixel: min-max keeps the floor
    assert agreement(_normalise(raw), mask).mass_inside < 0.5
    cleaned = _normalise(_remove_floor(raw, mask))
    assert agreement(cleaned, mask).mass_inside == pytest.approx(1.0)


def test_batched_saliency_equals_image_by_image():
    """A batch mixes target classes (one backward pass serves every image's own class) and
    still gives every image exactly its own maps."""
    explainer = SaliencyExplainer(Segmenter(device="cpu", batch_size=4))
    images = [make_phantom(321, i).image.astype(np.float32) for i in range(6)]
    batched = explainer.explain_batch(images, ["prototype", "gradcam++"])
    assert len({maps[0].target_class for maps in batched}) == 2  # benign and malignant mixed
    for image, maps in zip(images, batched, strict=True):
        for alone, together in zip(explainer.explain(image, ["prototype", "gradcam++"]), maps,
                                   strict=True):
            assert alone.method == together.method and alone.target_class == \
                together.target_class
            assert np.allclose(alone.map, together.map, atol=1e-5)


def test_pipeline_saliency_reuses_inference_and_adds_late_maps(tmp_path):
    """Saliency of the frames a batch settles comes from inference's own forward pass and
    equals a fresh pass's maps; frames chosen only after the whole clip (explain_frames: N)
    get theirs added to the maps already written."""
    from pydicom.uid import generate_uid

    from radlens.config import ModelSettings
    from radlens.dicom_io import pixels
    from radlens.tasks.breast_us.analyser import Analyser, analyse_image
    from radlens.tasks.breast_us.dicom import us_multiframe_dataset

    segmenter = Segmenter(device="cpu", batch_size=4)
    explainer = SaliencyExplainer(segmenter)
    images = np.stack([make_phantom(55, i).image for i in range(6)])
    ds = us_multiframe_dataset(images, study_uid=generate_uid(), series_uid=generate_uid(),
                               instance_number=1, spacing_cm=0.02, patient_id="P")
    decoded = pixels.decode_dataset(ds)
    methods = ["prototype", "gradcam++"]

    def run(explain: str | int, folder: str):
        settings = ModelSettings(explain_frames=explain, saliency=methods, batch_size=4)
        analyser = Analyser(segmenter, settings, explainer)
        info, _ = analyse_image(decoded, analyser, tmp_path / folder / "maps")
        return info, tmp_path / folder

    info, folder = run("lesions", "lesions")
    with_lesions = [p for p in info.predictions if p.lesions]
    assert with_lesions and len(info.predictions) == 6
    fresh = explainer.explain_batch([decoded.pixels[p.frame] for p in with_lesions], methods)
    for prediction, maps in zip(with_lesions, fresh, strict=True):
        with np.load(folder / prediction.maps_file) as stored:
            for saliency in maps:
                assert np.allclose(stored[f"saliency_{saliency.method}"], saliency.map,
                                   atol=2e-3)  # stored as float16
    info, folder = run(2, "two")
    explained = [p for p in info.predictions if p.saliency]
    assert len(explained) == 2
    for prediction in info.predictions:
        with np.load(folder / prediction.maps_file) as stored:
            keys = set(stored.files)
            assert {"classes", "lesions", "probabilities"} <= keys
            assert ("saliency_gradcam++" in keys) == bool(prediction.saliency)
            assert stored["probabilities"].shape == (3, *images.shape[1:3])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_from_the_inference_pass_equals_monai_through_the_whole_network(method):
    """radlens takes Grad-CAM from inference's own pass (graph from the CAM layer on, one
    backward pass for a batch of images each with its own class); every map equals MONAI's
    GradCAM / GradCAMpp run on that image alone through the whole network, and the network is
    left as it was: no hook behind, weights still trainable."""
    from monai.visualize import GradCAM, GradCAMpp

    from radlens.tasks.breast_us.saliency import RegionScores, _normalise, _remove_floor

    segmenter = Segmenter(device="cpu", batch_size=4)
    layer = segmenter.model.cam_layer
    hooks = (len(layer._forward_pre_hooks), len(layer._forward_hooks),
             len(layer._backward_hooks))
    images = [make_phantom(99, i).image.astype(np.float32) for i in range(4)]
    sizes = [image.shape[:2] for image in images]
    forward = segmenter.predict_batch(images, cam_layer=layer)
    assert forward.cam_activation is not None
    explainer = SaliencyExplainer(segmenter)
    ours = explainer.explain_pass(forward, range(4), sizes, [method])
    regions, targets = SaliencyExplainer._targets(forward.logits)
    assert len(set(targets)) == 2  # benign and malignant in one backward pass
    name = next(n for n, m in RegionScores(segmenter.model, regions[:1]).named_modules()
                if m is layer)
    for i, target in enumerate(targets):
        wrapper = RegionScores(segmenter.model, regions[i:i + 1]).eval()
        reference = (GradCAMpp if method == "gradcam++" else GradCAM)(
            nn_module=wrapper, target_layers=name, postprocessing=lambda values: values)
        with torch.enable_grad():
            raw = reference(forward.inputs[i:i + 1].clone().requires_grad_(True),
                            class_idx=target)
        expected = _normalise(_remove_floor(
            explainer._to_source(raw[0, 0], sizes[i]).detach().numpy(),
            explainer._region_at_source(regions[i], sizes[i])))
        assert ours[i][0].target_class == target
        assert np.allclose(ours[i][0].map, expected, atol=1e-5)
        assert ours[i][0].map.max() == pytest.approx(1.0)
        for handle in list(layer._forward_hooks)[hooks[1]:]:  # MONAI leaves its hooks
            layer._forward_hooks.pop(handle)
        for handle in list(layer._backward_hooks)[hooks[2]:]:
            layer._backward_hooks.pop(handle)
    assert all(p.requires_grad for p in segmenter.model.parameters())  # weights as they were
    assert (len(layer._forward_pre_hooks), len(layer._forward_hooks),
            len(layer._backward_hooks)) == hooks


def test_grad_cam_refuses_a_pass_run_without_its_graph():
    segmenter = Segmenter(device="cpu", batch_size=2)
    images = [make_phantom(99, i).image.astype(np.float32) for i in range(2)]
    forward = segmenter.predict_batch(images)  # inference only
    with pytest.raises(ValueError, match="cam_layer"):
        SaliencyExplainer(segmenter).explain_pass(forward, [0], [images[0].shape], ["gradcam"])
