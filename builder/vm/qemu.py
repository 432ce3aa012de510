"""The default VM backend: QEMU as a child process, driven over QMP on a unix socket. No daemon.

:func:`qemu_argv` is pure (spec → argv). :class:`QemuMachine` runs it::

    with QemuMachine(spec, workdir) as vm:      # starts QEMU, waits until QMP answers
        vm.wait(timeout=3600)                   # or vm.shutdown(), vm.status(), vm.screendump(...)
    # here no QEMU process is left, whatever happened inside the block

QEMU's stdout/stderr go to ``<workdir>/<name>.qemu.log`` (never an unread pipe). QEMU runs in its own session
(a terminal's Ctrl-C reaches Python, which then stops QEMU) and with ``PR_SET_PDEATHSIG=SIGKILL``, so it dies
with the Python process even on SIGKILL. The kernel sends that signal when the *thread* that forked QEMU ends:
start machines from the main thread, or from a thread that outlives them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BuilderError, MissingToolError, VmError
from ..run import Child, start, which
from .guestnet import RELAY_PACKAGE, RELAY_TOOL
from .logs import tail_lines, wait_for_pattern
from .qmp import QmpClient
from .spec import Drive, VmSpec

log = logging.getLogger(__name__)

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes including the NUL; keep a margin
_EXIT_GRACE = 2.0  # seconds a QEMU whose QMP connection failed at start gets to exit with its own error


def _esc(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax (',' is written ',,')."""
    return os.fspath(value).replace(",", ",,")


def _drive_args(index: int, drive: Drive, bootindex: int, ide_bus: int) -> list[str]:
    readonly = drive.readonly or drive.media == "cdrom"
    opts = [f"if=none,id=drive{index},file={_esc(drive.path)},format={drive.format},cache={drive.cache}"]
    if readonly:
        opts.append("readonly=on")
    elif drive.discard and drive.media == "disk":
        opts.append("discard=unmap,detect-zeroes=unmap")
    if drive.media == "cdrom":
        device = f"ide-cd,drive=drive{index},bus=ide.{ide_bus},bootindex={bootindex}"
    else:
        device = f"virtio-blk-pci,drive=drive{index},bootindex={bootindex}"
    return ["-drive", ",".join(opts), "-device", device]


