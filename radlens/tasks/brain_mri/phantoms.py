"""Seeded contrast-enhanced T1 brain volumes with tumours of the three published classes, or
none, made from the MNI152 template so that the atlas structures a tumour occupies are known.

Each case is drawn in MNI space (1 mm, the template's grid), where the Harvard-Oxford label
map lies, and then seen by a scanner in its patient's own pose:

- **the head**: the template's brain, with the layers a skull-stripped template lacks laid
  around it (cerebrospinal fluid, the skull's dark cortex and brighter marrow, the scalp's
  fat), since real series have them and registration has to cope with them;
- **the tumour** (science's appearance on T1 after contrast):
  glioma, intra-axial in the white matter, an irregular rim-enhancing mass with a necrotic
  centre inside hypointense oedema; meningioma, extra-axial on the brain's surface, a
  homogeneously enhancing, well-circumscribed mass pressing into the brain, often with a
  dural tail (a thin enhancing strip along the surface beside it); pituitary, in the sella
  in the midline, homogeneously enhancing, growing upwards; or no tumour;
- **the contrasts**: T1 after contrast (what the task reads), the same T1 before it (the
  tumour without its enhancement) and T2 (fluid, oedema and necrosis bright, white matter
  dark), so that a study has the series a scanner sends beside the one the task reads;
- **the scan**: a rigid pose and a scale of the head (the patient's own size and position in
  the scanner), axial slices 1 to 6 mm thick (the slice profile blurs along the slice
  direction), a field of view of 220 mm on a ``size``-pixel matrix, a smooth multiplicative
  bias field, and Rician noise (the magnitude of complex Gaussian noise).

The true mask (``CORE`` for the enhancing tumour with its necrosis, ``OEDEMA`` for the oedema)
comes out on the scan's grid; the atlas structures the tumour core occupies, each with its
share, its side and its volume in mL are measured in MNI space, where they are exact, and
the volume in the patient's size. Seeded: the same seed and index give the same case.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from radlens.tasks.brain_mri.atlas import Atlas, load_atlas, occupancy

log = logging.getLogger(__name__)

LABELS = ("glioma", "meningioma", "pituitary", "no tumour")
MIX = (0.3, 0.25, 0.2, 0.25)
CORE, OEDEMA = 1, 2  # the mask's values
CONTRASTS = ("T1+C", "T1", "T2")  # T1 after contrast, before it, and T2
FIELD_OF_VIEW_MM = 220.0
COVERAGE_MM = 168.0  # the slab's extent along the slices' normal
THICKNESSES_MM = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0)
MIN_SHARE = 0.02  # a structure holding less of the tumour is not listed
SELLA_RAS_MM = (0.0, 2.0, -30.0)  # the pituitary fossa's top, in MNI coordinates (RAS)


@dataclass(frozen=True)
class Pose:
    """How the patient's head sits in the scanner relative to MNI space."""

    angles_deg: tuple[float, float, float]  # about the scanner's x, y, z axes
    scale: float  # the head's size relative to the template's
    shift_mm: tuple[float, float, float]


@dataclass(frozen=True)
class BrainCase:
    case_id: str
    patient_id: str
    label: str
    images: dict[str, object]  # each of CONTRASTS: SimpleITK.Image, int16, on one grid
    mask: object  # SimpleITK.Image, uint8, CORE / OEDEMA on the scan's grid
    structures: tuple[tuple[str, float], ...]  # (structure label, share of the core)
    side: str  # "left", "right", "midline" or "" (no tumour)
    core_ml: float  # the core's volume in the patient's size
    slice_thickness_mm: float
    pixel_spacing_mm: float
    pose: Pose

    @property
    def image(self) -> object:
        """The T1 after contrast: what the task reads."""
        return self.images["T1+C"]


@dataclass
class Head:
    """One head in MNI space, arrays (z, y, x) on the template's grid: the T1 intensities
    before contrast (white matter near 1), what gadolinium adds to them, and the T2
    intensities (fluid near 1.4)."""

    t1: np.ndarray
    enhancement: np.ndarray
    t2: np.ndarray

    def copy(self) -> Head:
        return Head(self.t1.copy(), self.enhancement.copy(), self.t2.copy())

    def contrast(self, name: str) -> np.ndarray:
        if name == "T1":
            return self.t1
        if name == "T1+C":
            return self.t1 + self.enhancement
        if name == "T2":
            return self.t2
        raise ValueError(f"no contrast {name!r}: T1, T1+C or T2")


