"""Structured logging: a message plus key=value context, as text or one JSON object per line.

Call sites pass context with ``extra=kv(study=..., job=...)``; identifiers of patients never go
into the context (UIDs, job ids and AE titles do).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_CONTEXT_ATTR = "radlens_ctx"


def kv(**context: Any) -> dict[str, dict[str, Any]]:
    """Context for a log call: ``log.info("stored", extra=kv(sop=uid))``."""
    return {_CONTEXT_ATTR: context}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, _CONTEXT_ATTR, {}) or {}


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(ch in text for ch in " \"=\t\n"):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``2026-11-22T19:00:00Z INFO radlens.dicom_io.spool instance stored sop=1.2.3``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname, record.name,
                 record.getMessage()]
        parts += [f"{key}={_quote(value)}" for key, value in _context(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(_context(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text", *,
                      quiet_network: bool = False) -> None:
    """Send radlens logs to stderr; keep pynetdicom's per-PDU chatter out unless DEBUG.

    ``quiet_network`` silences pynetdicom entirely (client commands report failures themselves).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    quiet = "DEBUG" if level == "DEBUG" else "WARNING"
    logging.getLogger("apscheduler").setLevel(quiet)
    network = "CRITICAL" if quiet_network and level != "DEBUG" else quiet
    logging.getLogger("pynetdicom").setLevel(network)
