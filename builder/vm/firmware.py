"""The firmware a VM boots with: SeaBIOS (QEMU's default), OVMF (UEFI), or OVMF with Secure Boot.

OVMF comes from the host's ``ovmf`` package (``/usr/share/OVMF``: the 4 MiB builds). A UEFI VM gets two flash
chips: the read-only code and a **per-VM copy** of a variable store template, so nothing a guest writes
(boot entries, MOK requests) reaches another VM. ``uefi-secure`` uses the Secure Boot code (which needs SMM,
so the machine gets ``smm=on`` and the flash is locked) and the template with Microsoft's keys enrolled and
Secure Boot on; :func:`prepare` can add certificates to its MOK list with ``virt-fw-vars`` (virt-firmware), so
shim trusts a build's module-signing key without a manual ``mokutil --import`` round trip.

:func:`locate` is pure apart from reading the directory; :func:`prepare` writes the VARS copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import MissingToolError, VmError
from ..run import run

FirmwareKind = Literal["bios", "uefi", "uefi-secure"]
KINDS: tuple[FirmwareKind, ...] = ("bios", "uefi", "uefi-secure")
OVMF_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"), Path("/usr/share/qemu"))
# (code, vars template) for each UEFI kind, in the order they are looked for
FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "uefi": (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),),
    "uefi-secure": (("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"), ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd")),
}
PACKAGE = "ovmf"


@dataclass(frozen=True)
class Firmware:
    """How one VM boots. ``code``/``vars`` are None for BIOS; ``vars`` is the VM's own writable copy."""

    kind: FirmwareKind = "bios"
    code: Path | None = None
    vars: Path | None = None

    @property
    def uefi(self) -> bool:
        return self.kind != "bios"

    @property
    def secure(self) -> bool:
        return self.kind == "uefi-secure"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VmError(f"not a firmware: {self.kind!r} (bios, uefi or uefi-secure)")
        if self.uefi and (self.code is None or self.vars is None):
            raise VmError(f"{self.kind} firmware needs its code and variable store files")


BIOS = Firmware()


def locate(kind: FirmwareKind, dirs: Sequence[Path] = OVMF_DIRS) -> tuple[Path, Path]:
    """The OVMF code and VARS template for ``kind`` (MissingToolError naming the package when absent)."""
    if kind == "bios":
        raise VmError("BIOS needs no firmware files (QEMU's SeaBIOS)")
    for d in dirs:
        for code, template in FILES[kind]:
            if (d / code).is_file() and (d / template).is_file():
                return d / code, d / template
    names = " + ".join(FILES[kind][0])
    raise MissingToolError(f"{kind} firmware ({names})", package=PACKAGE,
                           why=f"not found in {', '.join(map(str, dirs))}")


def check_available(kinds: Sequence[FirmwareKind]) -> list[str]:
    """For preflight: one line per firmware kind that cannot be found."""
    problems = []
    for kind in dict.fromkeys(kinds):
        if kind == "bios":
            continue
        try:
            locate(kind)
        except MissingToolError as exc:
            problems.append(exc.message)
    return problems


def _virt_fw_vars() -> str:
    """virt-fw-vars from the venv builder runs in (the ``virt-firmware`` Python package), else from PATH."""
    here = Path(sys.executable).parent / "virt-fw-vars"
    if here.is_file():
        return os.fspath(here)
    found = shutil.which("virt-fw-vars")
    if found:
        return found
    raise MissingToolError("virt-fw-vars", why="to enroll a certificate in the firmware's variables",
                           hint="pip install virt-firmware (one of builder's dependencies)")


def mok_owner(cert_pem: bytes) -> str:
    """A stable owner GUID for a MOK entry, derived from the certificate (the same cert → the same GUID)."""
    return str(uuid.UUID(bytes=hashlib.sha256(cert_pem).digest()[:16], version=4))


def prepare(kind: FirmwareKind, vars_path: Path, *, mok_certs: Sequence[Path] = ()) -> Firmware:
    """The firmware for one VM: for UEFI a fresh copy of the VARS template at ``vars_path``; with
    ``mok_certs`` (PEM files, ``uefi-secure`` only) those certificates added to shim's MOK list."""
    if kind == "bios":
        if mok_certs:
            raise VmError("MOK certificates need UEFI firmware")
        return BIOS
    code, template = locate(kind)
    vars_path.parent.mkdir(parents=True, exist_ok=True)
    if mok_certs:
        argv = [_virt_fw_vars(), "-i", os.fspath(template), "-o", os.fspath(vars_path)]
        for cert in mok_certs:
            argv += ["--add-mok", mok_owner(Path(cert).read_bytes()), os.fspath(cert)]
        if kind == "uefi-secure":
            argv.append("--secure-boot")
        run(argv)
    else:
        shutil.copyfile(template, vars_path)
    os.chmod(vars_path, 0o600)
    return Firmware(kind, code, vars_path)
