"""Stage ``install``: the unattended debian-installer run in a VM, or the cached installed disk it made before.

The installer boots from the preseed ISO onto an empty disk. Its remote syslog is the progress bar and the
failure report; its serial console tells when it waits at a question the preseed did not answer. Success is
a clean exit of QEMU (the installer powers off) after the finish step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import image
from ..config import format_duration
from ..context import BuildContext
from ..errors import InstallError
from ..events import Emitter
from ..installcache import DirectBoot, InstalledDisk, bases_in_use
from ..installer.progress import InstallTracker, SyslogListener, console_question
from ..ssh import KeyPair
from ..vm import Machine
from ..vm.firmware import BIOS, Firmware
from ..vm.guestnet import gateway_service
from ..vm.logs import read_text, tail_lines
from ..vm.spec import Drive, VmSpec, vm_name
from .fetch import InstallerInputs
from .media import INSTALL_MACHINE, Media, make_iso

log = logging.getLogger(__name__)

POLL = 2.0
COUNTS_EVERY = 10.0


@dataclass(frozen=True)
class InstallResult:
    seconds: float
    udebs: int
    packages: int
    milestones: tuple[str, ...]
    syslog: Path
    serial_log: Path


@dataclass(frozen=True)
class InstalledBase:
    """The installed disk (read-only from here on: later stages write to an overlay) and the SSH keys baked
    into it."""

    disk: Path
    client_key: KeyPair
    host_key: KeyPair
    cached: bool
    facts: dict[str, Any]
    direct_boot: DirectBoot | None = None


def install_spec(*, name: str, iso: Path, disk: Path, accel: str, cpus: int, memory: int, workdir: Path,
                 gateway_port: int, firmware: Firmware = BIOS, syslog_port: int | None = None) -> VmSpec:
    """The installer VM: ``syslog_port`` is where the installer's syslog goes (the listener's UDP port)."""
    return VmSpec(firmware=firmware,
        name=name, memory_mib=memory >> 20, cpus=cpus, accel=accel,  # type: ignore[arg-type]
        drives=(Drive(disk, cache="unsafe"), Drive.cdrom(iso)), boot="cdrom", machine=INSTALL_MACHINE,
        serial_log=workdir / "install.serial.log", no_reboot=True,
        guest_services=(gateway_service(gateway_port),),
        udp_to_host=(syslog_port,) if syslog_port is not None else (),
    )


def run_install(spec: VmSpec, vm: Machine, *, tracker: InstallTracker, listener: SyslogListener,
                emitter: Emitter, timeout: float, stall_timeout: float) -> InstallResult:
    """Follow the installer running in the started ``vm`` until QEMU exits. InstallError on failure, question,
    stall or timeout (the caller owns the VM and stops it)."""
    t0 = last_t = time.monotonic()
    last: tuple[str, int, int] = ("", -1, -1)
    while True:
        rc = vm.wait(POLL)
        now = time.monotonic()
        state = (tracker.step, tracker.udebs, tracker.packages)
        # a new step at once; new counts every COUNTS_EVERY seconds (the live display's counters); else a minutely
        # heartbeat
        if (state[0] != last[0] or (state != last and now - last_t >= COUNTS_EVERY)
                or int(now - t0) % 60 < POLL):
            last, last_t = state, now
            emitter.progress(f"{tracker.step} (udebs {tracker.udebs}, packages {tracker.packages})",
                             step=tracker.step, udebs=tracker.udebs, packages=tracker.packages)
        if rc is not None:
            break
        if tracker.failed:
            raise InstallError(
                f"debian-installer failed at step '{tracker.failed_step}': {tracker.failed}",
                step=tracker.failed_step, log_tail=list(tracker.tail)[-25:],
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


def run(ctx: BuildContext, media: Media, inputs: InstallerInputs) -> InstalledBase:
    """The stage: the cached installed disk for ``media.install_key``, or a fresh install (then cached)."""
    cfg, emitter = ctx.config, ctx.emitter
    max_age = cfg.installer.max_base_age
    cached: InstalledDisk | None = None
    for _ in range(3) if ctx.options.use_cache else ():
        cached = ctx.disks.lookup(media.install_key, max_age=max_age)
        if cached is None:
            break
        (ctx.workdir / "BASE").write_text(f"{cached.disk}\n")  # from now on no `clean` or prune removes it
        if cached.disk.is_file():  # a `clean` between the lookup and BASE took it: look again
            break
        cached = None
    if cached is not None:
        age = cached.age()
        emitter.info(f"reusing the installed disk from {cached.created} ({format_duration(age)} old; "
                     f"installer.max_base_age {format_duration(max_age)}), key {media.install_key}, unchanged")
        reused = {"cached": True, "created": cached.created, "age_seconds": round(age), "age": format_duration(age),
                  "security_release": cached.security_release, "key": media.install_key}
        ctx.manifest["install"] = reused
        return InstalledBase(cached.disk, cached.client_key, cached.host_key, True, reused, cached.direct_boot)
    stale = ctx.disks.stale(media.install_key, max_age=max_age) if ctx.options.use_cache else None
    if stale is not None:
        emitter.info(f"the cached installed disk from {stale.created} is {format_duration(stale.age())} old (more "
                     f"than installer.max_base_age {format_duration(max_age)}): installing afresh")
    assert ctx.services is not None
    # no ISO yet when the media stage found the disk cached and it went away since (``clean``, another build)
    iso = media.iso or make_iso(cfg, inputs, media, ctx.services.signing_key, ctx.workdir / "installer.iso")
    services = ctx.services
    disk = ctx.workdir / "installed.qcow2"
    image.create(disk, cfg.disk.size)
    name = vm_name(cfg.name, "install")
    spec = install_spec(name=name, iso=iso, disk=disk, accel=ctx.accel, cpus=cfg.vm.cpus,
                        memory=cfg.vm.memory, workdir=ctx.workdir, gateway_port=services.gateway.port,
                        firmware=ctx.firmware(name), syslog_port=services.syslog.port)
    with ctx.machine(spec) as vm:
        res = run_install(spec, vm, tracker=services.tracker, listener=services.syslog, emitter=emitter,
                          timeout=cfg.installer.timeout, stall_timeout=cfg.installer.stall_timeout)
    facts: dict[str, Any] = {
        "cached": False, "key": media.install_key, "age_seconds": 0, "age": format_duration(0),
        "security_release": inputs.security_release, "seconds": round(res.seconds, 1), "udebs": res.udebs,
        "packages": res.packages, "milestones": list(res.milestones), "gateway": services.gateway.stats.as_dict(),
        "vm": {**cfg.vm.host_record(cfg.name), "accel": ctx.accel}}  # a variant's VMs may run elsewhere
    if stale is not None:
        facts["replaced_stale_base"] = {"created": stale.created, "age": format_duration(stale.age())}
    ctx.manifest["install"] = facts
    plock = inputs.target.lock.digest() if inputs.target is not None else ""
    base = ctx.disks.store(media.install_key, disk, media.client_key, media.host_key, image=cfg.name,
                           security_release=inputs.security_release, package_lock=plock)
    (ctx.workdir / "BASE").write_text(f"{base}\n")
    for gone in ctx.disks.prune(media.install_key, max_age=max_age, in_use=bases_in_use()):
        emitter.info(f"removed the stale installed disk {gone} (no running build uses it)")
    return InstalledBase(base, media.client_key, media.host_key, False, facts)
