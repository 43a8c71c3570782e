"""Segmentation datasets: images with masks in one of the declared layouts.

A mask can be coded several ways, and a wrong reading is silent: class-index masks (0/1/2, the
nnU-Net convention) read as binary turn every malignant lesion benign; binary masks (0/255) read
without a labels file turn every lesion into one class. So the layout is declared
(``--layout``) or detected from every mask's values, and a folder that could be read two ways,
that mixes layouts, or whose ``labels.csv`` contradicts its masks is refused with the files
and the competing readings named. Nothing is guessed.

Layouts (``LAYOUTS``): ``colour`` (RGB masks, a colour per class, as BUS-UCLM codes them),
``class-index`` (greyscale masks whose values are class indices), ``binary`` (0/255 or 0/1
masks, each case's class from ``labels.csv``), ``nifti`` (NIfTI image and mask pairs, spacing
from their headers) and ``nnunet`` (nnU-Net's raw layout: ``dataset.json``, ``imagesTr``,
``labelsTr``) and ``dicom-seg`` (DICOM images with the DICOM SEG objects that reference them,
read with highdicom). Checked first: MONAI's ``LoadImage`` reads the files (PIL, nibabel) but says
nothing about what mask values mean, and nnU-Net's own dataset checks need nnU-Net; the value
logic here is the part no library has.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Layout = Literal["colour", "class-index", "binary", "nifti", "nnunet", "dicom-seg"]
LAYOUTS: dict[str, str] = {
    "colour": "images/*.png with RGB masks/*.png, one colour per class (BUS-UCLM: green "
              "benign, red malignant, black background)",
    "class-index": "images/*.png with greyscale masks/*.png whose values are class indices "
                   "(0 background, 1, 2, ...: the nnU-Net convention)",
    "binary": "images/*.png with binary masks/*.png (0/255 or 0/1) and labels.csv "
              "(case_id, label) giving each case's class",
    "nifti": "images/*.nii.gz with masks/*.nii.gz of class indices, one pair per name; "
             "spacing from the NIfTI headers",
    "nnunet": "nnU-Net's raw layout: dataset.json (labels by name, file_ending), "
              "imagesTr/<case>_0000<ending>, labelsTr/<case><ending>",
    "dicom-seg": "DICOM images (*.dcm) with the DICOM SEG objects that reference them, anywhere "
                 "under the folder, segments named by class; an image no SEG covers only as "
                 "labels.csv's normal case",
}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_NIFTI = (".nii.gz", ".nii")
_PATIENT_PREFIX = re.compile(r"^(?P<patient>.+?)_\d+$")
_COLOUR_MARGIN = 64  # a channel this far above the others makes a pixel that channel's colour
_SHOWN = 5  # files named in a message


class DatasetError(ValueError):
    """A folder radlens will not read: missing files, or a reading it would have to guess."""


@dataclass(frozen=True)
class MaskClasses:
    """What a task's masks code. ``names[i]`` is mask value i's class (``names[0]`` the
    background); ``image_labels[i]`` the image label of an image whose highest class present
    is i (``image_labels[0]``: nothing found). ``colours`` maps a class index to the RGB
    channel (0 red, 1 green, 2 blue) that codes it in ``colour`` masks."""

    names: tuple[str, ...]
    image_labels: tuple[str, ...]
    colours: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.names) < 2 or len(self.image_labels) != len(self.names):
            raise ValueError("a background and at least one class, one image label per class")

    def label_of(self, classes: np.ndarray) -> str:
        present = np.unique(classes)
        return self.image_labels[int(present.max()) if present.size else 0]


@dataclass(frozen=True)
class SegmentationCase:
    case_id: str
    patient_id: str
    label: str
    image_path: Path
    mask_path: Path
    layout: Layout = "colour"
    spacing_mm: tuple[float, float] | None = None  # (row, column); None: not stated
    # nnU-Net: its mask value of each of the task's classes (dataset.json's numbering)
    value_map: tuple[tuple[int, int], ...] = ()


@dataclass
class SegmentationDataset:
    """What a folder holds, as read: the cases and the figures ``radlens dataset check``
    prints."""

    root: Path
    layout: Layout
    how: str  # why this layout: declared, or what the masks showed
    cases: list[SegmentationCase]
    classes: MaskClasses
    mask_values: Counter[str] = field(default_factory=Counter)  # raw value -> pixels
    class_pixels: Counter[str] = field(default_factory=Counter)  # class name -> pixels
    sizes: Counter[str] = field(default_factory=Counter)  # "rows x columns" -> images
    spacings: Counter[str] = field(default_factory=Counter)  # "row x column mm" -> images
    unlisted: list[str] = field(default_factory=list)  # images labels.csv does not list

    def label_counts(self) -> dict[str, int]:
        counts = Counter(case.label for case in self.cases)
        return {label: counts.get(label, 0) for label in self.classes.image_labels}


# ---- reading one file ------------------------------------------------------------------------

def read_grey(path: Path) -> np.ndarray:
    """A 2-D image as float32 grey levels 0-255 (PNG: as stored, colour to luminance; NIfTI:
    x = column, y = row, as radlens writes NIfTI). Refuses intensities outside 0-255: the
    models read 8-bit images, and rescaling an unknown range would be a guess."""
    if path.name.endswith(_NIFTI) or path.suffix.lower() == ".dcm":
        array = _nifti_plane(path) if path.name.endswith(_NIFTI) else _dicom_plane(path)
        if array.size and (float(array.min()) < 0 or float(array.max()) > 255):
            raise DatasetError(f"{path}: intensities {float(array.min()):g} to "
                               f"{float(array.max()):g} are outside 0-255 (8-bit images only)")
        return array.astype(np.float32)
    with Image.open(path) as image:
        if image.mode in ("I", "I;16", "I;16B", "F"):
            raise DatasetError(f"{path}: a {image.mode} (16-bit or float) PNG; the models read "
                               "8-bit images")
        return np.asarray(image.convert("L"), dtype=np.float32)


def _nifti_plane(path: Path) -> np.ndarray:
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj)
    data = np.squeeze(data)
    if data.ndim != 2:
        raise DatasetError(f"{path}: shape {data.shape} is not one 2-D image")
    return data.T  # (x = column, y = row) to (rows, columns)


def _dicom_plane(path: Path) -> np.ndarray:
    """A single-frame DICOM image's pixels as the agent decodes them (modality LUT, colour to
    luminance)."""
    from radlens.dicom_io import pixels
    from radlens.errors import UnsupportedImageError

    try:
        decoded = pixels.decode_dataset(pixels.read_dataset(path))
    except (UnsupportedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    if decoded.pixels.shape[0] != 1:
        raise DatasetError(f"{path}: {decoded.pixels.shape[0]} frames; the task reads single "
                           "images")
    frame = decoded.pixels[0]
    if frame.shape[-1] == 3:
        return frame @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return frame[..., 0]


def _image_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of an image file from its header, without decoding its pixels."""
    if path.name.endswith(_NIFTI):
        import nibabel as nib

        shape = [n for n in nib.load(str(path)).shape if n != 1]
        if len(shape) != 2:
            raise DatasetError(f"{path}: shape {tuple(shape)} is not one 2-D image")
        return shape[1], shape[0]  # (x = column, y = row)
    if path.suffix.lower() == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    with Image.open(path) as image:
        return image.size[1], image.size[0]


