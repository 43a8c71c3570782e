"""Saliency as DICOM, for any task: a Parametric Map per source image (OHIF overlays it on the
image) and an RGB overlay (image, heat map, outlines) that every viewer shows: a Secondary
Capture per single-frame image, one Multi-frame True Color Secondary Capture per cine loop.

The task decides what the maps are and says it in the objects' comments; these builders place
them on the source's grid, in its study, with its side. Saliency shows what a model attends to,
not whether it is right; every object says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage import measure

from radlens.dicom_io import codes
from radlens.dicom_io.writers.common import (
    Equipment,
    SeriesPlan,
    geometry_sources,
)
from radlens.findings import ImageInfo
from radlens.logs import kv

log = logging.getLogger(__name__)

HEAT_ALPHA = 0.45  # heat map opacity at full saliency
CONTOUR_RGB = (0, 255, 0)
HEAT_COLOURMAP = "inferno"


def build_parametric_map(header: Dataset, info: ImageInfo, planes: np.ndarray, method: str,
                         equipment: Equipment, plan: SeriesPlan, instance_number: int, *,
                         region: Code) -> hd.pm.ParametricMap:
    """Float saliency in [0, 1], shaped (frames, rows, columns) like the source (0 where none
    was computed). ``region``: the anatomic region the task reads, for a source that states
    none (the Frame Anatomy the IOD requires)."""
    planes = np.clip(planes.astype(np.float32), 0.0, 1.0)
    spacing = info.spacing
    headers, pixel_measures = geometry_sources(
        [header], (spacing.row_mm, spacing.column_mm) if spacing else None)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=method[:16], lut_explanation=f"{method} saliency, 0 to 1"[:64],
        unit=codes.UCUM_NO_UNITS, value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
        quantity_definition=codes.SALIENCY)
    pm = hd.pm.ParametricMap(
        source_images=headers,
        pixel_array=planes if info.frames > 1 else planes[0],
        series_instance_uid=plan.series_instance_uid,
        series_number=plan.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="SALIENCY",
        content_description=f"{method}: where the model looked, not whether it is right"[:64],
        pixel_measures=pixel_measures,
    )
    pm.SeriesDescription = plan.description
    _add_frame_anatomy(pm, header, region)
    log.info("parametric map built", extra=kv(sop=pm.SOPInstanceUID, method=method,
                                              frames=int(info.frames)))
    return pm


def render_overlay(frame_pixels: np.ndarray, saliency: np.ndarray,
                   lesion_mask: np.ndarray) -> np.ndarray:
    """(rows, columns, 3) uint8: the image in grey, the map as a heat colour blended by its own
    value, and the outline of every lesion."""
    grey = frame_pixels.astype(np.float32)
    if grey.ndim == 3 and grey.shape[-1] == 3:
        grey = grey.mean(axis=-1)
    elif grey.ndim == 3:
        grey = grey[..., 0]
    low, high = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - low) / max(high - low, 1e-6), 0.0, 1.0)
    base = np.repeat(grey[..., None], 3, axis=-1)
    heat = colormaps[HEAT_COLOURMAP](np.clip(saliency, 0.0, 1.0))[..., :3]
    alpha = HEAT_ALPHA * np.clip(saliency, 0.0, 1.0)[..., None]
    rgb = (1 - alpha) * base + alpha * heat
    return draw_outline(np.round(rgb * 255).astype(np.uint8), lesion_mask)


def draw_outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (rows, columns, 3) uint8 with the border of every region of ``mask`` drawn
    in the contour colour (in place; returned)."""
    for contour in measure.find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
        rows = np.clip(np.round(contour[:, 0] - 1).astype(int), 0, mask.shape[0] - 1)
        columns = np.clip(np.round(contour[:, 1] - 1).astype(int), 0, mask.shape[1] - 1)
        image[rows, columns] = CONTOUR_RGB
    return image


def build_frame_overlays(header: Dataset, info: ImageInfo, rendered: Sequence[np.ndarray],
                         frames: Sequence[int], equipment: Equipment, plan: SeriesPlan,
                         instance_number: int, *, comments: str) -> hd.sc.SCImage:
    """Rendered RGB overlays (``render_overlay``) of these 0-based frames of a source as one
    object: an RGB Secondary Capture for a single-frame source, a Multi-frame True Color
    Secondary Capture, timed like the source, for a multi-frame one (viewers play it)."""
    sc = _secondary_capture(header, info, rendered[0], equipment, plan, instance_number)
    if info.frames > 1:
        _as_multiframe(sc, header, list(rendered))
    sc.ImageComments = comments[:10240]
    _reference_source(sc, info, list(frames))
    return sc


def build_heat_overlay(header: Dataset, info: ImageInfo, pixels: np.ndarray, heat: np.ndarray,
                       equipment: Equipment, plan: SeriesPlan, instance_number: int, *,
                       comments: str, outline: np.ndarray | None = None) -> hd.sc.SCImage:
    """A task's heat map over one single-frame image, as an RGB Secondary Capture on the
    image's grid with its laterality, so a viewer hangs it beside the source. ``comments``
    says what the map is (the task knows; the writer does not); ``outline``: a mask whose
    border is drawn too (a lesion the task found)."""
    rgb = render_overlay(pixels, heat, np.zeros(heat.shape, dtype=bool) if outline is None
                         else outline)
    sc = _secondary_capture(header, info, rgb, equipment, plan, instance_number)
    sc.ImageComments = comments[:10240]
    _reference_source(sc, info, [0])
    log.info("heat map overlay built", extra=kv(sop=sc.SOPInstanceUID,
                                                source=info.ref.sop_instance_uid))
    return sc


