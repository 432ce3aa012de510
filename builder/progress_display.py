"""The live progress display on a terminal: Rich progress rows fed by build events, one summary line per stage.

The CLI uses it when stderr is a terminal and ``--log-format`` is text (never in a pipe, a file or CI: there
every event is a plain line of its own, see :mod:`builder.logformat`). :class:`LiveDisplay` is an ``on_event``
callback; it only renders what the events say, so any tool that drives :class:`~builder.events.Emitter` can use it.

* One row per running stage: spinner, name, a bar where the total is known, counters, elapsed time and what it
  is doing: the installer's milestone with its udebs/packages counters, the n-th of the playbook's tasks with the
  task's name, the compression percentage, or the stage's last info message.
* One row per running download below it: bytes done of the size, the rate and the file's name.
* When a stage ends, its rows go and one line stays: ``✓ install 31m02s (udebs 120, packages 341)``, or
  ``✗ …`` when it failed or was interrupted.
* Log lines (warnings, infos) go through the same console and so appear above the live rows. The records of the
  events the rows show instead (stage start and end, each Ansible task) are dropped: see :meth:`replaces`.

The display is transient: stopping it (at the end, on an error, on Ctrl-C) erases the live rows, so an error
message printed afterwards stands on a clean line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Column
from rich.text import Text

from .events import Event

LABEL_WIDTH = 9  # the longest stage name, provision
COUNT_WIDTH = 24  # "udebs 120 · packages 341", "19.9/151.2 MB 82.4 MB/s"


def duration(seconds: float) -> str:
    """``4.2s``, ``31m02s``, ``1h05m09s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class _Stage:
    name: str
    task: TaskID
    implicit: bool = False  # made for events outside any stage: no summary line
    downloads: dict[str, TaskID] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    udebs: int | None = None
    packages: int | None = None
    tasks: int = 0
    tasks_total: int | None = None
    percent: dict[str, float] = field(default_factory=dict)
    running: str = ""  # what a failure is reported "during": the installer's step, the Ansible task

    def summary(self) -> list[str]:
        parts = []
        if self.files:
            parts.append(f"{self.files} download{'' if self.files == 1 else 's'}, {decimal(self.bytes)}")
        if self.udebs is not None:
            parts.append(f"udebs {self.udebs}, packages {self.packages}")
        if self.tasks:
            parts.append(f"{self.tasks} task{'' if self.tasks == 1 else 's'}")
        parts.extend(f"{what} {pct:.0f}%" for what, pct in self.percent.items())
        return parts


# ------------------------------------------------------------------------------------------------ columns
# every row is a Rich task; its fields say what it is: kind "stage" or "download", unit "bytes", "percent",
# "tasks", "install" or "" (what the counter column shows), detail (the text at the end of the row)


class _Glyph(SpinnerColumn):
    def render(self, task: Task) -> RenderableType:
        if task.fields.get("kind") == "download":
            return Text("↓", style="cyan")
        return self.spinner.render(task.get_time())  # a stage at 100% is not over until it ends


class _Label(ProgressColumn):
    def __init__(self) -> None:
        super().__init__(table_column=Column(width=LABEL_WIDTH, no_wrap=True, overflow="ellipsis"))

    def render(self, task: Task) -> RenderableType:
        return Text(task.description, style="bold", no_wrap=True, overflow="ellipsis")


class _Bar(ProgressColumn):
    def __init__(self, width: int) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=width)
        self.width = width

    def render(self, task: Task) -> RenderableType:
        if task.total is None and task.fields.get("unit") != "bytes":
            return Text(" " * self.width)  # no total: the spinner says it is alive
        return self._bar.render(task)