def _nifti_spacing(path: Path) -> tuple[float, float]:
    import nibabel as nib

    zooms = nib.load(str(path)).header.get_zooms()
    return float(zooms[1]), float(zooms[0])


def _raw_mask(path: Path) -> np.ndarray:
    """A mask as stored: (rows, columns) integers, or (rows, columns, 3) for RGB."""
    if path.name.endswith(_NIFTI):
        data = _nifti_plane(path)
        if not np.allclose(data, np.rint(data)):
            raise DatasetError(f"{path}: mask values are not integers")
        return np.rint(data).astype(np.int64)
    with Image.open(path) as image:
        if image.mode in ("RGB", "RGBA", "P"):
            rgb = np.asarray(image.convert("RGB"))
            return rgb if _is_colour(rgb) else rgb[..., 0].astype(np.int64)
        return np.asarray(image).astype(np.int64)


def _is_colour(rgb: np.ndarray) -> bool:
    """Whether any pixel's channels differ by more than the margin (elementwise maxima and
    minima of the three planes: numpy reduces a last axis of three slowly)."""
    red, green, blue = (rgb[..., channel] for channel in range(3))
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    return bool(((high - low) > _COLOUR_MARGIN).any())  # high >= low: no uint8 wrap-around


def decode_colour(rgb: np.ndarray, classes: MaskClasses) -> np.ndarray:
    """RGB mask to class indices: a pixel whose coding channel exceeds the others by a margin
    (tolerant of anti-aliased edges) takes that class; every other pixel is background."""
    planes = [rgb[..., c].astype(np.int16) for c in range(3)]
    out = np.zeros(rgb.shape[:2], dtype=np.int64)
    for index, channel in classes.colours.items():
        first, second = (planes[c] for c in range(3) if c != channel)
        coding = planes[channel]
        out[(coding > 127) & (coding - np.maximum(first, second) > _COLOUR_MARGIN)] = index
    return out


