"""Synthetic breast-ultrasound phantoms: seeded, deterministic, in the BUS-UCLM folder layout.

Each case is a speckle-textured B-mode frame of layered breast anatomy (skin, subcutaneous fat with
hypoechoic lobules, fibroglandular tissue, pectoral muscle) with either no lesion (normal), an oval,
smooth, sharply bounded hypoechoic lesion with posterior enhancement (benign), or an irregular,
spiculated lesion with blurred margins and posterior shadowing (malignant). To keep the task honest
the classes overlap: lesion contrast and size ranges overlap, some benign lesions are lobulated or
lack enhancement, some malignant ones are small and round, and normal frames carry dark fat lobules
that look like lesions. Case ``i`` of seed ``s`` depends only on ``(s, i)``.

Masks follow the real dataset's colour code: red = malignant, green = benign, black = background.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from radlens.datasets.png import png_bytes  # noqa: F401 (re-exported)

Label = Literal["normal", "benign", "malignant"]
LABELS: tuple[Label, ...] = ("normal", "benign", "malignant")
CLASS_INDEX = {"background": 0, "benign": 1, "malignant": 2}
MASK_COLOURS = {"benign": (0, 255, 0), "malignant": (255, 0, 0)}
DEFAULT_MIX = (0.40, 0.35, 0.25)  # normal, benign, malignant
CASES_PER_PATIENT = 4


@dataclass(frozen=True)
class Phantom:
    case_id: str
    patient_id: str
    label: Label
    image: np.ndarray  # uint8, (H, W)
    mask: np.ndarray  # uint8 class indices, (H, W): 0 background, 1 benign, 2 malignant
    pixel_spacing_mm: float


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _radial_shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float,
                  cx: float, ry: float, rx: float, angle: float, irregularity: float,
                  spicules: int) -> np.ndarray:
    """Signed inside-ness of a star-shaped lesion: > 0 inside. ``irregularity`` 0 = ellipse."""
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / rx
    v = (-dx * sin + dy * cos) / ry
    radius = np.hypot(u, v)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for harmonic in range(2, 6):  # lobulation
        amp = irregularity * rng.uniform(0.02, 0.12) / harmonic ** 0.5
        boundary += amp * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    if spicules:
        phases = rng.uniform(0, 2 * np.pi, spicules)
        lengths = rng.uniform(0.15, 0.45, spicules) * irregularity
        for phase, length in zip(phases, lengths, strict=True):
            boundary += length * np.exp(-((np.angle(np.exp(1j * (theta - phase)))) / 0.08) ** 2)
    return boundary - radius


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    """Echogenicity map of layered breast anatomy, roughly 0..1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    depth = yy / size
    wave = lambda amp, freq: amp * np.sin(2 * np.pi * (xx / size) * freq  # noqa: E731
                                         + rng.uniform(0, 2 * np.pi))
    skin = rng.uniform(0.03, 0.06) + wave(0.005, rng.uniform(0.5, 1.5))
    fat_end = rng.uniform(0.22, 0.38) + wave(0.03, rng.uniform(0.8, 2.0))
    gland_end = rng.uniform(0.68, 0.85) + wave(0.04, rng.uniform(0.5, 1.5))
    echo = np.where(depth < skin, 0.85,
                    np.where(depth < fat_end, 0.32,
                             np.where(depth < gland_end, 0.62, 0.45))).astype(np.float32)
    # fibroglandular heterogeneity and Cooper's ligaments (bright oblique septa)
    echo += 0.12 * _smooth_noise(rng, (size, size), size / 40) * (depth > fat_end)
    septa = np.sin((xx * rng.uniform(0.6, 1.4) + yy) / size * rng.uniform(8, 16) * np.pi)
    echo += 0.10 * (septa > 0.93) * (depth > skin) * (depth < gland_end)
    # pectoral muscle striations
    echo += 0.08 * np.sin(yy / size * 90 + xx / size * 6) * (depth > gland_end)
    return ndimage.gaussian_filter(np.clip(echo, 0.05, 1.0), 1.0)


