"""Following a debian-installer run: its remote syslog (UDP) and its serial console.

d-i sends its whole syslog to ``log_host:log_port`` (kernel arguments). :class:`InstallTracker` turns those
lines into progress (the current step, udebs retrieved, packages unpacked) and into failures (a component
that failed, a question on the console that the preseed did not answer).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_SYSLOG_RE = re.compile(
    r"^(?:<(?P<pri>\d+)>)?(?:(?P<ts>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) )?(?:(?P<host>[\w.-]+) )??"
    r"(?P<prog>[\w./+-]+?)(?:\[(?P<pid>\d+)\])?: (?P<msg>.*)$"
)
# main-menu logs the component it runs; these are the milestones we show as steps.
STEP_NAMES = {
    "localechooser": "locale", "console-setup": "keyboard", "netcfg": "network", "choose-mirror": "mirror",
    "download-installer": "download installer components", "anna": "download installer components",
    "user-setup-udeb": "users", "clock-setup": "clock", "partman-base": "partitioning",
    "bootstrap-base": "install base system", "apt-setup-udeb": "configure apt", "pkgsel": "install software",
    "grub-installer": "install GRUB", "finish-install": "finish installation",
}
FAILURE_RES = (
    re.compile(r"Menu item '(?P<item>[^']+)' failed"),
    re.compile(r"Configuring '(?P<item>[^']+)' failed with error code (?P<code>\d+)"),
    re.compile(r"(?P<item>debootstrap): error: (?P<msg>.*)"),
)


@dataclass(frozen=True)
class SyslogRecord:
    program: str
    message: str
    raw: str


def parse_syslog_line(line: str) -> SyslogRecord:
    """'<13>Nov 30 08:50:01 anna[1234]: DEBUG: retrieving foo' → SyslogRecord('anna', 'DEBUG: …')."""
    line = line.rstrip("\r\n\0")
    m = _SYSLOG_RE.match(line)
    if not m:
        return SyslogRecord("", line, line)
    return SyslogRecord(m.group("prog"), m.group("msg"), line)


@dataclass
class InstallTracker:
    """Consumes syslog records; knows the current step, counters, failure and completion."""

    marker: str = "BUILDER"
    step: str = "starting"
    step_started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    udebs: int = 0
    packages: int = 0
    failed: str | None = None
    failed_step: str | None = None
    finished: bool = False
    milestones: list[str] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    on_step: Callable[[str], None] | None = None

    def feed(self, rec: SyslogRecord) -> None:
        self.last_activity = time.monotonic()
        self.tail.append(rec.raw)
        msg = rec.message
        if self.marker in msg:
            text = msg[msg.index(self.marker) + len(self.marker):].strip()
            self.milestones.append(text)
            if "late_command done" in text:
                self.finished = True
        m = re.search(r"Menu item '([^']+)' selected", msg)
        if m:
            item = m.group(1)
            if item in STEP_NAMES:
                self._set_step(STEP_NAMES[item])
            if item == "finish-install":
                self.finished = True
        if rec.program == "anna" and "retrieving" in msg.lower():
            self.udebs += 1
        if rec.program in ("in-target", "debootstrap", "apt-install", "log-output") and msg.startswith("Setting up "):
            self.packages += 1
        if rec.program == "debootstrap" and self.step != "install base system":
            self._set_step("install base system")
        for rx in FAILURE_RES:
            fm = rx.search(msg)
            if fm and self.failed is None:
                self.failed_step = fm.group("item")
                self.failed = msg
                break

    def touch(self) -> None:
        """Activity seen elsewhere (the installer fetched a file from the gateway): not stalled."""
        self.last_activity = time.monotonic()

    def _set_step(self, step: str) -> None:
        if step != self.step:
            self.step = step
            self.step_started = time.monotonic()
            if self.on_step:
                self.on_step(step)

    def idle_for(self) -> float:
        return time.monotonic() - self.last_activity


class SyslogListener:
    """A UDP syslog receiver on 127.0.0.1 (the guest reaches it as 10.0.2.2:port) writing to a log file."""

    def __init__(self, log_file: Path, tracker: InstallTracker, *, bind: str = "127.0.0.1") -> None:
        self.log_file = log_file
        self.tracker = tracker
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((bind, 0))
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="d-i-syslog", daemon=True)
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def __enter__(self) -> SyslogListener:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _loop(self) -> None:
        with open(self.log_file, "a", encoding="utf-8", errors="replace") as out:
            while not self._stop.is_set():
                try:
                    data, _ = self._sock.recvfrom(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                for line in data.decode("utf-8", "replace").splitlines():
                    if not line.strip():
                        continue
                    out.write(line.rstrip("\0") + "\n")
                    with self._lock:
                        try:
                            self.tracker.feed(parse_syslog_line(line))
                        except Exception:
                            log.exception("could not parse d-i syslog line %r", line)
                out.flush()


# the text frontend ends a question with this prompt, and an error note with "[Press enter to continue]"
QUESTION_RE = re.compile(r"Prompt: '\?' for help|\[Press enter to continue\]")


def console_question(serial_text: str, max_lines: int = 25) -> str | None:
    """If d-i is waiting at a question on the serial console, the question block; else None."""
    idx = None
    for m in QUESTION_RE.finditer(serial_text):
        idx = m.start()
    if idx is None:
        return None
    lines = serial_text[:idx].splitlines()
    block: list[str] = []
    for line in reversed(lines):
        block.insert(0, line)
        if len(block) >= max_lines or (line.strip().startswith("[") and line.strip().endswith("]")):
            break
    text = "\n".join(x for x in block if x.strip())
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
