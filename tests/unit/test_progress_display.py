"""The terminal's live display (builder/progress_display.py) driven by synthetic event streams into a recording
Rich console, and the CLI's wiring of it (which log lines it replaces; stopped before an error is printed)."""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator

import pytest
from rich.console import Console
from rich.logging import RichHandler

from builder import cli
from builder.events import Emitter, Event
from builder.progress_display import LiveDisplay, duration

NOON = time.struct_time((2026, 12, 1, 12, 0, 0, 1, 335, 0))


def _console(file: io.StringIO | None = None) -> Console:
    return Console(record=True, force_terminal=True, width=100, file=file or io.StringIO(), markup=False,
                   emoji=False, highlight=False, soft_wrap=True)


class _Clock:
    """Monotonic time that moves only when told (a download's rate is bytes over it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _display(console: Console, clock: _Clock | None = None) -> LiveDisplay:
    return LiveDisplay(console, auto_refresh=False, clock=lambda: NOON, get_time=clock or _Clock())


def _summaries(text: str) -> list[str]:
    return re.findall(r"\[12:00:00\] ([✓✗–] [^\n]*)", text)


def _stream() -> Iterator[Event]:
    """A build's events, abridged: downloads, the installer, Ansible, compression."""
    yield Event("stage-start", "fetch")
    for done in (0, 1_000_000, 3_000_000, 4_000_000):
        yield Event("progress", "fetch", "pool/main/l/linux/linux-image-6.12.deb", done, 4_000_000,
                    data={"unit": "bytes"})
    yield Event("progress", "fetch", "dists/trixie/InRelease", 50_000, None, data={"unit": "bytes"})
    yield Event("progress", "fetch", "dists/trixie/InRelease", 150_000, 150_000, data={"unit": "bytes"})
    yield Event("stage-end", "fetch", "2.1 s", elapsed=2.1, data={"outcome": "ok"})
    yield Event("stage-start", "install")
    for step, udebs, pkgs in (("network", 3, 0), ("partitioning", 97, 0), ("install base system", 120, 341)):
        yield Event("progress", "install", f"{step} (udebs {udebs}, packages {pkgs})",
                    data={"step": step, "udebs": udebs, "packages": pkgs})
    yield Event("stage-end", "install", "1862.0 s", elapsed=1862.0, data={"outcome": "ok"})
    yield Event("stage-start", "provision")
    yield Event("info", "provision", "waiting for SSH on the installed system")
    for n, task in enumerate(("Refresh the apt package lists", "Install the base packages"), 1):
        yield Event("progress", "provision", f"ansible task {n}/55: base : {task}", n, 55,
                    data={"unit": "tasks", "task": task, "role": "base"})
        yield Event("info", "provision", f"ansible: {task}", data={"task": task, "role": "base"})
    yield Event("stage-end", "provision", "730.0 s", elapsed=730.0, data={"outcome": "ok"})
    yield Event("stage-start", "finalize")
    for pct in (0.0, 12.5, 50.0, 100.0):
        yield Event("progress", "finalize", "compress", pct, 100, data={"unit": "percent"})
    yield Event("stage-end", "finalize", "241.0 s", elapsed=241.0, data={"outcome": "ok"})


def test_duration():
    assert duration(4.24) == "4.2s"
    assert duration(1862) == "31m02s"
    assert duration(3909) == "1h05m09s"


def test_a_build_renders_bars_counters_and_one_summary_line_per_stage():
    console, clock = _console(), _Clock()
    with _display(console, clock) as display:
        for ev in _stream():
            clock.now += 0.5
            display(ev)
    text = console.export_text()
    # downloads: a bar, bytes of the size, a rate, the file's name
    assert "━━━━" in text and "1.0/4.0 MB" in text and "linux-image-6.12.deb" in text
    assert re.search(r"\d\.\d MB/s", text)
    assert "udebs 97 · packages 0" in text and "partitioning" in text  # installer milestone and counters
    assert "task 2/55" in text and "base : Install the base packages" in text  # Ansible: n-th of the total
    assert " 12.5%" in text and "compress" in text  # compression percent
    assert _summaries(text) == ["✓ fetch 2.1s (2 downloads, 4.2 MB)", "✓ install 31m02s (udebs 120, packages 341)",
                         "✓ provision 12m10s (2 tasks)", "✓ finalize 4m01s (compress 100%)"]


