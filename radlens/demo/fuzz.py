"""Hostile input for the DICOM listener: a deterministic generator of malformed traffic, and a
client that sends it over real associations.

Two families, both reproducible from a seed:

- **dataset cases**: a small valid ultrasound instance, encoded, then broken: truncated and
  byte-flipped encodings, wrong element lengths (up to 2 GB declared), Rows/Columns 0 or 65535
  with short pixel data, BitsAllocated 1/12/64, SamplesPerPixel 3 with MONOCHROME2, wrong
  NumberOfFrames, missing, overlong or path-like UIDs, an encapsulated transfer syntax with raw
  pixels, deeply nested sequences, huge strings. Each goes out as one C-STORE with valid
  command and file meta, so it reaches the listener's own parsing.
- **PDU cases**: raw bytes on a socket: garbage instead of an A-ASSOCIATE-RQ, requests with
  broken item lengths, and after a valid association P-DATA with lengths that lie (one that
  declares 2 GB), unknown PDU types, truncated PDUs, broken command sets.

``send_dataset_case`` answers with the C-STORE status; ``send_pdu_case`` with how the listener
ended the connection. Used by the test suite (a few hundred cases) and benchmarks/fuzz.py
(thousands).
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

from radlens.dicom_io.acceptor import recv_exactly
from radlens.tasks.breast_us.dicom import US_IMAGE_STORAGE, us_dataset

ROOT = "1.2.826.0.1.3680043.10.511.9."  # radlens's fuzz UIDs
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# What the fuzz client proposes for US Image Storage: each case picks one.
FUZZ_SYNTAXES = (ExplicitVRLittleEndian, JPEG_BASELINE, RLE_LOSSLESS)


def fuzz_uid(*parts: object) -> str:
    """A valid, deterministic UID from ``parts``."""
    digest = int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24], 16)
    return f"{ROOT}{digest}"[:64]


@dataclass(frozen=True)
class DatasetCase:
    """One malformed instance: the dataset's bytes after the file meta, in ``transfer_syntax``."""

    name: str
    family: str
    sop_instance_uid: str  # the C-STORE command's (always a valid UID)
    transfer_syntax: str
    body: bytes


@dataclass(frozen=True)
class PduCase:
    """Raw bytes for one connection; ``associate`` first sends a valid A-ASSOCIATE-RQ."""

    name: str
    family: str
    associate: bool
    payload: bytes


# -- dataset cases -----------------------------------------------------------------------------
def base_dataset(study_uid: str, index: int, rows: int = 24, columns: int = 32) -> Dataset:
    """The valid instance every dataset case starts from (a speckle frame, fake patient)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 255, size=(rows, columns), dtype=np.uint8)
    return us_dataset(pixels, study_uid=study_uid, series_uid=fuzz_uid(study_uid, "series"),
                      instance_number=index + 1, spacing_cm=0.01, patient_id="FUZZ-0001",
                      patient_name="FUZZ^PHANTOM", sop_uid=fuzz_uid(study_uid, index))


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The dataset's bytes without file meta, as the listener receives them."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(buffer, ds)
    return buffer.getvalue()


def _element_offsets(body: bytes) -> list[tuple[int, int, bool]]:
    """(offset of the length field, its value, 4-byte length?) of each top-level element of an
    Explicit VR Little Endian encoding."""
    offsets, position = [], 0
    while position + 8 <= len(body):
        vr = body[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            if position + 12 > len(body):
                break
            length = struct.unpack_from("<I", body, position + 8)[0]
            offsets.append((position + 8, length, True))
            position += 12 + (0 if length == 0xFFFFFFFF else length)
            if length == 0xFFFFFFFF:
                break
        else:
            length = struct.unpack_from("<H", body, position + 6)[0]
            offsets.append((position + 6, length, False))
            position += 8 + length
    return offsets


def _set(ds: Dataset, keyword: str, value: object, vr: str | None = None) -> None:
    """Set an element, however wrong: a string goes in as raw bytes, unvalidated."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = vr or pydicom.datadict.dictionary_VR(tag)
    if isinstance(value, str):
        raw = value.encode("latin-1")
        raw += b"\x00" if vr == "UI" and len(raw) % 2 else b" " if len(raw) % 2 else b""
        ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[tag] = DataElement(tag, vr, value)


def _nested_sequence(depth: int) -> bytes:
    """(0040,A730) nested ``depth`` deep, undefined lengths, an empty item at the bottom."""
    open_sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_item = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    close_sq = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (open_sq + open_item) * depth + (close_item + close_sq) * depth