def read_mask(case: SegmentationCase, classes: MaskClasses) -> np.ndarray:
    """A case's mask as class indices, read the way its layout says."""
    if case.layout == "dicom-seg":
        return _seg_mask(case, classes)
    raw = _raw_mask(case.mask_path)
    if case.layout == "colour":
        return decode_colour(raw, classes) if raw.ndim == 3 else np.zeros(raw.shape, np.int64)
    if raw.ndim == 3:
        raise DatasetError(f"{case.mask_path}: a colour mask in a {case.layout} dataset")
    if case.layout == "binary":
        return (raw > 0).astype(np.int64) * classes.image_labels.index(case.label)
    if case.value_map:
        out = np.zeros(raw.shape, dtype=np.int64)
        for value, index in case.value_map:
            out[raw == value] = index
        return out
    return raw


# ---- reading a folder ------------------------------------------------------------------------

@dataclass
class _MaskScan:
    path: Path
    colour: bool
    values: Counter[int]  # grey masks: value -> pixels


def _labels_csv(root: Path, classes: MaskClasses) -> dict[str, dict[str, str]]:
    from radlens.datasets.labels_csv import LabelsCsvError, read_labels_csv

    path = root / "labels.csv"
    if not path.is_file():
        return {}
    try:
        return read_labels_csv(path, labels=classes.image_labels)
    except LabelsCsvError as exc:
        raise DatasetError(str(exc)) from exc


def _patient(case_id: str, row: Mapping[str, str]) -> str:
    if row.get("patient_id"):
        return row["patient_id"]
    match = _PATIENT_PREFIX.match(case_id)
    return match.group("patient") if match else case_id


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def _pairs(images: Path, masks: Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path, Path]]:
    def stem(path: Path) -> str | None:
        return next((path.name[:-len(s)] for s in suffixes if path.name.endswith(s)), None)

    found_images = {stem(p): p for p in sorted(images.iterdir()) if stem(p)}
    found_masks = {stem(p): p for p in sorted(masks.iterdir()) if stem(p)}
    no_mask = [found_images[s] for s in found_images if s not in found_masks]
    no_image = [found_masks[s] for s in found_masks if s not in found_images]
    if no_mask:
        raise DatasetError(f"{_names(no_mask)} {'has' if len(no_mask) == 1 else 'have'} no "
                           f"mask in {masks}")
    if no_image:
        raise DatasetError(f"{_names(no_image)} {'has' if len(no_image) == 1 else 'have'} no "
                           f"image in {images}")
    if not found_images:
        raise DatasetError(f"{images}: no images ({' or '.join(suffixes)})")
    return [(s, found_images[s], found_masks[s]) for s in sorted(found_images)]


def _scan(path: Path) -> _MaskScan:
    raw = _raw_mask(path)
    if raw.ndim == 3:
        return _MaskScan(path, True, Counter())
    if raw.size and int(raw.min()) < 0:
        raise DatasetError(f"{path}: negative mask values")
    counts = np.bincount(raw.ravel())
    return _MaskScan(path, False, Counter({v: int(c) for v, c in enumerate(counts) if c}))


