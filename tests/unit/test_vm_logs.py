"""Log helpers shared by the VM backends; find_free_port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from builder.run import pid_alive
from builder.vm import find_free_port
from builder.vm.logs import read_text, tail_lines, wait_for_pattern


def test_tail_lines(tmp_path: Path) -> None:
    f = tmp_path / "log"
    assert tail_lines(f) == [] and read_text(f) == ""
    f.write_bytes(b"a\r\n\nb\xff\n" + b"".join(b"line %d\n" % i for i in range(100)))
    assert tail_lines(f, 2) == ["line 98", "line 99"]
    assert tail_lines(f, 200)[:2] == ["a", "b\ufffd"]


def test_wait_for_pattern(tmp_path: Path) -> None:
    f = tmp_path / "serial"

    def writer() -> None:
        time.sleep(0.3)
        f.write_text("[0.0] Linux version 6.1.0-57\n")

    threading.Thread(target=writer).start()
    m = wait_for_pattern(f, r"Linux version (\S+)", timeout=5, interval=0.05)
    assert m is not None and m.group(1) == "6.1.0-57"
    assert wait_for_pattern(f, "never", timeout=0.2, interval=0.05) is None
    assert wait_for_pattern(f, "never", timeout=30, alive=lambda: False) is None


def test_pid_alive_treats_zombies_as_dead() -> None:
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(proc.pid) and time.monotonic() < deadline:  # exited but not reaped: a zombie
        time.sleep(0.05)
    assert not pid_alive(proc.pid)
    assert Path(f"/proc/{proc.pid}").exists()
    proc.wait()
    assert not pid_alive(proc.pid)


def test_find_free_port() -> None:
    port = find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
