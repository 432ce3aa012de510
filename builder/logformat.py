"""``--log-format json``: one JSON object per line on stderr, for CI systems and other tools (like Packer's
``-machine-readable``). The schema (:data:`SCHEMA`, documented in docs/log-format.md) is stable: fields may be
added, none is renamed or removed.

Every build event the Python API's ``on_event`` receives is one line (``"type": "event"``); other log records
are ``"type": "log"``; the CLI's last word is ``"type": "result"`` (exit code, and the error when there is one).
Download progress events are sampled: at most one a second per file, and always the last.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import IO, Any

from .events import Event
from .redact import redact_private_keys

SCHEMA_VERSION = 1

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "builder log line",
    "type": "object",
    "required": ["v", "time", "type"],
    "properties": {
        "v": {"const": SCHEMA_VERSION},
        "time": {"type": "string", "description": "UTC, RFC 3339 with milliseconds"},
        "type": {"enum": ["event", "log", "result"]},
        # type event
        "stage": {"type": "string"},
        "event": {"enum": ["stage-start", "stage-end", "stage-skip", "progress", "info", "warning"]},
        "message": {"type": "string"},
        "current": {"type": ["number", "null"]},
        "total": {"type": ["number", "null"]},
        "elapsed": {"type": ["number", "null"]},
        "fields": {"type": "object"},
        # type log
        "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]},
        "logger": {"type": "string"},
        # type result
        "exit_code": {"type": "integer"},
        "error": {"type": ["object", "null"]},
    },
    "allOf": [
        {"if": {"properties": {"type": {"const": "event"}}},
         "then": {"required": ["stage", "event", "message", "fields"]}},
        {"if": {"properties": {"type": {"const": "log"}}}, "then": {"required": ["level", "logger", "message"]}},
        {"if": {"properties": {"type": {"const": "result"}}}, "then": {"required": ["exit_code", "error"]}},
    ],
}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


class JsonLines:
    """Writes the JSON lines; thread-safe (the gateway and the syslog listener log from their threads)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._last_progress: dict[str, float] = {}

    def write(self, obj: dict[str, Any]) -> None:
        line = redact_private_keys(json.dumps({"v": SCHEMA_VERSION, "time": _now(), **obj}, ensure_ascii=False))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def event(self, ev: Event) -> None:
        if ev.kind == "progress" and ev.data.get("unit") == "bytes":
            key = ev.message
            now = time.monotonic()
            done = ev.total is not None and ev.current is not None and ev.current >= ev.total
            if not done and now - self._last_progress.get(key, 0.0) < 1.0:
                return
            self._last_progress[key] = now
        self.write({"type": "event", "stage": ev.stage, "event": ev.kind, "message": ev.message,
                    "current": ev.current, "total": ev.total, "elapsed": ev.elapsed,
                    "fields": {k: _jsonable(v) for k, v in ev.data.items()}})

    def result(self, exit_code: int, error: dict[str, Any] | None = None) -> None:
        self.write({"type": "result", "exit_code": exit_code, "error": error})


class JsonLogHandler(logging.Handler):
    """Log records as ``"type": "log"`` lines; the records the emitter makes of events are skipped (the events
    themselves are written whole)."""

    def __init__(self, out: JsonLines) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "builder_event", None) is not None:
            return
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not break the build
            message = str(record.msg)
        self.out.write({"type": "log", "level": record.levelname, "logger": record.name, "message": message})