def _grey_layout(scans: list[_MaskScan], classes: MaskClasses, has_labels: bool,
                 suffix_layout: Layout) -> tuple[Layout, str]:
    """Which reading greyscale masks allow, or a DatasetError naming the competing ones."""
    values = set().union(*(s.values for s in scans)) if scans else set()
    lesion_values = values - {0}
    top = len(classes.names) - 1
    with_value = {v: [s.path for s in scans if s.values.get(v)] for v in sorted(lesion_values)}
    if not lesion_values:
        return suffix_layout, "every mask is empty"
    if lesion_values <= set(range(2, top + 1)) | {1} and lesion_values - {1}:
        return suffix_layout, (f"mask values {sorted(values)} are class indices "
                               f"({', '.join(classes.names)})")
    if lesion_values == {255} or lesion_values == {1}:
        if has_labels:
            return "binary", (f"mask values {sorted(values)} mark a lesion; its class comes "
                              "from labels.csv")
        if lesion_values == {255}:
            raise DatasetError(
                f"the masks are binary (0 and 255: {_names(with_value[255])}) and say nothing "
                "of the lesion's class, and there is no labels.csv to say it. Add labels.csv "
                f"(case_id, label: one of {', '.join(classes.image_labels)}).")
        raise DatasetError(
            f"the masks hold only 0 and 1 ({_names(with_value[1])}), which reads two ways: as "
            f"class indices every lesion is {classes.names[1]}; as binary masks the class "
            "must come from a labels.csv, and there is none. Say which with --layout "
            f"{suffix_layout} or add labels.csv and use --layout binary.")
    odd = sorted(v for v in lesion_values if v > top and v != 255)
    if odd:
        files = [p for v in odd for p in with_value[v]]
        raise DatasetError(
            f"mask values {odd[:10]} ({_names(sorted(set(files)))}) are neither class indices "
            f"0-{top} ({', '.join(classes.names)}) nor binary 0/255: anti-aliased or "
            "resampled masks? Export them with nearest-neighbour values.")
    raise DatasetError(f"mask values {sorted(values)} mix binary (255) and class-index "
                       f"(1-{top}) coding: {_names(with_value.get(255, []))} against "
                       f"{_names(with_value.get(1, []) + with_value.get(2, []))}")


