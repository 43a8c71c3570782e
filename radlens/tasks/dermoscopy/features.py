"""The ABC(D) features of a pigmented lesion, measured on its mask and its RGB image, and their
five severity levels.

- **A, asymmetry**: the image inside the mask is mirrored about each of the lesion's two
  principal axes (through its centroid, along the eigenvectors of its pixels' covariance);
  ``A = sum |I - I_mirror| / sum M`` with ``I`` the lesion's grey values (0 outside the
  mask), so that both an uneven outline and unevenly placed colour count. A is the mean of the
  two axes' values; both are kept. A uniform disc gives 0.
- **B, border irregularity**: the mean curvature along the contour, ``kappa_i = |d theta_i| /
  d s_i`` (the absolute turning of the tangent per arc length), in 1/pixel, and in 1/mm when
  the pixel spacing is known. A disc of radius r gives 1/r. The contour is resampled at one
  pixel per step and smoothed along its length over ``BORDER_SMOOTHING_PX`` steps, so the
  pixel grid's staircase does not count as irregularity; a lesion wider than
  ``BORDER_GRID_PX`` pixels is traced shrunk to that width (blurred first), so that a
  4000-pixel photograph costs what a 256-pixel one does and shows no finer border than a
  lesion of that width can. Because B alone falls as a lesion grows, its
  level is set by the scale-free ``B x perimeter / 2 pi`` (the total absolute turning in
  turns): exactly 1 for any convex outline, more for a notched or wavy one.
- **C, colour variegation**: the standard deviations of hue, saturation and value inside the
  mask (HSV in 0..1). Hue is an angle and reds lie on both sides of 0, so its spread is the
  circular standard deviation (``scipy.stats.circstd``); S and V are plain population
  standard deviations. The level is set by their sum.
- **D, diameter**: the largest Feret diameter (scikit-image's ``regionprops``), in mm when the
  pixel spacing is known (otherwise not stated).

Each value is discretized into 5 levels by four cut points; ``DEFAULT_CUT_POINTS`` are the
ones stated in the shipped model's card (a model's own card may state others). scikit-image
gives the contour (``measure.find_contours``), the HSV conversion and the Feret diameter;
nothing in scikit-image, MONAI or pyradiomics computes mirror asymmetry about principal axes
or the curvature as defined here, so those two are written out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

BORDER_GRID_PX = 128.0  # a larger lesion's contour is traced shrunk to this diameter
BORDER_SMOOTHING_PX = 3.0  # Gaussian sigma along the contour, in resampled steps
# Four ascending cut points per feature: level 1 below the first, level 5 from the last on.
DEFAULT_CUT_POINTS: dict[str, tuple[float, float, float, float]] = {
    "asymmetry": (0.06, 0.09, 0.13, 0.18),
    "border": (1.1, 1.5, 2.5, 5.0),  # total absolute turning, in turns (1 = convex)
    "colour": (0.16, 0.21, 0.27, 0.34),  # sigma H + sigma S + sigma V
    "diameter_mm": (4.0, 6.0, 8.0, 10.0),  # the clinical "larger than 6 mm" among them
}
MIN_LESION_PIXELS = 16


class FeatureError(ValueError):
    """A mask the features cannot be measured on (empty, too small, not 2-D)."""


@dataclass(frozen=True)
class AbcFeatures:
    asymmetry: float  # A: mean of the two axes
    asymmetry_axes: tuple[float, float]  # about the major, then the minor principal axis
    border_per_px: float  # B, 1/pixel
    border_per_mm: float | None  # B, 1/mm (None: spacing unknown)
    border_turns: float  # B x perimeter / 2 pi: 1 for a convex outline
    hue_sd: float  # C: circular SD of hue (0..1 a turn)
    saturation_sd: float
    value_sd: float
    diameter_px: float
    diameter_mm: float | None  # D (None: spacing unknown)
    area_px: int

    @property
    def colour(self) -> float:
        """The colour score the C level is read from: the sum of the three SDs."""
        return self.hue_sd + self.saturation_sd + self.value_sd

    def levels(self, cut_points: Mapping[str, Sequence[float]] | None = None
               ) -> dict[str, int | None]:
        """The 1-5 severity level of each feature (D None when the spacing is unknown)."""
        cuts = {**DEFAULT_CUT_POINTS, **(cut_points or {})}
        return {"asymmetry": severity(self.asymmetry, cuts["asymmetry"]),
                "border": severity(self.border_turns, cuts["border"]),
                "colour": severity(self.colour, cuts["colour"]),
                "diameter_mm": (None if self.diameter_mm is None
                                else severity(self.diameter_mm, cuts["diameter_mm"]))}

    def vector(self) -> np.ndarray:
        """The features the classifier's ABC projector reads, scale-free: A (mean and each
        axis), the border's turns, the three colour SDs, and the diameter in mm (0 when
        unknown)."""
        return np.asarray([self.asymmetry, *self.asymmetry_axes, self.border_turns,
                           self.hue_sd, self.saturation_sd, self.value_sd,
                           self.diameter_mm or 0.0], dtype=np.float32)


def severity(value: float, cut_points: Sequence[float]) -> int:
    """The level 1-5 of ``value`` given four ascending cut points."""
    if len(cut_points) != 4 or list(cut_points) != sorted(cut_points):
        raise ValueError(f"cut points must be four ascending values, not {list(cut_points)}")
    return 1 + int(np.searchsorted(np.asarray(cut_points, dtype=float), value, side="right"))


def _checked(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2:
        raise FeatureError(f"the lesion mask must be 2-D, not {mask.shape}")
    region = mask.astype(bool)
    if int(region.sum()) < MIN_LESION_PIXELS:
        raise FeatureError(f"the lesion mask has {int(region.sum())} pixels; at least "
                           f"{MIN_LESION_PIXELS} are needed to measure its shape")
    return region


def principal_axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centroid (y, x) and the unit axes (2 x 2, rows: major then minor) of the mask."""
    points = np.argwhere(mask).astype(np.float64)
    centroid = points.mean(axis=0)
    covariance = np.cov((points - centroid).T)
    values, vectors = np.linalg.eigh(covariance)
    return centroid, vectors[:, np.argsort(values)[::-1]].T


