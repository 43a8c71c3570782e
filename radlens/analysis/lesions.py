"""Per-lesion measurements: size, shape, border and intensity descriptors (docs/method.md).

Connected components of a predicted class map become lesions. The perimeter is the length of the
marching-squares contour (scikit-image), in millimetres when the spacing is known; SimpleITK's
label shape statistics give the elongation; the longest diameter and the widest chord
perpendicular to it come from calipers on pixel centres; edge sharpness is the mean gradient
magnitude on the lesion's boundary; asymmetry mirrors the mask about its principal axes; the
border's mean absolute curvature is reported per pixel and as border irregularity, the total
absolute turning of the smoothed contour over 2*pi (1 for any convex outline, more for lobulated
or spiculated borders). Millimetre values are None when the spacing is unknown: never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage import measure

from radlens.findings import LesionClass, LesionMeasurements, Levels

CLASS_NAMES: dict[int, LesionClass] = {1: "benign", 2: "malignant"}


@dataclass(frozen=True)
class Scale:
    """Five-level discretisation: ``edges`` are the four boundaries between levels 1..5."""

    edges: tuple[float, float, float, float]

    def level(self, value: float | None) -> int | None:
        if value is None or not math.isfinite(value):
            return None
        return 1 + sum(value >= edge for edge in self.edges)


# Fixed, documented bins so reports mean the same thing across studies.
SCALES = {
    "longest_diameter_mm": Scale((5.0, 10.0, 20.0, 40.0)),
    "area_fraction": Scale((0.005, 0.02, 0.05, 0.10)),  # when spacing is unknown
    "compactness": Scale((0.5, 0.7, 0.8, 0.9)),  # higher = more regular
    "edge_sharpness": Scale((5.0, 10.0, 20.0, 35.0)),  # grey levels per pixel (8-bit scale)
    "asymmetry": Scale((0.05, 0.10, 0.20, 0.35)),
    "border_irregularity": Scale((1.2, 1.6, 2.2, 3.0)),
    "intensity_std": Scale((5.0, 10.0, 20.0, 35.0)),
}


def find_lesions(classes: np.ndarray, *, min_pixels: int = 20) -> list[tuple[np.ndarray, int]]:
    """Connected lesion regions (8-connected, any lesion class) with their majority class,
    largest first; regions under ``min_pixels`` are noise."""
    labelled, count = ndimage.label(classes > 0, structure=np.ones((3, 3), dtype=bool))
    regions = []
    for label in range(1, count + 1):
        region = labelled == label
        size = int(region.sum())
        if size < min_pixels:
            continue
        votes = np.bincount(classes[region].astype(np.int64), minlength=3)
        regions.append((region, int(np.argmax(votes[1:]) + 1), size))
    regions.sort(key=lambda r: -r[2])
    return [(region, cls) for region, cls, _ in regions]


def measure_frame(image: np.ndarray, classes: np.ndarray, probabilities: np.ndarray | None,
                  *, spacing_mm: tuple[float, float] | None, frame: int = 0,
                  min_pixels: int = 20) -> list[LesionMeasurements]:
    """Every lesion of one frame. ``image`` is (H, W) or (H, W, channels); ``probabilities``
    (3, H, W) from the model, or None (probability reported as 1)."""
    return measure_regions(image, find_lesions(classes, min_pixels=min_pixels), probabilities,
                           spacing_mm=spacing_mm, frame=frame)


def measure_regions(image: np.ndarray, regions: list[tuple[np.ndarray, int]],
                    probabilities: np.ndarray | None, *,
                    spacing_mm: tuple[float, float] | None,
                    frame: int = 0) -> list[LesionMeasurements]:
    """The lesions ``find_lesions`` returned, measured in the same order (index 1 first)."""
    grey = image if image.ndim == 2 else image.mean(axis=-1)
    channels = image[..., None] if image.ndim == 2 else image
    gradient = np.hypot(*np.gradient(grey.astype(np.float64)))
    lesions = []
    for index, (region, cls) in enumerate(regions, start=1):
        probability = (float(probabilities[cls][region].mean()) if probabilities is not None
                       else 1.0)
        malignant = (float(probabilities[2][region].mean()) if probabilities is not None
                     else None)
        lesion = _measure(region, cls, probability, channels, gradient, spacing_mm, frame, index)
        if malignant is not None:
            lesion = lesion.model_copy(update={
                "malignant_probability": min(max(malignant, 0.0), 1.0)})
        lesions.append(lesion)
    return lesions


def _measure(region: np.ndarray, cls: int, probability: float, channels: np.ndarray,
             gradient: np.ndarray, spacing_mm: tuple[float, float] | None, frame: int,
             index: int) -> LesionMeasurements:
    rows, columns = region.shape
    elongation = _elongation(region)
    contour = _outer_contour(region)
    perimeter_px = _length(contour, (1.0, 1.0))
    curvature, irregularity = _curvature(contour)
    area_px = int(region.sum())
    pixel_area = spacing_mm[0] * spacing_mm[1] if spacing_mm else None
    boundary = region & ~ndimage.binary_erosion(region, border_value=0)
    (long_a, long_b), (short_a, short_b) = _axes(region)
    long_px = float(np.hypot(*np.subtract(long_a, long_b)))
    short_px = float(np.hypot(*np.subtract(short_a, short_b)))
    centroid = ndimage.center_of_mass(region)
    pixels = channels[region].astype(np.float64)
    compactness = 4 * math.pi * area_px / perimeter_px ** 2 if perimeter_px else 0.0
    row_min, col_min = np.argwhere(region).min(axis=0)
    row_max, col_max = np.argwhere(region).max(axis=0)
    measurements = dict(
        index=index, frame=frame, lesion_class=CLASS_NAMES[cls],
        probability=min(max(probability, 0.0), 1.0),
        area_px=area_px,
        area_mm2=area_px * pixel_area if pixel_area else None,
        perimeter_px=perimeter_px,
        perimeter_mm=_length(contour, spacing_mm) if spacing_mm else None,
        compactness=float(compactness),
        edge_sharpness=float(gradient[boundary].mean()),
        centroid_fraction=(float(centroid[1] / columns), float(centroid[0] / rows)),
        centroid_px=(float(centroid[0]), float(centroid[1])),
        bbox_px=(int(row_min), int(col_min), int(row_max), int(col_max)),
        longest_diameter_px=long_px,
        longest_diameter_mm=_length_mm(long_a, long_b, spacing_mm),
        perpendicular_diameter_px=short_px,
        perpendicular_diameter_mm=_length_mm(short_a, short_b, spacing_mm),
        long_axis_px=(tuple(map(float, long_a)), tuple(map(float, long_b))),
        short_axis_px=(tuple(map(float, short_a)), tuple(map(float, short_b))),
        elongation=elongation,
        asymmetry=asymmetry(region),
        mean_abs_curvature_px=curvature,
        border_irregularity=irregularity,
        intensity_mean=[float(v) for v in pixels.mean(axis=0)],
        intensity_std=[float(v) for v in pixels.std(axis=0)],
    )
    size_level = (SCALES["longest_diameter_mm"].level(measurements["longest_diameter_mm"])
                  if spacing_mm else SCALES["area_fraction"].level(area_px / region.size))
    levels = Levels(
        size=size_level,
        compactness=SCALES["compactness"].level(measurements["compactness"]),
        edge_sharpness=SCALES["edge_sharpness"].level(measurements["edge_sharpness"]),
        asymmetry=SCALES["asymmetry"].level(measurements["asymmetry"]),
        border_irregularity=SCALES["border_irregularity"].level(
            measurements["border_irregularity"]),
        intensity_variation=SCALES["intensity_std"].level(max(measurements["intensity_std"])),
    )
    return LesionMeasurements(**measurements, levels=levels)


def _elongation(region: np.ndarray) -> float:
    """Major over minor principal moment ratio, from SimpleITK's label shape statistics."""
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(sitk.GetImageFromArray(np.pad(region, 1).astype(np.uint8)))
    return float(statistics.GetElongation(1))