def read_segmentation_folder(root: Path, classes: MaskClasses, *,
                             layout: Layout | None = None) -> SegmentationDataset:
    """Every case of ``root`` in ``layout`` (detected when None), with what ``radlens dataset
    check`` prints. Raises DatasetError when a file is missing, the layout cannot be told, or
    labels.csv contradicts a mask."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    if layout is not None and layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if layout == "nnunet" or (layout is None and (root / "dataset.json").is_file()):
        return _read_nnunet(root, classes)
    images, masks = root / "images", root / "masks"
    if layout == "dicom-seg" or (layout is None and not images.is_dir()
                                 and next(root.rglob("*.dcm"), None) is not None):
        return _read_dicom_seg(root, classes)
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root}: expected images/ and masks/ folders (or nnU-Net's "
                           "dataset.json, imagesTr/ and labelsTr/); layouts: "
                           + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    nifti = layout == "nifti" or (layout is None and any(
        p.name.endswith(_NIFTI) for p in images.iterdir()))
    pairs = _pairs(images, masks, _NIFTI if nifti else (".png",))
    listed = _labels_csv(root, classes)
    scans = [_scan(mask) for _, _, mask in pairs]
    colour = [s.path for s in scans if s.colour]
    grey_lesion = [s.path for s in scans if not s.colour and set(s.values) - {0}]
    if colour and grey_lesion:
        raise DatasetError(f"masks/ mixes colour masks ({_names(colour)}) and greyscale masks "
                           f"with lesion values ({_names(grey_lesion)}): one layout per folder")
    if layout is not None:
        chosen, how = layout, "declared (--layout)"
        if layout == "colour" and grey_lesion:
            raise DatasetError(f"--layout colour, but these masks are greyscale: "
                               f"{_names(grey_lesion)}")
        if layout != "colour" and colour:
            raise DatasetError(f"--layout {layout}, but these masks are in colour: "
                               f"{_names(colour)}")
        if layout == "binary" and not listed:
            raise DatasetError("--layout binary needs labels.csv (case_id, label): a binary "
                               "mask does not say the lesion's class")
    elif colour:
        chosen, how = "colour", "the masks are in colour"
    else:
        chosen, how = _grey_layout(scans, classes, bool(listed),
                                   "nifti" if nifti else "class-index")
        if nifti and chosen == "class-index":
            chosen = "nifti"
    if nifti and chosen not in ("nifti", "binary"):
        raise DatasetError(f"--layout {chosen} reads PNG files; {images} holds NIfTI")
    dataset = SegmentationDataset(root, chosen, how, [], classes)
    contradictions: list[str] = []
    empty = classes.image_labels[0]
    for (case_id, image_path, mask_path), scan in zip(pairs, scans, strict=True):
        row = listed.get(case_id, {})
        if listed and case_id not in listed:
            dataset.unlisted.append(case_id)
        label = (row.get("label") or "").strip()
        if chosen == "binary" and not label:
            raise DatasetError(f"labels.csv gives no label for {case_id}: binary masks need "
                               "every case's label")
        spacing = _nifti_spacing(image_path) if nifti else _listed_spacing(row)
        case = SegmentationCase(case_id, _patient(case_id, row), label or empty, image_path,
                                mask_path, chosen, spacing)
        mask = read_mask(case, classes)
        from_mask = classes.label_of(mask)
        if chosen == "binary":
            if (label == empty) != (from_mask == empty):
                contradictions.append(f"{case_id} is labelled {label} but its mask is "
                                      + ("empty" if from_mask == empty else "not empty"))
        elif label and label != from_mask:
            contradictions.append(f"{case_id} is labelled {label} but its mask says {from_mask}")
        dataset.cases.append(replace(case, label=label or from_mask))
        _tally(dataset, scan, mask, image_path, spacing)
    if contradictions:
        raise DatasetError(f"labels.csv contradicts {len(contradictions)} mask(s): "
                           + "; ".join(contradictions[:_SHOWN])
                           + (" ..." if len(contradictions) > _SHOWN else ""))
    return dataset


def _listed_spacing(row: Mapping[str, str]) -> tuple[float, float] | None:
    value = (row.get("pixel_spacing_mm") or "").strip()
    if not value:
        return None
    try:
        spacing = float(value)
    except ValueError:
        raise DatasetError(f"pixel_spacing_mm {value!r} of case {row.get('case_id')!r} is not "
                           "a number") from None
    return spacing, spacing


def _tally(dataset: SegmentationDataset, scan: _MaskScan, mask: np.ndarray, image_path: Path,
           spacing: tuple[float, float] | None) -> None:
    """A mask file's raw values, then what every layout counts (``_tally_case``), after
    checking that image and mask are the same size."""
    if scan.colour:
        dataset.mask_values["colour"] += int(mask.size)
    else:
        for value, pixels in scan.values.items():
            dataset.mask_values[str(value)] += pixels
    image_shape = _image_shape(image_path)
    if image_shape != mask.shape[:2]:
        raise DatasetError(f"{image_path.name}: image {image_shape[0]} x {image_shape[1]}, "
                           f"mask {mask.shape[0]} x {mask.shape[1]}")
    _tally_case(dataset, mask, spacing)


def _tally_case(dataset: SegmentationDataset, mask: np.ndarray,
                spacing: tuple[float, float] | None) -> None:
    """One case's pixels per class, size and spacing."""
    names = dataset.classes.names
    for index, pixels in enumerate(np.bincount(mask.ravel(), minlength=len(names))[:len(names)]):
        dataset.class_pixels[names[index]] += int(pixels)
    dataset.sizes[f"{mask.shape[0]} x {mask.shape[1]}"] += 1
    dataset.spacings[f"{spacing[0]:.3f} x {spacing[1]:.3f} mm" if spacing
                     else "not stated"] += 1