def asymmetry(grey: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """A about the major and the minor principal axis (``grey`` 0..1, same shape)."""
    region = _checked(mask)
    centroid, axes = principal_axes(region)
    lesion = np.where(region, grey.astype(np.float64), 0.0)
    yy, xx = np.indices(region.shape, dtype=np.float64)
    offset = np.stack([yy - centroid[0], xx - centroid[1]])
    scores = []
    for axis in axes:  # reflect about the line through the centroid along ``axis``
        normal = np.array([-axis[1], axis[0]])
        across = normal[0] * offset[0] + normal[1] * offset[1]
        mirrored_y = yy - 2 * across * normal[0]
        mirrored_x = xx - 2 * across * normal[1]
        mirrored = ndimage.map_coordinates(lesion, [mirrored_y, mirrored_x], order=1,
                                           mode="constant", cval=0.0)
        scores.append(float(np.abs(lesion - mirrored).sum() / region.sum()))
    return scores[0], scores[1]


def outline(mask: np.ndarray) -> np.ndarray:
    """The longest closed contour of the mask, (n, 2) in (y, x) pixels of ``mask``.

    A lesion wider than ``BORDER_GRID_PX`` (its equivalent diameter) is traced shrunk to that
    width; the contour is resampled at one pixel of the grid it was traced on a step and
    smoothed along its length by ``BORDER_SMOOTHING_PX`` steps."""
    from skimage import measure

    region = _checked(mask)
    rows = np.nonzero(region.any(axis=1))[0]
    cols = np.nonzero(region.any(axis=0))[0]
    top, left = int(rows[0]), int(cols[0])
    edge = 3  # pixels around the lesion, so that a lesion at the frame's edge closes
    crop = np.pad(region[top:rows[-1] + 1, left:cols[-1] + 1].astype(np.float64), edge)
    scale = min(1.0, BORDER_GRID_PX / math.sqrt(4.0 * region.sum() / math.pi))
    if scale < 1.0:  # shrink a large lesion, blurred first so that it does not alias
        crop = ndimage.gaussian_filter(crop, 0.5 / scale)
        grid = ndimage.zoom(crop, scale, order=1, mode="nearest")
    else:
        grid = crop
    contours = measure.find_contours(grid, 0.5)
    if not contours:
        raise FeatureError("the lesion mask has no outline")
    contour = max(contours, key=len)
    if not np.allclose(contour[0], contour[-1]):
        contour = np.vstack([contour, contour[:1]])
    steps = np.hypot(*np.diff(contour, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    length = float(arc[-1])
    count = max(8, int(round(length)))
    samples = np.linspace(0.0, length, count, endpoint=False)
    resampled = np.stack([np.interp(samples, arc, contour[:, k]) for k in range(2)], axis=1)
    smoothed = ndimage.gaussian_filter1d(resampled, BORDER_SMOOTHING_PX, axis=0, mode="wrap")
    zoom = np.asarray(crop.shape, dtype=np.float64) / np.asarray(grid.shape)  # per axis
    return (smoothed + 0.5) * zoom - 0.5 + np.array([top - edge, left - edge], dtype=np.float64)


def border(mask: np.ndarray) -> tuple[float, float]:
    """(B in 1/pixel, the total absolute turning in turns)."""
    points = outline(mask)
    tangent = np.roll(points, -1, axis=0) - points
    step = np.hypot(tangent[:, 0], tangent[:, 1])
    heading = np.arctan2(tangent[:, 0], tangent[:, 1])
    turning = np.abs(np.angle(np.exp(1j * (np.roll(heading, -1) - heading))))
    # kappa_i = |d theta_i| / d s_i, averaged over the contour's points
    curvature = turning / np.maximum((step + np.roll(step, -1)) / 2, 1e-9)
    return float(curvature.mean()), float(turning.sum() / (2 * math.pi))


def colour_spread(rgb: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(sigma H circular, sigma S, sigma V) inside the mask; ``rgb`` uint8 or 0..1."""
    from skimage.color import rgb2hsv

    region = _checked(mask)
    pixels = rgb[region].astype(np.float64)
    if rgb.dtype == np.uint8:
        pixels /= 255.0
    hsv = rgb2hsv(pixels.reshape(-1, 1, 3)).reshape(-1, 3)
    hue_sd = float(stats.circstd(hsv[:, 0], high=1.0, low=0.0))
    return hue_sd, float(hsv[:, 1].std()), float(hsv[:, 2].std())


def diameter(mask: np.ndarray) -> float:
    """The largest Feret diameter in pixels (of the largest connected part)."""
    from skimage import measure

    labels = measure.label(_checked(mask))
    largest = max(measure.regionprops(labels), key=lambda r: r.area)
    return float(largest.feret_diameter_max)


def measure_abc(rgb: np.ndarray, mask: np.ndarray, *, spacing_mm: float | None = None
                ) -> AbcFeatures:
    """All of A, B, C and D of the lesion ``mask`` on ``rgb`` (H, W, 3)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != mask.shape:
        raise FeatureError(f"an RGB image of the mask's shape is needed, not {rgb.shape} for "
                           f"{mask.shape}")
    region = _checked(mask)
    scaled = rgb.astype(np.float64) / (255.0 if rgb.dtype == np.uint8 else 1.0)
    grey = scaled @ np.array([0.299, 0.587, 0.114])
    axes = asymmetry(grey, region)
    per_px, turns = border(region)
    hue_sd, saturation_sd, value_sd = colour_spread(scaled, region)
    across = diameter(region)
    known = spacing_mm is not None and spacing_mm > 0
    return AbcFeatures(
        asymmetry=float(np.mean(axes)), asymmetry_axes=axes, border_per_px=per_px,
        border_per_mm=per_px / spacing_mm if known else None, border_turns=turns,
        hue_sd=hue_sd, saturation_sd=saturation_sd, value_sd=value_sd, diameter_px=across,
        diameter_mm=across * spacing_mm if known else None, area_px=int(region.sum()))
