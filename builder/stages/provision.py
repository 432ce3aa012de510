"""Stage ``provision``: boot the installed disk (through a qcow2 overlay: the cached base is never written),
reach it over SSH with the pinned host key, run the image's playbook, record the package list and what the SBOM
needs from the guest (each package's architecture and source, the licences the packages declare, the NVIDIA
kernel modules: :mod:`builder.guestfacts`).

The VM keeps running for the ``finalize`` stage (one boot does both); it lives on the build's ExitStack, so
it is stopped whatever happens. A VM that dies while the build waits for SSH or runs a playbook is reported
as a dead VM (:class:`VmError`, within seconds: the playbook is cancelled when the VM is gone), not as an SSH
or Ansible failure.
"""

from __future__ import annotations

import base64
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from .. import attest, dkmspatches, guestfacts, image, sbom
from ..config import ImageConfig
from ..context import BuildContext
from ..errors import ConfigError, ProvisionError, SshError, VmError
from ..events import Emitter
from ..gateway.target import KEY_FILE
from ..hostmodule import HostModule
from ..installcache import DirectBoot
from ..provision import TASK_COUNT_EVENT, AnsibleRunner, Provisioner, Target
from ..secureboot import SigningError, load_pair
from ..ssh import known_hosts_line, run_command, wait_for_ssh
from ..vm import Machine
from ..vm.firmware import BIOS, Firmware
from ..vm.guestnet import gateway_service
from ..vm.net import find_free_port
from ..vm.spec import Drive, VmSpec, vm_name
from . import module
from .install import InstalledBase

log = logging.getLogger(__name__)

SSH_TIMEOUT = 900
SIGNING_CERT = "module-signing.der"  # in the work directory: the certificate the playbook got, for publish
NO_SIGNING_WARNING = ("secure_boot is not configured: DKMS signs the NVIDIA module with its own throw-away key, "
                      "which cannot be enrolled, so the module will not load under Secure Boot "
                      "(python -m builder keygen; docs/secure-boot.md)")
FACTS = ("cat /etc/debian_version; uname -r; findmnt -n -o SOURCE,SIZE,FSTYPE /; "
         "systemctl is-enabled cloud-init-main.service cloud-init-local.service | tr '\\n' ' '")
# tab-separated: package, version, architecture, source, source version, status, homepage (sbom.DPKG_FIELDS)
PACKAGES = f"dpkg-query -W -f '{sbom.DPKG_FORMAT}'"
# the source of builder.guestfacts on its standard input; as root where sudo lets the build user (dkms may want it)
GUEST_FACTS = "if sudo -n true 2>/dev/null; then exec sudo -n python3 -; else exec python3 -; fi"


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
        name=vm_name(cfg.name, "provision"), memory_mib=cfg.provision.memory >> 20, cpus=cfg.vm.cpus,
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
    """Each task start as an info line ("ansible: TASK", fields ``task``, ``role``) and a progress event:
    ``current`` is the task's index (the n-th task; fact gathering is not counted), ``total`` the playbook's task
    count when known (handlers that run can push the index past it: the total then grows with it), fields
    ``unit="tasks"``, ``task``, ``role``. ``current["task"]`` is the running task ("role : task")."""
    count = {"n": 0, "total": 0}

    def on_event(ev: dict[str, Any]) -> None:
        data = ev.get("event_data") or {}
        kind = ev.get("event")
        if kind == TASK_COUNT_EVENT:
            count["total"] = int(data.get("tasks") or 0)
        elif kind in ("playbook_on_task_start", "playbook_on_handler_task_start"):
            task = str(data.get("task", ""))
            role = str(data.get("role") or "")
            label = f"{role} : {task}" if role else task
            if current is not None:
                current["task"] = label
            if str(data.get("task_action", "")).rsplit(".", 1)[-1] != "gather_facts":
                count["n"] += 1
            n = count["n"]
            total = max(count["total"], n) if count["total"] else None
            emitter.progress(f"ansible task {n}{f'/{total}' if total else ''}: {label}", n, total, unit="tasks",
                             task=task, role=role)
            emitter.info(f"ansible: {task}", task=task, role=role)
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


def playbook_vars(cfg: ImageConfig, workdir: Path, prebuilt: HostModule | None = None) -> dict[str, Any]:
    """The image playbook's variables: ``provision.extra_vars``; with ``secure_boot``, the signing pair for the
    nvidia role (the key where it is; the certificate as DER in the work directory, which is what the publish
    stage ships); the module built on the host; and the DKMS source patches, resolved as for the host build
    (:func:`module.dkms_patches`, absolute paths), so that the target's DKMS gets the very same ones."""
    out = dict(cfg.provision.extra_vars)
    patches = prebuilt.patches if prebuilt is not None else module.dkms_patches(cfg)
    if patches or dkmspatches.VAR in out:
        out[dkmspatches.VAR] = [p.role_entry() for p in patches]
    paths = cfg.signing_paths
    if paths is not None:
        try:
            pair = load_pair(*paths)
        except SigningError as exc:  # changed since the config was read
            raise ConfigError(f"secure_boot: {exc}", stage="provision") from exc
        cert = workdir / SIGNING_CERT
        cert.write_bytes(pair.der)
        out["nvidia_module_signing_key"] = str(pair.key_path)
        out["nvidia_module_signing_cert"] = str(cert)
    if prebuilt is not None:
        out[module.TARBALL_VAR] = str(prebuilt.tarball)
    return out


