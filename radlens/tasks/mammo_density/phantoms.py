"""Synthetic mammograms for the breast density model: seeded, deterministic, four views a patient.

Each patient has a right and a left breast, each seen craniocaudal (CC) and mediolateral oblique
(MLO). A view is a "for presentation" image (dense tissue bright, fat dark, background black):
the breast outline against the chest wall, a skin line, thinner tissue towards the edge, on MLO
the pectoral muscle in the upper chest-wall corner, and a fibroglandular pattern whose fraction
of the breast and whose texture set the BI-RADS density category:

- A, almost entirely fatty: a few thin strands, under about a quarter of the breast;
- B, scattered fibroglandular densities: small scattered islands, a quarter to a half;
- C, heterogeneously dense: large irregular patches, a half to three quarters;
- D, extremely dense: nearly uniform dense tissue, more than about 70 %.

Neighbouring categories overlap in fraction (readers disagree there too), and a breast may be a
category below its pair. Categories are drawn per patient with the real imbalance (D rare).
Each view also carries the confounders density models are known to look at instead of tissue:
the laterality and view marker (always), burned-in acquisition text, the edge of the
compression paddle, a biopsy clip, a breast implant. ``regions`` says which pixel is what
(background, breast tissue, pectoral muscle, artifact), so that where a model looked can be
checked. Patient ``p`` of seed ``s`` depends only on ``(s, p)``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from radlens.datasets.png import png_bytes

Density = Literal["A", "B", "C", "D"]
DENSITIES: tuple[Density, ...] = ("A", "B", "C", "D")
DENSITY_NAMES = {"A": "almost entirely fatty", "B": "scattered areas of fibroglandular density",
                 "C": "heterogeneously dense", "D": "extremely dense"}
# Close to screening populations: about 10 % A, 40 % B, 40 % C, 10 % D.
DEFAULT_DENSITY_MIX = (0.10, 0.42, 0.38, 0.10)
# Fraction of the breast that is fibroglandular, per category; neighbours overlap.
FRACTION_RANGE: dict[Density, tuple[float, float]] = {
    "A": (0.03, 0.27), "B": (0.20, 0.52), "C": (0.45, 0.76), "D": (0.70, 0.95)}
VIEWS: tuple[tuple[str, str], ...] = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
CONFOUNDERS = ("marker", "text", "paddle", "clip", "implant")

# values of ``regions``
BACKGROUND, TISSUE, PECTORAL, ARTIFACT = 0, 1, 2, 3


@dataclass(frozen=True)
class MammoView:
    case_id: str  # <patient>_<laterality><view>, e.g. M0000003_RMLO
    patient_id: str
    laterality: Literal["L", "R"]
    view: Literal["CC", "MLO"]
    density: Density  # this breast's category
    dense_fraction: float  # mean fibroglandular weight over the breast tissue, as drawn
    image: np.ndarray  # uint8 (H, W), for presentation: dense bright
    regions: np.ndarray  # uint8 (H, W): BACKGROUND, TISSUE, PECTORAL, ARTIFACT
    pixel_spacing_mm: float
    confounders: tuple[str, ...]


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _breast_outline(rng: np.random.Generator, view: str, height: int, width: int
                    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(breast mask, pectoral mask, nipple (y, x)) with the chest wall at x = 0."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    wobble = 1.0 + 0.03 * _smooth(rng, (height, width), max(height, width) / 6)
    if view == "CC":
        cy = height * rng.uniform(0.45, 0.55)
        ry, rx = height * rng.uniform(0.33, 0.44), width * rng.uniform(0.55, 0.82)
        inside = ((yy - cy) / ry) ** 2 + (xx / rx) ** 2 < wobble
        pectoral = np.zeros_like(inside)
        if rng.random() < 0.3:  # a sliver of pectoralis at the chest wall on some CC views
            pectoral = inside & (xx < width * rng.uniform(0.02, 0.05)) & \
                (np.abs(yy - cy) < ry * 0.4)
    else:
        cy = height * rng.uniform(0.52, 0.62)
        ry, rx = height * rng.uniform(0.45, 0.55), width * rng.uniform(0.6, 0.85)
        slant = rng.uniform(0.15, 0.35)  # the breast hangs down and out
        u = xx / rx
        v = (yy - cy + slant * xx) / ry
        inside = u ** 2 + v ** 2 < wobble
        inside |= (xx < width * rng.uniform(0.18, 0.28)) & (yy < cy)  # axillary tail
        top = height * rng.uniform(0.45, 0.65)  # pectoralis: a triangle from the top corner
        reach = width * rng.uniform(0.22, 0.38)
        pectoral = inside & (xx / reach + yy / top < 1.0)
    nipple = (float(cy), float(min(width - 1, rx * 0.98)))
    return inside, pectoral, nipple


def _fibroglandular(rng: np.random.Generator, density: Density, tissue: np.ndarray,
                    nipple: tuple[float, float], fraction: float) -> np.ndarray:
    """Dense-tissue weight 0..1 over the breast: its area is ``fraction`` of ``tissue``, its
    texture the category's."""
    height, width = tissue.shape
    scale = max(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Glandular tissue lies behind the nipple and thins out towards the chest wall and edges.
    distance = np.hypot((yy - nipple[0]) / (0.55 * height), (xx - nipple[1]) / (0.9 * width))
    prior = -1.6 * distance
    sigma = {"A": scale / 90, "B": scale / 55, "C": scale / 22, "D": scale / 14}[density]
    field = _smooth(rng, (height, width), sigma)
    if density == "A":  # strands: thin ridges of a finer field
        field = -np.abs(_smooth(rng, (height, width), scale / 60)) * 2.0 + 0.4 * field
    score = field + prior * {"A": 0.5, "B": 0.6, "C": 0.9, "D": 1.2}[density]
    values = score[tissue]
    if values.size == 0:
        return np.zeros_like(score)
    threshold = np.quantile(values, 1.0 - fraction)
    # Soft edges: glandular tissue fades into fat over a few pixels, with its own texture.
    softness = 0.18 * float(values.std())
    weight = 1.0 / (1.0 + np.exp(-(score - threshold) / max(softness, 1e-6)))
    weight *= 0.82 + 0.18 * np.clip(_smooth(rng, (height, width), scale / 120) * 0.5 + 0.5, 0, 1)
    weight = ndimage.gaussian_filter(weight.astype(np.float32), scale / 300 + 0.5)
    return np.clip(weight, 0.0, 1.0) * tissue


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int) -> None:
    font = ImageFont.load_default(size=max(8, size))
    draw.text(xy, text, fill=255, font=font)


