"""Choosing the accelerator by probing, not by looking for /dev/kvm.

On some hosts ``/dev/kvm`` exists but cannot run a stock guest (a PVM kvm module: ``-cpu host`` aborts with
"failed to set MSR 0x10a", other CPU models die with "KVM internal error"). So :func:`kvm_works` really boots a
stock Debian kernel under ``-accel kvm -cpu host`` with no initrd (it panics quickly: "VFS: Unable to mount
root fs") and looks at what it printed. Without a kernel it boots the firmware alone and reads SeaBIOS's debug
port instead (a weaker test). :func:`choose_accel` turns ``accel: auto|kvm|tcg`` into ``kvm`` or ``tcg``, once
per process.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ..errors import VmError
from ..events import Emitter
from ..run import Child, spawn, which
from .logs import read_text, tail_lines

log = logging.getLogger(__name__)

_KVM_FAILURE = re.compile(
    r"KVM internal error[^\n]*|failed to set MSR[^\n]*|kvm_buf_set_msrs[^\n]*|Could not access KVM kernel module[^\n]*"
    r"|failed to initialize kvm[^\n]*|kvm_init_vcpu[^\n]*|KVM: entry failed[^\n]*|kvm run failed[^\n]*"
)
_KERNEL_DONE = re.compile(r"Kernel panic|VFS: Unable to mount root|Run /init|Freeing unused kernel")
_FIRMWARE_DONE = re.compile(r"No bootable device|Booting from ")
_LINES_AFTER_BANNER = 30


def _kernel_ran(serial: str) -> str | None:
    """What shows that the kernel ran (a late boot message, or many lines after the banner), else None."""
    idx = serial.find("Linux version")
    if idx < 0:
        return None
    rest = serial[idx:]
    m = _KERNEL_DONE.search(rest)
    if m:
        return m.group(0)
    if rest.count("\n") >= _LINES_AFTER_BANNER:
        return f"{_LINES_AFTER_BANNER} lines of kernel log"
    return None


def _firmware_ran(debugcon: str) -> str | None:
    m = _FIRMWARE_DONE.search(debugcon)
    return m.group(0) if m else None


def probe_argv(
    kernel: Path | None, *, serial: Path, binary: str = "qemu-system-x86_64", accel: str = "kvm", cpu: str = "host"
) -> list[str]:
    """The probe's QEMU command line (pure): KVM, ``-cpu host``, the kernel with no initrd, or the firmware
    alone with SeaBIOS's debug port (0x402) logged to ``serial``."""
    argv = [
        binary, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35",
        "-accel", accel, "-cpu", cpu, "-smp", "1", "-m", "512M", "-no-reboot",
        "-chardev", f"file,id=probe0,path={os.fspath(serial).replace(',', ',,')}",
    ]
    if kernel is not None:
        argv += ["-serial", "chardev:probe0", "-kernel", os.fspath(kernel), "-append", "console=ttyS0 panic=-1"]
    else:
        argv += ["-device", "isa-debugcon,iobase=0x402,chardev=probe0"]
    return argv


def kvm_works(kernel: Path | None, *, timeout: float = 30, binary: str = "qemu-system-x86_64") -> tuple[bool, str]:
    """Boot ``kernel`` (a stock Debian kernel) under KVM; (True, what showed it ran) or (False, why not).

    ``kernel=None`` boots only the firmware. Never raises for a KVM problem: a missing /dev/kvm, QEMU dying
    ("failed to set MSR", "KVM internal error"), or no output within ``timeout`` are all (False, reason).
    """
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no read/write access to /dev/kvm (add the user to the kvm group)"
    return boot_probe(kernel, timeout=timeout, binary=binary)


