"""A source image's header as every output copies it: read without pixels, made conformant,
its type 2 attributes present."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from radlens.dicom_io.conformance import TYPE2_COPIED, conformant_header
from radlens.dicom_io.nesting import read_bounded


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
