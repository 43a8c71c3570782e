"""The refinement stage: prompts from the coarse mask, the random walker beats a coarse
mask it is prompted from, a refiner that runs off is not believed, and SAM2 says what it
lacks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from radlens.tasks.dermoscopy.phantoms import make_case
from radlens.tasks.dermoscopy.refine import (
    Prompts,
    RandomWalkerRefiner,
    RefinerError,
    Sam2Refiner,
    dice,
    refine,
    sample_points,
)


def _coarse(mask: np.ndarray) -> np.ndarray:
    """What a low-resolution first stage gives: the mask at an eighth of the size, blown up
    (blocky), and three pixels off."""
    small = ndimage.zoom(mask.astype(float), 1 / 8, order=1)
    blocky = ndimage.zoom(small, 8, order=0)[:mask.shape[0], :mask.shape[1]] > 0.5
    return ndimage.shift(blocky.astype(float), (3, -2), order=0) > 0.5


def test_prompts_lie_inside_and_around_the_coarse_mask_and_repeat():
    coarse = _coarse(make_case(21, 0).mask)
    prompts = sample_points(coarse)
    assert coarse[tuple(prompts.foreground.T)].all()
    assert not coarse[tuple(prompts.background.T)].any()
    assert len(prompts.foreground) == 24 and len(prompts.background) == 48
    again = sample_points(coarse)
    assert (again.foreground == prompts.foreground).all()
    with pytest.raises(ValueError, match="empty"):
        sample_points(np.zeros((32, 32), bool))


def test_the_random_walker_refines_a_blocky_coarse_mask_towards_the_truth():
    refiner = RandomWalkerRefiner()
    coarse_scores, refined_scores = [], []
    for index in range(12):
        case = make_case(21, index)
        coarse = _coarse(case.mask)
        refined = refine(case.image, coarse, refiner)
        coarse_scores.append(dice(coarse, case.mask))
        refined_scores.append(dice(refined.mask, case.mask))
        if not refined.kept:
            assert "coarse mask stands" in refined.note and (refined.mask == coarse).all()
    assert np.mean(refined_scores) > np.mean(coarse_scores) + 0.02
    assert np.mean(refined_scores) > 0.93
    assert min(refined_scores) >= min(coarse_scores) - 0.02  # the agreement rule's floor


def test_a_large_photograph_is_refined_on_the_lesions_box_at_the_working_size():
    """A dermatoscope's 2048-pixel photograph costs what a small one does (the walker works
    on the lesion's box at no more than WORKING_SIZE pixels) and gives the same lesion: the
    refined mask, brought down to the phantom's size, matches the small photograph's."""
    case = make_case(21, 3)
    factor = 8
    large = np.repeat(np.repeat(case.image, factor, axis=0), factor, axis=1)
    coarse = _coarse(case.mask)
    large_coarse = np.repeat(np.repeat(coarse, factor, axis=0), factor, axis=1)
    small = refine(case.image, coarse, RandomWalkerRefiner())
    refined = refine(large, large_coarse, RandomWalkerRefiner())
    assert refined.mask.shape == large.shape[:2] and refined.kept
    brought_down = refined.mask[factor // 2::factor, factor // 2::factor]
    assert dice(brought_down, small.mask) > 0.95
    assert dice(brought_down, case.mask) > dice(coarse, case.mask)


def test_a_lesion_running_off_the_frame_is_refined_to_the_frames_edge():
    case = make_case(21, 2)
    rows = np.nonzero(case.mask.any(axis=1))[0]
    middle = (rows.min() + rows.max()) // 2
    image, truth = case.image[middle:], case.mask[middle:]  # the lesion's upper half cut off
    refined = refine(image, _coarse(truth), RandomWalkerRefiner())
    assert refined.kept and refined.mask[0].any()
    assert dice(refined.mask, truth) > dice(_coarse(truth), truth)


class _RunsOff:
    """A refiner that takes the whole frame for lesion."""

    name = "runaway"

    def segment(self, image: np.ndarray, prompts: Prompts) -> np.ndarray:
        return np.ones(image.shape[:2], dtype=bool)


def test_a_refined_mask_that_disagrees_with_the_coarse_one_is_not_believed():
    case = make_case(21, 1)
    coarse = _coarse(case.mask)
    refined = refine(case.image, coarse, _RunsOff())
    assert not refined.kept and (refined.mask == coarse).all()
    assert refined.agreement < 0.85 and "under 0.85" in refined.note


def test_sam2_says_what_it_lacks(tmp_path):
    with pytest.raises(RefinerError, match="does not exist"):
        Sam2Refiner(tmp_path / "absent")
    with pytest.raises(RefinerError, match="no published checkpoint"):
        Sam2Refiner(tmp_path)
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"")
    try:
        import sam2  # noqa: F401
    except ImportError:
        with pytest.raises(RefinerError, match=r"pip install 'radlens\[sam2\]'"):
            Sam2Refiner(tmp_path)
    (tmp_path / "sam2.json").write_text('{"config": "x.yaml"}')
    with pytest.raises(RefinerError, match="must hold"):
        Sam2Refiner(tmp_path)


def test_the_coarse_unet_learns_and_the_refiner_sharpens_what_it_finds():
    """The real two-stage path, small: a coarse UNet trained a few epochs on 36 phantoms of
    96 pixels (64-pixel input) finds the held-out lesions, and the random walker prompted
    from its masks does at least as well."""
    import torch

    from radlens.tasks.dermoscopy.segment import (
        CoarseSegmenter,
        prepare_mask,
        prepare_rgb,
        train_coarse,
    )

    cases = [make_case(4, i, size=96) for i in range(46)]
    images = torch.stack([(prepare_rgb(c.image, 64) * 255).round().byte() for c in cases])
    masks = torch.stack([prepare_mask(c.mask, 64).byte() for c in cases])
    network, history, best = train_coarse(images, masks, list(range(36)), list(range(36, 46)),
                                          epochs=8, batch_size=6, learning_rate=3e-3,
                                          patience=5, seed=0, device="cpu")
    assert history[-1].val_dice > history[0].val_dice + 0.2 and best >= 1
    segmenter = CoarseSegmenter(network, size=64)
    held_out = cases[36:]
    coarse = [segmenter.mask(c.image) for c in held_out]
    assert all(m.shape == c.mask.shape for m, c in zip(coarse, held_out, strict=True))
    coarse_dice = np.mean([dice(m, c.mask) for m, c in zip(coarse, held_out, strict=True)])
    refined_dice = np.mean([dice(refine(c.image, m, RandomWalkerRefiner()).mask, c.mask)
                            for m, c in zip(coarse, held_out, strict=True)])
    assert coarse_dice > 0.6
    assert refined_dice >= coarse_dice
