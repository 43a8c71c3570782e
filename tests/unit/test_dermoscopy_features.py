"""The ABC(D) features on shapes whose answers are known, and their five levels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from radlens.tasks.dermoscopy.features import (
    DEFAULT_CUT_POINTS,
    FeatureError,
    measure_abc,
    severity,
)


def _disc(radius: float, size: int | None = None, centre: tuple[float, float] | None = None
          ) -> np.ndarray:
    size = size or int(2 * radius + 40)
    cy, cx = centre or (size / 2 - 0.3, size / 2 + 0.2)
    yy, xx = np.mgrid[0:size, 0:size]
    return np.hypot(yy - cy, xx - cx) < radius


def _painted(mask: np.ndarray, rgb: tuple[int, int, int] = (120, 80, 50)) -> np.ndarray:
    image = np.full((*mask.shape, 3), 230, dtype=np.uint8)
    image[mask] = rgb
    return image


@pytest.mark.parametrize("radius", [12, 25, 40, 80, 160, 400])
def test_a_uniform_disc_is_symmetric_with_curvature_one_over_r(radius):
    disc = _disc(radius)
    features = measure_abc(_painted(disc), disc, spacing_mm=0.1)
    assert features.asymmetry < 0.02
    assert features.border_per_px * radius == pytest.approx(1.0, rel=0.03)
    assert features.border_per_mm == pytest.approx(features.border_per_px / 0.1)
    assert features.border_turns == pytest.approx(1.0, abs=0.03)  # convex: one turn
    assert max(features.hue_sd, features.saturation_sd, features.value_sd) < 1e-9
    assert features.diameter_mm == pytest.approx(2 * radius * 0.1, rel=0.07)
    assert features.levels()["asymmetry"] == features.levels()["border"] == 1


def test_two_colours_give_their_known_spread_and_asymmetry_about_one_axis():
    """An ellipse, its upper half grey 0.2 and its lower half grey 0.6: value SD 0.2, hue
    and saturation SD 0; mirrored about the major (horizontal) axis the halves swap, so A
    there is |0.6 - 0.2|, and about the minor axis nothing changes."""
    yy, xx = np.mgrid[0:200, 0:300]
    ellipse = ((yy - 100) / 50.0) ** 2 + ((xx - 150) / 100.0) ** 2 < 1
    image = np.full((200, 300, 3), 255, dtype=np.uint8)
    dark, light = round(0.2 * 255), round(0.6 * 255)
    image[ellipse & (yy < 100)] = dark
    image[ellipse & (yy >= 100)] = light
    features = measure_abc(image, ellipse)
    assert features.value_sd == pytest.approx((light - dark) / 255 / 2, abs=0.003)
    assert features.hue_sd == pytest.approx(0.0, abs=1e-9)
    assert features.saturation_sd == pytest.approx(0.0, abs=1e-9)
    major, minor = features.asymmetry_axes
    assert major == pytest.approx((light - dark) / 255, abs=0.02)
    assert minor < 0.01
    assert features.asymmetry == pytest.approx((major + minor) / 2)
    assert features.diameter_mm is None and features.levels()["diameter_mm"] is None


def test_hue_spread_is_circular_so_reds_either_side_of_zero_are_close():
    """Hues 0.98 and 0.02 of a turn are 0.04 apart on the colour circle; a plain standard
    deviation would call them 0.48 apart."""
    from skimage.color import hsv2rgb

    disc = _disc(30)
    image = np.zeros((*disc.shape, 3))
    ys, xs = np.nonzero(disc)
    hues = np.where(np.arange(ys.size) % 2 == 0, 0.98, 0.02)
    image[ys, xs] = hsv2rgb(np.stack([hues, np.full_like(hues, 0.7),
                                      np.full_like(hues, 0.6)], axis=1)[:, None, :])[:, 0, :]
    features = measure_abc(image, disc)
    assert features.hue_sd == pytest.approx(0.02, abs=0.002)
    assert features.saturation_sd < 1e-6 and features.value_sd < 1e-6


def test_a_notched_uneven_outline_scores_above_a_convex_one():
    yy, xx = np.mgrid[0:240, 0:240]
    theta = np.arctan2(yy - 120, xx - 120)
    radius = 60 * (1 + 0.15 * np.cos(theta) + 0.05 * np.cos(9 * theta)
                   - 0.25 * np.exp(-0.5 * (np.angle(np.exp(1j * (theta - 2.0))) / 0.12) ** 2))
    irregular = np.hypot(yy - 120, xx - 120) < radius
    features = measure_abc(_painted(irregular), irregular)
    assert features.border_turns > 1.5
    assert features.asymmetry > 0.03  # the one-sided bulge (a disc this size: 0.005)
    assert features.levels()["border"] >= 3


def test_a_lesion_at_the_frame_edge_still_has_a_closed_outline():
    disc = _disc(40, size=100, centre=(20.0, 50.0))  # cut by the top edge
    features = measure_abc(_painted(disc), disc)
    assert features.border_turns >= 1.0 and math.isfinite(features.border_per_px)


def test_severity_levels_follow_the_cut_points():
    cuts = DEFAULT_CUT_POINTS["diameter_mm"]
    assert [severity(v, cuts) for v in (3.0, 4.0, 5.9, 6.0, 9.0, 10.0, 25.0)] == \
        [1, 2, 2, 3, 4, 5, 5]
    with pytest.raises(ValueError, match="four ascending"):
        severity(1.0, (3.0, 2.0, 4.0, 5.0))


def test_masks_the_features_cannot_measure_are_refused_with_the_reason():
    with pytest.raises(FeatureError, match="at least 16"):
        measure_abc(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), bool))
    with pytest.raises(FeatureError, match="RGB image of the mask's shape"):
        measure_abc(np.zeros((20, 20), np.uint8), _disc(5, size=20))
