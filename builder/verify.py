"""The ``verify`` verb (and the build's last check): boot a published qcow2 the way a cloud would, and check it.

A NoCloud seed ISO (volume label ``CIDATA``, made with pycdlib) gives cloud-init a user with a fresh key and the
guest's SSH host key, so paramiko can pin it. The image itself is never written: the VM runs on an overlay.
Results go to a JUnit XML report and a text summary.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pycdlib
import yaml

from . import image
from .config import ImageConfig, seed_packages
from .errors import BuilderError, VerifyError
from .events import Emitter
from .ssh import KeyPair, generate_keypair, run_command, wait_for_ssh
from .vm import guestnet, open_machine
from .vm.accel import pick_accel
from .vm.net import find_free_port
from .vm.spec import Drive, VmSpec

log = logging.getLogger(__name__)

TEST_USER = "verify"


def nocloud_user_data(user: str, client: KeyPair, host: KeyPair, hostname: str) -> str:
    data = {
        "hostname": hostname,
        "users": [{"name": user, "ssh_authorized_keys": [client.public_openssh], "sudo": "ALL=(ALL) NOPASSWD:ALL",
                   "shell": "/bin/bash"}],
        "ssh_deletekeys": True,
        "ssh_keys": {"ed25519_private": host.private_openssh, "ed25519_public": host.public_openssh},
        "runcmd": [["sh", "-c", "echo builder-verify-runcmd > /var/tmp/builder-verify"]],
    }
    return "#cloud-config\n" + yaml.safe_dump(data, sort_keys=False)


def nocloud_seed(path: Path, user_data: str, instance_id: str, hostname: str) -> Path:
    """A NoCloud seed ISO (label CIDATA) with user-data and meta-data."""
    meta = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n".encode()
    ud = user_data.encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="CIDATA")
    for name, data in (("user-data", ud), ("meta-data", meta)):
        iso.add_fp(io.BytesIO(data), len(data), f"/{name.upper().replace('-', '_')}.;1", rr_name=name,
                   joliet_path=f"/{name}")
    iso.write(str(path))
    iso.close()
    return path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass
class VerifyReport:
    image: Path
    checks: list[Check] = field(default_factory=list)
    boot_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        lines = [f"verify {self.image.name}: SSH after {self.boot_seconds:.0f} s"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)

    def junit(self) -> str:
        suite = ET.Element("testsuite", name=f"builder-verify-{self.image.stem}", tests=str(len(self.checks)),
                           failures=str(sum(not c.ok for c in self.checks)))
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname="image", name=c.name, time=f"{c.seconds:.2f}")
            if not c.ok:
                ET.SubElement(case, "failure", message=c.detail[:200]).text = c.detail
            else:
                ET.SubElement(case, "system-out").text = c.detail
        return ET.tostring(suite, encoding="unicode")


# cloud-init's view of a top-level key: /etc/cloud/cloud.cfg, then cloud.cfg.d/*.cfg in order, later wins
_EFFECTIVE_CLOUD_CFG = (
    "python3 -c \"import glob, yaml; d = {{}}; [d.update(yaml.safe_load(open(f)) or {{}}) for f in "
    "['/etc/cloud/cloud.cfg'] + sorted(glob.glob('/etc/cloud/cloud.cfg.d/*.cfg'))]; print(d.get('{key}'))\""
)


def checks_for(cfg: ImageConfig) -> list[tuple[str, str, str]]:
    """(name, shell command, expectation) — the command must exit 0; the expectation is documentation."""
    size_gib = cfg.disk.size >> 30
    pkgs = " ".join(p.split("=", 1)[0] for p in seed_packages(cfg))
    build_hosts = " ".join(f"-e {shlex.quote(h)}" for h in (guestnet.GATEWAY_IP, guestnet.HOST))
    etc_hosts = cfg.provision.extra_vars.get("base_cloud_init_manage_etc_hosts", True)
    out = [
        ("debian 13", "grep -E '^13' /etc/debian_version", "Debian 13.x"),
        ("seed packages", f"dpkg-query -W -f '${{Package}} ${{Status}}\\n' {pkgs} | grep -v 'install ok installed' "
         "| { ! grep .; }", "all installed"),
        ("one root filesystem", "test $(lsblk -nr -o TYPE,MOUNTPOINT | awk '$1==\"part\" && $2!=\"\"' | wc -l) -eq 1 "
         "&& findmnt -n -o FSTYPE / | grep -qx ext4", "a single ext4 partition mounted at /"),
        ("disk size", f"test $(( $(lsblk -bdn -o SIZE /dev/vda) >> 30 )) -eq {size_gib}", f"{size_gib} GiB disk"),
        ("root fs grown", f"test $(( $(df -B1 --output=size / | tail -1) >> 30 )) -ge {max(size_gib - 2, 1)}",
         "root filesystem fills the disk"),
        ("cloud-init ran", "cloud-init status --wait >/dev/null; test -f /var/tmp/builder-verify", "runcmd executed"),
        ("hostname resolvable", "getent hosts $(hostname)", "manage_etc_hosts"),
        ("ssh key-only", "sshd -T | grep -qx 'passwordauthentication no' && sshd -T | grep -x 'permitrootlogin no'",
         "PasswordAuthentication no, PermitRootLogin no"),
        ("cloud-init manage_etc_hosts", _EFFECTIVE_CLOUD_CFG.format(key="manage_etc_hosts") + f" | grep -x {etc_hosts}",
         f"manage_etc_hosts {etc_hosts} in the effective configuration"),
        ("NetworkManager", "systemctl is-active NetworkManager", "active"),
        ("no build user", f"! getent passwd {shlex.quote(cfg.installer.build_user)}", "removed"),
        ("apt sources", f"! grep -rsF {build_hosts} /etc/apt/", "no build gateway left"),
        ("machine-id fresh", "test -s /etc/machine-id", "generated at first boot"),
        ("no failed unit", "s=$(systemctl is-system-running --wait); echo \"$s\"; "
         "systemctl --failed --no-legend --plain | awk '{print $1}'; [ \"$s\" = running ]",
         "systemctl is-system-running: running"),
    ]
    if cfg.provision.enabled:
        out += [
            # Debian names the file nvidia-current.ko (modprobe maps "nvidia" to it); modinfo needs the file
            ("nvidia module", "for f in $(find /lib/modules/$(uname -r) -name 'nvidia*.ko*'); do "
             "[ \"$(modinfo -F name $f)\" = nvidia ] && modinfo -F version $f && echo $f; done | grep .",
             "the nvidia module built for the running kernel"),
            ("dkms status", "dkms status | grep -q 'installed'", "installed"),
            ("nvidia-smi", "test -x /usr/bin/nvidia-smi", "present"),
            ("nouveau blacklisted", "grep -rqs '^blacklist nouveau' /etc/modprobe.d/ && "
             "! lsinitramfs /boot/initrd.img-$(uname -r) | grep -Eq '(^|/)nouveau([.]ko|/|$)'",
             "modprobe.d and initramfs"),
            ("no CUDA toolkit", "! dpkg -l 'cuda-toolkit*' 'nvidia-cuda-toolkit' 2>/dev/null | grep -q '^ii'",
             "absent"),
            ("persistenced", "systemctl is-enabled nvidia-persistenced", "enabled"),
        ]
    return out


def _pick_accel(cfg: ImageConfig, emitter: Emitter) -> Literal["kvm", "tcg"]:
    """The accelerator, probed with a real kernel boot as the build does (a firmware-only probe passes on hosts
    whose KVM cannot run a Linux kernel). The kernel is the installer's, from the verified download cache."""
    if cfg.vm.accel != "auto":
        return cfg.vm.accel
    from .archive.cache import ContentCache
    from .archive.http import FetchStats
    from .stages.fetch import fetch_inputs

    try:
        kernel = fetch_inputs(cfg, ContentCache(), FetchStats(), Emitter()).kernel
    except BuilderError as exc:
        emitter.warning(f"no kernel to probe KVM with ({exc.message}); probing the firmware only")
        kernel = None
    return pick_accel(cfg.vm.accel, kernel, emitter)


