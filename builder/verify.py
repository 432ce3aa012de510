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
from .gateway.target import KEY_FILE
from .image import BIOS_BOOT_TYPE, ESP_TYPE
from .ssh import KeyPair, generate_keypair, run_command, wait_for_ssh
from .vm import guestnet, open_machine
from .vm.accel import pick_accel
from .vm.firmware import FirmwareKind, prepare
from .vm.net import find_free_port
from .vm.remote import is_local
from .vm.spec import Drive, VmSpec, vm_name

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
    firmware: str = "bios"
    partitions: str = ""
    label: str = ""  # how the reports name the image (default: its path); a build names the published file

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        lines = [f"verify {self.image.name} [{self.firmware}]: SSH after {self.boot_seconds:.0f} s"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {"image": self.label or str(self.image), "firmware": self.firmware, "ok": self.ok,
                "boot_seconds": round(self.boot_seconds, 1), "checks": [c.__dict__ for c in self.checks],
                "partitions": self.partitions}

    def junit(self) -> str:
        suite = ET.Element("testsuite", name=f"builder-verify-{self.image.stem}-{self.firmware}",
                           tests=str(len(self.checks)),
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


# a loop over the running kernel's nvidia module files, down to the one named "nvidia" ($f), left open: Debian
# names the file nvidia-current.ko (modprobe's alias maps "nvidia" to it; modinfo needs the file)
_NVIDIA_KO = ("for f in $(find /lib/modules/$(uname -r) -name 'nvidia*.ko*'); do "
              "[ \"$(modinfo -F name $f)\" = nvidia ] &&")


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
        ("one root filesystem", "test $(lsblk -nr -o TYPE,FSTYPE,MOUNTPOINT | awk '$1==\"part\" && $2==\"ext4\" "
         "&& $3!=\"\"' | wc -l) -eq 1 && findmnt -n -o FSTYPE / | grep -qx ext4",
         "a single ext4 partition mounted at /"),
        ("root partition last", "root=$(findmnt -n -o SOURCE /); last=/dev/$(lsblk -nr -o NAME,TYPE /dev/vda | "
         "awk '$2==\"part\"{n=$1} END{print n}'); echo \"$root\"; [ \"$root\" = \"$last\" ]",
         "the root is the disk's last partition (growpart extends it)"),
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
        ("no build apt key", f"test ! -e {KEY_FILE}", "apt trusts no key of the build (the package lock's view)"),
        ("machine-id fresh", "test -s /etc/machine-id", "generated at first boot"),
        ("no failed unit", "s=$(systemctl is-system-running --wait); echo \"$s\"; "
         "systemctl --failed --no-legend --plain | awk '{print $1}'; [ \"$s\" = running ]",
         "systemctl is-system-running: running"),
    ]
    out += boot_checks(cfg.disk.boot)
    if cfg.provision.enabled:
        out += [
            ("nvidia module", f"{_NVIDIA_KO} modinfo -F version $f && echo $f; done | grep .",
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


EFIVAR_SECURE_BOOT = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def boot_checks(boot: str) -> list[tuple[str, str, str]]:
    """The disk layout that ``disk.boot`` promises, whatever firmware booted it."""
    if boot == "bios":
        return [("partition table", "sfdisk -d /dev/vda | grep -qx 'label: dos'", "msdos label")]
    out = [
        ("partition table", "sfdisk -d /dev/vda | grep -qx 'label: gpt'", "GPT"),
        ("EFI system partition", f"lsblk -nr -o PARTTYPE,FSTYPE,MOUNTPOINT /dev/vda | grep -qx '{ESP_TYPE} vfat "
         "/boot/efi'", "a FAT ESP mounted at /boot/efi"),
        ("removable boot path", "test -s /boot/efi/EFI/BOOT/BOOTX64.EFI && test -s /boot/efi/EFI/BOOT/grubx64.efi",
         "shim at EFI/BOOT/BOOTX64.EFI with GRUB next to it"),
        ("signed boot loader", "dpkg-query -W -f '${Package} ${Status}\\n' shim-signed grub-efi-amd64-signed | "
         "grep -c 'install ok installed' | grep -qx 2", "shim-signed and grub-efi-amd64-signed installed"),
    ]
    if boot == "hybrid":
        out.append(("BIOS boot partition", f"lsblk -nr -o PARTTYPE /dev/vda | grep -qx {BIOS_BOOT_TYPE} && "
                    "dd if=/dev/vda bs=512 count=1 2>/dev/null | grep -q GRUB",
                    "a BIOS boot partition and GRUB's boot code in the MBR"))
    return out


def firmware_checks(firmware: FirmwareKind, signer: str | None) -> list[tuple[str, str, str]]:
    """What the firmware that booted the VM must show: UEFI or not, Secure Boot on, and under Secure Boot the
    NVIDIA module's signature accepted (``modprobe`` fails only for want of a GPU)."""
    if firmware == "bios":
        return [("booted by BIOS", "! test -d /sys/firmware/efi", "no EFI runtime")]
    out = [("booted by UEFI", "test -d /sys/firmware/efi", "EFI runtime present")]
    if firmware == "uefi-secure":
        out.append(("secure boot on", f"v=$(od -An -t u1 -j4 -N1 {EFIVAR_SECURE_BOOT} | tr -d ' '); "
                    "echo \"SecureBoot=$v\"; cat /sys/kernel/security/lockdown 2>/dev/null; [ \"$v\" = 1 ]",
                    "the SecureBoot variable is 1 (lockdown follows)"))
    if signer is not None:
        out.append(("nvidia module signer", f"{_NVIDIA_KO} modinfo -F signer $f; done | grep -Fx {shlex.quote(signer)}",
                    f"signed by {signer}"))
        if firmware == "uefi-secure":
            out.append(("nvidia signature accepted", "out=$(modprobe nvidia 2>&1); rc=$?; echo \"$out\"; "
                        "[ $rc -ne 0 ] && echo \"$out\" | grep -q 'No such device' && "
                        "! echo \"$out\" | grep -qi 'key was rejected'",
                        "modprobe nvidia fails with 'No such device' (no GPU), not 'Key was rejected by service'"))
    return out


def default_firmwares(cfg: ImageConfig) -> tuple[FirmwareKind, ...]:
    """What ``verify`` boots by default: every firmware the disk claims to boot under."""
    table: dict[str, tuple[FirmwareKind, ...]] = {"hybrid": ("bios", "uefi"), "uefi": ("uefi",), "bios": ("bios",)}
    return table[cfg.disk.boot]


def _pick_accel(cfg: ImageConfig, emitter: Emitter) -> Literal["kvm", "tcg"]:
    """The accelerator, probed with a real kernel boot as the build does (a firmware-only probe passes on hosts
    whose KVM cannot run a Linux kernel). The kernel is the installer's, from the verified download cache."""
    if cfg.vm.accel != "auto":
        return cfg.vm.accel
    uri = cfg.vm.libvirt_host(cfg.name) if cfg.vm.backend == "libvirt" else None
    if uri is not None and not is_local(uri):  # the VMs run there: nothing to probe here
        return pick_accel(cfg.vm.accel, None, emitter, libvirt_uri=uri)
    from .archive.cache import ContentCache
    from .archive.http import FetchStats
    from .stages.fetch import fetch_inputs

    try:
        kernel = fetch_inputs(cfg, ContentCache(), FetchStats(), Emitter()).kernel
    except BuilderError as exc:
        emitter.warning(f"no kernel to probe KVM with ({exc.message}); probing the firmware only")
        kernel = None
    return pick_accel(cfg.vm.accel, kernel, emitter)


def cert_signer(cert: Path) -> str:
    """The name ``modinfo -F signer`` shows for modules signed with ``cert`` (PEM or DER; its subject's CN)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    data = cert.read_bytes()
    try:
        c = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else \
            x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise VerifyError(f"{cert} is not an X.509 certificate: {exc}") from exc
    names = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise VerifyError(f"{cert} has no common name in its subject")
    return str(names[0].value)


def published_cert(qcow2: Path, name: str) -> Path | None:
    """The module-signing certificate published next to ``qcow2`` (``<name>.mok.pem``), if any."""
    for cand in (qcow2.with_name(f"{name}.mok.pem"), qcow2.with_name(f"{qcow2.stem}.mok.pem")):
        if cand.is_file():
            return cand
    return None


def verify_image(cfg: ImageConfig, qcow2: Path, workdir: Path, *, emitter: Emitter | None = None,
                 ssh_timeout: float = 900, firmware: FirmwareKind = "bios", mok_cert: Path | None = None,
                 accel: Literal["kvm", "tcg"] | None = None, label: str = "") -> VerifyReport:
    """Boot ``qcow2`` (on an overlay) under ``firmware`` and run every check; reports go to ``workdir``
    (naming the image ``label``, default its path).
    ``mok_cert`` (PEM): the build's module-signing certificate; under ``uefi-secure`` it is added to the
    firmware's MOK list, as an operator enrolls it, and the NVIDIA module's signer is checked against it."""
    emitter = emitter or Emitter()
    if not qcow2.is_file():
        raise VerifyError(f"no image at {qcow2}", hint="build it first")
    if firmware != "bios" and cfg.disk.boot == "bios":
        raise VerifyError(f"{qcow2.name} is a disk.boot: bios image; it cannot boot under {firmware}")
    if firmware == "bios" and cfg.disk.boot == "uefi":
        raise VerifyError(f"{qcow2.name} is a disk.boot: uefi image; it cannot boot under BIOS")
    workdir.mkdir(parents=True, exist_ok=True)
    signer = cert_signer(mok_cert) if mok_cert is not None else None
    client, host = generate_keypair("verify"), generate_keypair("verify-host")
    seed = nocloud_seed(workdir / "seed.iso", nocloud_user_data(TEST_USER, client, host, "verify-node"),
                        f"verify-{int(time.time())}", "verify-node")
    disk = image.overlay(qcow2, workdir / "verify.qcow2")
    accel = accel or _pick_accel(cfg, emitter)
    port = find_free_port()
    fw = prepare(firmware, workdir / "verify.vars.fd",
                 mok_certs=[mok_cert] if mok_cert is not None and firmware == "uefi-secure" else [])
    # named per image: the verify VMs of parallel variants may share a libvirt host
    spec = VmSpec(name=vm_name(cfg.name, "verify"), memory_mib=cfg.provision.memory >> 20, cpus=cfg.vm.cpus,
                  accel=accel, drives=(Drive(disk, keep=False), Drive.cdrom(seed)), boot="disk",
                  serial_log=workdir / "verify.serial.log", ssh_forward=port, no_reboot=False, firmware=fw)
    report = VerifyReport(qcow2, firmware=firmware, label=label)
    checks = checks_for(cfg) + firmware_checks(firmware, signer if cfg.provision.enabled else None)
    if firmware == "uefi-secure" and cfg.provision.enabled and signer is None:
        report.checks.append(Check("module signing certificate", False,
                                   f"no {cfg.name}.mok.pem next to the image and no --mok-cert: the NVIDIA module "
                                   "cannot be trusted under Secure Boot (set secure_boot.signing_key/signing_cert)"))
    emitter.info(f"verify: booting {qcow2.name} under {firmware}")
    with open_machine(spec, workdir, **cfg.vm.machine_options(cfg.name)) as vm:
        t0 = time.monotonic()
        vm.start()
        client_conn = wait_for_ssh("127.0.0.1", port, TEST_USER, client, host.public_openssh, timeout=ssh_timeout,
                                   is_alive=vm.is_running)
        report.boot_seconds = time.monotonic() - t0
        emitter.info(f"verify [{firmware}]: SSH after {report.boot_seconds:.0f} s")
        try:
            for name, cmd, expect in checks:
                t1 = time.monotonic()
                # as root (the NoCloud user has sudo): modinfo, dkms and lsinitramfs need /usr/sbin and /boot
                rc, out, err = run_command(client_conn, f"sudo -n sh -c {shlex.quote(cmd)}", timeout=300,
                                           check=False)
                detail = (out.strip() or err.strip() or expect).splitlines()
                report.checks.append(Check(name, rc == 0, " | ".join(detail[-3:]) if rc == 0 else
                                           f"expected {expect}; exit {rc}: " + " | ".join(detail[-5:]),
                                           time.monotonic() - t1))
                emitter.info(f"verify [{firmware}] {name}: {'ok' if rc == 0 else 'FAIL'}")
            _, facts, _ = run_command(client_conn, "uname -r; cat /etc/debian_version", check=False)
            report.checks.append(Check("facts", True, facts.strip().replace("\n", " | ")))
            _, parts, _ = run_command(client_conn, "sudo -n sfdisk -l /dev/vda; lsblk -o NAME,SIZE,PARTTYPENAME,"
                                      "FSTYPE,MOUNTPOINT /dev/vda", check=False)
            report.partitions = parts.strip()
        finally:
            client_conn.close()
        vm.shutdown(60)
    for scratch in (disk, seed, fw.vars):  # the overlay, the seed and the variable store: nothing to keep
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    (workdir / "verify-report.xml").write_text(report.junit())
    (workdir / "verify-report.txt").write_text(report.text() + "\n")
    (workdir / "verify-report.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report


def verify_all(cfg: ImageConfig, qcow2: Path, report_dir: Path, *, firmwares: tuple[FirmwareKind, ...] = (),
               mok_cert: Path | None = None, emitter: Emitter | None = None,
               accel: Literal["kvm", "tcg"] | None = None, label: str = "",
               cert_label: str = "") -> list[VerifyReport]:
    """``verify`` under each of ``firmwares`` (default: every firmware the disk boots under), one after the
    other; reports in ``report_dir/<firmware>/`` and a summary ``report_dir/verify-summary.json``. ``accel``:
    the accelerator already chosen (a build's), else probed once here. ``label`` / ``cert_label``: how the
    reports name the image and the certificate (default: their paths; a build verifies in its staging directory
    and names the files as published, next to ``verify/``)."""
    firmwares = firmwares or default_firmwares(cfg)
    cert = mok_cert or published_cert(qcow2, cfg.name)
    accel = accel or _pick_accel(cfg, emitter or Emitter())  # probed once for every firmware
    reports = [verify_image(cfg, qcow2, report_dir / fw, emitter=emitter, firmware=fw, mok_cert=cert, accel=accel,
                            label=label) for fw in firmwares]
    (report_dir / "verify-summary.json").write_text(json.dumps(
        {"image": label or str(qcow2), "ok": all(r.ok for r in reports),
         "certificate": (cert_label or str(cert)) if cert else None,
         "firmwares": {r.firmware: {"ok": r.ok, "boot_seconds": round(r.boot_seconds, 1),
                                    "failed": [c.name for c in r.checks if not c.ok]} for r in reports}},
        indent=2))
    return reports
