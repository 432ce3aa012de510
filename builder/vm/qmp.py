"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket).

QEMU listens (``-qmp unix:PATH,server=on,wait=off``); :meth:`QmpClient.connect` retries until the socket
appears and accepts, for a bounded time, and gives up early when ``alive()`` says QEMU is gone. Replies are
matched to commands by ``id``; asynchronous events that arrive in between are kept in :attr:`QmpClient.events`.
Every failure is a :class:`~builder.errors.VmError`.

One QMP socket serves one client at a time, so a machine keeps one client for its whole life.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import VmError

log = logging.getLogger(__name__)


class QmpError(VmError):
    """QEMU answered a command with an error. ``error_class`` is QMP's class (e.g. ``GenericError``)."""

    def __init__(self, message: str, *, error_class: str = "", **kw: Any) -> None:
        self.error_class = error_class
        super().__init__(message, **kw)


class QmpClient:
    """``with QmpClient(path) as qmp: qmp.connect(); qmp.execute("query-status")``."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    # -- connection -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, *, wait: float = 30.0, alive: Callable[[], bool] | None = None) -> None:
        """Connect, read the greeting and negotiate capabilities.

        Retries every 20 ms until the socket accepts, for at most ``wait`` seconds; stops early (VmError) when
        ``alive()`` returns False.
        """
        deadline = time.monotonic() + wait
        last_exc: OSError | None = None
        while True:
            if alive is not None and not alive():
                raise VmError(f"QEMU exited before its QMP socket {self.path} accepted a connection")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(os.fspath(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                last_exc = exc
                if time.monotonic() >= deadline:
                    raise VmError(
                        f"QMP socket {self.path} did not accept a connection within {wait:.0f} s: {last_exc}"
                    ) from exc
                time.sleep(0.02)
                continue
            except OSError as exc:
                sock.close()
                raise VmError(f"cannot connect to QMP socket {self.path}: {exc}") from exc
            break
        self._sock = sock
        self._buf = b""
        try:
            greeting = self._read_message(time.monotonic() + self.timeout)
            if "QMP" not in greeting:
                raise VmError(f"not a QMP greeting on {self.path}: {greeting!r}")
            self.greeting = greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        version = greeting["QMP"].get("version", {}).get("qemu", {})
        log.debug("QMP connected to %s (QEMU %s.%s.%s)", self.path, version.get("major"), version.get("minor"),
                  version.get("micro"))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands and events ----------------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run one QMP command and return its ``return`` value; QmpError if QEMU answers with an error."""
        if self._sock is None:
            raise VmError(f"QMP command {command!r}: not connected")
        msg_id = f"builder-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise VmError(f"QMP command {command!r} could not be sent: {exc}") from exc
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._read_message(deadline, what=f"the reply to {command!r}")
            if "event" in reply:
                self._note_event(reply)
                continue
            if reply.get("id") != msg_id:
                log.debug("QMP: ignoring unexpected message %r", reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP command {command!r} failed: {err.get('desc', err)}",
                               error_class=str(err.get("class", "")))
            return reply.get("return")

    def wait_event(self, names: str | Iterable[str], timeout: float) -> dict[str, Any] | None:
        """The first event named in ``names`` (already received or arriving within ``timeout``), or None.

        The returned event is removed from :attr:`events`. A closed connection (QEMU exited) ends the wait
        early with None.
        """
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") in wanted:
                    return self.events.pop(i)
            if self._sock is None or time.monotonic() >= deadline:
                return None
            try:
                msg = self._read_message(deadline, what="an event")
            except VmError:
                return None
            if "event" in msg:
                self._note_event(msg)

    def _note_event(self, ev: dict[str, Any]) -> None:
        log.debug("QMP event %s %s", ev.get("event"), ev.get("data", ""))
        self.events.append(ev)
        del self.events[:-1000]  # bounded

    def _read_message(self, deadline: float, *, what: str = "a message") -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError(f"QMP: timed out waiting for {what} on {self.path}")
            try:
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise VmError(f"QMP: timed out waiting for {what} on {self.path}") from exc
            except OSError as exc:
                self.close()
                raise VmError(f"QMP connection to {self.path} failed: {exc}") from exc
            if not chunk:
                self.close()
                raise VmError(f"QMP connection to {self.path} closed by QEMU while waiting for {what}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as exc:
            raise VmError(f"QMP: malformed message from QEMU: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise VmError(f"QMP: unexpected message from QEMU: {line[:200]!r}")
        return msg