def _outer_contour(region: np.ndarray) -> np.ndarray:
    """The outer boundary as a closed polyline of (row, column) points at the 0.5 level."""
    contours = measure.find_contours(np.pad(region, 1).astype(np.float64), 0.5)
    contour = max(contours, key=len) - 1.0
    if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
        contour = contour[:-1]  # find_contours repeats the start of a closed contour
    return contour


def _length(contour: np.ndarray, spacing: tuple[float, float]) -> float:
    """Closed-contour length after a 1-pixel smoothing, which removes the staircase that would
    otherwise lengthen every curved border by about 5 %."""
    smooth = ndimage.gaussian_filter1d(contour, 1.0, axis=0, mode="wrap")
    steps = np.diff(np.vstack([smooth, smooth[:1]]), axis=0) * np.asarray(spacing)
    return float(np.hypot(steps[:, 0], steps[:, 1]).sum())


def _curvature(contour: np.ndarray, smoothing_px: float = 3.0) -> tuple[float, float]:
    """(mean |curvature| per pixel, total absolute turning / 2*pi) of the smoothed contour.

    Curvature is the change of tangent angle per arc length; the turning of each segment is
    wrapped to (-pi, pi], so a convex outline turns 2*pi in all and scores 1.
    """
    if len(contour) < 8:
        return 0.0, 1.0
    smooth = ndimage.gaussian_filter1d(contour, smoothing_px, axis=0, mode="wrap")
    segments = np.roll(smooth, -1, axis=0) - smooth
    heading = np.arctan2(segments[:, 0], segments[:, 1])
    turning = np.abs(np.angle(np.exp(1j * (np.roll(heading, -1) - heading))))
    arc = float(np.hypot(segments[:, 0], segments[:, 1]).sum())
    total = float(turning.sum())
    return total / max(arc, 1e-9), total / (2 * np.pi)


