"""Synthetic dermoscopy images for the melanoma task: seeded, deterministic, RGB, with the
lesion's mask, which pixel is what, and the true dermoscopic descriptors of each lesion.

A case is one pigmented skin lesion seen through a contact dermatoscope: skin of a Fitzpatrick
type from I to VI (its tone, texture and creases), lit brightest at the centre of the
dermatoscope's circular field of view, and the lesion:

- nevus (the majority): near-symmetric, a regular sharp border, one or two browns shading
  concentrically, a regular pigment network fading towards the border;
- melanoma (the minority): asymmetric, an irregular and notched border, often blurred, several
  colours placed unevenly (light and dark brown, black dots and blotches, blue-gray areas, white
  regression areas, red areas), an atypical network (uneven mesh, thick broken lines), streaks
  at the periphery.

The classes overlap as in clinics: some nevi are atypical (an irregular border, three colours)
and some melanomas are featureless. Each descriptor of ``descriptors.DESCRIPTORS`` is decided
first and drawn so that it is plainly true or false, and the case records it: that is the
ground truth the descriptor retrieval is scored against. Each case may carry the confounders
models are known to take for lesion: hair crossing the lesion, ruler marks, ink marks, gel
bubbles, specular highlights, and dark vignette corners (the field of view smaller than the
frame). ``regions`` says which pixel is what (outside the field of view, skin, lesion,
artifact) so that where a model looked can be checked.

Case ``i`` of seed ``s`` depends only on ``(s, i)``; a later visit of the same lesion depends on
``(s, i, visit)`` for its acquisition (position, lighting, confounders) and shows the lesion
evolved: a melanoma grows and becomes more irregular, a nevus stays as it was.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from radlens.datasets.png import png_bytes
from radlens.tasks.dermoscopy.descriptors import COLOURS, DESCRIPTORS

Label = Literal["nevus", "melanoma"]
LABELS: tuple[Label, ...] = ("nevus", "melanoma")
DEFAULT_MIX = (0.8, 0.2)  # nevus, melanoma: melanoma the minority
LESIONS_PER_PATIENT = 2
CONFOUNDERS = ("hair", "ruler", "ink", "bubbles", "specular", "vignette")
CONFOUNDER_RATES = {"hair": 0.30, "ruler": 0.12, "ink": 0.08, "bubbles": 0.15,
                    "specular": 0.20, "vignette": 0.35}

# Skin tone (linear 0..1 RGB of the dermoscopic appearance) per Fitzpatrick type, and how often
# each type comes (a European-leaning clinic, as the public dermoscopy archives are).
SKIN_TONES: dict[int, tuple[float, float, float]] = {
    1: (0.95, 0.83, 0.76), 2: (0.90, 0.75, 0.63), 3: (0.80, 0.63, 0.48),
    4: (0.66, 0.47, 0.33), 5: (0.47, 0.32, 0.22), 6: (0.31, 0.21, 0.15)}
SKIN_MIX = (0.15, 0.30, 0.25, 0.15, 0.10, 0.05)

# The dermoscopic colours as drawn (RGB 0..1), in the order of ``descriptors.COLOURS``.
PIGMENTS: dict[str, tuple[float, float, float]] = {
    "light brown": (0.64, 0.43, 0.27), "dark brown": (0.36, 0.21, 0.12),
    "black": (0.09, 0.07, 0.07), "blue-gray": (0.44, 0.50, 0.60),
    "white": (0.92, 0.90, 0.88), "red": (0.80, 0.32, 0.32)}
SPECIAL_DESCRIPTOR = {"black": "black dots or blotches", "blue-gray": "blue-gray areas",
                      "white": "white regression areas", "red": "red areas"}

# How often each descriptor is true, per class; the pairs are given by their first member.
DESCRIPTOR_RATES: dict[Label, dict[str, float]] = {
    "melanoma": {"asymmetric shape": 0.85, "irregular border": 0.80,
                 "atypical pigment network": 0.75, "streaks": 0.40, "black": 0.40,
                 "blue-gray": 0.45, "white": 0.30, "red": 0.20, "dark brown": 0.95},
    "nevus": {"asymmetric shape": 0.08, "irregular border": 0.12,
              "atypical pigment network": 0.10, "streaks": 0.03, "black": 0.05,
              "blue-gray": 0.03, "white": 0.02, "red": 0.03, "dark brown": 0.60},
}

# values of ``regions``
OUTSIDE, SKIN, LESION, ARTIFACT = 0, 1, 2, 3
REGION_COLOURS = {OUTSIDE: (0, 0, 0), SKIN: (255, 255, 255), LESION: (0, 255, 0),
                  ARTIFACT: (255, 0, 255)}

# Where on the body (the SR's finding site, the DICOM's anatomic region): the name of its
# SNOMED CT concept in pydicom's code dictionary (``pydicom.sr.codedict.codes.SCT``).
SITES: dict[str, str] = {
    "back": "Back", "chest": "Chest", "abdomen": "Abdomen", "upper arm": "UpperArm",
    "forearm": "Forearm", "thigh": "Thigh", "lower leg": "LowerLeg", "face": "Face"}
SITE_MIX = (0.35, 0.12, 0.08, 0.10, 0.05, 0.12, 0.10, 0.08)
PAIRED_SITES = frozenset({"chest", "upper arm", "forearm", "thigh", "lower leg", "face"})


@dataclass(frozen=True)
class DermoscopyCase:
    case_id: str  # <patient>_L<lesion>[_V<visit>]
    patient_id: str
    lesion_id: str  # the patient's lesion number, the same on every visit
    visit: int  # 1, 2...: a later visit of the same lesion
    label: Label
    image: np.ndarray  # uint8 (H, W, 3) RGB
    mask: np.ndarray  # bool (H, W): the lesion
    regions: np.ndarray  # uint8 (H, W): OUTSIDE, SKIN, LESION, ARTIFACT
    pixel_spacing_mm: float
    fitzpatrick: int
    site: str  # a key of SITES
    laterality: str  # "L" or "R" on a paired site, "" on the back and abdomen
    descriptors: tuple[str, ...]  # the true descriptors, in the order of DESCRIPTORS
    colours: tuple[str, ...]  # the dermoscopic colours it shows, in the order of COLOURS
    confounders: tuple[str, ...]
    diameter_mm: float  # the lesion's largest extent, as drawn
    study_date: str  # YYYYMMDD of its visit


@dataclass(frozen=True)
class _Lesion:
    """What a lesion is, drawn once per (seed, index): every visit shows this lesion."""

    label: Label
    fitzpatrick: int
    site: str
    laterality: str
    truth: frozenset[str]  # descriptors and special colours decided true
    radius_mm: float  # mean radius
    ellipticity: float
    orientation: float
    odd: np.ndarray  # (3, 2): amplitude and phase of harmonics 1-3 (asymmetry)
    high: np.ndarray  # (n, 3): order, amplitude, phase of the border's wiggles
    notches: np.ndarray  # (n, 3): angle, depth, width
    edge: float  # border blur, as a fraction of the radius
    dark_share: float  # how much of the lesion is dark brown
    offset_angle: float  # where an uneven pigment lies
    mesh: float  # pigment network period, as a fraction of the frame
    streak_angles: np.ndarray


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _draw_lesion(rng: np.random.Generator, label: Label) -> _Lesion:
    rates = DESCRIPTOR_RATES[label]
    truth = {name for name, rate in rates.items() if rng.random() < rate}
    specials = [c for c in ("black", "blue-gray", "white", "red") if c in truth]
    if label == "melanoma" and not specials and rng.random() < 0.75:
        specials.append(str(rng.choice(["black", "blue-gray", "white", "red"])))
        truth.add(specials[-1])
    if "dark brown" not in truth and len(specials) >= 2:
        truth.add("dark brown")  # regression and blue-gray areas sit in a brown lesion
    asymmetric = "asymmetric shape" in truth
    irregular = "irregular border" in truth
    odd = np.stack([rng.uniform(0.09, 0.16, 3) if asymmetric else rng.uniform(0.0, 0.015, 3),
                    rng.uniform(0, 2 * np.pi, 3)], axis=1)
    if asymmetric:
        odd[0, 0] = rng.uniform(0.12, 0.2)  # a one-sided bulge
    wiggles = int(rng.integers(5, 9)) if irregular else 3
    high = np.stack([rng.integers(4, 13, wiggles).astype(float),
                     rng.uniform(0.02, 0.045, wiggles) if irregular
                     else rng.uniform(0.0, 0.006, wiggles),
                     rng.uniform(0, 2 * np.pi, wiggles)], axis=1)
    notches = (np.stack([rng.uniform(0, 2 * np.pi, k := int(rng.integers(1, 4))),
                         rng.uniform(0.12, 0.25, k), rng.uniform(0.08, 0.2, k)], axis=1)
               if irregular else np.zeros((0, 3)))
    radius_range = (2.6, 6.0) if label == "melanoma" else (1.6, 4.0)  # mm
    site = str(list(SITES)[int(rng.choice(len(SITES), p=SITE_MIX))])
    return _Lesion(
        label=label, fitzpatrick=int(rng.choice(6, p=SKIN_MIX)) + 1, site=site,
        laterality=str(rng.choice(["L", "R"])) if site in PAIRED_SITES else "",
        truth=frozenset(truth), radius_mm=float(rng.uniform(*radius_range)),
        ellipticity=float(rng.uniform(0.0, 0.08)), orientation=float(rng.uniform(0, np.pi)),
        odd=odd, high=high, notches=notches,
        edge=float(rng.uniform(0.06, 0.14) if irregular and rng.random() < 0.6
                   else rng.uniform(0.015, 0.03)),
        dark_share=float(rng.uniform(0.3, 0.7)), offset_angle=float(rng.uniform(0, 2 * np.pi)),
        mesh=float(rng.uniform(0.022, 0.032)),
        streak_angles=rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))


def _evolved(lesion: _Lesion, visit: int) -> _Lesion:
    """The lesion ``visit - 1`` intervals later: a melanoma grows and its border and shape
    become more irregular; a nevus does not change."""
    if lesion.label != "melanoma" or visit <= 1:
        return lesion
    steps = visit - 1
    odd = lesion.odd.copy()
    odd[:, 0] *= 1.0 + 0.25 * steps
    high = lesion.high.copy()
    high[:, 1] *= 1.0 + 0.3 * steps
    return _Lesion(**{**lesion.__dict__, "radius_mm": lesion.radius_mm * (1 + 0.15 * steps),
                      "odd": odd, "high": high})


def _boundary(lesion: _Lesion, theta: np.ndarray) -> np.ndarray:
    """The lesion's radius at each angle, relative to its mean radius."""
    relative = theta - lesion.orientation
    radius = 1.0 + lesion.ellipticity * np.cos(2 * relative)
    for k, (amplitude, phase) in enumerate(lesion.odd, 1):
        radius += amplitude * np.cos(k * theta + phase)
    for order, amplitude, phase in lesion.high:
        radius += amplitude * np.cos(order * theta + phase)
    for angle, depth, width in lesion.notches:
        gap = np.angle(np.exp(1j * (theta - angle)))
        radius -= depth * np.exp(-0.5 * (gap / width) ** 2)
    return np.maximum(radius, 0.35)


