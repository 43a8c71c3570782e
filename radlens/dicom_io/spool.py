"""The durable spool: received instances on disk, exactly as received, indexed in the state.

The spool owns the "received" state. ``store`` returns only after the file is fsync'ed under its
final name (temp file + fsync + rename + directory fsync) and its index row is committed, so the
listener may answer Success; anything less raises and the listener answers a failure status.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import sqlalchemy as sa

from radlens.db import Database, instances, quarantine
from radlens.errors import InvalidDatasetError, SpoolError
from radlens.logs import kv

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
QUARANTINE_DIR = "quarantine"
_PARTIAL_SUFFIX = ".partial"
# UIDs become path components: accept only what cannot escape the spool folder.
_PATH_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
RECOVERED_CALLING_AET = "(recovered)"
_IDENTIFYING_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class UnparseableDatasetError(InvalidDatasetError):
    """The bytes are not a DICOM dataset pydicom can read."""


class MissingUidError(InvalidDatasetError):
    """The dataset lacks (or has unusable) SOP, study or series UIDs."""


@dataclass(frozen=True)
class InstanceUids:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    file_transfer_syntax_uid: str | None = None  # from the file meta, when the stream has one


@dataclass(frozen=True)
class StoredInstance:
    """One instance made durable (or recognised as already held, ``duplicate=True``)."""

    uids: InstanceUids
    transfer_syntax_uid: str
    calling_aet: str
    path: Path
    size_bytes: int
    received_at: float
    duplicate: bool = False


def read_uids(source: bytes | Path) -> InstanceUids:
    """Parse just enough of a Part 10 stream to file it; raise InvalidDatasetError if not."""
    try:
        ds = pydicom.dcmread(
            BytesIO(source) if isinstance(source, bytes) else source,
            stop_before_pixels=True, specific_tags=list(_IDENTIFYING_TAGS),
        )
        values = {tag: str(ds.get(tag, "") or "").strip() for tag in _IDENTIFYING_TAGS}
        meta_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    except Exception as exc:  # pydicom raises many types on damaged bytes (zlib.error on a
        # broken deflate stream, RecursionError on absurd nesting): each is "cannot parse"
        raise UnparseableDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    missing = [tag for tag, value in values.items() if not value]
    if "SOPClassUID" in missing and "SOPInstanceUID" in missing:
        # pydicom reads garbage leniently as "no elements": that is an unparseable stream.
        raise UnparseableDatasetError(
            "cannot parse dataset: no identifying element could be read (corrupt or not DICOM)")
    if missing:
        raise MissingUidError(f"dataset lacks {', '.join(missing)}")
    unsafe = [tag for tag, value in values.items() if not _PATH_SAFE_UID.match(value)]
    if unsafe:
        raise MissingUidError(f"dataset has malformed {', '.join(unsafe)}")
    return InstanceUids(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        file_transfer_syntax_uid=str(meta_syntax) if meta_syntax else None,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` at ``path`` so that a crash leaves either the whole file or none."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_PARTIAL_SUFFIX}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class Spool:
    """Files received instances under ``<data>/spool/<Study>/<Series>/<SOP>.dcm``."""

    def __init__(self, data_dir: Path, db: Database, *, fsync: bool = True,
                 min_free_mb: int = 0, identical_resend: str = "ignore") -> None:
        """``identical_resend``: what an instance sent again byte for byte does once its study
        was taken into a job: "ignore" (a duplicate) or "reprocess" (pending again, so the
        study gets a new revision). A changed instance under a known SOP Instance UID always
        replaces the file and is pending again."""
        if identical_resend not in ("ignore", "reprocess"):
            raise ValueError(f"identical_resend must be ignore or reprocess, not "
                             f"{identical_resend!r}")
        self.identical_resend = identical_resend
        self.data_dir = data_dir
        self.root = data_dir / SPOOL_DIR
        self.quarantine_root = data_dir / QUARANTINE_DIR
        self.db = db
        self.fsync = fsync
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        for folder in (self.root, self.quarantine_root):
            folder.mkdir(parents=True, exist_ok=True)

    # -- receiving -------------------------------------------------------------------------
    def store(self, encoded: bytes, *, calling_aet: str,
              transfer_syntax_uid: str) -> StoredInstance:
        """Make one Part 10 byte stream durable and indexed.

        On return the file is fsync'ed under its final name (temp file, fsync, rename, folder
        fsync) and its index row committed: the caller may answer Success. Raises
        InvalidDatasetError (unusable dataset) or SpoolError (disk, I/O, index).
        """
        uids = read_uids(encoded)
        now = time.time()
        try:
            found = self.db.rows(
                sa.select(instances.c.path, instances.c.size_bytes, instances.c.received_at,
                          instances.c.job_id)
                .where(instances.c.sop_instance_uid == uids.sop_instance_uid))
        except sa.exc.SQLAlchemyError as exc:
            raise SpoolError(f"cannot read the index: {exc}") from exc
        existing = found[0] if found else None
        if existing is not None:
            return self._stored_again(existing, encoded, uids, calling_aet=calling_aet,
                                      transfer_syntax_uid=transfer_syntax_uid, now=now)
        self._check_free_space(len(encoded))
        relative = Path(SPOOL_DIR, uids.study_instance_uid, uids.series_instance_uid,
                        f"{uids.sop_instance_uid}.dcm")
        path = self.data_dir / relative
        try:
            self._ensure_dir(path.parent)
            try:
                write_durably(path, encoded, fsync=self.fsync)
            except FileNotFoundError:  # a retention sweep removed the empty folder just now
                self._known_dirs.discard(path.parent)
                self._ensure_dir(path.parent)
                write_durably(path, encoded, fsync=self.fsync)
        except OSError as exc:
            raise SpoolError(f"cannot write {relative}: {exc.strerror or exc}") from exc
        try:
            # The file above is the durable record; this row can be rebuilt from it
            # (reconcile), so its commit does not wait for a WAL fsync of its own.
            self._index(uids, transfer_syntax_uid, calling_aet, relative, len(encoded), now)
        except sa.exc.IntegrityError:
            # The same instance arrived concurrently on another association and won the race.
            return StoredInstance(uids, transfer_syntax_uid, calling_aet, path, len(encoded),
                                  now, duplicate=True)
        except sa.exc.SQLAlchemyError as exc:
            raise SpoolError(f"cannot index {relative}: {exc}") from exc
        return StoredInstance(uids, transfer_syntax_uid, calling_aet, path, len(encoded), now)

    def _stored_again(self, existing: Any, encoded: bytes, uids: InstanceUids, *,
                      calling_aet: str, transfer_syntax_uid: str, now: float
                      ) -> StoredInstance:
        """An instance whose SOP Instance UID the index holds already. Byte for byte the same
        (a sender re-sending what it was not sure had arrived): a duplicate, unless
        ``identical_resend`` is "reprocess" and its study was analysed. Changed (a corrected
        header, a re-export): the file is replaced and the instance is pending again, so its
        study is analysed again as a new revision."""
        path = self.data_dir / existing["path"]
        try:
            identical = (existing["size_bytes"] == len(encoded)
                         and path.read_bytes() == encoded)
        except OSError:  # the file went away (retention): take the new one
            identical = False
        if identical and (self.identical_resend == "ignore" or existing["job_id"] is None):
            return StoredInstance(uids, transfer_syntax_uid, calling_aet, path,
                                  existing["size_bytes"], existing["received_at"],
                                  duplicate=True)
        if not identical:
            self._check_free_space(len(encoded))
            try:
                self._ensure_dir(path.parent)  # a retention sweep may have removed it
                write_durably(path, encoded, fsync=self.fsync)
            except OSError as exc:
                raise SpoolError(f"cannot write {existing['path']}: {exc.strerror or exc}"
                                 ) from exc
        try:
            with self.db.transaction() as conn:
                updated = conn.execute(
                    sa.update(instances)
                    .where(instances.c.sop_instance_uid == uids.sop_instance_uid)
                    .values(job_id=None, received_at=now, size_bytes=len(encoded),
                            transfer_syntax_uid=transfer_syntax_uid,
                            calling_aet=calling_aet)).rowcount
        except sa.exc.SQLAlchemyError as exc:
            raise SpoolError(f"cannot index {existing['path']}: {exc}") from exc
        if not updated:
            # The retention sweep removed the instance (file and row) meanwhile: file it anew.
            return self.store(encoded, calling_aet=calling_aet,
                              transfer_syntax_uid=transfer_syntax_uid)
        log.info("instance received again: its study will be analysed again", extra=kv(
            sop=uids.sop_instance_uid, study=uids.study_instance_uid,
            change="identical (assembly.identical_resend: reprocess)" if identical
            else "changed"))
        return StoredInstance(uids, transfer_syntax_uid, calling_aet, path, len(encoded), now)

    def _index(self, uids: InstanceUids, transfer_syntax_uid: str, calling_aet: str,
               relative: Path, size: int, received_at: float) -> None:
        with self.db.transaction(sync=False) as conn:
            conn.execute(sa.insert(instances).values(
                sop_instance_uid=uids.sop_instance_uid, sop_class_uid=uids.sop_class_uid,
                study_instance_uid=uids.study_instance_uid,
                series_instance_uid=uids.series_instance_uid,
                transfer_syntax_uid=transfer_syntax_uid, calling_aet=calling_aet,
                path=str(relative), size_bytes=size, received_at=received_at))

    def _check_free_space(self, needed: int) -> None:
        if not self.min_free_bytes:
            return
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise SpoolError(f"cannot read free space of {self.root}: {exc}") from exc
        if free - needed < self.min_free_bytes:
            raise SpoolError(
                f"disk nearly full: {free // 2**20} MiB free, reserve is "
                f"{self.min_free_bytes // 2**20} MiB (storage.min_free_mb)"
            )

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs and folder.is_dir():  # retention removes empty folders
            return
        with self._dirs_lock:
            # Create each missing level and fsync its parent so the new entry itself is durable.
            missing = []
            probe = folder
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            for level in reversed(missing):
                level.mkdir(exist_ok=True)
                if self.fsync:
                    _fsync_dir(level.parent)
            self._known_dirs.add(folder)

    # -- bad input ---------------------------------------------------------------------------
    def quarantine(self, encoded: bytes, *, calling_aet: str, reason: str) -> Path:
        """Keep bytes we could not file, with the reason beside them; raises SpoolError."""
        now = time.time()
        stem = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:12]
        path = self.quarantine_root / f"{stem}.dcm"
        sidecar = {"received_at": now, "calling_aet": calling_aet, "reason": reason,
                   "size_bytes": len(encoded)}
        try:
            write_durably(path, encoded, fsync=self.fsync)
            write_durably(path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode(),
                          fsync=self.fsync)
            with self.db.transaction() as conn:
                conn.execute(sa.insert(quarantine).values(
                    received_at=now, calling_aet=calling_aet,
                    path=str(path.relative_to(self.data_dir)), size_bytes=len(encoded),
                    reason=reason))
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise SpoolError(f"cannot quarantine dataset: {exc}") from exc
        log.warning("dataset quarantined", extra=kv(path=path.name, calling_aet=calling_aet,
                                                   reason=reason))
        return path

    # -- start-up ----------------------------------------------------------------------------
    def reconcile(self) -> int:
        """Index every spooled file that has no index row (after a power loss the last rows may
        be gone while their fsync'ed files are not); returns how many were recovered."""
        indexed = {row["path"] for row in self.db.rows(sa.select(instances.c.path))}
        recovered = 0
        for path in sorted(self.root.glob("*/*/*.dcm")):
            relative = path.relative_to(self.data_dir)
            if str(relative) in indexed:
                continue
            try:
                uids = read_uids(path)
                if uids.file_transfer_syntax_uid is None:
                    raise InvalidDatasetError("no transfer syntax in its file meta")
                status = path.stat()
                self._index(uids, uids.file_transfer_syntax_uid, RECOVERED_CALLING_AET,
                            relative, status.st_size, status.st_mtime)
            except sa.exc.IntegrityError:
                continue
            except (InvalidDatasetError, OSError) as exc:
                log.warning("cannot recover spooled file", extra=kv(path=str(relative),
                                                                    error=str(exc)))
                continue
            recovered += 1
        if recovered:
            log.warning("indexed spooled files missing from the index", extra=kv(
                count=recovered))
        return recovered

    def remove_partials(self, *, older_than_s: float | None = None) -> int:
        """Delete temp files a crash left behind (never acknowledged, so nothing is lost).
        ``older_than_s``: only those last written that long ago, where other processes may be
        writing theirs in the same spool."""
        removed = 0
        cutoff = time.time() - older_than_s if older_than_s is not None else None
        for folder in (self.root, self.quarantine_root):
            for partial in folder.rglob(f"*{_PARTIAL_SUFFIX}"):
                try:
                    if cutoff is not None and partial.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:  # renamed by its writer meanwhile
                    continue
                partial.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed partial files left by an earlier crash", extra=kv(count=removed))
        return removed
