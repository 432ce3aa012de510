"""The QMP client against a scripted fake QEMU on a unix socket (no QEMU needed)."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.errors import VmError
from builder.vm.qmp import QmpClient, QmpError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}, "capabilities": []}}

Handler = Callable[[dict, Callable[[dict], None]], bool]  # (command, send) -> keep going


class FakeQemu:
    """Listens on a unix socket; greets; answers each command with ``handler``."""

    def __init__(self, path: Path, handler: Handler, *, delay: float = 0.0) -> None:
        self.path = path
        self.handler = handler
        self.delay = delay
        self.received: list[dict] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        time.sleep(self.delay)  # the socket appears late, like QEMU starting up
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(self.path))
        srv.listen(1)
        conn, _ = srv.accept()
        f = conn.makefile("rwb")

        def send(msg: dict) -> None:
            f.write(json.dumps(msg).encode() + b"\r\n")
            f.flush()

        send(GREETING)
        for line in f:
            cmd = json.loads(line)
            self.received.append(cmd)
            if cmd["execute"] == "qmp_capabilities":
                send({"return": {}, "id": cmd["id"]})
                continue
            if not self.handler(cmd, send):
                break
        conn.close()
        srv.close()


@pytest.fixture
def sock() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmpt-") as d:  # short path: sun_path is 108 bytes
        yield Path(d) / "q.sock"


def test_execute_with_events_before_reply(sock: Path) -> None:
    def handler(cmd: dict, send: Callable[[dict], None]) -> bool:
        if cmd["execute"] == "query-status":
            send({"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {}})
            send({"return": {"status": "running", "running": True}, "id": cmd["id"]})
        elif cmd["execute"] == "system_powerdown":
            send({"return": {}, "id": cmd["id"]})
            send({"event": "POWERDOWN", "timestamp": {}})
        return True

    FakeQemu(sock, handler, delay=0.3)
    with QmpClient(sock, timeout=5) as qmp:
        qmp.connect(wait=5)
        assert qmp.greeting["QMP"]["version"]["qemu"]["major"] == 7
        assert qmp.execute("query-status") == {"status": "running", "running": True}
        assert [e["event"] for e in qmp.events] == ["RTC_CHANGE"]
        qmp.execute("system_powerdown")
        ev = qmp.wait_event("POWERDOWN", timeout=5)
        assert ev is not None and ev["event"] == "POWERDOWN"
        assert qmp.wait_event(["SHUTDOWN"], timeout=0.2) is None


def test_error_reply_raises_qmp_error(sock: Path) -> None:
    def handler(cmd: dict, send: Callable[[dict], None]) -> bool:
        send({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
              "id": cmd["id"]})
        return True

    FakeQemu(sock, handler)
    with QmpClient(sock) as qmp:
        qmp.connect(wait=5)
        with pytest.raises(QmpError, match="has not been found") as info:
            qmp.execute("nope", {"x": 1})
        assert info.value.error_class == "CommandNotFound"
        assert isinstance(info.value, VmError)


def test_connection_closed_by_qemu(sock: Path) -> None:
    FakeQemu(sock, lambda cmd, send: False)  # "quit": QEMU goes away without answering
    qmp = QmpClient(sock)
    qmp.connect(wait=5)
    with pytest.raises(VmError, match="closed by QEMU"):
        qmp.execute("quit")
    assert not qmp.connected
    with pytest.raises(VmError, match="not connected"):
        qmp.execute("query-status")


def test_reply_timeout(sock: Path) -> None:
    FakeQemu(sock, lambda cmd, send: time.sleep(2) or True)
    with QmpClient(sock, timeout=0.3) as qmp:
        qmp.connect(wait=5)
        t0 = time.monotonic()
        with pytest.raises(VmError, match="timed out"):
            qmp.execute("query-status")
        assert time.monotonic() - t0 < 1.5


def test_connect_gives_up_when_socket_never_appears(sock: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(VmError, match="did not accept"):
        QmpClient(sock).connect(wait=0.3)
    assert time.monotonic() - t0 < 2


def test_connect_stops_early_when_qemu_died(sock: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(VmError, match="exited before"):
        QmpClient(sock).connect(wait=30, alive=lambda: False)
    assert time.monotonic() - t0 < 1
