"""DICOM Segmentation (highdicom) of what a task segmented: the SEG written, and which segment
holds what, for the SR's references to it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import highdicom as hd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenSegmentation:
    """A SEG, which segment holds what, and the source images it segments."""

    dataset: hd.seg.Segmentation
    segment_numbers: dict[str, int]  # what a segment holds (a class, a label) -> its number
    source_sop_instance_uids: tuple[str, ...]


