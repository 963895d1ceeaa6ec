"""Structured logging: JSON lines on stdout, a readable rotating file, one timezone.

Callers pass case context through ``extra``::

    log.warning("upload failed: %s", exc, extra=ctx_fields(case_id=7, operation="upload",
                                                           error_type="Unreachable"))
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

from concurrent_log_handler import ConcurrentRotatingFileHandler

CONTEXT_FIELDS = ("case_id", "operation", "error_type", "worker")


def ctx_fields(**fields: object) -> dict[str, object]:
    """The ``extra=`` mapping for a log call; drops fields that are None."""
    return {k: v for k, v in fields.items() if v is not None}


def for_case(case_id: int | None, operation: str, error: BaseException | None = None) -> dict[str, object]:
    """The usual ``extra=`` for a per-case log line."""
    return ctx_fields(case_id=case_id, operation=operation,
                      error_type=None if error is None else type(error).__name__)


class _Zoned(logging.Formatter):
    def __init__(self, tz: ZoneInfo, fmt: str | None = None):
        super().__init__(fmt)
        self.tz = tz

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, self.tz).isoformat(timespec="milliseconds")


class JsonFormatter(_Zoned):
    """One JSON object per line with the fields operators and log shippers need."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "module": record.module,
            "funcName": record.funcName,
            "lineno": record.lineno,
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ReadableFormatter(_Zoned):
    """``time LEVEL logger [case=.. op=.. error=..] message`` for the rotating file."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS
                           if hasattr(record, name))
        text = f"{self.formatTime(record)} {record.levelname:<7} {record.name}"
        text += f" [{context}] " if context else " "
        text += record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(logging_config, worker: str) -> logging.Logger:
    """Configure the root ``mqic`` logger once for this process; return ``mqic.<worker>``."""
    tz = ZoneInfo(logging_config.timezone)
    root = logging.getLogger("mqic")
    root.handlers.clear()
    root.setLevel(logging_config.level)
    root.propagate = False
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(JsonFormatter(tz) if logging_config.json_stdout else ReadableFormatter(tz))
    root.addHandler(stream)
    logging_config.file.parent.mkdir(parents=True, exist_ok=True)
    # Several worker processes share this file: a lock-guarded handler rotates it safely.
    rotating = ConcurrentRotatingFileHandler(
        logging_config.file, maxBytes=logging_config.max_bytes,
        backupCount=logging_config.backup_count, encoding="utf-8")
    rotating.setFormatter(ReadableFormatter(tz))
    root.addHandler(rotating)
    return logging.getLogger(f"mqic.{worker}")
