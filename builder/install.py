"""Stage 4: the unattended debian-installer run in a VM.

The installer boots from the preseed ISO onto an empty disk. Its remote syslog is the progress bar and the
failure report; its serial console tells when it waits at a question the preseed did not answer. Success is
a clean exit of QEMU (the installer powers off) after the finish step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InstallError
from .events import Emitter
from .installer.progress import InstallTracker, SyslogListener, console_question
from .vm import open_machine
from .vm.guestnet import gateway_service
from .vm.logs import read_text, tail_lines
from .vm.spec import Drive, VmSpec

log = logging.getLogger(__name__)

POLL = 2.0


@dataclass(frozen=True)
class InstallResult:
    seconds: float
    udebs: int
    packages: int
    milestones: tuple[str, ...]
    syslog: Path
    serial_log: Path


def install_spec(*, name: str, iso: Path, disk: Path, accel: str, cpus: int, memory: int, workdir: Path,
                 gateway_port: int) -> VmSpec:
    return VmSpec(
        name=name, memory_mib=memory >> 20, cpus=cpus, accel=accel,  # type: ignore[arg-type]
        drives=(Drive(disk, cache="unsafe"), Drive.cdrom(iso)), boot="cdrom",
        serial_log=workdir / "install.serial.log", no_reboot=True,
        guest_services=(gateway_service(gateway_port),),
    )


def run_install(spec: VmSpec, *, workdir: Path, tracker: InstallTracker, listener: SyslogListener,
                emitter: Emitter, timeout: float, stall_timeout: float, backend: str = "qemu",
                libvirt_uri: str = "qemu:///system") -> InstallResult:
    """Boot the installer; follow it until QEMU exits. InstallError on failure, question, stall or timeout."""
    t0 = time.monotonic()
    last_step = ""
    with open_machine(spec, workdir, backend=backend, libvirt_uri=libvirt_uri) as vm:  # type: ignore[arg-type]
        vm.start()
        while True:
            rc = vm.wait(POLL)
            if tracker.step != last_step or int(time.monotonic() - t0) % 60 < POLL:
                last_step = tracker.step
                emitter.progress(f"{tracker.step} (udebs {tracker.udebs}, packages {tracker.packages})",
                                 step=tracker.step, udebs=tracker.udebs, packages=tracker.packages)
            if rc is not None:
                break
            if tracker.failed:
                raise InstallError(
                    f"debian-installer failed at step '{tracker.failed_step}': {tracker.failed}",
                    step=tracker.failed_step, log_tail=list(tracker.tail)[-25:],
                    hint=f"full logs: {listener.log_file} and {spec.serial_log}",
                )
            question = console_question(read_text(spec.serial_log)[-20000:])
            if question:
                raise InstallError(
                    "debian-installer stopped at a question the preseed does not answer",
                    step=tracker.step, log_tail=question.splitlines(),
                    hint="add the answer to the preseed templates in preseed/",
                )
            elapsed = time.monotonic() - t0
            if elapsed > timeout:
                raise InstallError(f"the install did not finish in {timeout:.0f} s (at step '{tracker.step}')",
                                   step=tracker.step, log_tail=list(tracker.tail)[-25:])
            if tracker.idle_for() > stall_timeout and elapsed > stall_timeout:
                raise InstallError(
                    f"the installer made no progress for {stall_timeout:.0f} s (at step '{tracker.step}')",
                    step=tracker.step, log_tail=list(tracker.tail)[-15:] + tail_lines(spec.serial_log, 10),
                )
        seconds = time.monotonic() - t0
    if tracker.failed:
        raise InstallError(f"debian-installer failed at step '{tracker.failed_step}': {tracker.failed}",
                           step=tracker.failed_step, log_tail=list(tracker.tail)[-25:])
    if rc != 0 or not tracker.finished:
        raise InstallError(
            f"the installer VM ended (exit code {rc}) before the install finished (last step '{tracker.step}')",
            step=tracker.step, log_tail=list(tracker.tail)[-15:] + tail_lines(spec.serial_log, 15),
        )
    return InstallResult(seconds, tracker.udebs, tracker.packages, tuple(tracker.milestones), listener.log_file,
                         spec.serial_log)  # type: ignore[arg-type]