def nested_error_sequence(depth: int) -> bytes:
    """(0040,A730) nested ``depth`` deep with defined lengths (pydicom reads them lazily, so the
    listener files the instance), and at the bottom a US value of odd length that pydicom
    cannot convert. Walked by pydicom (``Dataset.decode``), the error's message doubles and
    more at every level: 20 levels exhaust a machine's memory."""
    body = struct.pack("<HH2sH", 0x0040, 0xA160, b"US", 3) + b"abc"
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
        body = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return body


def with_nested_error(ds: Dataset, depth: int) -> bytes:
    """``ds`` encoded (Explicit VR Little Endian) with ``nested_error_sequence(depth)``."""
    return _insert_sorted(encode(ds), nested_error_sequence(depth), (0x0040, 0xA730))


def _insert_sorted(body: bytes, element: bytes, tag: tuple[int, int]) -> bytes:
    """``element`` placed among the top-level elements of ``body`` in tag order."""
    key = (tag[0] << 16) | tag[1]
    position = 0
    for offset, _, long_form in _element_offsets(body):
        start = offset - (8 if long_form else 6)
        group, number = struct.unpack_from("<HH", body, start)
        if (group << 16) | number > key:
            position = start
            break
    else:
        position = len(body)
    return body[:position] + element + body[position:]


def dataset_cases(count: int, *, seed: int = 0, study_uid: str | None = None,
                  start: int = 0) -> Iterator[DatasetCase]:
    """``count`` malformed instances, cycling through every family, the same for a seed;
    ``start``: the first case's number (families cycle on from there)."""
    rng = random.Random(seed)
    study = study_uid or fuzz_uid("study", seed)
    for index in range(start, start + count):
        family = DATASET_FAMILIES[index % len(DATASET_FAMILIES)]
        ds = base_dataset(study, index)
        sop_uid = str(ds.SOPInstanceUID)
        name, body, syntax = family(ds, rng)
        yield DatasetCase(f"{index:05d}-{name}", family.__name__.lstrip("_"), sop_uid,
                          syntax, body)


