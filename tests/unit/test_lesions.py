"""Lesion descriptors against shapes whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from radlens.analysis.lesions import find_lesions, measure_frame
from radlens.tasks.breast_us.phantoms import make_phantom

YY, XX = np.mgrid[0:200, 0:200]


def _one(mask: np.ndarray, image: np.ndarray | None = None, spacing=(0.5, 0.5), **kwargs):
    if image is None:
        image = np.where(mask > 0, 50.0, 150.0)
    (lesion,) = measure_frame(image, mask, None, spacing_mm=spacing, **kwargs)
    return lesion


def test_compactness_of_a_disc_and_a_square():
    disc = (np.hypot(YY - 100, XX - 100) < 40).astype(np.uint8)
    square = np.zeros((200, 200), np.uint8)
    square[60:140, 60:140] = 1
    assert _one(disc).compactness == pytest.approx(1.0, abs=0.1)
    assert _one(square).compactness == pytest.approx(math.pi / 4, abs=0.03)


def test_a_blurred_edge_is_less_sharp_than_a_sharp_one():
    disc = (np.hypot(YY - 100, XX - 100) < 40).astype(np.uint8)
    sharp = np.where(disc > 0, 50.0, 150.0)
    blurred = ndimage.gaussian_filter(sharp, 4)
    assert _one(disc, blurred).edge_sharpness < 0.5 * _one(disc, sharp).edge_sharpness


def test_area_in_mm2_from_a_known_spacing_and_none_without_spacing():
    square = np.zeros((100, 100), np.uint8)
    square[10:30, 20:60] = 2  # 20 x 40 pixels
    lesion = _one(square, spacing=(0.2, 0.3))
    assert lesion.area_px == 800
    assert lesion.area_mm2 == pytest.approx(800 * 0.2 * 0.3)
    assert lesion.lesion_class == "malignant"
    unknown = _one(square, spacing=None)
    assert unknown.area_mm2 is None and unknown.perimeter_mm is None
    assert unknown.longest_diameter_mm is None and unknown.perpendicular_diameter_mm is None
    assert unknown.levels.size is not None  # falls back to the share of the image


@pytest.mark.parametrize("angle", [0.0, 0.5, 1.2])
def test_ellipse_diameters_within_a_pixel(angle):
    u = (YY - 100) * math.sin(angle) + (XX - 100) * math.cos(angle)
    v = (YY - 100) * math.cos(angle) - (XX - 100) * math.sin(angle)
    ellipse = ((u / 50.0) ** 2 + (v / 18.0) ** 2 <= 1).astype(np.uint8)
    lesion = _one(ellipse, spacing=(0.5, 0.5))
    assert lesion.longest_diameter_px == pytest.approx(100, abs=1)
    assert lesion.perpendicular_diameter_px == pytest.approx(36, abs=1)
    assert lesion.longest_diameter_mm == pytest.approx(50, abs=0.5)
    (a, b), (c, d) = lesion.long_axis_px, lesion.short_axis_px
    long_dir = np.subtract(b, a) / np.linalg.norm(np.subtract(b, a))
    short_dir = np.subtract(d, c) / np.linalg.norm(np.subtract(d, c))
    assert abs(float(long_dir @ short_dir)) < 0.05  # perpendicular


def test_symmetric_shapes_have_no_asymmetry_and_convex_ones_regular_borders():
    ellipse = (((YY - 100) / 20.0) ** 2 + ((XX - 100) / 50.0) ** 2 <= 1).astype(np.uint8)
    lesion = _one(ellipse)
    assert lesion.asymmetry < 0.02
    assert lesion.border_irregularity == pytest.approx(1.0, abs=0.15)
    teardrop = ellipse.copy()
    teardrop[:, 100:] = (((YY[:, 100:] - 100) / 20.0) ** 2
                         + ((XX[:, 100:] - 100) / 25.0) ** 2 <= 1)
    assert _one(teardrop).asymmetry > 0.04 > 5 * lesion.asymmetry


def test_malignant_phantoms_measure_less_compact_and_more_irregular_than_benign():
    def mean(label: str, field: str) -> float:
        values = []
        for index in range(8):
            phantom = make_phantom(3, index, label=label)
            lesions = measure_frame(phantom.image.astype(float), phantom.mask, None,
                                    spacing_mm=(0.2, 0.2))
            values.append(getattr(lesions[0], field))
        return float(np.mean(values))

    assert mean("malignant", "compactness") < mean("benign", "compactness") - 0.2
    assert mean("malignant", "border_irregularity") > mean("benign", "border_irregularity") + 1
    assert mean("malignant", "edge_sharpness") < mean("benign", "edge_sharpness")


def test_components_class_vote_minimum_size_and_order():
    classes = np.zeros((60, 60), np.uint8)
    classes[5:15, 5:15] = 1  # 100 px benign
    classes[5:8, 10:15] = 2  # a few malignant pixels inside it: benign wins the vote
    classes[30:50, 30:50] = 2  # 400 px malignant
    classes[55:57, 55:57] = 1  # 4 px: noise
    regions = find_lesions(classes, min_pixels=20)
    assert [(int(r.sum()), cls) for r, cls in regions] == [(400, 2), (100, 1)]
    probabilities = np.zeros((3, 60, 60))
    probabilities[2][classes == 2] = 0.8
    probabilities[1][classes == 1] = 0.6
    lesions = measure_frame(np.full((60, 60), 100.0), classes, probabilities,
                            spacing_mm=(1.0, 1.0), frame=3)
    assert [lesion.index for lesion in lesions] == [1, 2]
    assert lesions[0].probability == pytest.approx(0.8)
    assert lesions[0].frame == 3
    assert lesions[0].centroid_fraction == pytest.approx((39.5 / 60, 39.5 / 60))
    assert lesions[0].bbox_px == (30, 30, 49, 49)
    assert all(1 <= level <= 5 for level in lesions[0].levels.model_dump().values())
