"""The installer ISO: ISOLINUX, the netboot kernel and the initrd (preseed inside), made with pycdlib.

Layout (Rock Ridge / Joliet names; ISO9660 level-3 names are the upper-case equivalents)::

    /isolinux/isolinux.bin   El Torito BIOS boot image (no emulation, 4 sectors, boot info table)
    /isolinux/ldlinux.c32    must come from the same syslinux build as isolinux.bin
    /isolinux/isolinux.cfg   serial console, no prompt, boots ``install`` at once
    /isolinux/boot.cat       El Torito boot catalog
    /install/vmlinuz         kernel
    /install/initrd.gz       initrd
    /<extra files>           e.g. /preseed.cfg (for reading; the netboot installer reads the initrd copy)

:func:`isolinux_cfg` is pure; :func:`build_iso` writes atomically (temp name, then rename) and raises
:class:`MediaError`; :func:`describe_iso` reads an ISO back for tests and for ``builder iso``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from ..errors import MediaError
from . import efi as efimod

log = logging.getLogger(__name__)

ISOLINUX_DIR = "/isolinux"
BOOT_FILE = "/isolinux/isolinux.bin"
BOOT_CATALOG = "/isolinux/boot.cat"
KERNEL = "/install/vmlinuz"
INITRD = "/install/initrd.gz"
# Linux x86 COMMAND_LINE_SIZE is 2048 bytes including the NUL; syslinux adds BOOT_IMAGE=… in front.
MAX_APPEND = 1900
PLATFORMS = {0: "x86", 1: "ppc", 2: "mac", 0xEF: "efi"}
MEDIA = {0: "noemul", 1: "floppy-1.2M", 2: "floppy-1.44M", 3: "floppy-2.88M", 4: "hdemul"}

_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ISO_PATH_RE = re.compile(r"(/[A-Za-z0-9_.+-]+)+")
_VOLID_RE = re.compile(r"[A-Z0-9_]{1,32}")


def isolinux_cfg(append: str, *, label: str = "install", kernel: str = KERNEL, initrd: str = INITRD) -> str:
    """isolinux.cfg that boots ``label`` at once, with ISOLINUX's own output on the first serial port."""
    if not _LABEL_RE.fullmatch(label):
        raise MediaError(f"not a usable isolinux label: {label!r}")
    for what, p in (("kernel", kernel), ("initrd", initrd)):
        if not _ISO_PATH_RE.fullmatch(p):
            raise MediaError(f"not a usable {what} path on the ISO: {p!r}")
    if any(c in append for c in "\r\n\0"):
        raise MediaError("the kernel command line must be a single line")
    line = f"initrd={initrd} {append.strip()}".strip()
    if len(line) > MAX_APPEND:
        raise MediaError(f"the kernel command line is too long ({len(line)} > {MAX_APPEND} characters)")
    return (
        "serial 0 115200\n"
        "# Written by builder: boot the installer at once; ISOLINUX talks on the first serial port too.\n"
        f"default {label}\n"
        "prompt 0\n"
        "timeout 0\n"
        f"label {label}\n"
        f"  kernel {kernel}\n"
        f"  append {line}\n"
    )


# ---------------------------------------------------------------------------------------------- names


def _iso_component(name: str, *, is_dir: bool) -> str:
    """A Rock Ridge name → an ISO9660 level-3 identifier (upper case, A-Z 0-9 _, one dot for files)."""
    up = name.upper()
    if is_dir:
        return (re.sub(r"[^A-Z0-9_]", "_", up) or "_")[:31]
    base, dot, ext = up.rpartition(".")
    if not dot:
        base, ext = up, ""
    base = re.sub(r"[^A-Z0-9_]", "_", base) or "_"
    ext = re.sub(r"[^A-Z0-9_]", "_", ext)[:8]
    base = base[: 30 - len(ext) - 1]
    return f"{base}.{ext};1"


class _Namer:
    """Assigns unique ISO9660 paths to Rock Ridge paths (mangled names may collide)."""

    def __init__(self) -> None:
        self.iso_of: dict[str, str] = {"/": "/"}
        self.used: set[str] = set()

    def path(self, rr_path: str, *, is_dir: bool) -> str:
        if rr_path in self.iso_of:
            return self.iso_of[rr_path]
        parent, _, name = rr_path.rpartition("/")
        parent_iso = self.iso_of[parent or "/"]
        cand = _iso_component(name, is_dir=is_dir)
        n = 0
        while True:
            full = (parent_iso.rstrip("/") + "/" + cand)
            if full not in self.used:
                break
            n += 1
            suffix = f"_{n}"
            if is_dir:
                cand = _iso_component(name, is_dir=True)[: 31 - len(suffix)] + suffix
            else:
                stem, ext = _iso_component(name, is_dir=False)[:-2].split(".", 1)
                cand = f"{stem[: 30 - len(ext) - 1 - len(suffix)]}{suffix}.{ext};1"
        self.used.add(full)
        self.iso_of[rr_path] = full
        return full


