"""Reading within bounds: nesting cut before anything walks the dataset, unconvertible nested
values removed, nothing recursing on the way."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radlens.demo.fuzz import (
    DatasetCase,
    _insert_sorted,
    _nested_sequence,
    base_dataset,
    encode,
    with_nested_error,
    write_case_file,
)
from radlens.dicom_io.nesting import MAX_SEQUENCE_DEPTH, NestingError, read_bounded


def _file(tmp_path: Path, body: bytes, name: str) -> Path:
    ds = base_dataset(generate_uid(), 0)
    return write_case_file(DatasetCase(name, "test", str(ds.SOPInstanceUID),
                                       ExplicitVRLittleEndian, body), tmp_path)


def _depth(ds) -> int:
    depth, item = 0, ds
    while "ContentSequence" in item and item.ContentSequence:
        item = item.ContentSequence[0]
        depth += 1
    return depth


@pytest.mark.parametrize("depth", [3, 20, 400, 5000])
def test_a_bad_value_at_the_bottom_of_deep_nesting_costs_only_itself(tmp_path, depth):
    """pydicom's walk would re-raise the bottom error once per level, its message growing
    about 2.6 times a level (20 levels: more memory than the machine has)."""
    path = _file(tmp_path, with_nested_error(base_dataset(generate_uid(), 0), depth),
                 f"nested-{depth}")
    ds = read_bounded(path)
    assert _depth(ds) == min(depth, MAX_SEQUENCE_DEPTH)
    ds.decode()  # walks everything: nothing left to raise
    copy.deepcopy(ds)
    assert ds.Rows == 24 and ds.pixel_array.shape == (24, 32)  # the image itself is intact


def test_within_bounds_nothing_is_removed(tmp_path):
    path = _file(tmp_path, encode(base_dataset(generate_uid(), 0)), "plain")
    ds = read_bounded(path)
    assert ds.PatientName == "FUZZ^PHANTOM"


def test_an_unconvertible_nested_value_is_removed_and_its_neighbours_kept(tmp_path):
    good = struct.pack("<HH2sH", 0x0040, 0xA040, b"CS", 4) + b"TEXT"
    bad = struct.pack("<HH2sH", 0x0040, 0xA160, b"US", 3) + b"abc"
    body = good + bad
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    sequence = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    path = _file(tmp_path, _insert_sorted(encode(base_dataset(generate_uid(), 0)), sequence,
                                          (0x0040, 0xA730)), "one-bad")
    (item,) = read_bounded(path).ContentSequence
    assert item.ValueType == "TEXT" and "TextValue" not in item


def test_undefined_length_nesting_past_the_reader_is_a_clear_error(tmp_path):
    body = _insert_sorted(encode(base_dataset(generate_uid(), 0)), _nested_sequence(5000),
                          (0x0040, 0xA730))
    with pytest.raises(NestingError, match="nested deeper than pydicom's reader can follow"):
        read_bounded(_file(tmp_path, body, "undefined-5000"))