def _confounders(rng: np.random.Generator, image: np.ndarray, regions: np.ndarray,
                 laterality: str, view: str, tissue: np.ndarray,
                 nipple: tuple[float, float]) -> list[str]:
    """Draw the marker (always) and the optional confounders into ``image`` (float 0..1) and
    mark them ARTIFACT in ``regions``; returns their names."""
    height, width = image.shape
    present = ["marker"]
    overlay = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(overlay)
    size = max(8, height // 14)
    chest_wall_right = laterality == "R"
    marker_x = int(width * rng.uniform(0.05, 0.2)) if chest_wall_right else \
        int(width * rng.uniform(0.62, 0.85)) - size
    marker_y = int(height * rng.uniform(0.03, 0.10))
    _text(draw, (marker_x, marker_y), f"{laterality}{view}", size)
    if rng.random() < 0.35:
        present.append("text")
        line = f"kVp {rng.integers(25, 33)} mAs {rng.integers(40, 160)}"
        _text(draw, (int(width * (0.05 if chest_wall_right else 0.45)),
                     int(height * rng.uniform(0.86, 0.93))), line, max(7, height // 22))
    artifact = np.asarray(overlay, dtype=np.float32) / 255.0
    if rng.random() < 0.25:
        present.append("paddle")
        row = int(height * (rng.uniform(0.04, 0.12) if rng.random() < 0.5
                            else rng.uniform(0.88, 0.96)))
        tilt = rng.uniform(-0.04, 0.04)
        for x in range(width):
            y = int(round(row + tilt * x))
            if 0 <= y < height - 1:
                artifact[y:y + 2, x] = np.maximum(artifact[y:y + 2, x], 0.7)
    if rng.random() < 0.08:
        present.append("clip")
        ys, xs = np.nonzero(tissue)
        pick = int(rng.integers(0, len(ys)))
        cy, cx = int(ys[pick]), int(xs[pick])
        half = max(1, height // 120)
        artifact[max(0, cy - 2 * half):cy + 2 * half + 1, max(0, cx - half):cx + half + 1] = 1.0
    if rng.random() < 0.03:
        present.append("implant")
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ry, rx = height * rng.uniform(0.14, 0.2), width * rng.uniform(0.18, 0.26)
        wall_x = width - 1 - rx * 0.9 if chest_wall_right else rx * 0.9
        implant = (((yy - nipple[0]) / ry) ** 2 + ((xx - wall_x) / rx) ** 2 < 1) & tissue
        artifact[implant] = np.maximum(artifact[implant], 0.93)
    marked = artifact > 0.05
    image[marked] = np.maximum(image[marked], artifact[marked])
    regions[marked] = ARTIFACT
    return present


def make_view(seed: int, patient: int, laterality: str, view: str, density: Density,
              fraction: float, *, size: int = 256) -> MammoView:
    """One view; its randomness depends on (seed, patient, laterality, view) alone."""
    rng = np.random.default_rng([seed, patient, ord(laterality), ord(view[0])])
    height, width = size, int(round(size * 0.8))
    breast, pectoral, nipple = _breast_outline(rng, view, height, width)
    tissue = breast & ~pectoral
    weight = _fibroglandular(rng, density, tissue, nipple, fraction)
    # Tissue gets thinner towards the skin: darker at the edge of the compressed breast.
    depth = ndimage.distance_transform_edt(breast)
    thickness = np.clip(depth / (0.08 * width), 0.0, 1.0) ** 0.5
    fat, dense = rng.uniform(0.22, 0.32), rng.uniform(0.72, 0.86)
    image = (fat + (dense - fat) * weight) * (0.55 + 0.45 * thickness)
    image += 0.025 * _smooth(rng, (height, width), 2.0) * breast  # parenchymal texture
    image[pectoral] = rng.uniform(0.78, 0.9) - 0.12 * (np.argwhere(pectoral)[:, 1] /
                                                       max(1, width * 0.4))
    skin = breast & ~ndimage.binary_erosion(breast, iterations=2)
    image[skin] = np.maximum(image[skin], 0.5)
    image[~breast] = 0.0
    image += rng.normal(0.0, 0.012, image.shape)  # quantum noise
    regions = np.full((height, width), BACKGROUND, dtype=np.uint8)
    regions[tissue] = TISSUE
    regions[pectoral] = PECTORAL
    if laterality == "R":  # the chest wall on the image's right for a right breast
        image, regions = image[:, ::-1].copy(), regions[:, ::-1].copy()
        tissue, weight = tissue[:, ::-1], weight[:, ::-1]
        nipple = (nipple[0], width - 1 - nipple[1])
    present = _confounders(rng, image, regions, laterality, view, tissue, nipple)
    pixels = np.clip(image, 0.0, 1.0)
    fraction_drawn = float(weight[tissue].mean()) if tissue.any() else 0.0
    patient_id = f"M{seed % 1000:03d}{patient:05d}"
    return MammoView(
        case_id=f"{patient_id}_{laterality}{view}", patient_id=patient_id,
        laterality=laterality, view=view, density=density,  # type: ignore[arg-type]
        dense_fraction=fraction_drawn,
        image=np.ascontiguousarray((pixels * 255).round().astype(np.uint8)),
        regions=np.ascontiguousarray(regions), pixel_spacing_mm=round(float(
            rng.uniform(200.0, 260.0) / height), 6), confounders=tuple(present))


def make_patient(seed: int, patient: int, *, size: int = 256,
                 mix: tuple[float, float, float, float] = DEFAULT_DENSITY_MIX
                 ) -> list[MammoView]:
    """A patient's four views (RCC, LCC, RMLO, LMLO). The patient's category is drawn from
    ``mix``; one breast is sometimes a category less dense; a breast's two views share its
    fraction."""
    rng = np.random.default_rng([seed, patient, 4])
    category = DENSITIES[int(rng.choice(4, p=np.asarray(mix) / sum(mix)))]
    low, high = FRACTION_RANGE[category]
    breasts: dict[str, tuple[Density, float]] = {}
    lesser = str(rng.choice(["L", "R"])) if category != "A" and rng.random() < 0.12 else None
    for laterality in ("R", "L"):
        own = category if laterality != lesser else DENSITIES[DENSITIES.index(category) - 1]
        low, high = FRACTION_RANGE[own]
        breasts[laterality] = (own, float(rng.uniform(low, high)))
    return [make_view(seed, patient, laterality, view, *breasts[laterality], size=size)
            for laterality, view in VIEWS]


def generate(patients: int, seed: int, *, size: int = 256,
             mix: tuple[float, float, float, float] = DEFAULT_DENSITY_MIX
             ) -> Iterator[list[MammoView]]:
    for patient in range(patients):
        yield make_patient(seed, patient, size=size, mix=mix)


def study_density(views: list[MammoView]) -> Density:
    """The study's category: the denser breast's, as readers report it."""
    return max((v.density for v in views), key=DENSITIES.index)


REGION_COLOURS = {BACKGROUND: (0, 0, 0), TISSUE: (255, 255, 255), PECTORAL: (0, 0, 255),
                  ARTIFACT: (255, 0, 255)}


def regions_to_rgb(regions: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*regions.shape, 3), dtype=np.uint8)
    for value, colour in REGION_COLOURS.items():
        rgb[regions == value] = colour
    return rgb


def write_dataset(out: Path, patients: Iterator[list[MammoView]], *, dicom: bool = False,
                  uid_seed: str = "radlens-mammo", tomosynthesis: bool = False,
                  on_patient: Callable[[list[MammoView]], None] | None = None
                  ) -> list[MammoView]:
    """Write ``images/<case>.png``, ``regions/<case>.png`` (black background, white tissue,
    blue pectoral muscle, magenta artifacts), ``labels.csv`` (and, when asked, one DICOM study
    a patient under ``dicom/<patient>/``)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "regions").mkdir(parents=True, exist_ok=True)
    written: list[MammoView] = []
    for views in patients:
        for view in views:
            (out / "images" / f"{view.case_id}.png").write_bytes(png_bytes(view.image))
            (out / "regions" / f"{view.case_id}.png").write_bytes(
                png_bytes(regions_to_rgb(view.regions)))
        if dicom:
            from radlens.tasks.mammo_density.dicom import write_mammo_study

            write_mammo_study(out / "dicom" / views[0].patient_id, views, uid_seed=uid_seed,
                              tomosynthesis=tomosynthesis)
        written.extend(views)
        if on_patient is not None:
            on_patient(views)
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "patient_id", "laterality", "view", "density",
                         "dense_fraction", "confounders", "pixel_spacing_mm"])
        for v in written:
            writer.writerow([v.case_id, v.patient_id, v.laterality, v.view, v.density,
                             f"{v.dense_fraction:.4f}", " ".join(v.confounders),
                             f"{v.pixel_spacing_mm:.6f}"])
    return written

