"""Stage ``finalize``: the finalize role (roles/finalize: apt pointed at the real mirrors, no identity, no
logs, no build user, fstrim) over the same SSH connection, the VM powered off, and the disk converted into a
compressed qcow2 in a staging directory next to the output (``publish`` moves it into place).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import image
from ..config import ImageConfig
from ..context import BuildContext
from ..provision import AnsibleRunner, Provisioner
from ..vm import guestnet
from .provision import Guest, dead_vm, run_playbook_on

POWEROFF_TIMEOUT = 300


@dataclass(frozen=True)
class FinalImage:
    staging: Path
    image: Path
    raw_disk_bytes: int


# the nvidia role's module-signing paths in the image, which the finalize role checks (key absent, cert kept)
_SIGNING_PATHS = {"nvidia_module_signing_key_dest": "finalize_module_signing_key",
                  "nvidia_module_signing_cert_dest": "finalize_module_signing_cert"}


def finalize_vars(cfg: ImageConfig) -> dict[str, Any]:
    """The finalize role's variables for this image (its README documents each)."""
    extra = cfg.provision.extra_vars
    return {
        **{fin: extra[nv] for nv, fin in _SIGNING_PATHS.items() if nv in extra},
        "finalize_apt_mirror": cfg.debian.mirror,
        "finalize_apt_security_mirror": cfg.debian.security_mirror,
        "finalize_apt_suite": cfg.debian.suite,
        "finalize_apt_components": list(cfg.debian.components),
        "finalize_apt_keyring": "/usr/share/keyrings/debian-archive-keyring.gpg",
        "finalize_build_hosts": [guestnet.GATEWAY_IP, guestnet.HOST],
        "finalize_build_user": cfg.installer.build_user,
    }


def chain_actual_size(disk: Path) -> int:
    """Bytes the disk really uses on the host, its backing files (the cached installed disk) included."""
    total, path = 0, disk
    for _ in range(8):
        info = image.info(path)
        total += int(info.get("actual-size") or 0)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            break
        path = Path(backing)
    return total


def power_off(ctx: BuildContext, guest: Guest) -> str:
    """ACPI power button, then harder ways; how the VM stopped."""
    vm = guest.vm
    guest.client.close()
    if not vm.is_running():
        raise dead_vm(vm, "finalize (before power-off)")
    vm.shutdown(POWEROFF_TIMEOUT)
    method = vm.stop_method or "exited"
    if method not in ("powerdown", "exited"):
        ctx.emitter.warning(f"the guest did not power off in {POWEROFF_TIMEOUT} s; stopped it ({method})")
    return method


def compress(ctx: BuildContext, disk: Path) -> FinalImage:
    """The disk as the final qcow2 in a fresh staging directory beside the output (removed if the build fails)."""
    out_dir = ctx.options.output
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    ctx.stack.callback(shutil.rmtree, staging, True)  # a no-op once publish has moved it into place
    target = staging / f"{ctx.name}.qcow2"
    raw = chain_actual_size(disk)
    image.convert(disk, target, compression=ctx.config.disk.compression,
                  on_progress=lambda pct: ctx.emitter.progress("compress", pct, 100, unit="percent"))
    return FinalImage(staging, target, raw)


def run(ctx: BuildContext, guest: Guest, *, provisioner: Provisioner | None = None) -> FinalImage:
    """The stage: the finalize role, power-off, compression."""
    cfg = ctx.config
    provisioner = provisioner or AnsibleRunner(task_timeout=cfg.provision.task_timeout,
                                               timeout=cfg.provision.timeout)
    facts: dict[str, Any] = {}
    ctx.manifest["finalize"] = facts
    facts["ansible"] = run_playbook_on(
        guest, provisioner, cfg.finalize_playbook, roles_path=cfg.roles_dirs, extra_vars=finalize_vars(cfg),
        workdir=ctx.workdir, emitter=ctx.emitter, during="finalize")
    t0 = time.monotonic()
    facts["stopped_by"] = power_off(ctx, guest)
    facts["poweroff_seconds"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    final = compress(ctx, guest.disk)
    facts["compress_seconds"] = round(time.monotonic() - t0, 1)
    return final
