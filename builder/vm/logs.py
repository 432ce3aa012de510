"""Reading the files a VM writes while it runs (serial log, QEMU's stderr), shared by both backends."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path


def read_text(path: Path | None) -> str:
    """The file's text ('' when it does not exist yet); undecodable bytes are replaced."""
    if path is None:
        return ""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def tail_lines(path: Path | None, n: int = 20, *, max_bytes: int = 256 * 1024) -> list[str]:
    """The last ``n`` non-empty lines of a (possibly large, possibly missing) text file."""
    if path is None or n <= 0:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = [ln.rstrip("\r") for ln in data.decode("utf-8", "replace").splitlines()]
    return [ln for ln in lines if ln.strip()][-n:]


def wait_for_pattern(
    path: Path,
    pattern: str | re.Pattern[str],
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.2,
) -> re.Match[str] | None:
    """Poll ``path`` until ``pattern`` matches its text; the match, or None on timeout or when ``alive()``
    turns False (checked once more after the VM is gone, so a last line written before exiting counts)."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while True:
        running = alive() if alive is not None else True
        m = regex.search(read_text(path))
        if m or not running or time.monotonic() >= deadline:
            return m
        time.sleep(interval)