def _read_nnunet(root: Path, classes: MaskClasses) -> SegmentationDataset:
    """nnU-Net's raw layout. dataset.json names its labels (v2: {"name": value}; v1:
    {"value": "name"}); each must be one of the task's classes, by name."""
    try:
        described = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{root / 'dataset.json'}: {exc}") from exc
    labels = described.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{root / 'dataset.json'}: no labels")
    if all(str(k).isdigit() for k in labels):  # v1: {"0": "background", ...}
        by_name = {str(v).lower(): int(k) for k, v in labels.items()}
    else:
        by_name = {str(k).lower(): int(v) for k, v in labels.items()}
    known = {name.lower(): index for index, name in enumerate(classes.names)}
    unknown = sorted(set(by_name) - set(known))
    if unknown:
        raise DatasetError(f"{root / 'dataset.json'}: labels {unknown} are not the task's "
                           f"classes ({', '.join(classes.names)})")
    channels = described.get("channel_names") or described.get("modality") or {"0": "image"}
    if len(channels) != 1:
        raise DatasetError(f"{root / 'dataset.json'}: {len(channels)} input channels; the "
                           "task reads one")
    ending = described.get("file_ending", ".nii.gz")
    images, masks = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root}: nnU-Net's imagesTr/ and labelsTr/ are expected")
    value_map = tuple(sorted((value, known[name]) for name, value in by_name.items()))
    dataset = SegmentationDataset(root, "nnunet", "dataset.json names the labels", [], classes)
    label_files = sorted(p for p in masks.iterdir() if p.name.endswith(ending))
    if not label_files:
        raise DatasetError(f"{masks}: no *{ending} label files")
    for mask_path in label_files:
        case_id = mask_path.name[:-len(ending)]
        image_path = images / f"{case_id}_0000{ending}"
        if not image_path.is_file():
            raise DatasetError(f"{mask_path.name} has no image {image_path.name} in {images}")
        spacing = _nifti_spacing(image_path) if ending in _NIFTI else None
        case = SegmentationCase(case_id, _patient(case_id, {}), "?", image_path, mask_path,
                                "nnunet", spacing, value_map)
        scan = _scan(mask_path)
        odd = sorted(set(scan.values) - {v for v, _ in value_map})
        if scan.colour or odd:
            raise DatasetError(f"{mask_path.name}: values {odd or 'in colour'} are not in "
                               "dataset.json's labels")
        mask = read_mask(case, classes)
        dataset.cases.append(replace(case, label=classes.label_of(mask)))
        _tally(dataset, scan, mask, image_path, spacing)
    return dataset


def _segment_classes(seg: object, classes: MaskClasses, path: Path) -> dict[int, int]:
    """Each segment number's class index, by its label (its first word, as radlens writes
    "malignant lesion") or its segmented property type's meaning."""
    known = {name.lower(): index for index, name in enumerate(classes.names)}
    mapping, unknown = {}, []
    for item in seg.SegmentSequence:  # type: ignore[attr-defined]
        label = str(getattr(item, "SegmentLabel", "")).strip().lower()
        meanings = [label, label.split(" ")[0] if label else ""]
        for code in getattr(item, "SegmentedPropertyTypeCodeSequence", []):
            meanings.append(str(code.CodeMeaning).strip().lower())
        index = next((known[m] for m in meanings if m in known), None)
        if index is None or index == 0:
            unknown.append(label or meanings[-1])
        else:
            mapping[int(item.SegmentNumber)] = index
    if unknown:
        raise DatasetError(f"{path.name}: segments {unknown} are not the task's classes "
                           f"({', '.join(classes.names[1:])}): name each segment by its class")
    return mapping