def _fat_lobules(rng: np.random.Generator, echo: np.ndarray, count: int) -> None:
    """Dark oval fat lobules: lesion look-alikes without a mask (hard negatives)."""
    size = echo.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(count):
        ry, rx = rng.uniform(0.03, 0.08) * size, rng.uniform(0.06, 0.14) * size
        cy, cx = rng.uniform(0.12, 0.45) * size, rng.uniform(0.1, 0.9) * size
        inside = _radial_shape(rng, yy, xx, cy, cx, ry, rx, rng.uniform(-0.3, 0.3), 0.4, 0)
        weight = ndimage.gaussian_filter((inside > 0).astype(np.float32), 2.5)
        echo *= 1 - weight * rng.uniform(0.25, 0.55)


def _lesion(rng: np.random.Generator, echo: np.ndarray, label: Label) -> np.ndarray:
    """Carve a lesion into ``echo`` (in place) and return its binary mask."""
    size = echo.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    small = rng.random() < 0.25
    base = rng.uniform(0.035, 0.07) if small else rng.uniform(0.06, 0.17)
    cy = rng.uniform(0.3, 0.65) * size
    cx = rng.uniform(0.2, 0.8) * size
    if label == "benign":
        wide = rng.uniform(1.1, 1.8)  # parallel orientation: wider than tall
        ry, rx = base * size / np.sqrt(wide), base * size * np.sqrt(wide)
        lobulated = rng.random() < 0.3
        inside = _radial_shape(rng, yy, xx, cy, cx, ry, rx, rng.uniform(-0.35, 0.35),
                               irregularity=0.9 if lobulated else 0.15, spicules=0)
        contrast = rng.uniform(0.08, 0.45)
        margin_blur = rng.uniform(0.4, 1.2)
        posterior = rng.uniform(0.15, 0.5) if rng.random() < 0.8 else rng.uniform(-0.1, 0.05)
        texture = 0.08
    else:
        tall = rng.uniform(0.8, 1.4)  # often taller than wide
        ry, rx = base * size * np.sqrt(tall), base * size / np.sqrt(tall)
        round_small = small and rng.random() < 0.4
        inside = _radial_shape(rng, yy, xx, cy, cx, ry, rx, rng.uniform(-1.2, 1.2),
                               irregularity=0.35 if round_small else rng.uniform(0.8, 1.6),
                               spicules=0 if round_small else int(rng.integers(4, 12)))
        contrast = rng.uniform(0.10, 0.50)
        margin_blur = rng.uniform(1.0, 2.5)
        posterior = -rng.uniform(0.2, 0.6) if rng.random() < 0.8 else rng.uniform(-0.05, 0.15)
        texture = 0.22
    mask = inside > 0
    if mask.sum() < 12:  # never a lesion too small to exist
        mask = np.hypot(yy - cy, xx - cx) < 3
    soft = ndimage.gaussian_filter(mask.astype(np.float32), margin_blur)
    heterogeneity = 1 + texture * _smooth_noise(rng, (size, size), 2.5)
    echo *= 1 - soft * (1 - contrast * heterogeneity)
    if label == "malignant" and rng.random() < 0.5:  # echogenic halo
        ring = ndimage.gaussian_filter(mask.astype(np.float32), margin_blur + 3) - soft
        echo += 0.25 * np.clip(ring, 0, None)
    # posterior acoustic enhancement (+) or shadowing (-) below the lesion
    columns = mask.any(axis=0).astype(np.float32)
    bottom = np.where(mask.any(axis=0), size - 1 - np.argmax(mask[::-1], axis=0), size)
    below = (yy > bottom[None, :]) * columns[None, :]
    fade = np.exp(-np.clip(yy - bottom[None, :], 0, None) / (rng.uniform(0.3, 0.8) * size))
    column_blur = ndimage.gaussian_filter(below * fade, (1.0, 3.0))
    echo *= np.clip(1 + posterior * column_blur, 0.05, None)
    return mask