def _network(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, period: float,
             atypical: bool) -> np.ndarray:
    """Pigment-network lines 0..1: a honeycomb mesh of three waves at 120 degrees; atypical:
    an uneven mesh with thick, broken lines."""
    shape = yy.shape
    scale = 2 * np.pi / period
    if atypical:
        warp = 1.0 + 0.35 * _smooth(rng, shape, period * 2.0)
        scale = scale * warp
    phase = rng.uniform(0, 2 * np.pi, 3)
    angle = rng.uniform(0, np.pi)
    waves = sum(np.cos(scale * (xx * np.cos(angle + k * 2 * np.pi / 3) +
                                yy * np.sin(angle + k * 2 * np.pi / 3)) + phase[k])
                for k in range(3))
    width = 0.9 + (0.8 * np.clip(_smooth(rng, shape, period), 0, None) if atypical else 0.0)
    lines = ndimage.gaussian_filter(np.clip((width - waves) / 1.6, 0.0, 1.0), period / 12)
    if atypical:  # broken: the mesh stops and starts
        lines *= _smooth(rng, shape, period * 1.5) > -0.6
    return lines.astype(np.float32)


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          reach: float, inside: np.ndarray) -> np.ndarray:
    """A soft irregular patch 0..1 of about ``reach`` pixels somewhere inside the lesion."""
    ys, xs = np.nonzero(inside)
    if ys.size == 0:
        return np.zeros(yy.shape, dtype=np.float32)
    pick = int(rng.integers(0, ys.size))
    by, bx = float(ys[pick]), float(xs[pick])
    distance = np.hypot(yy - by, xx - bx) / reach
    patch = np.clip(1.2 - distance + 0.35 * _smooth(rng, yy.shape, reach / 3), 0, 1)
    return (patch * inside).astype(np.float32)


