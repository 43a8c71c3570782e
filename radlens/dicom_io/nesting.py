"""Reading a DICOM file without letting its nesting decide how much work or memory it costs.

pydicom reads sequences of defined length lazily and walks them recursively when asked
(``Dataset.decode``, ``walk``, ``copy.deepcopy``, ``str``, writing). Its ``tag_in_exception``
re-raises an error with the whole formatted traceback in the message, once per level of that
recursion, and each level's traceback holds the one below: the message grows about 2.6 times a
level. A 14 KB instance whose Content Sequence nests 20 deep with one unconvertible value at the
bottom needs more memory than the machine has (docs/robustness.md has the reproduction).

So every file radlens reads goes through :func:`read_bounded`: after pydicom's read, the
sequences are opened here one level at a time with an explicit stack (no recursion), every
element inside a sequence is converted once under its own ``try`` (an element pydicom cannot
convert is removed, so no later walk can raise from inside), and sequences nested deeper than
``max_depth`` are removed before anything walks the dataset. Top-level elements other than
sequences are left as read (the pixels stay deferred). pydicom (3.0) offers no depth limit or
lenient walk of its own; highdicom and pynetdicom read through pydicom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from radlens.errors import UnsupportedImageError
from radlens.logs import kv

log = logging.getLogger(__name__)

MAX_SEQUENCE_DEPTH = 16  # the deepest an image header radlens reads needs is about 5
MAX_ELEMENTS = 200_000  # nested elements opened per file; a header has a few thousand at most
_UNDEFINED = 0xFFFFFFFF


class NestingError(UnsupportedImageError):
    """The file cannot be read within the bounds (nesting pydicom's reader cannot follow)."""


@dataclass
class BoundedRead:
    """What bounding removed from one dataset, for the log and the findings."""

    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.removed)


def _maybe_sequence(raw: Any) -> bool:
    """Whether an element still in its stored form is, or could be read as, a sequence."""
    vr = getattr(raw, "VR", None)
    if vr == "SQ":
        return True
    if vr in (None, "UN"):
        if getattr(raw, "length", 0) == _UNDEFINED:
            return True
        try:
            return dictionary_VR(raw.tag) == "SQ"
        except KeyError:
            return False
    return False


def bound_dataset(ds: Dataset, *, max_depth: int = MAX_SEQUENCE_DEPTH,
                  source: str = "") -> BoundedRead:
    """Open ``ds``'s sequences level by level, in place: remove sequences deeper than
    ``max_depth`` (top-level sequences are depth 1) and every nested element pydicom cannot
    convert. Top-level non-sequence elements are left unconverted. Never recurses."""
    report = BoundedRead()
    stack: list[tuple[Dataset, int, str]] = [(ds, 0, "")]
    opened = 0
    while stack:
        dataset, depth, path = stack.pop()
        for tag in list(dataset._dict.keys()):
            stored = dataset._dict[tag]
            is_sequence = stored.VR == "SQ" if not isinstance(stored, RawDataElement) \
                else _maybe_sequence(stored)
            if depth == 0 and not is_sequence:
                continue  # top-level values stay lazy: pixels, and what nobody reads
            where = f"{path}{BaseTag(tag)}"
            opened += 1
            if is_sequence and depth + 1 > max_depth:
                del dataset._dict[tag]
                report.removed.append(f"{where}: sequence nested deeper than {max_depth}")
                continue
            if opened > MAX_ELEMENTS:
                del dataset._dict[tag]
                report.removed.append(f"{where}: more than {MAX_ELEMENTS} nested elements")
                continue
            try:
                element = dataset[tag]
            except Exception as exc:  # noqa: BLE001 - any conversion error: the element goes
                del dataset._dict[tag]
                first = str(exc).split("\n", 1)[0]
                reason = first.rsplit("got exception: ", 1)[-1][:200]
                report.removed.append(f"{where}: unreadable ({type(exc).__name__}: {reason})")
                continue
            if element.VR == "SQ":
                for number, item in enumerate(element.value or []):
                    stack.append((item, depth + 1, f"{where}[{number}]/"))
    if report.changed:
        log.warning("source elements removed before reading", extra=kv(
            source=source, removed=len(report.removed), first=report.removed[0]))
    return report


def read_bounded(source: str | Path | BinaryIO, *, stop_before_pixels: bool = False,
                 defer_size: int | None = None, specific_tags: list[Any] | None = None,
                 force: bool = False, max_depth: int = MAX_SEQUENCE_DEPTH) -> Dataset:
    """``pydicom.dcmread`` followed by :func:`bound_dataset`. A stream whose undefined-length
    nesting is deeper than pydicom's reader can follow raises NestingError (a clear reason,
    not a RecursionError from deep inside pydicom); pydicom's own errors pass through."""
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels,
                             defer_size=defer_size, specific_tags=specific_tags, force=force)
    except RecursionError:
        raise NestingError("sequences nested deeper than pydicom's reader can follow") \
            from None
    name = str(source) if isinstance(source, (str, Path)) else ""
    bound_dataset(ds, max_depth=max_depth, source=name)
    return ds
