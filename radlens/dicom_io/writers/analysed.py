"""An analysed source image as the writers see it: its header, its findings and its maps.

The pipeline keeps each frame's lesion labels, class probabilities and saliency maps in
``results/<Study>/maps/*.npz``; this module brings them back next to the source header so the
SEG, SR and map writers all read one object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radlens.dicom_io.conformance import TYPE2_COPIED, conformant_header
from radlens.dicom_io.nesting import read_bounded
from radlens.findings import FramePrediction, ImageInfo, LesionMeasurements


@dataclass(frozen=True)
class AnalysedFrame:
    prediction: FramePrediction
    lesions: np.ndarray  # (rows, columns) uint16: 0 background, k = lesion index k
    saliency: dict[str, np.ndarray] = field(default_factory=dict)  # method -> map in [0, 1]


@dataclass(frozen=True)
class AnalysedImage:
    header: Dataset  # the source's header, no pixel data
    info: ImageInfo
    frames: dict[int, AnalysedFrame]  # 0-based frame number -> what was found there
    pixels: np.ndarray | None = None  # decoded (frames, rows, columns, channels), for overlays

    @property
    def sop_instance_uid(self) -> str:
        return self.info.ref.sop_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.info.ref.series_instance_uid

    @property
    def lesions(self) -> list[LesionMeasurements]:
        return [lesion for frame in self.frames.values() for lesion in frame.prediction.lesions]

    def mask(self, frame: int, lesion_class: str | None = None) -> np.ndarray:
        """Boolean mask of the measured lesions of a frame (of one class, or all)."""
        analysed = self.frames.get(frame)
        shape = (self.info.rows, self.info.columns)
        if analysed is None:
            return np.zeros(shape, dtype=bool)
        indices = [lesion.index for lesion in analysed.prediction.lesions
                   if lesion_class is None or lesion.lesion_class == lesion_class]
        return np.isin(analysed.lesions, indices) if indices else np.zeros(shape, dtype=bool)


def with_type2_present(header: Dataset) -> Dataset:
    """Every type 2 attribute outputs copy is present (empty when the source lacks it):
    highdicom needs them, and an empty value is what the standard asks for."""
    for keyword in sorted(TYPE2_COPIED):
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def read_header(source_path: Path) -> Dataset:
    """A source's header without pixels, made conformant to be copied into outputs."""
    header = read_bounded(source_path, stop_before_pixels=True)
    return with_type2_present(conformant_header(header, source=str(header.get(
        "SOPInstanceUID", source_path.name))))


def load_analysed(info: ImageInfo, source_path: Path, study_results: Path, *,
                  pixels: np.ndarray | None = None, header: Dataset | None = None
                  ) -> AnalysedImage:
    """The source header (read here unless given) and every analysed frame's maps."""
    header = header if header is not None else read_header(source_path)
    frames: dict[int, AnalysedFrame] = {}
    for prediction in info.predictions:
        if prediction.maps_file is None:
            continue
        with np.load(study_results / prediction.maps_file) as stored:
            lesions = (stored["lesions"] if "lesions" in stored.files
                       else np.zeros((info.rows, info.columns), np.uint16))
            saliency = {name.removeprefix("saliency_"): stored[name].astype(np.float32)
                        for name in stored.files if name.startswith("saliency_")}
        frames[prediction.frame] = AnalysedFrame(prediction, lesions, saliency)
    return AnalysedImage(header=header, info=info, frames=frames, pixels=pixels)
