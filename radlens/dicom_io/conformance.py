"""Source headers made safe to copy into the objects radlens writes.

Every output copies attributes from its source (patient and study modules, dates, times, names,
character set). Real senders put anything there: ``14:04:38`` as a time, ``19700230`` as a date,
``heavy`` as a weight, an unknown character set, sequences nested hundreds deep. A strict library
(highdicom) refuses such a value at construction, which would sink the study's answer; copying it
as it is would make our objects non-conformant. So each header is read once and made conformant
here: a value that can be repaired is repaired (separators dropped from a date or a time, a code
string upper-cased, text cut to its VR's length), one that cannot is emptied where the standard
requires the attribute (type 2) or left out otherwise. Each change is one log line naming the
attribute and the fix, never a value (it may identify a patient). UIDs are never changed: they
are how the outputs reference the source.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from datetime import date

from pydicom import config
from pydicom.charset import decode_element
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName, validate_value

from radlens.dicom_io.nesting import bound_dataset
from radlens.logs import kv

log = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
MAX_SEQUENCE_DEPTH = 6  # deeper nesting is no image header a writer needs

# Type 2 attributes of the patient and study modules that every derived object copies: an empty
# value is conformant, so an unusable one is emptied rather than removed.
TYPE2_COPIED = frozenset({"PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                          "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                          "ReferringPhysicianName"})
_TEXT_LIMITS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "AS": 4}
_CHECKED_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                          "TM", "AE"})
_CS_ALLOWED = re.compile(r"^[A-Z0-9 _]*$")
# Control characters no value may hold once re-declared as UTF-8 (ESC only introduces other
# character sets); texts (LT, ST) keep tab, line feed, form feed and carriage return.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def conformant_header(header: Dataset, *, source: str = "") -> Dataset:
    """Make ``header`` (a source's header read without pixels) safe to copy into outputs, in
    place, and return it. Text is decoded with the source's character set and re-declared as
    UTF-8, so a broken or unknown character set costs nothing but a log line."""
    for removed in bound_dataset(header, max_depth=MAX_SEQUENCE_DEPTH, source=source).removed:
        log.warning("source attribute made conformant",
                    extra=kv(source=source, attribute=removed.split(":", 1)[0],
                             fix=f"left out: {removed.split(': ', 1)[-1]}"))
    _declare_utf8(header, source)  # decode() walks the dataset: only once it is bounded
    for tag in list(header.keys()):
        element = _element(header, tag)
        if element.VR not in _CHECKED_VRS or element.tag.group in (0x0002, 0x7FE0):
            continue
        fixed, action = _conform(element)
        if action is None:
            continue
        keyword = element.keyword or str(element.tag)
        if fixed is None and keyword in TYPE2_COPIED:
            fixed, action = "", "emptied (type 2)"
        if fixed is None:
            del header[tag]
        else:
            header[tag] = DataElement(tag, element.VR, fixed)
        log.warning("source attribute made conformant",
                    extra=kv(source=source, attribute=keyword, vr=element.VR, fix=action))
    return header


def _element(header: Dataset, tag: BaseTag) -> DataElement:
    """The element, or, when pydicom cannot convert its stored bytes (a DS of ``heavy``), the
    stored text as it is, for ``_conform`` to judge."""
    try:
        return header[tag]
    except Exception:
        raw = header.get_item(tag)
        text = raw.value.decode("latin-1") if isinstance(raw.value, bytes) else str(raw.value)
        element = DataElement(tag, "UN", None)
        element.VR = raw.VR or "UN"
        element._value = text.strip(" \x00")
        return element


def _declare_utf8(header: Dataset, source: str) -> None:
    declared = header.get("SpecificCharacterSet")
    _decode_text(header, source)
    if declared not in (None, "", UTF8, "ISO_IR 6", ["ISO_IR 192"]):
        log.info("source character set re-declared", extra=kv(
            source=source, attribute="SpecificCharacterSet", fix=f"written as {UTF8}"))
    header.SpecificCharacterSet = UTF8


def _decode_text(header: Dataset, source: str) -> None:
    """Every text value to str with its character set (pydicom's fallbacks for unknown sets),
    one element at a time: an element that cannot be read or decoded (an unknown VR, bytes no
    character set takes) is emptied when outputs need it (type 2) and left out otherwise,
    instead of stopping the rest (``Dataset.decode`` stops at the first). Iterative: the
    header is bounded already, but nothing here recurses either."""
    stack = [header]
    while stack:
        dataset = stack.pop()
        encodings = dataset._character_set
        for tag in list(dataset._dict.keys()):
            if BaseTag(tag).group in (0x0002, 0x7FE0):
                continue
            try:
                element = dataset[tag]
                if element.VR == "SQ":
                    stack.extend(element.value or [])
                    continue
                decode_element(element, encodings)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types here
                keyword = dictionary_keyword_or_tag(tag)
                if keyword in TYPE2_COPIED and dataset is header:
                    header[tag] = DataElement(tag, dictionary_VR(tag), "")
                    fix = "emptied (type 2): unreadable"
                else:
                    del dataset[tag]
                    fix = "left out: unreadable"
                reason = str(exc).split("\n", 1)[0].rsplit("got exception: ", 1)[-1]
                log.warning("source attribute made conformant", extra=kv(
                    source=source, attribute=keyword, fix=fix,
                    error=f"{type(exc).__name__}: {_reason(Exception(reason))}"))


def dictionary_keyword_or_tag(tag: int) -> str:
    try:
        return keyword_for_tag(tag) or str(BaseTag(tag))
    except KeyError:
        return str(BaseTag(tag))


def _values(element: DataElement) -> list[object]:
    value = element.value
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, PersonName)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _conform(element: DataElement) -> tuple[object | None, str | None]:
    """(new value, what was done) or (value, None) when it is conformant already. A new value
    of None means: no conformant value could be made."""
    values = _values(element)
    if not values:
        return element.value, None
    vr = element.VR
    if len(values) > 1 and _single_valued(element.tag):
        # "A\\B" in a name read as two names: highdicom takes one name, so keep the first
        fixed, action = _conform_one(vr, values[0])
        if fixed is None:
            return None, f"left out: {action}"
        return fixed, f"kept the first of {len(values)} values (value multiplicity 1)"
    repaired: list[object] = []
    actions: set[str] = set()
    for value in values:
        fixed, action = _conform_one(vr, value)
        if fixed is None:
            return None, f"left out: {action}"
        repaired.append(fixed)
        if action:
            actions.add(action)
    if not actions:
        return element.value, None
    new_value: object = repaired[0] if len(repaired) == 1 else repaired
    return new_value, "; ".join(sorted(actions))


def _single_valued(tag: BaseTag) -> bool:
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:  # a private or unknown attribute: its multiplicity is its own
        return False


def _conform_one(vr: str, value: object) -> tuple[object | None, str | None]:
    if vr in ("DS", "IS"):
        return _number(vr, value)
    text = str(value)
    controls = _TEXT_CONTROLS if vr in ("LT", "ST") else _CONTROLS
    if controls.search(text):
        fixed, action = _conform_one(vr, controls.sub("", text))
        return fixed, "; ".join(filter(None, ("control characters removed", action)))
    if vr == "DA":
        return _date(text)
    if vr == "TM":
        return _time(text)
    if vr == "CS" and not _CS_ALLOWED.match(text):
        upper = text.upper().strip()
        if _CS_ALLOWED.match(upper) and len(upper) <= 16:
            return upper, "code string upper-cased"
        return None, "not a code string"
    limit = _TEXT_LIMITS.get(vr)
    if limit is not None and len(text) > limit:
        text, cut = text[:limit], f"cut to {limit} characters"
    else:
        cut = None
    if "\\" in text and vr not in ("PN", "LT", "ST"):  # elsewhere a value delimiter
        return None, "holds a backslash"
    try:
        validate_value(vr, text, config.RAISE)
    except (ValueError, TypeError) as exc:
        return None, _reason(exc)
    if cut:
        return text, cut
    return value, None


def _number(vr: str, value: object) -> tuple[object | None, str | None]:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, "not a number"
    if not math.isfinite(number):
        return None, "not a finite number"
    if vr == "IS":
        if not number.is_integer() or abs(number) >= 2**31:
            return None, "not a 32-bit integer"
    try:
        validate_value(vr, str(value).strip(), config.RAISE)
    except (ValueError, TypeError):
        return (int(number) if vr == "IS" else _ds_text(number)), "number re-written"
    return value, None


def _ds_text(number: float) -> str:
    text = f"{number:.10g}"
    return text if len(text) <= 16 else f"{number:.8e}"[:16]


def _date(text: str) -> tuple[str | None, str | None]:
    digits = re.sub(r"[.\-/ ]", "", text.strip())
    if not re.fullmatch(r"\d{8}", digits):
        return None, "not a date"
    try:
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None, "not a calendar date"
    return (text, None) if digits == text else (digits, "separators removed")


def _time(text: str) -> tuple[str | None, str | None]:
    stripped = text.strip()
    compact = stripped.replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", compact)
    if not match:
        return None, "not a time"
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups()[:3])
    if hours > 23 or minutes > 59 or seconds > 60:
        return None, "not a time of day"
    if compact == text:
        return text, None
    return compact, "separators removed"


def _reason(exc: Exception) -> str:
    message = str(exc).split("\n")[0]
    return re.sub(r"'.*'", "(value)", message)[:120]