def _seg_mask(case: SegmentationCase, classes: MaskClasses) -> np.ndarray:
    import highdicom as hd

    shape = _image_shape(case.image_path)
    if case.mask_path == case.image_path:  # a normal case no SEG covers
        return np.zeros(shape, dtype=np.int64)
    seg = hd.seg.segread(str(case.mask_path))
    mapping = _segment_classes(seg, classes, case.mask_path)
    sop = _sop_instance_uid(case.image_path)
    planes = seg.get_pixels_by_source_instance([sop], segment_numbers=sorted(mapping),
                                               skip_overlap_checks=True)[0]
    out = np.zeros(planes.shape[:2], dtype=np.int64)
    for channel, number in enumerate(sorted(mapping)):  # the higher class wins an overlap
        out = np.where(planes[..., channel] > 0, np.maximum(out, mapping[number]), out)
    if out.shape != shape:
        raise DatasetError(f"{case.mask_path.name}: segmentation {out.shape} for an image of "
                           f"{shape}")
    return out


def _sop_instance_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def _read_dicom_seg(root: Path, classes: MaskClasses) -> SegmentationDataset:
    """DICOM images and the SEG objects that reference them, anywhere under ``root``."""
    import highdicom as hd
    import pydicom

    listed = _labels_csv(root, classes)
    images: dict[str, Path] = {}
    patients: dict[str, str] = {}
    segs: list[Path] = []
    for path in sorted(root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is named
            raise DatasetError(f"{path}: not a DICOM file radlens can read ({exc})") from exc
        if str(ds.SOPClassUID) == SEG_STORAGE:
            segs.append(path)
        elif "PixelData" in ds or "Rows" in ds:
            images[str(ds.SOPInstanceUID)] = path
            patients[str(ds.SOPInstanceUID)] = str(ds.get("PatientID", "")) or path.stem
    if not segs:
        raise DatasetError(f"{root}: no DICOM SEG objects among {len(images)} DICOM file(s)")
    covered: dict[str, Path] = {}
    for path in segs:
        seg = hd.seg.segread(str(path))
        _segment_classes(seg, classes, path)
        for _study, _series, sop in seg.get_source_image_uids():
            if sop not in images:
                raise DatasetError(f"{path.name} segments image {sop}, which is not in {root}")
            if sop in covered:
                raise DatasetError(f"image {images[sop].name} is segmented twice: "
                                   f"{covered[sop].name} and {path.name}")
            covered[sop] = path
    dataset = SegmentationDataset(root, "dicom-seg", "DICOM SEG objects reference the images",
                                  [], classes)
    def case_id(path: Path) -> str:  # the path under root without .dcm: IM1.dcm repeats
        return path.relative_to(root).with_suffix("").as_posix()

    def row_of(path: Path) -> dict[str, str]:
        return listed.get(case_id(path)) or listed.get(path.stem) or {}

    uncovered = [images[sop] for sop in images if sop not in covered]
    normal = classes.image_labels[0]
    strays = [p for p in uncovered if row_of(p).get("label") != normal]
    if strays:
        them = "it" if len(strays) == 1 else "them"
        raise DatasetError(f"{_names(strays)}: no SEG covers {them}; segment {them}, or list "
                           f"{them} in labels.csv as {normal}")
    from radlens.dicom_io import pixels

    contradictions = []
    for sop, image_path in sorted(images.items(), key=lambda item: item[1]):
        spacing_value = pixels.physical_spacing(pixels.read_dataset(image_path))
        spacing = ((spacing_value.row_mm, spacing_value.column_mm) if spacing_value else None)
        row = row_of(image_path)
        case = SegmentationCase(case_id(image_path), row.get("patient_id") or patients[sop],
                                normal, image_path, covered.get(sop, image_path), "dicom-seg",
                                spacing)
        mask = read_mask(case, classes)
        from_mask = classes.label_of(mask)
        label = (row.get("label") or "").strip()
        if label and label != from_mask:
            contradictions.append(f"{case.case_id} is labelled {label} but its SEG says "
                                  f"{from_mask}")
        dataset.cases.append(replace(case, label=from_mask))
        for index, count in enumerate(np.bincount(mask.ravel(), minlength=len(classes.names))):
            dataset.mask_values[str(index)] += int(count)  # a SEG's values are its classes
        _tally_case(dataset, mask, spacing)
    if contradictions:
        raise DatasetError(f"labels.csv contradicts {len(contradictions)} SEG(s): "
                           + "; ".join(contradictions[:_SHOWN]))
    return dataset
