"""The installer's UEFI boot: a small FAT image for the ISO's EFI El Torito entry, and the GRUB menu it reads.

Debian's own layout (debian-installer ``build/util/efi-image`` with signed binaries), so Secure Boot firmware
accepts it:

    EFI/BOOT/BOOTX64.EFI   shim, signed by Microsoft's UEFI CA (shim-signed: shimx64.efi.signed)
    EFI/BOOT/grubx64.efi   GRUB for CD-ROMs, signed by Debian (grub-efi-amd64-signed: gcdx64.efi.signed)
    EFI/debian/grub.cfg    finds the ISO by /.disk/info and reads its /boot/grub/grub.cfg

The signed GRUB's built-in config looks for ``/.disk/info`` on the CD and then sources ``/boot/grub/grub.cfg``
there; the copy under ``EFI/debian`` (GRUB's built-in prefix) covers firmwares that hand GRUB the FAT image as
its root. The FAT image is made with ``mkfs.fat`` (dosfstools) and filled with ``mcopy`` (mtools): no mount, no
root. :func:`grub_cfg` is pure.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..errors import MediaError
from ..run import run

SHIM_MEMBER = "usr/lib/shim/shimx64.efi.signed"
GRUB_CD_MEMBER = "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"
SHIM_PACKAGE = "shim-signed"
GRUB_PACKAGE = "grub-efi-amd64-signed"
DISK_INFO = "/.disk/info"
GRUB_CFG = "/boot/grub/grub.cfg"
EFI_IMAGE = "/boot/grub/efi.img"
_PE_MAGIC = b"MZ"
# El Torito's sector count is 16 bits of 512-byte sectors: the image must stay below 32 MiB.
MAX_IMAGE = 0xFFFF * 512


def grub_cfg(append: str, *, kernel: str, initrd: str, serial: tuple[int, int] | None = (0, 115200)) -> str:
    """The installer's GRUB menu: one entry, booted at once, GRUB on the serial port too."""
    if any(c in append for c in "\r\n\0"):
        raise MediaError("the kernel command line must be a single line")
    for what, p in (("kernel", kernel), ("initrd", initrd)):
        if not re.fullmatch(r"(/[A-Za-z0-9_.+-]+)+", p):
            raise MediaError(f"not a usable {what} path on the ISO: {p!r}")
    # GRUB's own quoting: single quotes, a ' becomes '\''.
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in append.split())
    lines = ["# Written by builder: boot the installer at once (UEFI)."]
    if serial:
        unit, speed = serial
        lines += [f"serial --unit={unit} --speed={speed}", "terminal_input console serial",
                  "terminal_output console serial"]
    lines += [
        "set timeout=0",
        "set default=0",
        "menuentry 'install' {",
        f"    linux {kernel} {quoted}".rstrip(),
        f"    initrd {initrd}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def prefix_cfg() -> str:
    """EFI/debian/grub.cfg inside the FAT image: hand over to the ISO's menu."""
    return (f"search --file --set=root {DISK_INFO}\n"
            f"set prefix=($root)/boot/grub\n"
            f"configfile $prefix/grub.cfg\n")


def _check_pe(data: bytes, what: str) -> None:
    if len(data) < 4096 or data[:2] != _PE_MAGIC:
        raise MediaError(f"the {what} is not an EFI (PE) binary")


def efi_image(*, shim: bytes, grub: bytes, workdir: Path | None = None) -> bytes:
    """The FAT image of the EFI El Torito entry (bytes, a multiple of 512, below 32 MiB)."""
    _check_pe(shim, "shim (shimx64.efi.signed)")
    _check_pe(grub, "GRUB (gcdx64.efi.signed)")
    cfg = prefix_cfg().encode()
    payload = len(shim) + len(grub) + len(cfg)
    kib = max(1440, ((payload * 5 // 4) >> 10) + 256)  # FAT overhead and slack, at least a floppy's size
    if kib * 1024 > MAX_IMAGE:
        raise MediaError(f"the EFI boot image would be {kib} KiB, above El Torito's 32 MiB")
    with tempfile.TemporaryDirectory(prefix="builder-efi-", dir=workdir) as tmp:
        t = Path(tmp)
        img = t / "efi.img"
        for name, data in (("BOOTX64.EFI", shim), ("grubx64.efi", grub), ("grub.cfg", cfg)):
            (t / name).write_bytes(data)
        run(["mkfs.fat", "-C", "-n", "EFIBOOT", os.fspath(img), str(kib)])
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        run(["mmd", "-i", os.fspath(img), "::/EFI", "::/EFI/BOOT", "::/EFI/debian"], env=env)
        for name, dest in (("BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"), ("grubx64.efi", "::/EFI/BOOT/grubx64.efi"),
                           ("grub.cfg", "::/EFI/debian/grub.cfg")):
            run(["mcopy", "-i", os.fspath(img), os.fspath(t / name), dest], env=env)
        return img.read_bytes()


def list_efi_image(data: bytes) -> dict[str, int]:
    """The files of a FAT image (path → size), read back with mtools; for tests and ``iso`` checks."""
    with tempfile.TemporaryDirectory(prefix="builder-efi-") as tmp:
        img = Path(tmp) / "efi.img"
        img.write_bytes(data)
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        out = run(["mdir", "-i", os.fspath(img), "-/", "-b", "::/"], env=env).stdout.decode(errors="replace")
        files: dict[str, int] = {}
        for line in out.splitlines():
            p = line.strip()
            if not p.startswith("::/") or p.endswith("/"):
                continue
            dest = Path(tmp) / "x"
            run(["mcopy", "-n", "-i", os.fspath(img), p, os.fspath(dest)], env=env)
            files[p[2:]] = dest.stat().st_size
            dest.unlink()
        return files


def read_efi_file(data: bytes, path: str) -> bytes:
    """One file of a FAT image by its path (``/EFI/BOOT/BOOTX64.EFI``)."""
    with tempfile.TemporaryDirectory(prefix="builder-efi-") as tmp:
        img = Path(tmp) / "efi.img"
        img.write_bytes(data)
        dest = Path(tmp) / "out"
        run(["mcopy", "-n", "-i", os.fspath(img), "::" + path, os.fspath(dest)],
            env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        return dest.read_bytes()