def _pigment(rng: np.random.Generator, lesion: _Lesion, yy: np.ndarray, xx: np.ndarray,
             cy: float, cx: float, rho: np.ndarray, inside: np.ndarray, size: int,
             reach: float, tone: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The lesion's colour (H, W, 3) and the dermoscopic colours it shows (``reach``: its
    mean radius in pixels). Pigment is darker than the skin around it whatever the skin's
    type: on dark skin a "light brown" lesion is a darker brown than on fair skin."""
    light = np.minimum(np.asarray(PIGMENTS["light brown"], np.float32),
                       tone * 0.72) * rng.uniform(0.92, 1.08)
    dark = np.minimum(np.asarray(PIGMENTS["dark brown"], np.float32),
                      tone * 0.45) * rng.uniform(0.9, 1.1)
    colours = ["light brown"]
    if "dark brown" in lesion.truth:
        colours.append("dark brown")
        if "asymmetric shape" in lesion.truth or lesion.label == "melanoma":
            # uneven: the dark part lies to one side, in an irregular patch
            direction = ((xx - cx) * np.cos(lesion.offset_angle) +
                         (yy - cy) * np.sin(lesion.offset_angle)) / reach
            share = 1 / (1 + np.exp(-(2.5 * direction + 1.2 * _smooth(
                rng, yy.shape, reach / 3) - (lesion.dark_share - 0.5) * 3)))
        else:  # concentric: darker at the centre
            share = np.clip(1.0 - rho / (0.5 + lesion.dark_share * 0.6), 0, 1) ** 0.8
        colour = light + (dark - light) * share[..., None]
    else:
        colour = np.broadcast_to(light, (*yy.shape, 3)).copy()
    core = inside & (rho < 0.8)
    for name in ("blue-gray", "white", "red"):
        if name in lesion.truth:
            weight = _blob(rng, yy, xx, cy, cx, reach * rng.uniform(0.3, 0.5), core)
            weight = np.clip(weight * 1.6, 0, 0.95)
            colour = colour + (np.asarray(PIGMENTS[name], np.float32) - colour) * weight[..., None]
            colours.append(name)
    if "black" in lesion.truth:
        black = np.asarray(PIGMENTS["black"], np.float32)
        dots = np.zeros(yy.shape, dtype=np.float32)
        ys, xs = np.nonzero(core)
        if ys.size:
            for _ in range(int(rng.integers(6, 18))):  # dots and globules, clustered
                k = int(rng.integers(0, ys.size))
                r = rng.uniform(0.012, 0.03) * size
                dots = np.maximum(dots, np.clip(1.5 - np.hypot(yy - ys[k], xx - xs[k]) / r,
                                                0, 1))
            if lesion.label == "melanoma" and rng.random() < 0.5:  # and an off-centre blotch
                dots = np.maximum(dots, np.clip(_blob(rng, yy, xx, cy, cx, reach * 0.28, core)
                                                * 1.8, 0, 1))
        colour = colour + (black - colour) * (0.9 * dots * inside)[..., None]
        colours.append("black")
    order = {name: k for k, name in enumerate(COLOURS)}
    return colour, sorted(colours, key=order.__getitem__)


def paint_hair(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Curved dark strands crossing the frame (and the lesion)."""
    for _ in range(int(rng.integers(3, 14))):
        start = rng.uniform(-0.1, 1.1, 2) * size
        end = rng.uniform(-0.1, 1.1, 2) * size
        bend = (start + end) / 2 + rng.normal(0, 0.15, 2) * size
        t = np.linspace(0, 1, 40)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
        shade = int(rng.integers(10, 60))
        draw.line([tuple(p) for p in points], fill=(shade, shade * 3 // 4, shade // 2, 255),
                  width=max(1, int(round(size / 256 * rng.uniform(1.0, 2.2)))))


def _ruler(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int,
           spacing_mm: float) -> None:
    """A millimetre scale along one edge: a line with a tick each millimetre."""
    tick = 1.0 / spacing_mm
    edge = int(rng.integers(0, 4))
    offset = size * rng.uniform(0.08, 0.16)
    start, stop = size * rng.uniform(0.15, 0.3), size * rng.uniform(0.7, 0.85)
    colour = (20, 20, 20, 255) if rng.random() < 0.7 else (235, 235, 235, 255)
    width = max(1, size // 256)

    def place(along: float, across: float) -> tuple[float, float]:
        if edge == 0:
            return along, across
        if edge == 1:
            return along, size - 1 - across
        if edge == 2:
            return across, along
        return size - 1 - across, along

    draw.line([place(start, offset), place(stop, offset)], fill=colour, width=width)
    for k, along in enumerate(np.arange(start, stop, tick)):
        length = size * (0.035 if k % 5 == 0 else 0.018)
        draw.line([place(along, offset), place(along, offset + length)], fill=colour,
                  width=width)


def paint_ink(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, cy: float,
         cx: float, reach: float) -> None:
    """A surgical marker's purple dots or arc beside the lesion."""
    colour = (int(rng.integers(70, 110)), int(rng.integers(30, 60)),
              int(rng.integers(120, 170)), 235)
    width = max(2, int(size * rng.uniform(0.01, 0.02)))
    distance = reach * rng.uniform(1.25, 1.6)
    if rng.random() < 0.5:
        start = float(rng.uniform(0, 360))
        box = [cx - distance, cy - distance, cx + distance, cy + distance]
        draw.arc(box, start, start + float(rng.uniform(60, 160)), fill=colour, width=width)
    else:
        for angle in rng.uniform(0, 2 * np.pi, int(rng.integers(2, 5))):
            y, x = cy + distance * np.sin(angle), cx + distance * np.cos(angle)
            r = width * 1.2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _bubbles(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Immersion-gel bubbles: bright rims with a glint."""
    for _ in range(int(rng.integers(1, 7))):
        y, x = rng.uniform(0.1, 0.9, 2) * size
        r = size * rng.uniform(0.015, 0.06)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(245, 245, 245, 200),
                     width=max(1, int(r / 6)))
        g = max(1.0, r / 4)
        draw.ellipse([x - r / 2 - g, y - r / 2 - g, x - r / 2 + g, y - r / 2 + g],
                     fill=(255, 255, 255, 230))


def _specular(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, cy: float,
              cx: float, reach: float) -> None:
    """Specular highlights: small saturated white spots, some on the lesion."""
    for _ in range(int(rng.integers(2, 9))):
        y = cy + rng.normal(0, reach)
        x = cx + rng.normal(0, reach)
        ry, rx = size * rng.uniform(0.004, 0.012, 2)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=(255, 255, 255, 255))


def make_case(seed: int, index: int, *, size: int = 256, visit: int = 1,
              label: Label | None = None, mix: tuple[float, float] = DEFAULT_MIX
              ) -> DermoscopyCase:
    """Case ``index`` of seed ``seed`` at ``visit``; the same arguments give the same bytes."""
    rng = np.random.default_rng([seed, index])
    chosen: Label = label or LABELS[int(rng.choice(2, p=np.asarray(mix) / sum(mix)))]
    lesion = _evolved(_draw_lesion(rng, chosen), visit)
    shot = np.random.default_rng([seed, index, visit])  # this visit's acquisition
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2
    cy, cx = centre + shot.normal(0, 0.05, 2) * size
    # The dermatoscope's field: lit brightest at its centre; with "vignette" the circle is
    # smaller than the frame and the corners are black.
    confounders = [name for name in CONFOUNDERS if shot.random() < CONFOUNDER_RATES[name]]
    field_radius = size * (shot.uniform(0.47, 0.52) if "vignette" in confounders
                           else shot.uniform(0.72, 0.8))
    from_centre = np.hypot(yy - centre, xx - centre)
    in_view = from_centre < field_radius
    light = np.clip(1.0 - 0.35 * (from_centre / field_radius) ** 4, 0.0, 1.0)

    tone = np.asarray(SKIN_TONES[lesion.fitzpatrick], np.float32) * shot.uniform(0.94, 1.06, 3)
    skin = tone * (1.0 + 0.04 * _smooth(shot, (size, size), size / 12))[..., None]
    skin *= (1.0 - 0.025 * np.clip(_smooth(shot, (size, size), size / 40), 0, None))[..., None]
    creases = np.abs(np.sin((xx * np.cos(1.1) + yy * np.sin(1.1)) / size * 40 +
                            2.0 * _smooth(shot, (size, size), size / 10)))
    skin *= (1.0 - 0.035 * (creases < 0.12))[..., None]
    erythema = np.clip(_smooth(shot, (size, size), size / 8), 0, None)[..., None]
    skin = skin + 0.03 * erythema * np.asarray([0.6, -0.3, -0.3], np.float32)

    theta = np.arctan2(yy - cy, xx - cx)
    # A field of view of 18-24 mm across the frame; the lesion keeps its size in mm from
    # visit to visit (as far as the field holds it).
    spacing_mm = round(float(shot.uniform(18.0, 24.0)) / size, 6)
    radius_px = min(lesion.radius_mm / spacing_mm, 0.36 * size)
    rho = np.hypot(yy - cy, xx - cx) / (radius_px * _boundary(lesion, theta))
    inside = rho < 1.0
    colour, colours = _pigment(rng, lesion, yy, xx, cy, cx, rho, inside, size, radius_px,
                               tone)
    streaks = np.zeros_like(inside)
    if "streaks" in lesion.truth:  # radial lines from the periphery out, part of the lesion
        for angle in lesion.streak_angles:
            gap = np.abs(np.angle(np.exp(1j * (theta - angle))))
            along = np.hypot(yy - cy, xx - cx) * gap
            streaks |= (along < max(1.0, size / 256 * 1.6)) & (rho > 0.7) & \
                (rho < 1.0 + rng.uniform(0.12, 0.25))
        inside |= streaks
    atypical = "atypical pigment network" in lesion.truth
    net = _network(rng, yy, xx, lesion.mesh * size, atypical)
    fade = np.clip((1.0 - rho) / 0.35, 0, 1) if not atypical else np.clip((1.1 - rho) / 0.3, 0, 1)
    colour = colour * (1.0 - 0.3 * net * fade)[..., None]
    streak_only = inside & (rho >= 1.0)
    dark = np.asarray(PIGMENTS["dark brown"], np.float32)
    colour[streaks] = colour[streaks] * 0.25 + dark * 0.75

    alpha = np.clip((1.0 - rho) / (2 * lesion.edge) + 0.5, 0.0, 1.0)
    alpha = np.maximum(alpha, streak_only.astype(np.float32))[..., None] * 0.92
    image = skin * (1 - alpha) + colour * alpha
    image = image * light[..., None]
    image += shot.normal(0, 0.012, image.shape).astype(np.float32)
    image[~in_view] *= 0.06  # the dark rim beyond the dermatoscope's glass

    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for name in confounders:
        if name == "hair":
            paint_hair(shot, draw, size)
        elif name == "ruler":
            _ruler(shot, draw, size, spacing_mm)
        elif name == "ink":
            paint_ink(shot, draw, size, cy, cx, radius_px)
        elif name == "bubbles":
            _bubbles(shot, draw, size)
        elif name == "specular":
            _specular(shot, draw, size, cy, cx, radius_px)
    drawn = np.asarray(overlay, dtype=np.float32) / 255.0
    cover = drawn[..., 3:4] * in_view[..., None]
    image = image * (1 - cover) + drawn[..., :3] * cover
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    mask = inside & in_view
    regions = np.full((size, size), OUTSIDE, dtype=np.uint8)
    regions[in_view] = SKIN
    regions[mask] = LESION
    regions[(cover[..., 0] > 0.25)] = ARTIFACT
    descriptors = _descriptors(lesion, colours)
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 if rows.size else 0
    patient = index // LESIONS_PER_PATIENT
    patient_id = f"D{seed % 1000:03d}{patient:05d}"
    lesion_id = str(index % LESIONS_PER_PATIENT + 1)
    case_id = f"{patient_id}_L{lesion_id}" + (f"_V{visit}" if visit > 1 else "")
    day = 1 + (visit - 1) * 180  # follow-up visits six months apart
    study_date = (np.datetime64("2026-01-01") + np.timedelta64(day - 1, "D")).astype(str)
    return DermoscopyCase(
        case_id=case_id, patient_id=patient_id, lesion_id=lesion_id, visit=visit,
        label=chosen, image=np.ascontiguousarray(pixels), mask=mask, regions=regions,
        pixel_spacing_mm=spacing_mm, fitzpatrick=lesion.fitzpatrick, site=lesion.site,
        laterality=lesion.laterality,
        descriptors=descriptors, colours=tuple(colours), confounders=tuple(confounders),
        diameter_mm=round(float(extent) * spacing_mm, 3),
        study_date=study_date.replace("-", ""))


def _descriptors(lesion: _Lesion, colours: list[str]) -> tuple[str, ...]:
    truth = {"asymmetric shape" if "asymmetric shape" in lesion.truth else "symmetric shape",
             "irregular border" if "irregular border" in lesion.truth else "regular border",
             "multiple colours" if len(colours) >= 3 else "one or two colours",
             "atypical pigment network" if "atypical pigment network" in lesion.truth
             else "regular pigment network"}
    truth |= {SPECIAL_DESCRIPTOR[c] for c in colours if c in SPECIAL_DESCRIPTOR}
    if "streaks" in lesion.truth:
        truth.add("streaks")
    return tuple(d for d in DESCRIPTORS if d in truth)


def generate(n: int, seed: int, *, size: int = 256, visits: int = 1,
             mix: tuple[float, float] = DEFAULT_MIX) -> Iterator[DermoscopyCase]:
    """``n`` lesions, each seen on ``visits`` visits (its visits one after the other)."""
    for index in range(n):
        for visit in range(1, visits + 1):
            yield make_case(seed, index, size=size, visit=visit, mix=mix)


def regions_to_rgb(regions: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*regions.shape, 3), dtype=np.uint8)
    for value, colour in REGION_COLOURS.items():
        rgb[regions == value] = colour
    return rgb


LABEL_COLUMNS = ("case_id", "patient_id", "lesion_id", "visit", "label", "fitzpatrick", "site",
                 "laterality", "diameter_mm", "pixel_spacing_mm", "descriptors", "colours",
                 "confounders", "study_date")


def write_dataset(out: Path, cases: Iterator[DermoscopyCase], *, dicom: bool = False,
                  uid_seed: str = "radlens-dermoscopy",
                  on_case: Callable[[DermoscopyCase], None] | None = None
                  ) -> list[str]:
    """Write ``images/<case>.png`` (RGB), ``masks/<case>.png`` (white lesion on black),
    ``regions/<case>.png`` (black outside the field of view, white skin, green lesion,
    magenta artifacts), ``labels.csv`` (descriptors, colours and confounders separated by
    ``;``) and, when asked, one DICOM study a case under ``dicom/<case>/``. Cases are written
    as they come, so memory holds one case, not the dataset; returns the case ids."""
    for folder in ("images", "masks", "regions"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    for case in cases:
        (out / "images" / f"{case.case_id}.png").write_bytes(png_bytes(case.image))
        (out / "masks" / f"{case.case_id}.png").write_bytes(
            png_bytes(case.mask.astype(np.uint8) * 255))
        (out / "regions" / f"{case.case_id}.png").write_bytes(
            png_bytes(regions_to_rgb(case.regions)))
        if dicom:
            from radlens.tasks.dermoscopy.dicom import write_dermoscopy_study

            write_dermoscopy_study(out / "dicom" / case.case_id, case, uid_seed=uid_seed)
        rows.append([case.case_id, case.patient_id, case.lesion_id, str(case.visit), case.label,
                     str(case.fitzpatrick), case.site, case.laterality,
                     f"{case.diameter_mm:.3f}",
                     f"{case.pixel_spacing_mm:.6f}", ";".join(case.descriptors),
                     ";".join(case.colours), ";".join(case.confounders), case.study_date])
        if on_case is not None:
            on_case(case)
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    return [row[0] for row in rows]
