"""Real QEMU (TCG) through QemuMachine: QMP, screendump, shutdown, start failures, a kernel boot, and that no
QEMU survives its Python process (SIGKILL, SIGTERM, SIGINT).

The kernel is a stock Debian kernel fetched with ``apt-get download`` (verified by apt against the host's
signed package lists) and unpacked with ``dpkg-deb -x``; see conftest_vm.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import image
from builder.errors import VmError
from builder.vm import Drive, QemuMachine, VmSpec, find_free_port, open_machine

try:
    from conftest_vm import acpi_initrd, debian_kernel, wait_gone
except ImportError:  # tests/ imported as a package
    from .conftest_vm import acpi_initrd, debian_kernel, wait_gone

pytestmark = [pytest.mark.integration, pytest.mark.vm]

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return debian_kernel(tmp_path_factory)


@pytest.fixture(scope="session")
def initrd(tmp_path_factory: pytest.TempPathFactory, kernel: Path) -> Path:
    return acpi_initrd(tmp_path_factory, kernel)


def _spec(name: str, **kw: object) -> VmSpec:
    base: dict[str, object] = {"name": name, "memory_mib": 256, "cpus": 1, "accel": "tcg"}
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_empty_disk_running_screendump_shutdown(tmp_path: Path) -> None:
    disk = image.create(tmp_path / "disk.qcow2", 1 << 30)
    port = find_free_port()
    spec = _spec("empty", drives=(Drive(disk),), ssh_forward=port)
    with open_machine(spec, tmp_path) as vm:
        assert isinstance(vm, QemuMachine)
        pid = vm.pid
        assert vm.is_running()
        assert vm.status() == "running"
        assert vm.startup_seconds is not None and vm.startup_seconds < 10
        # the SSH forward listens on 127.0.0.1 (slirp accepts before the guest does)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        time.sleep(0.5)
        ppm = vm.screendump(tmp_path / "shots" / "screen.ppm")
        header = ppm.read_bytes()[:20]
        assert header.startswith(b"P6\n")
        assert ppm.stat().st_size > 100_000
        # no OS answers the ACPI button: the fallback (QMP quit) must end it
        t0 = time.monotonic()
        rc = vm.shutdown(timeout=1)
        assert time.monotonic() - t0 < 15
        assert rc == 0
        assert vm.stop_method == "quit"
        assert not vm.is_running()
        assert vm.status() == "exited"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "empty.qmp").exists()
    assert "QEMU" not in " ".join(vm.stderr_tail())  # no errors from QEMU itself


@pytest.mark.timeout(60)
def test_exit_kills_a_running_vm_on_exception(tmp_path: Path) -> None:
    vm = QemuMachine(_spec("boom"), tmp_path)
    with pytest.raises(RuntimeError, match="inside"), vm:
        pid = vm.pid
        raise RuntimeError("inside the with block")
    assert vm.stop_method == "kill"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_long_workdir_puts_qmp_socket_elsewhere(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with QemuMachine(_spec("deep"), deep) as vm:
        assert vm.status() == "running"
        sockdir = vm._sockdir
        assert sockdir is not None and sockdir.exists()
    assert not sockdir.exists()


@pytest.mark.timeout(60)
def test_missing_disk_fails_with_qemu_message(tmp_path: Path) -> None:
    spec = _spec("nodisk", drives=(Drive(tmp_path / "missing.qcow2"),))
    with pytest.raises(VmError) as info, QemuMachine(spec, tmp_path):
        pass
    err = info.value
    assert "missing.qcow2" in str(err) and "No such file or directory" in str(err)
    assert "exited with code 1 at start" in str(err)
    assert any("missing.qcow2" in line for line in err.log_tail)


@pytest.mark.timeout(60)
def test_bad_argument_and_busy_port_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="-no-such-option"), QemuMachine(_spec("badarg", extra_args=("-no-such-option",)),
                                                                       tmp_path):
        pass
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(VmError, match="host forwarding"), QemuMachine(_spec("busy", ssh_forward=port), tmp_path):
            pass


@pytest.mark.timeout(120)
def test_kernel_boot_under_tcg(tmp_path: Path, kernel: Path) -> None:
    spec = _spec("kboot", memory_mib=512, cpus=2, kernel=kernel, append="console=ttyS0 panic=-1")
    with QemuMachine(spec, tmp_path) as vm:
        t0 = time.monotonic()
        banner = vm.wait_for_serial(r"Linux version \S+", timeout=90)
        assert banner is not None, vm.serial_tail()
        print(f"kernel banner after {time.monotonic() - t0:.1f} s: {banner}")
        vm.kill()
        assert not vm.is_running()
    assert "Linux version" in vm.serial_log.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_guest_reboot_ends_the_vm(tmp_path: Path, kernel: Path) -> None:
    """With no_reboot, a guest reboot (here: panic=-1 after 'VFS: Unable to mount root') exits QEMU."""
    spec = _spec("reboot", memory_mib=512, kernel=kernel, append="console=ttyS0 panic=-1", no_reboot=True)
    with QemuMachine(spec, tmp_path) as vm:
        t0 = time.monotonic()
        rc = vm.wait(timeout=90)
        print(f"kernel panicked and QEMU exited after {time.monotonic() - t0:.1f} s")
        assert rc == 0
        assert vm.stop_method == "exited"
        assert vm.status() == "exited"
    assert "Kernel panic" in vm.serial_log.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_graceful_powerdown(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    """shutdown() presses the ACPI power button; a guest that powers off ends QEMU with exit code 0."""
    spec = _spec("acpi", kernel=kernel, initrd=initrd, append="console=ttyS0 panic=-1")
    with QemuMachine(spec, tmp_path) as vm:
        assert vm.wait_for_serial("builder-test: ready", timeout=90), vm.serial_tail()
        t0 = time.monotonic()
        assert vm.shutdown(timeout=30) == 0
        print(f"guest powered off {time.monotonic() - t0:.2f} s after system_powerdown")
        assert vm.stop_method == "powerdown"
    assert "reboot: Power down" in vm.serial_log.read_text(errors="replace")


SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from builder.vm import QemuMachine, VmSpec

    mode, workdir = sys.argv[1], Path(sys.argv[2])
    if mode == "sigterm-handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    spec = VmSpec(name="orphan", memory_mib=128, cpus=1, accel="tcg")
    with QemuMachine(spec, workdir, die_with_parent=mode != "sigkill-no-deathsig") as vm:
        print(vm.pid, flush=True)
        time.sleep(300)
    """
)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the child subreaper, so QEMUs orphaned by the killed script become our children and
    can be reaped (this host's PID 1 never reaps orphans: they would stay zombies)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(pid: int, timeout: float = 5.0) -> None:
    """Reap an orphaned QEMU that became our child. A multi-threaded process shows as a zombie before it can
    be waited for (its other threads are still exiting), so poll for a moment."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "sig", "graceful"),
    [
        ("sigkill", signal.SIGKILL, False),  # no Python code runs: PR_SET_PDEATHSIG kills QEMU
        ("sigterm", signal.SIGTERM, False),  # default SIGTERM action, no handler: PDEATHSIG again
        ("sigterm-handler", signal.SIGTERM, True),  # SystemExit → __exit__ kills QEMU and removes the socket
        ("sigint", signal.SIGINT, True),  # KeyboardInterrupt → __exit__
        ("sigkill-no-deathsig", signal.SIGKILL, False),  # control: without PDEATHSIG, QEMU survives
    ],
)
def test_qemu_dies_with_its_python_process(
    tmp_path: Path, subreaper: None, mode: str, sig: signal.Signals, graceful: bool
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    qemu_pid = 0
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
        qemu_pid = int(line)
        assert Path(f"/proc/{qemu_pid}").exists()
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
        assert rc != 0
        if mode == "sigkill-no-deathsig":
            assert not wait_gone(qemu_pid, timeout=2), "the control case should leave QEMU running"
            os.kill(qemu_pid, signal.SIGKILL)  # we started it; our child now (subreaper)
            os.waitpid(qemu_pid, 0)
            return
        assert wait_gone(qemu_pid, timeout=5), f"QEMU pid {qemu_pid} survived {mode}"
        if graceful:
            assert not (tmp_path / "orphan.qmp").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if qemu_pid:
            _reap(qemu_pid)