def _truncated(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    body = encode(ds)
    cut = rng.randrange(1, len(body))
    return f"truncated-at-{cut}", body[:cut], ExplicitVRLittleEndian


def _byte_flipped(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    body = bytearray(encode(ds))
    flips = rng.randint(1, 24)
    header_end = min(len(body), 600)  # most flips in the header, where parsing happens
    for _ in range(flips):
        position = rng.randrange(0, header_end if rng.random() < 0.8 else len(body))
        body[position] ^= 1 << rng.randrange(8)
    return f"{flips}-bits-flipped", bytes(body), ExplicitVRLittleEndian


def _wrong_length(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    body = bytearray(encode(ds))
    offset, length, long_form = rng.choice(_element_offsets(bytes(body)))
    if long_form:
        value = rng.choice([0, 1, length + 1, length + 4096, 0x7FFFFFF0, 0xFFFFFFFF,
                            0x80000000])
        struct.pack_into("<I", body, offset, value)
    else:
        value = rng.choice([0, 1, length + 1, 0xFFFF, max(0, length - 3)])
        struct.pack_into("<H", body, offset, value)
    return f"length-{value}-at-{offset}", bytes(body), ExplicitVRLittleEndian


def _dimensions(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    rows, columns = rng.choice([(0, 32), (24, 0), (0, 0), (65535, 32), (24, 65535),
                                (65535, 65535)])
    _set(ds, "Rows", rows)
    _set(ds, "Columns", columns)
    return f"rows-{rows}-columns-{columns}", encode(ds), ExplicitVRLittleEndian


def _bits(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    allocated = rng.choice([1, 12, 64, 0, 7, 33])
    _set(ds, "BitsAllocated", allocated)
    if rng.random() < 0.5:
        _set(ds, "BitsStored", max(1, allocated))
        _set(ds, "HighBit", max(0, allocated - 1))
    return f"bits-allocated-{allocated}", encode(ds), ExplicitVRLittleEndian


def _samples(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    samples = rng.choice([3, 4, 0, 2])
    _set(ds, "SamplesPerPixel", samples)
    if rng.random() < 0.5:
        _set(ds, "PlanarConfiguration", rng.choice([0, 1, 7]))
    return f"samples-{samples}-monochrome2", encode(ds), ExplicitVRLittleEndian


def _frames(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    frames = rng.choice(["0", "-1", "abc", "1000000", "2", "", "1.5", "99999999999"])
    _set(ds, "NumberOfFrames", frames, "IS")
    return f"frames-{frames or 'empty'}", encode(ds), ExplicitVRLittleEndian


def _uids(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    keyword = rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                          "SOPClassUID"])
    value = rng.choice([None, "", "1." + "2" * 200, "../../../../etc/passwd", "/tmp/x",
                        "1.2/../../3", "1.2\\3", "..", "1.2.3\x00.4", "A" * 64, "1..2"])
    if value is None:
        del ds[keyword]
        label = "missing"
    else:
        _set(ds, keyword, value, "UI")
        label = "".join(ch if ch.isalnum() else "_" for ch in value)[:20] or "empty"
    return f"{keyword}-{label}", encode(ds), ExplicitVRLittleEndian


def _encapsulated_raw(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    syntax = rng.choice([JPEG_BASELINE, RLE_LOSSLESS])
    return f"raw-pixels-as-{syntax}", encode(ds), syntax


def _nested(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    depth = rng.choice([16, 64, 200, 1000, 5000])
    body = _insert_sorted(encode(ds), _nested_sequence(depth), (0x0040, 0xA730))
    return f"sequences-{depth}-deep", body, ExplicitVRLittleEndian


def _nested_error(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    depth = rng.choice([10, 20, 100, 400, 1000])
    return f"defined-sequences-{depth}-deep-bad-value", with_nested_error(ds, depth), \
        ExplicitVRLittleEndian


def _huge_string(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    keyword, vr, size = rng.choice([("PatientComments", "LT", 4 * 1024 * 1024),
                                    ("StudyDescription", "LO", 65534),
                                    ("PatientName", "PN", 65534),
                                    ("ImageComments", "LT", 1024 * 1024)])
    _set(ds, keyword, "X" * size, vr)
    return f"{keyword}-{size}-bytes", encode(ds), ExplicitVRLittleEndian


def _pixel_length(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    body = bytearray(encode(ds))
    pixel = body.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
    value = rng.choice([0x7FFFFFF0, 0xFFFFFFFE, 3, 0])
    struct.pack_into("<I", body, pixel + 8, value)
    return f"pixel-data-declares-{value}", bytes(body), ExplicitVRLittleEndian


def _garbage_vr(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    body = bytearray(encode(ds))
    offset, _, long_form = rng.choice(_element_offsets(bytes(body)))
    vr_at = offset - (4 if long_form else 2)
    body[vr_at:vr_at + 2] = rng.choice([b"ZZ", b"\x00\x00", b"SQ", b"OB", b"??"])
    return f"vr-garbage-at-{vr_at}", bytes(body), ExplicitVRLittleEndian


def _implicit_as_explicit(ds: Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    return "implicit-bytes-explicit-syntax", encode(ds, implicit=True), ExplicitVRLittleEndian


DATASET_FAMILIES: tuple[Callable[[Dataset, random.Random], tuple[str, bytes, str]], ...] = (
    _truncated, _byte_flipped, _wrong_length, _dimensions, _bits, _samples, _frames, _uids,
    _encapsulated_raw, _nested, _huge_string, _pixel_length, _garbage_vr,
    _implicit_as_explicit, _nested_error,
)


def write_case_file(case: DatasetCase, folder: Path) -> Path:
    """The case as a Part 10 file (valid meta, broken body): pynetdicom sends what follows
    the meta byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = case.sop_instance_uid
    meta.TransferSyntaxUID = case.transfer_syntax
    meta.ImplementationClassUID = ROOT + "1"
    path = folder / f"{case.name}.dcm"
    with path.open("wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)  # type: ignore[arg-type]
        handle.write(case.body)
    return path


# -- PDU cases ---------------------------------------------------------------------------------
def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, list[str]]],
                 max_pdu: int = 65536) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), built by hand so that a case can break it."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, s.encode())
                                                        for s in syntaxes)
        body += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", max_pdu))
                  + _item(0x52, (ROOT + "1").encode()))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV."""
    pdv = struct.pack(">IB", len(data) + 2, context_id) + bytes([control]) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def echo_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set, Implicit VR Little Endian."""
    command = Dataset()
    command.AffectedSOPClassUID = VERIFICATION
    command.CommandField = 0x0030
    command.MessageID = message_id
    command.CommandDataSetType = 0x0101
    body = encode_implicit(command)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return encode_implicit(group) + body


def encode_implicit(ds: Dataset) -> bytes:
    return encode(ds, implicit=True)


def pdu_cases(count: int, *, called: str = "RADLENS", calling: str = "FUZZER", seed: int = 0
              ) -> Iterator[PduCase]:
    """``count`` hostile connections, cycling through every family, the same for a seed."""
    rng = random.Random(seed)
    valid = associate_rq(called, calling, [(1, VERIFICATION, [IMPLICIT_LE])])
    families: list[Callable[[], tuple[str, str, bool, bytes]]] = [
        lambda: ("garbage", f"{(n := rng.randint(1, 300))}-random-bytes", False,
                 rng.randbytes(n)),
        lambda: ("unknown-pdu-type", "before-association", False,
                 struct.pack(">BBI", rng.choice([0x00, 0x08, 0x09, 0xFF]), 0, 4) + b"abcd"),
        lambda: ("associate-lies", "declares-2GB", False,
                 struct.pack(">BBI", 0x01, 0, 0x7FFFFFF0) + valid[6:]),
        lambda: ("associate-lies", "item-overruns", False, _break_item(valid, rng)),
        lambda: ("associate-lies", "truncated", False, valid[:rng.randrange(1, len(valid))]),
        lambda: ("associate-lies", "no-contexts", False,
                 associate_rq(called, calling, [])),
        lambda: ("associate-lies", "600-contexts", False, associate_rq(
            called, calling, [(2 * i + 1 & 0xFF, VERIFICATION, [IMPLICIT_LE] * 3)
                              for i in range(600)])),
        lambda: ("p-data-lies", "declares-2GB", True,
                 struct.pack(">BBI", 0x04, 0, 0x7FFFFFF0) + b"\x00" * 64),
        lambda: ("p-data-lies", "pdv-longer-than-pdu", True,
                 struct.pack(">BBI", 0x04, 0, 12) + struct.pack(">IB", 5000, 1) + b"\x03abc"),
        lambda: ("p-data-lies", "unknown-context", True,
                 p_data(rng.choice([3, 99, 255]), 0x03, echo_command())),
        lambda: ("p-data-lies", "garbage-command", True,
                 p_data(1, 0x03, rng.randbytes(rng.randint(1, 200)))),
        lambda: ("p-data-lies", "dataset-before-command", True,
                 p_data(1, 0x02, rng.randbytes(64))),
        lambda: ("p-data-lies", "truncated-command", True,
                 p_data(1, 0x03, echo_command()[:rng.randint(1, 60)])),
        lambda: ("after-association", "unknown-pdu-type", True,
                 struct.pack(">BBI", rng.choice([0x08, 0x09, 0x7F]), 0, 2) + b"zz"),
        lambda: ("after-association", "second-associate-rq", True, valid),
        lambda: ("after-association", "truncated-pdu", True,
                 p_data(1, 0x03, echo_command())[:rng.randint(1, 20)]),
    ]
    for index in range(count):
        family, name, associate, payload = families[index % len(families)]()
        yield PduCase(f"{index:05d}-{family}-{name}", family, associate, payload)


def _break_item(valid: bytes, rng: random.Random) -> bytes:
    broken = bytearray(valid)
    # the application context item starts right after the fixed 68-byte header
    position = 6 + 68 + rng.choice([0, 0, 2])
    struct.pack_into(">H", broken, position + 2 if position == 74 else position,
                     rng.choice([0, 0xFFFF, 4000]))
    return bytes(broken)


# -- sending -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PduOutcome:
    """How the listener ended a hostile connection."""

    closed: bool  # it closed the connection within the wait
    answer: str  # the first PDU type it sent back: "associate-ac", "abort", "reject", ... or ""
    seconds: float


_PDU_NAMES = {0x02: "associate-ac", 0x03: "associate-rj", 0x04: "p-data", 0x06: "release-rp",
              0x07: "abort"}


def send_pdu_case(case: PduCase, host: str, port: int, *, called: str = "RADLENS",
                  calling: str = "FUZZER", wait_s: float = 10.0) -> PduOutcome:
    """Send a case's bytes, stop sending, and read until the listener closes (or ``wait_s``)."""
    started = time.monotonic()
    answers: list[str] = []
    with socket.create_connection((host, port), timeout=wait_s) as connection:
        try:
            if case.associate:
                connection.sendall(associate_rq(called, calling,
                                                [(1, VERIFICATION, [IMPLICIT_LE])]))
                header = recv_exactly(connection, 6)
                length = struct.unpack(">I", header[2:6])[0] if len(header) == 6 else 0
                recv_exactly(connection, length)
                answers.append(_PDU_NAMES.get(header[0], f"0x{header[0]:02x}")
                               if header else "")
            connection.sendall(case.payload)
            connection.shutdown(socket.SHUT_WR)
        except OSError:  # the listener closed already (reset, broken pipe, not connected)
            return PduOutcome(True, answers[0] if answers else "", time.monotonic() - started)
        closed = False
        deadline = started + wait_s
        try:
            while time.monotonic() < deadline:
                connection.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = connection.recv(65536)
                if not chunk:
                    closed = True
                    break
                if len(answers) < 2:
                    answers.append(_PDU_NAMES.get(chunk[0], f"0x{chunk[0]:02x}"))
        except TimeoutError:
            closed = False
        except OSError:
            closed = True
    answer = answers[-1] if answers else ""
    return PduOutcome(closed, answer, time.monotonic() - started)



@dataclass(frozen=True)
class DatasetOutcome:
    """The listener's answer to one malformed instance."""

    status: int | None  # the C-STORE status; None when there was no answer
    error: str | None = None


def send_dataset_case(path: Path, host: str, port: int, *, called: str = "RADLENS",
                      calling: str = "FUZZER", timeout_s: float = 30.0) -> DatasetOutcome:
    """One association, one C-STORE of the case's file (its bytes as they are), release."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for syntax in FUZZ_SYNTAXES:
        ae.add_requested_context(US_IMAGE_STORAGE, syntax)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return DatasetOutcome(None, "no association")
    try:
        response = assoc.send_c_store(path)
    except (ValueError, RuntimeError, OSError, AttributeError) as exc:
        return DatasetOutcome(None, f"{type(exc).__name__}: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        return DatasetOutcome(None, "no response (timeout or abort)")
    return DatasetOutcome(int(response.Status))


def echo_seconds(host: str, port: int, *, called: str = "RADLENS", calling: str = "FUZZER",
                 timeout_s: float = 10.0) -> float | None:
    """How long a fresh association with one C-ECHO takes; None when it fails."""
    from radlens.dicom_io.scu import echo
    from radlens.errors import DestinationError

    started = time.monotonic()
    try:
        status = echo(host, port, called, calling_aet=calling, timeout_s=timeout_s)
    except DestinationError:
        return None
    return time.monotonic() - started if status == 0 else None


class RawAssociation:
    """A hand-driven association over a plain socket, for senders no toolkit would be: one
    that trickles a PDU a second, one that streams more than the node accepts."""

    def __init__(self, host: str, port: int, *, source: str | None = None,
                 called: str = "RADLENS", calling: str = "RAWSCU", timeout_s: float = 30.0,
                 contexts: list[tuple[int, str, list[str]]] | None = None) -> None:
        self.connection = socket.create_connection(
            (host, port), timeout=timeout_s,
            source_address=(source, 0) if source is not None else None)
        self.connection.sendall(associate_rq(called, calling, contexts or [
            (1, US_IMAGE_STORAGE, [ExplicitVRLittleEndian])]))
        kind, _ = self.read_pdu()
        if kind != 0x02:
            raise ConnectionError(f"association not accepted (PDU type 0x{kind:02x})")

    def read_pdu(self) -> tuple[int, bytes]:
        header = recv_exactly(self.connection, 6)
        if len(header) < 6:
            raise ConnectionError("connection closed")
        length = struct.unpack(">I", header[2:6])[0]
        return header[0], recv_exactly(self.connection, length)

    def store_pdus(self, sop_instance_uid: str, dataset: bytes, *, fragment: int = 16384,
                   message_id: int = 1, context_id: int = 1) -> Iterator[bytes]:
        """The P-DATA-TF PDUs of one C-STORE-RQ: the command, then the dataset in fragments."""
        command = Dataset()
        command.AffectedSOPClassUID = US_IMAGE_STORAGE
        command.CommandField = 0x0001
        command.MessageID = message_id
        command.Priority = 0
        command.CommandDataSetType = 0x0000
        command.AffectedSOPInstanceUID = sop_instance_uid
        body = encode_implicit(command)
        group = Dataset()
        group.CommandGroupLength = len(body)
        yield p_data(context_id, 0x03, encode_implicit(group) + body)
        for start in range(0, len(dataset), fragment):
            last = start + fragment >= len(dataset)
            yield p_data(context_id, 0x02 if last else 0x00, dataset[start:start + fragment])

    def read_status(self) -> int:
        """The Status of the next DIMSE response."""
        kind, body = self.read_pdu()
        if kind != 0x04:
            raise ConnectionError(f"expected P-DATA, got PDU type 0x{kind:02x}")
        data = body[6:]  # PDV length (4), context (1), control header (1)
        command = pydicom.filereader.read_dataset(DicomBytesIO(data), True, True)
        return int(command.Status)

    def release(self) -> None:
        try:
            self.connection.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
            self.read_pdu()
        except (OSError, ConnectionError):
            pass
        self.connection.close()