def _secondary_capture(header: Dataset, info: ImageInfo, rgb: np.ndarray,
                       equipment: Equipment, plan: SeriesPlan,
                       instance_number: int) -> hd.sc.SCImage:
    spacing = info.spacing
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "F"),  # replaced by the source's own below
        series_instance_uid=plan.series_instance_uid,
        series_number=plan.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        pixel_spacing=(spacing.row_mm, spacing.column_mm) if spacing else None,
        series_description=plan.description,
        transfer_syntax_uid=ExplicitVRLittleEndian,  # as every other output (highdicom: implicit)
    )
    sc.BurnedInAnnotation = "NO"
    # The overlay lies on the source's pixel grid: it has the source's orientation, which for
    # 2-D ultrasound is usually unknown (an empty Patient Orientation).
    sc.PatientOrientation = header.get("PatientOrientation", "")
    _copy_laterality(sc, header)
    return sc


MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
DEFAULT_FRAME_TIME_MS = 33.3  # 30 frames per second, when the source states no timing


def _as_multiframe(sc: hd.sc.SCImage, header: Dataset, frames: list[np.ndarray]) -> None:
    """Turn highdicom's single-frame SC (its header copied and checked) into the Multi-frame
    True Color SC of the frames, timed like the source (Cine module) so a viewer plays it."""
    sc.SOPClassUID = MULTIFRAME_TRUE_COLOR_SC
    sc.file_meta.MediaStorageSOPClassUID = MULTIFRAME_TRUE_COLOR_SC
    sc.NumberOfFrames = len(frames)
    sc.PixelData = np.ascontiguousarray(np.stack(frames), dtype=np.uint8).tobytes()
    sc.FrameIncrementPointer = Tag("FrameTime")
    sc.FrameTime = _frame_time_ms(header)


def _frame_time_ms(header: Dataset) -> float:
    for read in (lambda: float(header.FrameTime),
                 lambda: 1000.0 / float(header.CineRate),
                 lambda: 1000.0 / float(header.RecommendedDisplayFrameRate)):
        try:
            value = read()
        except (AttributeError, TypeError, ValueError, ZeroDivisionError):
            continue
        if np.isfinite(value) and value > 0:
            return round(value, 3)
    return DEFAULT_FRAME_TIME_MS


def _add_frame_anatomy(pm: hd.pm.ParametricMap, header: Dataset, region: Code) -> None:
    """The Frame Anatomy functional group, which the Parametric Map IOD requires and highdicom
    does not write (QIICR's dcmqi, the reference reader, crashes without it): the source's
    anatomic region, else the region the task reads, and the side it states. DICOM's
    Frame Laterality has no "unknown": an image that states no side is written U (unpaired),
    and the series-level Laterality, which Frame Laterality replaces, is left out."""
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [_anatomic_region(header, region)]
    anatomy.FrameLaterality = _stated_side(header) or "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    if "Laterality" in pm:
        del pm.Laterality


def _anatomic_region(header: Dataset, fallback: Code) -> hd.sr.CodedConcept:
    for item in header.get("AnatomicRegionSequence", []) or []:
        try:
            return hd.sr.CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator),
                                      str(item.CodeMeaning))
        except (AttributeError, TypeError, ValueError):
            continue  # an item without a usable code: the next, or the task's region
    return hd.sr.CodedConcept.from_code(fallback)


def _stated_side(header: Dataset) -> str | None:
    """The side the source states (its series' Laterality, else its Image Laterality): L, R or
    B (both, which only Image Laterality may say); None when it states none."""
    side = header.get("Laterality") or header.get("ImageLaterality")
    return side if side in ("L", "R", "B") else None


def _copy_laterality(dataset: hd.SOPClass, header: Dataset) -> None:
    """A paired body part's series says which side (General Series, type 2C: L or R); a
    source whose image says it is of an unpaired part (Image Laterality U, as dermatoscopes
    write for the back) passes that on, which is what spares the series its side."""
    side = _stated_side(header)
    if side in ("L", "R"):
        dataset.Laterality = side
    elif str(header.get("ImageLaterality", "") or "").strip().upper() == "U":
        dataset.ImageLaterality = "U"


def _reference_source(sc: hd.sc.SCImage, info: ImageInfo, frames: list[int]) -> None:
    """Source Image Sequence: the overlay derives from these frames of this image."""
    item = Dataset()
    item.ReferencedSOPClassUID = info.ref.sop_class_uid
    item.ReferencedSOPInstanceUID = info.ref.sop_instance_uid
    if info.frames > 1:
        item.ReferencedFrameNumber = [n + 1 for n in frames] if len(frames) > 1 else frames[0] + 1
    sc.SourceImageSequence = [item]