def _speckle_and_scan(rng: np.random.Generator, echo: np.ndarray) -> np.ndarray:
    """Fully developed speckle, depth attenuation, time-gain compensation, log compression."""
    size = echo.shape[0]
    correlation = rng.uniform(0.6, 1.2)
    real = ndimage.gaussian_filter(rng.standard_normal((size, size)), (correlation * 0.7,
                                                                       correlation * 1.4))
    imag = ndimage.gaussian_filter(rng.standard_normal((size, size)), (correlation * 0.7,
                                                                       correlation * 1.4))
    speckle = np.hypot(real, imag)
    speckle /= speckle.mean() + 1e-8
    depth = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    attenuation = np.exp(-rng.uniform(0.6, 1.6) * depth) * (1 + rng.uniform(-0.15, 0.15) * depth)
    signal = echo * speckle * attenuation
    gain = rng.uniform(0.75, 1.25)
    image = np.log1p(rng.uniform(12, 30) * signal) / np.log1p(30) * 255 * gain
    image += rng.normal(0, rng.uniform(2, 6), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _apply_fan(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Convex probe footprint: zero everything outside a sector (in place)."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    apex_y = -rng.uniform(0.3, 0.6) * size
    half_angle = rng.uniform(0.55, 0.8)
    angle = np.arctan2(xx - size / 2, yy - apex_y)
    outside = np.abs(angle) > half_angle
    image[outside] = 0
    mask[outside] = 0


def make_phantom(seed: int, index: int, *, size: int = 256, label: Label | None = None,
                 mix: tuple[float, float, float] = DEFAULT_MIX) -> Phantom:
    """Case ``index`` of seed ``seed``; the same pair always gives the same bytes."""
    rng = np.random.default_rng([seed, index])
    chosen: Label = label or LABELS[int(rng.choice(3, p=np.asarray(mix) / sum(mix)))]
    echo = _tissue(rng, size)
    _fat_lobules(rng, echo, int(rng.integers(1, 4)) if chosen == "normal" else
                 int(rng.integers(0, 3)))
    mask = np.zeros((size, size), dtype=np.uint8)
    if chosen != "normal":
        mask[_lesion(rng, echo, chosen)] = CLASS_INDEX[chosen]
    image = _speckle_and_scan(rng, echo)
    if rng.random() < 0.3:
        _apply_fan(rng, image, mask)
    if chosen != "normal" and not mask.any():  # the fan hid the lesion: keep the label honest
        return make_phantom(seed, index + 1_000_003, size=size, label=chosen, mix=mix)
    spacing_mm = float(rng.uniform(40, 60)) / size  # a 4-6 cm field of view
    return Phantom(case_id=f"case_{index:05d}", patient_id=f"P{seed % 1000:03d}"
                   f"{index // CASES_PER_PATIENT:04d}", label=chosen, image=image, mask=mask,
                   pixel_spacing_mm=spacing_mm)


def mask_to_rgb(mask: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    for name, colour in MASK_COLOURS.items():
        rgb[mask == CLASS_INDEX[name]] = colour
    return rgb


def generate(n: int, seed: int, *, size: int = 256,
             mix: tuple[float, float, float] = DEFAULT_MIX) -> Iterator[Phantom]:
    for index in range(n):
        yield make_phantom(seed, index, size=size, mix=mix)


def write_dataset(out: Path, phantoms: Iterator[Phantom], *, dicom: bool = False,
                  uid_seed: str = "radlens-phantoms",
                  on_case: Callable[[Phantom], None] | None = None) -> list[Phantom]:
    """Write ``images/``, ``masks/``, ``labels.csv`` (and ``dicom/<case>/`` when asked)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written = []
    for phantom in phantoms:
        (out / "images" / f"{phantom.case_id}.png").write_bytes(png_bytes(phantom.image))
        (out / "masks" / f"{phantom.case_id}.png").write_bytes(png_bytes(mask_to_rgb(phantom.mask)))
        if dicom:
            from radlens.tasks.breast_us.dicom import write_phantom_study

            write_phantom_study(out / "dicom" / phantom.case_id, phantom.image,
                                spacing_mm=phantom.pixel_spacing_mm, case_id=phantom.case_id,
                                patient_id=phantom.patient_id, uid_seed=uid_seed)
        written.append(phantom)
        if on_case is not None:
            on_case(phantom)
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "patient_id", "label", "lesion_pixels", "pixel_spacing_mm"])
        for p in written:
            writer.writerow([p.case_id, p.patient_id, p.label, int((p.mask > 0).sum()),
                             f"{p.pixel_spacing_mm:.6f}"])
    return written