def _length_mm(a: tuple[float, float], b: tuple[float, float],
               spacing_mm: tuple[float, float] | None) -> float | None:
    if not spacing_mm:
        return None
    return float(np.hypot((a[0] - b[0]) * spacing_mm[0], (a[1] - b[1]) * spacing_mm[1]))


def _outline_points(region: np.ndarray) -> np.ndarray:
    """Convex-hull vertices of the lesion's pixel centres (what the calipers touch)."""
    centres = np.argwhere(region).astype(np.float64)
    try:
        return centres[ConvexHull(centres).vertices]
    except QhullError:  # a line of pixels, or a single one
        return centres


def _axes(region: np.ndarray) -> tuple[tuple[tuple[float, float], tuple[float, float]],
                                       tuple[tuple[float, float], tuple[float, float]]]:
    """Longest diameter (the widest caliper pair on the hull of pixel centres) and the longest
    chord perpendicular to it, each as two end points (row, column).

    The perpendicular chord is found on pixel centres too: centres are binned by position along
    the long axis (1-pixel bins) and the bin with the widest spread across the axis wins.
    """
    points = _outline_points(region)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    i, j = np.unravel_index(np.argmax(distances), distances.shape)
    a, b = points[i], points[j]
    direction = (b - a) / max(float(np.linalg.norm(b - a)), 1e-9)
    normal = np.array([-direction[1], direction[0]])
    centres = np.argwhere(region).astype(np.float64)
    along = (centres - a) @ direction
    across = (centres - a) @ normal
    bins, inverse = np.unique(np.round(along).astype(np.int64), return_inverse=True)
    low = np.full(len(bins), np.inf)
    high = np.full(len(bins), -np.inf)
    np.minimum.at(low, inverse, across)
    np.maximum.at(high, inverse, across)
    widest = int(np.argmax(high - low))
    base = a + direction * float(bins[widest])
    short_a, short_b = base + normal * low[widest], base + normal * high[widest]
    return (tuple(a), tuple(b)), (tuple(short_a), tuple(short_b))


def asymmetry(region: np.ndarray) -> float:
    """|M - mirror(M)| summed over the image, over the mask area, averaged over the mirrors
    about the two principal axes through the centroid. 0 for a shape symmetric about both."""
    properties = measure.regionprops(region.astype(np.uint8))[0]
    centre = np.array(properties.centroid)
    theta = properties.orientation  # angle between the row axis and the major axis
    axis = np.array([math.cos(theta), math.sin(theta)])
    values = []
    for mirror_axis in (axis, np.array([-axis[1], axis[0]])):
        # Reflection about a line through ``centre`` along ``mirror_axis``: x' = R (x - c) + c
        reflect = 2 * np.outer(mirror_axis, mirror_axis) - np.eye(2)
        offset = centre - reflect @ centre
        mirrored = ndimage.affine_transform(region.astype(np.float64), reflect, offset=offset,
                                            order=0, mode="constant")
        values.append(np.abs(region - mirrored).sum() / region.sum())
    return float(np.mean(values))
