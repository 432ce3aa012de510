"""Typed build events. Library code reports progress through an ``on_event`` callback; it never prints.

The CLI renders events with rich; other tools that ``import builder`` pass their own callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

log = logging.getLogger("builder")

Kind = Literal["stage-start", "stage-end", "stage-skip", "progress", "info", "warning"]


@dataclass(frozen=True)
class Event:
    kind: Kind
    stage: str
    message: str = ""
    current: float | None = None
    total: float | None = None
    elapsed: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


OnEvent = Callable[[Event], None]


class Emitter:
    """Wraps the user's callback; also logs each event and times stages."""

    def __init__(self, on_event: OnEvent | None = None, *, prefix: str = "") -> None:
        self._cb = on_event
        self.prefix = prefix
        self.durations: dict[str, float] = {}
        self.stage_name = ""
        self.stage_started: float | None = None

    def emit(self, ev: Event) -> None:
        if self.prefix:  # one variant's events: stage "VARIANT/STAGE", handed to the build's emitter, which logs
            ev = replace(ev, stage=f"{self.prefix}/{ev.stage}" if ev.stage else self.prefix,
                         data={**ev.data, "variant": self.prefix})
            if self._cb is not None:
                self._cb(ev)
            return
        level = logging.WARNING if ev.kind == "warning" else logging.DEBUG if ev.kind == "progress" else logging.INFO
        if ev.kind != "progress" or ev.message:
            where = f"[{ev.stage}] " if ev.stage else ""
            kind = (ev.kind + (": " if ev.message else "")) if ev.kind.startswith("stage") else ""
            log.log(level, "%s%s%s", where, kind, ev.message, extra={"builder_event": ev})
        if self._cb is not None:
            try:
                self._cb(ev)
            except Exception:  # a broken progress display must not break the build
                log.exception("on_event callback failed")

    def info(self, message: str, **data: Any) -> None:
        self.emit(Event("info", self.stage_name, message, data=data))

    def warning(self, message: str, **data: Any) -> None:
        self.emit(Event("warning", self.stage_name, message, data=data))

    def progress(self, message: str = "", current: float | None = None, total: float | None = None,
                 **data: Any) -> None:
        self.emit(Event("progress", self.stage_name, message, current, total, data=data))

    def skip(self, stage: str, reason: str) -> None:
        self.emit(Event("stage-skip", stage, reason))

    @contextmanager
    def stage(self, name: str, message: str = "") -> Iterator[Emitter]:
        """Time a stage: ``stage-start``, then ``stage-end`` with ``elapsed`` and ``data["outcome"]`` (``ok``,
        ``failed`` or ``interrupted``)."""
        prev, self.stage_name = self.stage_name, name
        prev_t0 = self.stage_started
        t0 = self.stage_started = time.monotonic()
        self.emit(Event("stage-start", name, message))
        outcome = "failed"
        try:
            yield self
            outcome = "ok"
        except (KeyboardInterrupt, SystemExit):
            outcome = "interrupted"
            raise
        finally:
            dt = time.monotonic() - t0
            self.durations[name] = self.durations.get(name, 0.0) + dt
            self.emit(Event("stage-end", name, f"{dt:.1f} s", elapsed=dt, data={"outcome": outcome}))
            self.stage_name, self.stage_started = prev, prev_t0