def test_a_failed_stage_says_where_and_the_live_rows_are_erased_before_the_error():
    raw = io.StringIO()
    console = _console(raw)
    display = _display(console)
    with pytest.raises(RuntimeError), display:
        display(Event("stage-start", "install"))
        display(Event("progress", "install", "partitioning (udebs 97, packages 0)",
                      data={"step": "partitioning", "udebs": 97, "packages": 0}))
        display(Event("stage-end", "install", "75.0 s", elapsed=75.0, data={"outcome": "failed"}))
        display(Event("stage-start", "provision"))  # a stage still running when the error comes
        raise RuntimeError("boom")
    console.print("error: boom")
    assert "✗ install 1m15s failed during 'partitioning' (udebs 97, packages 0)" in console.export_text()
    out = raw.getvalue()
    live_end = out.rindex("\x1b[?25h")  # the live display shows the cursor again when it stops
    assert out.index("error: boom") > live_end
    # the rows erased (cursor moves and line erasures only), then the error on a clean line
    assert re.fullmatch(r"(?:\r|\x1b\[[0-9;?]*[A-Za-z])*error: boom\n", out[live_end:]), repr(out[live_end:])


def test_an_interrupted_stage_and_events_outside_any_stage():
    console = _console()
    with _display(console) as display:
        display(Event("progress", "", "dists/trixie/InRelease", 10, 100, data={"unit": "bytes"}))  # e.g. lock
        display(Event("stage-start", "verify"))
        display(Event("stage-end", "verify", "3.0 s", elapsed=3.0, data={"outcome": "interrupted"}))
        display(Event("stage-skip", "media", "the installed disk is cached"))
    text = console.export_text()
    assert "10/100 bytes" in text
    assert "✗ verify 3.0s interrupted" in text
    assert "– media skipped (the installed disk is cached)" in text


def test_emitter_stage_end_says_how_the_stage_ended():
    seen: list[Event] = []
    em = Emitter(seen.append)
    with em.stage("fetch"):
        pass
    with pytest.raises(ValueError), em.stage("install"):
        raise ValueError("x")
    with pytest.raises(KeyboardInterrupt), em.stage("provision"):
        raise KeyboardInterrupt
    ends = [(ev.stage, ev.data["outcome"]) for ev in seen if ev.kind == "stage-end"]
    assert ends == [("fetch", "ok"), ("install", "failed"), ("provision", "interrupted")]


@pytest.fixture
def tty_logging() -> Iterator[tuple[io.StringIO, Console]]:
    """The CLI's terminal setup (RichHandler with the live filter) on a recording console."""
    raw = io.StringIO()
    console = _console(raw)
    handler = RichHandler(console=console, show_path=False, markup=False, show_time=True,
                          omit_repeated_times=False, log_time_format="[%X]")
    handler.addFilter(cli._LiveFilter())
    logger = logging.getLogger("builder")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield raw, console
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def test_cli_terminal_output_warnings_above_the_rows_and_no_repeated_lines(tty_logging, monkeypatch):
    raw, console = tty_logging
    monkeypatch.setattr(cli, "_JSON", None)
    progress = cli._Progress(console)
    assert progress.display is not None  # a terminal, text format
    progress.display = _display(console)
    with pytest.raises(RuntimeError), progress:
        em = Emitter(progress)
        with em.stage("provision"):
            em.info("waiting for SSH on the installed system")
            em.progress("ansible task 1/3: base : Refresh", 1, 3, unit="tasks", task="Refresh", role="base")
            em.info("ansible: Refresh", task="Refresh", role="base")
            em.warning("the mirror answers slowly")
        with em.stage("finalize"):
            em.progress("compress", 40.0, 100, unit="percent")
            raise RuntimeError("boom")
    console.print("error: boom")
    text = console.export_text()
    assert "WARNING" in text and "the mirror answers slowly" in text
    assert "waiting for SSH on the installed system" in text  # info lines stay
    assert "stage-start" not in text and "stage-end" not in text  # the summary lines say it
    assert "ansible: Refresh" not in text and "task 1/3" in text  # the row shows each task
    assert "✓ provision" in text and "(1 task)" in text
    assert "✗ finalize" in text and "failed during 'compress' (compress 40%)" in text
    assert text.index("the mirror answers slowly") < text.index("✓ provision")
    out = raw.getvalue()
    assert out.index("error: boom") > out.rindex("\x1b[?25h")


def test_cli_no_live_display_when_quiet_or_json_or_not_a_terminal(monkeypatch):
    monkeypatch.setattr(cli, "_JSON", None)
    assert cli._Progress(_console(), live=False).display is None
    plain = Console(file=io.StringIO(), force_terminal=False)
    assert cli._Progress(plain).display is None
    monkeypatch.setattr(cli, "_JSON", object())
    assert cli._Progress(_console()).display is None
