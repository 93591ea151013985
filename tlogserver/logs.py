"""Logging for the daemon: one line per event, as text or JSON, with its context.

Context (the vdisk, the connection, the peer, the storage server) travels as
structured fields on the log record (``extra=``), set once per object by a
`ContextLogger`, so the JSON lines carry it as keys and the text lines show it
as a ``[vdisk=... conn=...]`` prefix. Block data and keys are never logged: no
message here formats either, and the configuration's secrets are kept out of
its repr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

#: Record attributes that are context fields, in the order they are shown.
CONTEXT_FIELDS = ("vdisk", "conn", "peer", "server")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
FORMATS = ("text", "json")

_handlers: list[logging.Handler] = []


class ContextLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that adds fixed context fields to every record (merged with call ``extra``)."""

    def __init__(self, logger: logging.Logger, **context: str) -> None:
        super().__init__(logger, dict(context))

    def bind(self, **context: str) -> None:
        """Add or change context fields for the later records (a connection learns its vdisk)."""
        assert isinstance(self.extra, dict)
        self.extra.update(context)

    def process(self, msg: Any,
                kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = {**(self.extra or {}), **extra} if extra else self.extra
        return msg, kwargs


def _context(record: logging.LogRecord) -> dict[str, str]:
    return {name: str(value) for name in CONTEXT_FIELDS
            if (value := getattr(record, name, None)) is not None}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: [vdisk=... conn=...] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        context = _context(record)
        if context:
            prefix = " ".join(f"{k}={v}" for k, v in context.items())
            record.message = f"[{prefix}] {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _timestamp(created: float) -> str:
    """RFC 3339, UTC, milliseconds: what log shippers parse without configuration."""
    seconds = int(created)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int((created - seconds) * 1000):03d}Z")


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else TextFormatter()


def setup(level: str, kind: str, log_file: str | None = None) -> None:
    """Send every log record to stderr (and ``log_file``) at ``level`` in format ``kind``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter(kind))
    logging.basicConfig(level=LEVELS[level], handlers=handlers, force=True)
    _handlers[:] = handlers


def reconfigure(level: str, kind: str) -> bool:
    """Change level and format of the handlers `setup` installed (config reload).

    Returns False when `setup` was not called (a server embedded in another program, or in
    tests, leaves its host's logging alone).
    """
    if not _handlers:
        return False
    logging.getLogger().setLevel(LEVELS[level])
    for handler in _handlers:
        handler.setFormatter(formatter(kind))
    return True