@lru_cache(maxsize=1)
def _head(atlas: Atlas) -> tuple[Head, np.ndarray, np.ndarray]:
    """(the healthy head, the brain mask, the depth inside the brain in mm)."""
    import SimpleITK as sitk

    template = sitk.GetArrayFromImage(atlas.template).astype(np.float32)
    brain = template > 0
    white = float(np.percentile(template[brain], 90))
    t1 = template / white
    # T2 inside the brain: fluid bright, white matter dark, grey matter between
    t2 = np.where(brain, np.clip(1.5 - 1.05 * t1, 0.3, 1.4), 0.0).astype(np.float32)
    outside = ndimage.distance_transform_edt(~brain)
    for low, high, t1_value, t2_value in ((0.0, 2.0, 0.12, 1.4),  # cerebrospinal fluid
                                          (2.0, 7.0, 0.06, 0.05),  # the skull's cortex
                                          (3.8, 5.2, 0.45, 0.5),  # its marrow
                                          (7.0, 12.0, 0.85, 0.7)):  # the scalp's fat
        layer = (outside > low) & (outside <= high)
        t1[layer], t2[layer] = t1_value, t2_value
    depth = ndimage.distance_transform_edt(brain).astype(np.float32)
    return Head(t1, np.zeros_like(t1), t2), brain, depth


def _ras_to_index(atlas: Atlas, ras: Iterable[float]) -> np.ndarray:
    """(z, y, x) index of an MNI point given in RAS millimetres."""
    x, y, z = ras
    column, row, plane = atlas.template.TransformPhysicalPointToContinuousIndex(
        (-float(x), -float(y), float(z)))
    return np.array([plane, row, column])


def _index_to_ras(atlas: Atlas, index: np.ndarray) -> np.ndarray:
    x, y, z = atlas.template.TransformContinuousIndexToPhysicalPoint(
        (float(index[2]), float(index[1]), float(index[0])))
    return np.array([-x, -y, z])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float
                  ) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (float(field.std()) + 1e-6)


def _ball_box(centre: np.ndarray, reach: float, shape: tuple[int, ...]
              ) -> tuple[tuple[slice, ...], np.ndarray]:
    """The slices of a box of half-side ``reach`` about ``centre`` clipped to ``shape``, and
    each voxel's offset from the centre (3, ...)."""
    low = np.maximum(0, np.floor(centre - reach).astype(int))
    high = np.minimum(shape, np.ceil(centre + reach).astype(int) + 1)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    grid = np.mgrid[box].astype(np.float32) - centre.reshape(3, 1, 1, 1).astype(np.float32)
    return box, grid


def _glioma(rng: np.random.Generator, head: Head, brain: np.ndarray, depth: np.ndarray,
            mask: np.ndarray) -> None:
    candidates = np.argwhere((head.t1 > 0.85) & (depth > 18) & brain)
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    radius = float(rng.uniform(10, 22))
    box, offset = _ball_box(centre, 1.8 * radius, brain.shape)
    distance = np.sqrt((offset ** 2).sum(axis=0))
    lumpy = 1.0 + 0.22 * _smooth_noise(rng, distance.shape, radius / 3)
    relative = distance / (radius * lumpy)
    inside = brain[box]
    core = (relative < 1.0) & inside
    oedema = (relative >= 1.0) & (relative < float(rng.uniform(1.4, 1.8))) & inside
    necrotic = core & (relative < float(rng.uniform(0.45, 0.65)))
    rim = core & ~necrotic
    t1, enhancement, t2 = head.t1[box], head.enhancement[box], head.t2[box]
    t1[oedema] *= 0.72  # oedema: dark on T1, bright on T2
    t2[oedema] = 1.15
    t1[rim] = 0.75 + 0.05 * lumpy[rim]
    enhancement[rim] = 0.6 + 0.05 * lumpy[rim]  # the enhancing rim
    t2[rim] = 0.95
    t1[necrotic] = 0.3 + 0.05 * lumpy[necrotic]  # the necrotic centre: no enhancement
    t2[necrotic] = 1.35
    mask[box][oedema] = OEDEMA
    mask[box][core] = CORE