def boot_probe(
    kernel: Path | None,
    *,
    accel: str = "kvm",
    cpu: str = "host",
    timeout: float = 30,
    binary: str = "qemu-system-x86_64",
) -> tuple[bool, str]:
    """Boot ``kernel`` (or the firmware) under ``accel``/``cpu`` and tell whether the guest ran; the engine of
    :func:`kvm_works` (tests run it under TCG to check that a working boot is recognised)."""
    qemu = which(binary, package="qemu-system-x86")
    if kernel is not None and not Path(kernel).is_file():
        raise VmError(f"KVM probe: kernel {kernel} does not exist")
    what = "kernel" if kernel is not None else "firmware"
    done = _kernel_ran if kernel is not None else _firmware_ran
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="builder-boot-probe-") as tmp:
        serial, out_path = Path(tmp) / "serial.log", Path(tmp) / "qemu.log"
        argv = probe_argv(kernel, serial=serial, binary=qemu, accel=accel, cpu=cpu)
        log.debug("boot probe: %s", " ".join(argv))
        with out_path.open("wb") as out, spawn(argv, stdout=out, grace=0, stage="vm") as proc:
            ok, reason = _watch(proc, serial, out_path, done, timeout)
    elapsed = time.monotonic() - t0
    reason = f"{reason} ({what} probe, -accel {accel} -cpu {cpu}, {elapsed:.1f} s)"
    log.info("boot probe: %s: %s", "works" if ok else "failed", reason)
    return ok, reason


def _watch(proc: Child, serial: Path, out_path: Path, done: Callable[[str], str | None],
           timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while True:
        exited = not proc.running()
        failure = _KVM_FAILURE.search(read_text(out_path))
        if failure:
            return False, f"QEMU failed: {failure.group(0).strip()}"
        sign = done(read_text(serial))
        if sign:
            return True, f"the guest ran: {sign!r}"
        if exited:
            tail = tail_lines(out_path, 3)
            return False, f"QEMU exited with code {proc.returncode} before the guest ran" + (
                f": {tail[-1]}" if tail else "")
        if time.monotonic() >= deadline:
            last = tail_lines(serial, 1)
            return False, f"no sign of the guest running within {timeout:.0f} s" + (
                f" (last guest output: {last[0].strip()!r})" if last else " (no guest output)")
        time.sleep(0.05)


_cache: dict[str, tuple[bool, str]] = {}
_cache_lock = threading.Lock()


def _probe_once(kernel: Path | None) -> tuple[bool, str]:
    key = os.fspath(Path(kernel).resolve()) if kernel is not None else ""
    with _cache_lock:
        if key not in _cache:
            _cache[key] = kvm_works(kernel)
        return _cache[key]


def choose_accel(requested: Literal["auto", "kvm", "tcg"], kernel: Path | None) -> tuple[Literal["kvm", "tcg"], str]:
    """``tcg`` → tcg; ``kvm`` → kvm if the probe boots, else VmError; ``auto`` → kvm if the probe boots, else
    tcg with the reason (the caller logs it as a warning). The probe runs once per process (and kernel)."""
    if requested == "tcg":
        return "tcg", "accel: tcg requested"
    if requested not in ("auto", "kvm"):
        raise VmError(f"unknown accelerator {requested!r} (auto, kvm or tcg)")
    ok, reason = _probe_once(kernel)
    if ok:
        return "kvm", reason
    if requested == "kvm":
        raise VmError(f"accel: kvm was requested, but KVM cannot run a guest here: {reason}",
                      hint="set vm.accel to 'tcg' (slow) or 'auto'")
    return "tcg", f"KVM is unusable ({reason}); using TCG (software emulation, much slower)"


def pick_accel(requested: Literal["auto", "kvm", "tcg"], kernel: Path | None, emitter: Emitter, *,
               libvirt_uri: str | None = None) -> Literal["kvm", "tcg"]:
    """:func:`choose_accel`, its reason reported: as info when it is KVM or what was asked for, else a warning.
    With a remote ``libvirt_uri`` the VMs run there: that host's libvirt says whether it has KVM
    (:func:`~builder.vm.libvirt.choose_remote_accel`), nothing is probed here."""
    from .remote import is_local

    if libvirt_uri is not None and not is_local(libvirt_uri):
        from .libvirt import choose_remote_accel

        accel, why = choose_remote_accel(requested, libvirt_uri)
    else:
        accel, why = choose_accel(requested, kernel)
    (emitter.info if accel == "kvm" or requested == "tcg" else emitter.warning)(f"accelerator {accel}: {why}")
    return accel


def clear_cache() -> None:
    """Forget the memoized probe results (tests)."""
    with _cache_lock:
        _cache.clear()