def _rr_path(name: str) -> str:
    p = "/" + name.strip("/")
    parts = p.split("/")[1:]
    if p == "/" or any(x in ("", ".", "..") for x in parts) or any(len(x) > 64 for x in parts):
        raise MediaError(f"not a usable path on the ISO: {name!r}")
    if any(not re.fullmatch(r"[A-Za-z0-9_.+-]+", x) for x in parts):
        raise MediaError(f"not a usable path on the ISO (letters, digits, _ . + - only): {name!r}")
    return p


# ---------------------------------------------------------------------------------------------- writing


def _payload(src: Path | bytes, what: str) -> tuple[BinaryIO, int]:
    if isinstance(src, bytes | bytearray):
        if not src:
            raise MediaError(f"the {what} is empty")
        return io.BytesIO(bytes(src)), len(src)
    try:
        size = Path(src).stat().st_size
        if size == 0:
            raise MediaError(f"the {what} is empty: {src}")
        return open(src, "rb"), size
    except OSError as exc:
        raise MediaError(f"cannot read the {what} {src}: {exc.strerror}") from exc


def build_iso(
    out: Path,
    *,
    kernel: Path | bytes,
    initrd: Path | bytes,
    isolinux_bin: bytes,
    ldlinux_c32: bytes,
    append: str,
    extra_files: Mapping[str, bytes] | None = None,
    volume_id: str = "BUILDER_INSTALL",
    efi: tuple[bytes, bytes] | None = None,
) -> Path:
    """Write an installer ISO to ``out`` (ISO9660 level 3 + Joliet + Rock Ridge 1.09) that boots under BIOS
    (ISOLINUX) and, with ``efi`` = (signed shim, signed CD GRUB), under UEFI as well (a second El Torito entry,
    platform 0xEF: :mod:`builder.installer.efi`).

    ``append`` is the kernel command line (without ``initrd=``). ``extra_files`` maps paths on the ISO
    (``"preseed.cfg"``, ``"d-i/notes.txt"``) to their content. Returns ``out``.
    """
    out = Path(out)
    if not _VOLID_RE.fullmatch(volume_id):
        raise MediaError(f"not a usable ISO volume id (A-Z 0-9 _, at most 32): {volume_id!r}")
    if len(isolinux_bin) < 2048 or isolinux_bin[0x40:0x44] != b"\xfb\xc0\x78\x70":
        # 0x7078c0fb is the isolinux.bin magic that the boot info table patching relies on.
        raise MediaError("isolinux_bin does not look like ISOLINUX's isolinux.bin")
    if not ldlinux_c32:
        raise MediaError("ldlinux.c32 is empty")
    cfg = isolinux_cfg(append).encode()
    extras = {_rr_path(k): v for k, v in (extra_files or {}).items()}
    efi_files: dict[str, bytes] = {}
    if efi is not None:
        shim, grub = efi
        efi_files = {
            efimod.EFI_IMAGE: efimod.efi_image(shim=shim, grub=grub, workdir=out.parent),
            efimod.GRUB_CFG: efimod.grub_cfg(append, kernel=KERNEL, initrd=INITRD).encode(),
            efimod.DISK_INFO: f"builder installer ({volume_id})\n".encode(),
        }
    for reserved in (BOOT_FILE, BOOT_CATALOG, KERNEL, INITRD, "/isolinux/ldlinux.c32", "/isolinux/isolinux.cfg",
                     *efi_files):
        if reserved in extras:
            raise MediaError(f"{reserved} is written by build_iso itself; it cannot be an extra file")

    files: dict[str, tuple[BinaryIO, int]] = {}
    iso = pycdlib.PyCdlib()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmpname = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmpname)
    try:
        files[KERNEL] = _payload(kernel, "kernel")
        files[INITRD] = _payload(initrd, "initrd")
        files[BOOT_FILE] = (io.BytesIO(bytes(isolinux_bin)), len(isolinux_bin))
        files["/isolinux/ldlinux.c32"] = (io.BytesIO(bytes(ldlinux_c32)), len(ldlinux_c32))
        files["/isolinux/isolinux.cfg"] = (io.BytesIO(cfg), len(cfg))
        for p, data in extras.items():
            if not isinstance(data, bytes | bytearray):
                raise MediaError(f"extra file {p}: content must be bytes")
            files[p] = (io.BytesIO(bytes(data)), len(data))
        for p, data in efi_files.items():
            files[p] = (io.BytesIO(data), len(data))

        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=volume_id, app_ident_str="builder")
        namer = _Namer()
        made: set[str] = set()
        for rr in sorted(files):
            parts = rr.split("/")[1:]
            for i in range(1, len(parts)):
                d = "/" + "/".join(parts[:i])
                if d not in made:
                    iso.add_directory(namer.path(d, is_dir=True), rr_name=parts[i - 1], joliet_path=d)
                    made.add(d)
            fp, size = files[rr]
            iso.add_fp(fp, size, namer.path(rr, is_dir=False), rr_name=parts[-1], joliet_path=rr)
        cat_iso = namer.path(BOOT_CATALOG, is_dir=False)
        iso.add_eltorito(
            namer.path(BOOT_FILE, is_dir=False), bootcatfile=cat_iso, rr_bootcatname="boot.cat",
            joliet_bootcatfile=BOOT_CATALOG, boot_load_size=4, boot_info_table=True, media_name="noemul",
        )
        if efi_files:
            # The sector count (512-byte sectors) is the whole FAT image: UEFI reads the entry as a disk.
            iso.add_eltorito(namer.path(efimod.EFI_IMAGE, is_dir=False), bootcatfile=cat_iso,
                             rr_bootcatname="boot.cat", joliet_bootcatfile=BOOT_CATALOG,
                             boot_load_size=len(efi_files[efimod.EFI_IMAGE]) // 512, efi=True,
                             platform_id=0xEF, media_name="noemul")
        iso.write(str(tmp))
        iso.close()
        os.replace(tmp, out)
    except PyCdlibException as exc:
        raise MediaError(f"could not build the installer ISO: {exc}", stage="media") from exc
    except OSError as exc:
        raise MediaError(f"could not write {out}: {exc.strerror or exc}", stage="media") from exc
    finally:
        for fp, _ in files.values():
            fp.close()
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