def _meningioma(rng: np.random.Generator, head: Head, brain: np.ndarray, depth: np.ndarray,
                mask: np.ndarray) -> None:
    # on the convexity or the falx, above the skull base
    surface = np.argwhere(brain & (depth <= 1.5)
                          & (np.arange(brain.shape[0])[:, None, None] > brain.shape[0] * 0.45))
    point = surface[rng.integers(len(surface))].astype(np.float32)
    radius = float(rng.uniform(8, 22))
    # pushed outwards along the surface's normal (away from the brain near the point):
    # dural-based, pressing into the brain
    near, _ = _ball_box(point, 10.0, brain.shape)
    normal = point - (np.argwhere(brain[near]) + [s.start for s in near]).mean(axis=0)
    normal /= float(np.linalg.norm(normal)) + 1e-6
    centre = point + normal * radius * float(rng.uniform(0.2, 0.45))
    box, offset = _ball_box(centre, 1.8 * radius, brain.shape)
    distance = np.sqrt((offset ** 2).sum(axis=0))
    outside_brain = ndimage.distance_transform_edt(~brain[box]) if not brain[box].all() else \
        np.zeros(distance.shape, dtype=np.float32)
    within_dura = brain[box] | (outside_brain <= 2.0)
    tumour = (distance < radius) & within_dura
    t1, enhancement, t2 = head.t1[box], head.enhancement[box], head.t2[box]
    if rng.random() < 0.7:  # the dural tail: thickened dura that enhances
        tail = (~brain[box]) & (outside_brain <= 2.0) & (distance < 1.7 * radius) & ~tumour
        enhancement[tail] = 1.1 - t1[tail]
    texture = 0.03 * _smooth_noise(rng, distance.shape, 2)[tumour]
    t1[tumour] = 0.85 + texture
    enhancement[tumour] = 0.4  # homogeneous
    t2[tumour] = 0.8 + texture
    mask[box][tumour] = CORE


def _pituitary(rng: np.random.Generator, atlas: Atlas, head: Head, mask: np.ndarray) -> None:
    radius = float(rng.uniform(6, 14))
    sella = np.asarray(SELLA_RAS_MM) + np.array([rng.normal(0, 0.8), rng.normal(0, 1.5),
                                                 0.35 * radius])
    centre = _ras_to_index(atlas, sella)
    box, offset = _ball_box(centre, 1.5 * radius, mask.shape)
    stretch = np.array([1.0, 1.0, float(rng.uniform(1.0, 1.25))]).reshape(3, 1, 1, 1)
    distance = np.sqrt(((offset / stretch) ** 2).sum(axis=0))
    tumour = distance < radius
    texture = 0.03 * _smooth_noise(rng, distance.shape, 2)[tumour]
    head.t1[box][tumour] = 0.8 + texture
    head.enhancement[box][tumour] = 0.4
    head.t2[box][tumour] = 0.75 + texture
    mask[box][tumour] = CORE


def _pose(rng: np.random.Generator) -> Pose:
    return Pose(angles_deg=(float(rng.normal(0, 5)), float(rng.normal(0, 4)),
                            float(rng.normal(0, 6))),
                scale=float(rng.uniform(0.92, 1.08)),
                shift_mm=tuple(float(v) for v in rng.normal(0, 6, 3)))  # type: ignore[arg-type]


HEAD_CENTRE_LPS = (0.0, 18.0, 8.0)  # the head's middle sits behind and above MNI 0


def pose_transform(pose: Pose) -> object:
    """The SimpleITK transform from a point of the scan to the MNI point it shows: a rotation
    about the head's middle, a scale and a shift (the truth a registration should find)."""
    import SimpleITK as sitk

    transform = sitk.AffineTransform(3)
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*[np.deg2rad(a) for a in pose.angles_deg])
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) * pose.scale
    transform.SetMatrix(tuple(matrix.ravel()))
    transform.SetCenter(HEAD_CENTRE_LPS)
    transform.SetTranslation(pose.shift_mm)
    return transform