def module_record(client: paramiko.SSHClient, cfg: ImageConfig) -> dict[str, Any] | None:
    """What the nvidia role recorded about the module (its ``nvidia_module_report`` file), or None."""
    path = module.report_path(cfg)
    if path is None:
        return None
    rc, out, _ = run_command(client, f"cat {shlex.quote(path)}", check=False)
    try:
        record = json.loads(out) if rc == 0 else None
    except ValueError:
        log.warning("%s on the guest is not JSON", path)
        return None
    return record if isinstance(record, dict) else None


def trust_build_key(client: paramiko.SSHClient, public_key: bytes) -> None:
    """apt in the guest trusts this build's key, which signs the package lock's view of the archive (a cached
    installed disk holds the key of the build that made it; roles/finalize removes it from the image)."""
    b64 = base64.b64encode(public_key).decode()
    run_command(client, f"echo {b64} | base64 -d | sudo -n install -D -m 0644 /dev/stdin {KEY_FILE}", check=True)


def run(ctx: BuildContext, base: InstalledBase, *, provisioner: Provisioner | None = None,
        prebuilt: HostModule | None = None) -> Guest:
    """The stage: a booted, provisioned guest (still running, for ``finalize``). ``prebuilt``: the NVIDIA
    module built on the host, for the role to load instead of compiling it."""
    cfg, emitter, wd = ctx.config, ctx.emitter, ctx.workdir
    provisioner = provisioner or AnsibleRunner(task_timeout=cfg.provision.task_timeout,
                                               timeout=cfg.provision.timeout)
    disk = image.overlay(base.disk, wd / "disk.qcow2")
    port = find_free_port()
    spec = provision_spec(cfg, disk, wd, ctx.accel, port, ctx.gateway.port, base.direct_boot,
                          firmware=ctx.firmware(vm_name(cfg.name, "provision")))
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
            if cfg.signing_paths is None:
                emitter.warning(NO_SIGNING_WARNING)
            if prebuilt is not None and len(facts["facts"]) > 1:
                prebuilt = module.for_kernel(ctx, prebuilt, facts["facts"][1].strip())
            extra_vars = playbook_vars(cfg, wd, prebuilt)
            facts["ansible"] = run_playbook_on(
                guest, provisioner, cfg.playbook,
                roles_path=cfg.roles_dirs,
                extra_vars=extra_vars, workdir=wd, emitter=emitter, during="provisioning")
            nvidia = module.module_manifest(prebuilt, module_record(client, cfg))
            if nvidia is not None:
                ctx.manifest["nvidia_module"] = nvidia
                emitter.info(f"NVIDIA module {nvidia['module']} {nvidia['version']} for {nvidia['kver']}: "
                             f"{nvidia['origin']}")
        else:
            emitter.info("provision.enabled is false: no playbook")
        _, pkgs, _ = run_command(client, PACKAGES, check=True)
        collect_guest_facts(client, wd, emitter)
    except SshError as exc:
        if not vm.is_running():
            raise dead_vm(vm, "provisioning") from exc
        raise
    packages = sbom.parse_packages_tsv(pkgs)
    (wd / attest.PACKAGES_TSV).write_text(pkgs)
    (wd / "packages.txt").write_text(sbom.packages_txt(packages))
    facts["packages"] = len(packages)
    return guest


def collect_guest_facts(client: paramiko.SSHClient, wd: Path, emitter: Emitter) -> None:
    """licenses.tsv and kernel-modules.json in ``wd``, from :mod:`builder.guestfacts` run in the guest. A
    failure costs the SBOM those facts (each package then says its licence is unknown), not the build."""
    status, out, err = run_command(client, GUEST_FACTS, check=False, timeout=300,
                                   input=Path(guestfacts.__file__).read_bytes())
    try:
        if status != 0:
            raise ValueError(f"exit status {status}: {err.strip()[-500:]}")
        data = json.loads(out)
        lic, modules, dkms = data["licenses"], data["modules"], data["dkms"]
    except (ValueError, KeyError, TypeError) as exc:
        emitter.warning(f"the guest's licences and kernel modules were not collected: {exc}")
        return
    (wd / attest.LICENSES_TSV).write_text(sbom.licenses_tsv(lic))
    (wd / attest.MODULES_JSON).write_text(json.dumps({"modules": modules, "dkms": dkms}, indent=2) + "\n")
    names = sorted({f"{m.get('name')} {m.get('version')}" for m in modules})
    emitter.info(f"guest facts: licences of {len(lic)} packages; NVIDIA modules: {', '.join(names) or 'none'}")