def verify_image(cfg: ImageConfig, qcow2: Path, workdir: Path, *, emitter: Emitter | None = None,
                 ssh_timeout: float = 900) -> VerifyReport:
    emitter = emitter or Emitter()
    if not qcow2.is_file():
        raise VerifyError(f"no image at {qcow2}", hint="build it first")
    workdir.mkdir(parents=True, exist_ok=True)
    client, host = generate_keypair("verify"), generate_keypair("verify-host")
    seed = nocloud_seed(workdir / "seed.iso", nocloud_user_data(TEST_USER, client, host, "verify-node"),
                        f"verify-{int(time.time())}", "verify-node")
    disk = image.overlay(qcow2, workdir / "verify.qcow2")
    accel = _pick_accel(cfg, emitter)
    port = find_free_port()
    spec = VmSpec(name="verify", memory_mib=cfg.provision.memory >> 20, cpus=cfg.vm.cpus, accel=accel,
                  drives=(Drive(disk), Drive.cdrom(seed)), boot="disk", serial_log=workdir / "verify.serial.log",
                  ssh_forward=port, no_reboot=False)
    report = VerifyReport(qcow2)
    with open_machine(spec, workdir, backend=cfg.vm.backend, libvirt_uri=cfg.vm.libvirt_uri) as vm:
        t0 = time.monotonic()
        vm.start()
        client_conn = wait_for_ssh("127.0.0.1", port, TEST_USER, client, host.public_openssh, timeout=ssh_timeout,
                                   is_alive=vm.is_running)
        report.boot_seconds = time.monotonic() - t0
        try:
            for name, cmd, expect in checks_for(cfg):
                t1 = time.monotonic()
                # as root (the NoCloud user has sudo): modinfo, dkms and lsinitramfs need /usr/sbin and /boot
                rc, out, err = run_command(client_conn, f"sudo -n sh -c {shlex.quote(cmd)}", timeout=300,
                                           check=False)
                detail = (out.strip() or err.strip() or expect).splitlines()
                report.checks.append(Check(name, rc == 0, " | ".join(detail[-3:]) if rc == 0 else
                                           f"expected {expect}; exit {rc}: " + " | ".join(detail[-5:]),
                                           time.monotonic() - t1))
                emitter.info(f"verify {name}: {'ok' if rc == 0 else 'FAIL'}")
            _, facts, _ = run_command(client_conn, "uname -r; cat /etc/debian_version", check=False)
            report.checks.append(Check("facts", True, facts.strip().replace("\n", " | ")))
        finally:
            client_conn.close()
        vm.shutdown(60)
    (workdir / "verify-report.xml").write_text(report.junit())
    (workdir / "verify-report.txt").write_text(report.text() + "\n")
    (workdir / "verify-report.json").write_text(json.dumps(
        {"image": str(qcow2), "ok": report.ok, "boot_seconds": round(report.boot_seconds, 1),
         "checks": [c.__dict__ for c in report.checks]}, indent=2))
    return report