# ---------------------------------------------------------------------------------------------- reading


def describe_iso(path: Path) -> dict[str, Any]:
    """What an ISO holds: volume id, extensions, files (Rock Ridge path → size), El Torito entries."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (PyCdlibException, OSError) as exc:
        raise MediaError(f"cannot read ISO {path}: {exc}") from exc
    try:
        pvd = iso.pvd
        info: dict[str, Any] = {
            "path": str(path),
            "size": Path(path).stat().st_size,
            "volume_id": pvd.volume_identifier.decode("ascii", "replace").strip(),
            "joliet": iso.has_joliet(),
            "rock_ridge": iso.has_rock_ridge(),
            "files": {},
            "eltorito": [],
            "boot_catalog": None,
        }
        by_extent: dict[int, str] = {}
        key = "rr_path" if iso.has_rock_ridge() else "iso_path"
        for dirpath, _dirs, names in iso.walk(**{key: "/"}):
            for name in names:
                p = dirpath.rstrip("/") + "/" + name
                rec = iso.get_record(**{key: p})
                info["files"][p] = rec.get_data_length()
                by_extent.setdefault(rec.extent_location(), p)
        cat = iso.eltorito_boot_catalog
        if cat is not None:
            info["boot_catalog"] = by_extent.get(cat.extent_location())
            entries = [(cat.validation_entry.platform_id, cat.initial_entry)]
            for sec in cat.sections:
                entries.extend((sec.platform_id, e) for e in sec.section_entries)
            for platform, e in entries:
                info["eltorito"].append({
                    "platform": platform,
                    "platform_name": PLATFORMS.get(platform, hex(platform)),
                    "bootable": e.boot_indicator == 0x88,
                    "media": MEDIA.get(e.boot_media_type, str(e.boot_media_type)),
                    "load_segment": e.load_segment,
                    "sectors": e.sector_count,
                    "load_rba": e.load_rba,
                    "boot_file": by_extent.get(e.load_rba),
                })
        return info
    except PyCdlibException as exc:
        raise MediaError(f"cannot read ISO {path}: {exc}") from exc
    finally:
        iso.close()


def read_iso_file(path: Path, rr_path: str) -> bytes:
    """One file's content from an ISO, by its Rock Ridge path."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path=rr_path)
        return buf.getvalue()
    except (PyCdlibException, OSError) as exc:
        raise MediaError(f"cannot read {rr_path} from {path}: {exc}") from exc
    finally:
        try:
            iso.close()
        except PyCdlibException:
            pass