def scan(atlas: Atlas, head: Head, mask: np.ndarray, pose: Pose, *, size: int,
         thickness: float, rng: np.random.Generator) -> tuple[dict[str, object], object]:
    """The head and its mask in MNI space as the scanner sees them: each contrast of
    ``CONTRASTS`` as an int16 SimpleITK image on the scan's axial grid (one coil: one bias
    field; each acquisition its own noise), and the uint8 mask on the same grid."""
    import SimpleITK as sitk

    spacing = FIELD_OF_VIEW_MM / size
    slices = int(np.ceil(COVERAGE_MM / thickness))
    grid = sitk.Image(size, size, slices, sitk.sitkFloat32)
    grid.SetSpacing((spacing, spacing, thickness))
    grid.SetOrigin(tuple(np.asarray(HEAD_CENTRE_LPS) - np.array(
        [spacing * (size - 1) / 2, spacing * (size - 1) / 2, thickness * (slices - 1) / 2])))
    transform = pose_transform(pose)
    labels = sitk.GetImageFromArray(mask)
    labels.CopyInformation(atlas.template)
    truth = sitk.Resample(labels, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32)
                            for n in (slices, size, size)], indexing="ij")
    terms = rng.normal(0, 0.12, 6)
    bias = np.exp(terms[0] * x + terms[1] * y + terms[2] * z + terms[3] * x * y
                  + terms[4] * (x ** 2 - 0.33) + terms[5] * (y ** 2 - 0.33))
    del x, y, z
    sigma = float(rng.uniform(0.015, 0.045))
    images: dict[str, object] = {}
    for name in CONTRASTS:
        values = head.contrast(name)
        if thickness > 1:  # the slice profile
            values = ndimage.gaussian_filter1d(values, sigma=(thickness - 1.0) / 2.355, axis=0)
        mni = sitk.GetImageFromArray(values)
        mni.CopyInformation(atlas.template)
        seen = sitk.GetArrayFromImage(sitk.Resample(mni, grid, transform, sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
        real = seen * bias + rng.normal(0, sigma, seen.shape).astype(np.float32)
        imaginary = rng.normal(0, sigma, seen.shape).astype(np.float32)
        magnitude = np.sqrt(real ** 2 + imaginary ** 2)
        image = sitk.GetImageFromArray(np.clip(magnitude * 1000, 0, 32767).round()
                                       .astype(np.int16))
        image.CopyInformation(truth)
        images[name] = image
    return images, truth


def make_case(seed: int, index: int, *, size: int = 192, label: str | None = None,
              atlas: Atlas | None = None) -> BrainCase:
    """Case ``index`` of seed ``seed``; the same arguments give the same volume."""
    atlas = atlas or load_atlas()
    rng = np.random.default_rng([seed, index])
    chosen = label or LABELS[int(rng.choice(len(LABELS), p=np.asarray(MIX)))]
    if chosen not in LABELS:
        raise ValueError(f"{chosen!r} is not one of {', '.join(LABELS)}")
    base, brain, depth = _head(atlas)
    head = base.copy()
    mask = np.zeros(brain.shape, dtype=np.uint8)
    if chosen == "glioma":
        _glioma(rng, head, brain, depth, mask)
    elif chosen == "meningioma":
        _meningioma(rng, head, brain, depth, mask)
    elif chosen == "pituitary":
        _pituitary(rng, atlas, head, mask)
    pose = _pose(rng)
    thickness = float(rng.choice(THICKNESSES_MM))
    images, truth = scan(atlas, head, mask, pose, size=size, thickness=thickness, rng=rng)

    import SimpleITK as sitk

    core = mask == CORE
    shares = occupancy(sitk.GetArrayViewFromImage(atlas.labels), core, atlas.structures)
    structures = tuple((s.label if s is not None else "outside the atlas", round(float(v), 3))
                       for s, v in shares if v >= MIN_SHARE)
    side = ""
    if core.any():
        x = _index_to_ras(atlas, np.argwhere(core).mean(axis=0))[0]
        side = "midline" if abs(x) < 5.0 else ("left" if x < 0 else "right")
    patient_id = f"B{seed % 1000:03d}{index:05d}"
    return BrainCase(case_id=patient_id, patient_id=patient_id, label=chosen, images=images,
                     mask=truth, structures=structures, side=side,
                     core_ml=round(float(core.sum()) / pose.scale ** 3 / 1000.0, 2),
                     slice_thickness_mm=thickness, pixel_spacing_mm=FIELD_OF_VIEW_MM / size,
                     pose=pose)


def generate(n: int, seed: int, *, size: int = 192) -> Iterator[BrainCase]:
    atlas = load_atlas()
    for index in range(n):
        yield make_case(seed, index, size=size, atlas=atlas)


LABEL_COLUMNS = ("case_id", "patient_id", "label", "side", "core_ml", "structures",
                 "slice_thickness_mm", "pixel_spacing_mm")


def write_dataset(out: Path, cases: Iterable[BrainCase],
                  on_case: Callable[[BrainCase], None] | None = None) -> int:
    """``images/<case>.nii.gz`` (the scan), ``masks/<case>.nii.gz`` (CORE, OEDEMA) and
    ``labels.csv`` (the class, side, core volume and the structures with their shares);
    written one case at a time, the table last, so that a folder with a table is whole."""
    import SimpleITK as sitk

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        sitk.WriteImage(case.image, str(out / "images" / f"{case.case_id}.nii.gz"),
                        useCompression=True)
        sitk.WriteImage(case.mask, str(out / "masks" / f"{case.case_id}.nii.gz"),
                        useCompression=True)
        rows.append({"case_id": case.case_id, "patient_id": case.patient_id,
                     "label": case.label, "side": case.side, "core_ml": case.core_ml,
                     "structures": "; ".join(f"{name} {share:.3f}"
                                             for name, share in case.structures),
                     "slice_thickness_mm": case.slice_thickness_mm,
                     "pixel_spacing_mm": round(case.pixel_spacing_mm, 4)})
        if on_case is not None:
            on_case(case)
    partial = out / "labels.csv.partial"
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(out / "labels.csv")
    return len(rows)