class _Count(ProgressColumn):
    """The counters: bytes and rate, percent, the n-th task of the total, the installer's udebs and packages. A
    fixed minimum width: the columns right of it stay put while the numbers change."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(min_width=COUNT_WIDTH, no_wrap=True))
        self._bytes = DownloadColumn()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> RenderableType:
        unit, f = task.fields.get("unit", ""), task.fields
        if unit == "bytes":
            return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))
        if unit == "percent":
            return Text(f"{task.percentage:5.1f}%", style="progress.percentage")
        if unit == "tasks":
            n = int(task.completed)
            return Text(f"task {n}/{int(task.total)}" if task.total else f"task {n}", style="progress.download")
        if unit == "install":
            return Text(f"udebs {f.get('udebs', 0)} · packages {f.get('packages', 0)}", style="progress.download")
        if task.total is not None:
            return Text(f"{task.completed:g}/{task.total:g}", style="progress.download")
        return Text("")


class _Elapsed(TimeElapsedColumn):
    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("kind") == "stage" else Text("")


class _Detail(ProgressColumn):
    def __init__(self) -> None:
        super().__init__(table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))

    def render(self, task: Task) -> RenderableType:
        return Text(str(task.fields.get("detail", "")), style="dim", no_wrap=True, overflow="ellipsis")


# ------------------------------------------------------------------------------------------------ display


class LiveDisplay:
    """``on_event`` callback drawing :mod:`rich` progress on ``console`` (see the module docstring).

    Use as a context manager (or :meth:`start` / :meth:`stop`; :meth:`stop` is idempotent). Thread-safe: events
    may come from any thread. ``auto_refresh=False`` redraws on every event instead of a few times a second (for
    tests). ``clock`` gives the wall time of the summary lines, ``get_time`` the monotonic time of the rows.
    """

    def __init__(self, console: Console, *, auto_refresh: bool = True, refresh_per_second: float = 4,
                 clock: Callable[[], time.struct_time] = time.localtime,
                 get_time: Callable[[], float] | None = None) -> None:
        self.console = console
        self.progress = Progress(
            _Glyph(), _Label(), _Bar(20), _Count(), _Elapsed(), _Detail(),
            console=console, transient=True, auto_refresh=auto_refresh, refresh_per_second=refresh_per_second,
            expand=True, get_time=get_time)
        self._auto = auto_refresh
        self._clock = clock
        self._stages: dict[str, _Stage] = {}
        self._lock = threading.RLock()

    # lifecycle

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        """Erase the live rows (stages still running get no summary: the error that stopped them follows)."""
        with self._lock:
            self.progress.stop()

    def __enter__(self) -> LiveDisplay:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # events

    @staticmethod
    def replaces(ev: Event) -> bool:
        """Whether the display shows ``ev`` itself, so that the log line of its record would only repeat it:
        stage start, end and skip (a summary line instead) and each Ansible task start (the stage's row)."""
        if ev.kind in ("stage-start", "stage-end", "stage-skip"):
            return True
        return ev.kind == "info" and "task" in ev.data and ev.message.startswith("ansible: ")

    def __call__(self, ev: Event) -> None:
        with self._lock:
            if ev.kind == "stage-start":
                self._start_stage(ev.stage)
            elif ev.kind == "stage-end":
                self._end_stage(ev)
            elif ev.kind == "stage-skip":
                self._line("–", "yellow", ev.stage, "skipped", [ev.message] if ev.message else [])
            elif ev.kind == "progress":
                self._progress(ev)
            elif ev.kind == "info" and ev.stage in self._stages and not self.replaces(ev):
                self._set(self._stages[ev.stage], detail=ev.message.split("\n", 1)[0])
            if not self._auto:
                self.progress.refresh()

    def _start_stage(self, name: str, *, implicit: bool = False) -> _Stage:
        old = self._stages.pop(name, None)
        if old is not None:
            self._drop(old)
        task = self.progress.add_task(name or "…", total=None, kind="stage", unit="", detail="")
        st = self._stages[name] = _Stage(name, task, implicit=implicit)
        return st

    def _stage(self, name: str) -> _Stage:
        return self._stages.get(name) or self._start_stage(name, implicit=True)

    def _drop(self, st: _Stage) -> None:
        for task in st.downloads.values():
            self.progress.remove_task(task)
        st.downloads.clear()
        self.progress.remove_task(st.task)

    def _end_stage(self, ev: Event) -> None:
        st = self._stages.pop(ev.stage, None)
        if st is None:
            st = _Stage(ev.stage, TaskID(-1))
        else:
            self._drop(st)
        outcome = ev.data.get("outcome", "ok")
        took = duration(ev.elapsed) if ev.elapsed is not None else ""
        parts = st.summary()
        if outcome == "ok":
            self._line("✓", "green", ev.stage, took, parts)
        else:
            where = st.running
            self._line("✗", "red", ev.stage, f"{took} {outcome}" + (f" during {where!r}" if where else ""), parts)

    def _line(self, glyph: str, style: str, stage: str, what: str, parts: list[str]) -> None:
        stamp = time.strftime("[%X]", self._clock())
        text = Text.assemble((f"{stamp} ", "log.time"), (f"{glyph} ", f"bold {style}"), (stage, "bold"),
                             f" {what}", (f" ({', '.join(parts)})" if parts else "", "dim"))
        self.progress.console.print(text, soft_wrap=True)

    def _set(self, st: _Stage, **fields: Any) -> None:
        self.progress.update(st.task, **fields)

    def _progress(self, ev: Event) -> None:
        unit = ev.data.get("unit")
        st = self._stage(ev.stage)
        if unit == "bytes":
            self._download(st, ev)
        elif unit == "percent":
            what = st.running = ev.message or "progress"
            pct = float(ev.current or 0.0)
            st.percent[what] = pct
            self.progress.update(st.task, completed=pct, total=float(ev.total or 100), unit="percent", detail=what)
        elif unit == "tasks":
            st.tasks = max(st.tasks, int(ev.current or 0))
            st.tasks_total = int(ev.total) if ev.total else None
            task, role = str(ev.data.get("task", "")), str(ev.data.get("role") or "")
            st.running = f"{role} : {task}" if role else task
            self.progress.update(st.task, completed=st.tasks, total=st.tasks_total, unit="tasks", detail=st.running)
        elif "step" in ev.data:
            st.running = str(ev.data["step"])
            st.udebs, st.packages = int(ev.data.get("udebs") or 0), int(ev.data.get("packages") or 0)
            self.progress.update(st.task, total=None, unit="install", udebs=st.udebs, packages=st.packages,
                                 detail=st.running)
        else:
            fields: dict[str, Any] = {"unit": "", "detail": ev.message}
            if ev.current is not None:
                fields["completed"] = ev.current
            self.progress.update(st.task, total=ev.total, **fields)

    def _download(self, st: _Stage, ev: Event) -> None:
        key = ev.message
        task = st.downloads.get(key)
        if task is None:
            task = st.downloads[key] = self.progress.add_task("", total=ev.total, kind="download", unit="bytes",
                                                              detail=Path(key).name or key)
        self.progress.update(task, completed=ev.current or 0, total=ev.total)
        if ev.total is not None and ev.current is not None and ev.current >= ev.total:
            self.progress.remove_task(task)
            del st.downloads[key]
            st.files += 1
            st.bytes += int(ev.total)
            self._set(st, detail=f"downloaded {Path(key).name or key}")
