"""An image the lesion model read, as its outputs see it: its header, findings and maps.

The analyser keeps each frame's lesion labels, class probabilities and saliency maps in
``results/<Study>/maps/*.npz``; this module brings them back next to the source header so the
SEG, SR and map builders all read one object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radlens.dicom_io.writers.headers import read_header
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