def qemu_argv(spec: VmSpec, *, qmp_socket: Path, binary: str = "qemu-system-x86_64") -> list[str]:
    """The complete QEMU command line for ``spec`` (pure: reads nothing, checks no file).

    No default devices or user config; no display window but a VGA device (so QMP ``screendump`` has a
    console to capture); the first serial port to ``spec.serial_log``; QMP on ``qmp_socket``; virtio disks
    and SATA/IDE CD-ROMs with boot indexes; user networking with the port forwards on 127.0.0.1; a virtio RNG
    fed from the host's /dev/urandom so the guest has entropy early (SSH host keys, apt).
    """
    accel = "tcg,thread=multi" if spec.accel == "tcg" else "kvm"
    fw = spec.firmware
    argv = [
        binary,
        "-name", spec.name,
        "-nodefaults",
        "-no-user-config",
        "-machine", spec.machine + (",smm=on" if fw.secure else ""),
        "-accel", accel,
        "-cpu", spec.effective_cpu_model,
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-display", "none",
        "-device", "VGA",
        "-qmp", f"unix:{_esc(qmp_socket)},server=on,wait=off",
    ]
    if fw.uefi:
        assert fw.code is not None and fw.vars is not None
        if fw.secure:  # the Secure Boot build runs its variable services in SMM; only SMM may write the flash
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_esc(fw.code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={_esc(fw.vars)}"]
    if spec.serial_log is not None:
        argv += ["-chardev", f"file,id=serial0,path={_esc(spec.serial_log)}", "-serial", "chardev:serial0"]
    else:
        argv += ["-serial", "null"]

    order = [i for i, d in enumerate(spec.drives) if d.media == spec.boot]
    order += [i for i, d in enumerate(spec.drives) if d.media != spec.boot]
    first = 1 if spec.kernel is not None else 0  # a direct kernel boot (-kernel) takes bootindex 0 itself
    bootindex = {drive_index: position + first for position, drive_index in enumerate(order)}
    ide_bus = 0
    for i, drive in enumerate(spec.drives):
        argv += _drive_args(i, drive, bootindex[i], ide_bus)
        if drive.media == "cdrom":
            ide_bus += 1

    netdev = spec.user_netdev("net0")
    # romfile= drops the NIC's iPXE option ROM: the firmware never tries a network boot.
    argv += ["-netdev", netdev, "-device", f"{spec.nic_model},netdev=net0,romfile="]
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]

    if spec.kernel is not None:
        argv += ["-kernel", os.fspath(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", os.fspath(spec.initrd)]
        if spec.append:
            argv += ["-append", spec.append]
    if spec.no_reboot:
        argv.append("-no-reboot")
    argv += list(spec.extra_args)
    return argv


# -- process management -------------------------------------------------------------------------------------


def _reap(child: Child, paths: tuple[Path, ...]) -> None:
    """Kill QEMU if it still runs, reap it, remove its socket files. Used by close() and as finalizer."""
    child.stop(grace=0)
    for path in paths:
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


class QemuMachine:
    """One QEMU process for one :class:`VmSpec`; a context manager that always leaves no process behind.

    ``serial_log`` is ``spec.serial_log`` or ``<workdir>/<name>.serial.log``; QEMU's own output goes to
    :attr:`log_path`. ``stop_method`` tells how the VM ended (``exited`` on its own, ``powerdown``, ``quit``,
    ``terminate``, ``kill``). ``startup_seconds`` is the time from spawning QEMU to QMP answering.
    """

    def __init__(
        self,
        spec: VmSpec,
        workdir: Path,
        *,
        binary: str = "qemu-system-x86_64",
        qmp_timeout: float = 10.0,
        start_timeout: float = 30.0,
        die_with_parent: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        if spec.serial_log is None:
            spec = replace(spec, serial_log=self.workdir / f"{spec.name}.serial.log")
        self.spec = spec
        self.serial_log: Path = spec.serial_log  # type: ignore[assignment]
        self.log_path = self.workdir / f"{spec.name}.qemu.log"
        self.binary = binary
        self.qmp_timeout = qmp_timeout
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self.stop_method: str | None = None
        self.startup_seconds: float | None = None
        self._proc: Child | None = None
        self._qmp: QmpClient | None = None
        self._qmp_path: Path | None = None
        self._sockdir: Path | None = None
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VmError(f"VM {self.name} has not been started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def start(self) -> None:
        """Spawn QEMU and wait until QMP answers. A second call while it runs does nothing.

        Raises VmError (with the tail of QEMU's output) when QEMU is missing, exits at start (bad argument,
        missing file, KVM failure, port in use) or its QMP socket does not answer in ``start_timeout``.
        """
        if self._proc is not None:
            if self._proc.returncode is None:
                return
            raise VmError(f"VM {self.name} has already run; create a new QemuMachine to start it again")
        binary = which(self.binary, package="qemu-system-x86")
        if self.spec.guest_services:
            which(RELAY_TOOL, package=RELAY_PACKAGE, why="it relays the guest's connections to builder's services")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        qmp_path = self.workdir.absolute() / f"{self.name}.qmp"
        if len(os.fsencode(qmp_path)) > _SOCKET_PATH_MAX:
            self._sockdir = Path(tempfile.mkdtemp(prefix="builder-qmp-"))
            qmp_path = self._sockdir / "qmp.sock"
        with contextlib.suppress(FileNotFoundError):
            qmp_path.unlink()
        self._qmp_path = qmp_path
        argv = qemu_argv(self.spec, qmp_socket=qmp_path, binary=binary)
        log.info("starting VM %s (%s, %d vCPU, %d MiB)", self.name, self.spec.accel, self.spec.cpus,
                 self.spec.memory_mib)
        log.debug("QEMU command: %s", shlex.join(argv))
        if self.die_with_parent and threading.current_thread() is not threading.main_thread():
            log.debug("VM %s started from thread %s: QEMU is killed when that thread ends",
                      self.name, threading.current_thread().name)
        t0 = time.monotonic()
        try:
            with self.log_path.open("wb") as out:
                out.write(f"# {shlex.join(argv)}\n".encode())
                out.flush()
                self._proc = start(argv, stdout=out, die_with_parent=self.die_with_parent, stage="vm")
        except MissingToolError:
            raise
        except (OSError, BuilderError) as exc:
            raise VmError(f"cannot run QEMU ({binary}): {exc}") from exc
        paths = (qmp_path, self._sockdir) if self._sockdir else (qmp_path,)
        self._finalizer = weakref.finalize(self, _reap, self._proc, paths)

        self._qmp = QmpClient(qmp_path, timeout=self.qmp_timeout)
        try:
            self._qmp.connect(wait=self.start_timeout, alive=self.is_running)
        except VmError as exc:
            raise self._start_failure(exc) from exc
        except BaseException:  # e.g. Ctrl-C while waiting: __exit__ will not run when __enter__ fails
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.debug("VM %s: QEMU pid %d, QMP ready after %.2f s", self.name, self._proc.pid, self.startup_seconds)

    def _start_failure(self, exc: VmError) -> VmError:
        assert self._proc is not None
        # QEMU that fails at start (a host forward on a busy port, a bad device) may have opened its QMP socket
        # already and be on its way out when the connection drops: give it a moment to exit, so the error is
        # its own message rather than "QMP did not answer".
        self._proc.wait(_EXIT_GRACE)
        running = self.is_running()
        self.close()
        tail = self.stderr_tail()
        if running:
            return VmError(f"VM {self.name}: QEMU started but QMP did not answer: {exc}", log_tail=tail)
        rc = self._proc.returncode
        detail = next((ln for ln in reversed(tail) if "qemu-system" in ln or "rror" in ln), tail[-1] if tail else "")
        if rc is not None and rc < 0:
            how = f"was killed by signal {signal.Signals(-rc).name}"
        else:
            how = f"exited with code {rc}"
        return VmError(f"QEMU {how} at start of VM {self.name}: {detail or 'no output'}", log_tail=tail,
                       hint=f"full QEMU output: {self.log_path}")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit (guest power-off, or reboot with ``no_reboot``); its exit code, or None."""
        if self._proc is None:
            raise VmError(f"VM {self.name} has not been started")
        rc = self._proc.wait(timeout)
        if rc is None:
            return None
        if self.stop_method is None:
            self.stop_method = "exited"
            log.info("VM %s exited with code %d", self.name, rc)
        if self._qmp is not None:
            self._qmp.close()
        return rc

    def shutdown(self, timeout: float = 60) -> int:
        """Stop the VM, gently first: ACPI power button and ``timeout`` seconds for the guest to power off,
        then QMP ``quit``, then SIGTERM, then SIGKILL. Always reaps QEMU; returns its exit code."""
        if self._proc is None:
            raise VmError(f"VM {self.name} has not been started")
        steps: list[tuple[str, float]] = [("powerdown", timeout), ("quit", 10), ("terminate", 10), ("kill", 30)]
        rc = self.wait(0) if self._proc.returncode is not None else None  # already exited on its own
        for method, wait_s in steps:
            if rc is not None:
                break
            try:
                if method == "powerdown":
                    self.powerdown()
                elif method == "quit":
                    log.warning("VM %s did not power off within %.0f s; stopping it with QMP quit", self.name,
                                timeout)
                    self._execute("quit")
                elif method == "terminate":
                    self._proc.popen.terminate()
                else:
                    self._proc.popen.kill()
            except (VmError, ProcessLookupError) as exc:
                log.debug("VM %s: %s failed: %s", self.name, method, exc)
            self.stop_method = method
            rc = self.wait(wait_s)
        if rc is None:  # not even SIGKILL worked within 30 s (D state): nothing more we can do
            raise VmError(f"VM {self.name}: QEMU pid {self._proc.pid} did not die after SIGKILL")
        self.close()
        return rc

    def kill(self) -> None:
        """SIGKILL QEMU (if it runs) and reap it."""
        if self.is_running():
            assert self._proc is not None
            log.debug("VM %s: killing QEMU pid %d", self.name, self._proc.pid)
            self.stop_method = "kill"
            self._proc.stop(grace=0)
        if self._qmp is not None:
            self._qmp.close()

    def close(self) -> None:
        """Kill QEMU if it still runs, reap it, close QMP and remove the socket. Idempotent."""
        if self._qmp is not None:
            self._qmp.close()
        if self.is_running():
            self.stop_method = "kill"
            log.debug("VM %s: killing QEMU pid %d on close", self.name, self.pid)
        if self._finalizer is not None:
            self._finalizer()  # kills, reaps, removes the socket; runs only once

    def __enter__(self) -> QemuMachine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- QMP ------------------------------------------------------------------------------------------------

    def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if not self.is_running() or self._qmp is None or not self._qmp.connected:
            raise VmError(f"VM {self.name} is not running (QMP {command!r})", log_tail=self.stderr_tail())
        return self._qmp.execute(command, arguments)

    @property
    def qmp(self) -> QmpClient:
        """The machine's QMP client (for commands this class does not wrap, and for ``events``)."""
        if self._qmp is None:
            raise VmError(f"VM {self.name} has not been started")
        return self._qmp

    def status(self) -> str:
        """QMP ``query-status`` ('running', 'paused', 'shutdown', 'internal-error', …); 'exited' once QEMU
        has exited."""
        if self._proc is None:
            raise VmError(f"VM {self.name} has not been started")
        if not self.is_running():
            return "exited"
        try:
            return str(self._execute("query-status")["status"])
        except VmError:
            if not self.is_running():
                return "exited"
            raise

    def screendump(self, path: Path) -> Path:
        """Save the VGA console as a PPM image at ``path`` (QMP ``screendump``)."""
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._execute("screendump", {"filename": os.fspath(path)})
        if not path.is_file() or path.stat().st_size == 0:
            raise VmError(f"VM {self.name}: screendump wrote nothing to {path}")
        return path

    def powerdown(self) -> None:
        """Press the ACPI power button (QMP ``system_powerdown``); the guest decides what to do."""
        self._execute("system_powerdown")

    # -- logs -----------------------------------------------------------------------------------------------

    def stderr_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines QEMU itself wrote (stderr and stdout; not the guest's serial console)."""
        return [ln for ln in tail_lines(self.log_path, n + 1) if not ln.startswith("# ")][-n:]

    def serial_tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.serial_log, n)

    def wait_for_serial(self, pattern: str, timeout: float) -> str | None:
        """Wait until the serial log matches the regex ``pattern``; the matched text, or None on timeout or
        when QEMU exits first."""
        m = wait_for_pattern(self.serial_log, pattern, timeout=timeout, alive=self.is_running)
        return m.group(0) if m else None
