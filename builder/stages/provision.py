"""Stage ``provision``: boot the installed disk (through a qcow2 overlay: the cached base is never written),
reach it over SSH with the pinned host key, run the image's playbook, record the package list.

The VM keeps running for the ``finalize`` stage (one boot does both); it lives on the build's ExitStack, so
it is stopped whatever happens. A VM that dies while the build waits for SSH or runs a playbook is reported
as a dead VM (:class:`VmError`, within seconds: the playbook is cancelled when the VM is gone), not as an SSH
or Ansible failure.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from .. import image
from ..config import ImageConfig
from ..context import BuildContext
from ..errors import ProvisionError, SshError, VmError
from ..events import Emitter
from ..gateway.target import KEY_FILE
from ..installcache import DirectBoot
from ..provision import AnsibleRunner, Provisioner, Target
from ..ssh import known_hosts_line, run_command, wait_for_ssh
from ..vm import Machine
from ..vm.firmware import BIOS, Firmware
from ..vm.guestnet import gateway_service
from ..vm.net import find_free_port
from ..vm.spec import Drive, VmSpec
from .install import InstalledBase

log = logging.getLogger(__name__)

SSH_TIMEOUT = 900
FACTS = ("cat /etc/debian_version; uname -r; findmnt -n -o SOURCE,SIZE,FSTYPE /; "
         "systemctl is-enabled cloud-init-main.service cloud-init-local.service | tr '\\n' ' '")
PACKAGES = "dpkg-query -W -f '${Package} ${Version}\\n'"


@dataclass
class Guest:
    """The running, provisioned build VM and how to reach it."""

    vm: Machine
    client: paramiko.SSHClient
    target: Target
    disk: Path
    facts: dict[str, Any] = field(default_factory=dict)


def provision_spec(cfg: ImageConfig, disk: Path, workdir: Path, accel: str, ssh_port: int,
                   gateway_port: int, direct_boot: DirectBoot | None = None, firmware: Firmware = BIOS) -> VmSpec:
    return VmSpec(firmware=firmware,
        name=f"{cfg.name}-provision", memory_mib=cfg.provision.memory >> 20, cpus=cfg.vm.cpus,
        accel=accel,  # type: ignore[arg-type]
        drives=(Drive(disk, discard=True),), boot="disk", serial_log=workdir / "provision.serial.log",
        ssh_forward=ssh_port, no_reboot=False, guest_services=(gateway_service(gateway_port),),
        kernel=direct_boot.kernel if direct_boot else None, initrd=direct_boot.initrd if direct_boot else None,
        append=direct_boot.append if direct_boot else "",
    )


def dead_vm(vm: Machine, during: str, cause: BaseException | None = None) -> VmError:
    """The error for a build VM that died ``during`` something (with the end of its console)."""
    rc = getattr(vm, "returncode", None)
    how = f" (QEMU exit code {rc})" if isinstance(rc, int) else ""
    detail = f": {cause}" if cause is not None else ""
    return VmError(f"the build VM {vm.name} died during {during}{how}{detail}", stage="provision",
                   log_tail=vm.serial_tail(20) + vm.stderr_tail(5))


def ansible_progress(emitter: Emitter, current: dict[str, str] | None = None) -> Callable[[dict[str, Any]], None]:
    """Task starts as progress lines; ``current["task"]`` is the running task ("role : task")."""
    def on_event(ev: dict[str, Any]) -> None:
        data = ev.get("event_data", {})
        if ev.get("event") == "playbook_on_task_start":
            task = str(data.get("task", ""))
            role = str(data.get("role") or "")
            if current is not None:
                current["task"] = f"{role} : {task}" if role else task
            emitter.info(f"ansible: {task}")
    return on_event


def run_playbook_on(guest: Guest, provisioner: Provisioner, playbook: Path, *, roles_path: list[Path],
                    extra_vars: dict[str, Any], workdir: Path, emitter: Emitter, during: str) -> dict[str, Any]:
    """Run ``playbook`` against the guest; a VM that dies meanwhile cancels the run and is a VmError that names
    the task that was running."""
    vm = guest.vm
    current: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        res = provisioner.run(playbook, guest.target, roles_path=roles_path, extra_vars=extra_vars,
                              workdir=workdir, on_event=ansible_progress(emitter, current),
                              cancel=lambda: not vm.is_running())
    except ProvisionError as exc:
        if not vm.is_running():
            task = current.get("task") or exc.task
            raise dead_vm(vm, f"{during} (in task '{task}')" if task else during) from exc
        raise
    return {"seconds": round(time.monotonic() - t0, 1), "changed": res.changed, "status": res.status}


def trust_build_key(client: paramiko.SSHClient, public_key: bytes) -> None:
    """apt in the guest trusts this build's key, which signs the package lock's view of the archive (a cached
    installed disk holds the key of the build that made it; roles/finalize removes it from the image)."""
    b64 = base64.b64encode(public_key).decode()
    run_command(client, f"echo {b64} | base64 -d | sudo -n install -D -m 0644 /dev/stdin {KEY_FILE}", check=True)


def run(ctx: BuildContext, base: InstalledBase, *, provisioner: Provisioner | None = None) -> Guest:
    """The stage: a booted, provisioned guest (still running, for ``finalize``)."""
    cfg, emitter, wd = ctx.config, ctx.emitter, ctx.workdir
    provisioner = provisioner or AnsibleRunner(task_timeout=cfg.provision.task_timeout,
                                               timeout=cfg.provision.timeout)
    disk = image.overlay(base.disk, wd / "disk.qcow2")
    port = find_free_port()
    spec = provision_spec(cfg, disk, wd, ctx.accel, port, ctx.gateway.port, base.direct_boot,
                          firmware=ctx.firmware(f"{cfg.name}-provision"))
    user = cfg.installer.build_user
    key_path, _ = base.client_key.write(wd, "build_key")
    known_hosts = wd / "known_hosts"
    known_hosts.write_text(known_hosts_line("127.0.0.1", port, base.host_key.public_openssh) + "\n")
    facts: dict[str, Any] = {}
    ctx.manifest["provision"] = facts
    vm = ctx.stack.enter_context(ctx.machine(spec))
    t0 = time.monotonic()
    emitter.info("waiting for SSH on the installed system")
    try:
        client = wait_for_ssh("127.0.0.1", port, user, base.client_key, base.host_key.public_openssh,
                              timeout=SSH_TIMEOUT, is_alive=vm.is_running)
    except SshError as exc:
        if not vm.is_running():
            raise dead_vm(vm, "boot (waiting for SSH)") from exc
        raise
    ctx.stack.callback(client.close)
    facts["ssh_seconds"] = round(time.monotonic() - t0, 1)
    guest = Guest(vm, client, Target("127.0.0.1", port, user, key_path, known_hosts), disk, facts)
    try:
        _, out, _ = run_command(client, FACTS, check=False)
        facts["facts"] = out.strip().splitlines()
        emitter.info(f"SSH up after {facts['ssh_seconds']} s: " + " | ".join(facts["facts"]))
        if ctx.services is not None and ctx.services.package_lock is not None:
            trust_build_key(client, ctx.services.signing_key.public_key())
        if cfg.provision.enabled:
            facts["ansible"] = run_playbook_on(
                guest, provisioner, cfg.playbook,
                roles_path=cfg.roles_dirs,
                extra_vars=dict(cfg.provision.extra_vars), workdir=wd, emitter=emitter, during="provisioning")
        else:
            emitter.info("provision.enabled is false: no playbook")
        _, pkgs, _ = run_command(client, PACKAGES, check=True)
    except SshError as exc:
        if not vm.is_running():
            raise dead_vm(vm, "provisioning") from exc
        raise
    (wd / "packages.txt").write_text(pkgs)
    facts["packages"] = len(pkgs.splitlines())
    return guest
