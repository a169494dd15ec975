"""The queen's logging: text or JSON lines on stderr, and never what anyone asked or was answered.

The queen's own log calls name requests by id and keys by their ids only. What remains is the
libraries: at DEBUG, the websockets library dumps every frame it sends or receives, and a job frame
ends with the prompt, a result frame with the completion. Those dumps are dropped before any handler
writes them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

import websockets
from uvicorn.config import LOG_LEVELS
from uvicorn.logging import TRACE_LOG_LEVEL

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_WEBSOCKETS_DIR = os.path.dirname(websockets.__file__) + os.sep
# Not extras worth a field: the record's own attributes, and uvicorn's ANSI-coloured copy of the message.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class NoPayloads(logging.Filter):
    """Drops the websockets library's frame dumps, which carry prompts and completions."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the websockets library's DEBUG ones."""
        return not (record.levelno <= logging.DEBUG and record.pathname.startswith(_WEBSOCKETS_DIR))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


_CONTROL = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape_controls(text: str) -> str:
    """`text` with control characters written as escapes, so that it stays on its line."""
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """Text lines whose messages cannot span lines: whatever a client or worker put in one is escaped.

    Tracebacks still span lines (they are the queen's own, after the message).
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line for a record, its message escaped."""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(level: str, *, json_lines: bool = False) -> None:
    """Send every logger's records (uvicorn's included) to stderr, as text or JSON lines.

    `level` is one of uvicorn's names: trace (below debug), debug, info, warning, error, critical.
    """
    # uvicorn names its TRACE level only once its own logging is configured; ours comes first.
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    handler.addFilter(NoPayloads())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS.get(level.lower(), level.upper()))
