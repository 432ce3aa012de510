"""The installer ISO: built with pycdlib from dummy payloads, read back, checked with xorriso."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from builder.errors import MediaError
from builder.installer.iso import build_iso, describe_iso, isolinux_cfg, read_iso_file

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
needs_syslinux = pytest.mark.skipif(
    not (ISOLINUX_BIN.is_file() and LDLINUX_C32.is_file()), reason="packages isolinux and syslinux-common needed"
)
APPEND = "auto=true priority=critical DEBIAN_FRONTEND=text console=ttyS0,115200n8 --- console=ttyS0,115200"


def test_isolinux_cfg() -> None:
    cfg = isolinux_cfg(APPEND)
    lines = cfg.splitlines()
    assert lines[0] == "serial 0 115200"  # must come first
    assert "default install" in lines and "prompt 0" in lines and "timeout 0" in lines
    assert "label install" in lines
    assert "  kernel /install/vmlinuz" in lines
    assert f"  append initrd=/install/initrd.gz {APPEND}" in lines
    other = isolinux_cfg("quiet", label="go", kernel="/k/linux", initrd="/k/initrd.gz")
    assert "default go" in other and "  kernel /k/linux" in other and "append initrd=/k/initrd.gz quiet" in other


@pytest.mark.parametrize(
    "kwargs",
    [
        {"append": "a\nb"},
        {"append": "x" * 3000},
        {"append": "x", "label": "has space"},
        {"append": "x", "kernel": "relative/vmlinuz"},
        {"append": "x", "initrd": "/a b"},
    ],
)
def test_isolinux_cfg_rejects(kwargs: dict) -> None:
    with pytest.raises(MediaError):
        isolinux_cfg(**kwargs)


@pytest.fixture()
def iso(tmp_path: Path) -> Path:
    if not (ISOLINUX_BIN.is_file() and LDLINUX_C32.is_file()):
        pytest.skip("packages isolinux and syslinux-common needed")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"K" * 10000)
    return build_iso(
        tmp_path / "out" / "installer.iso",
        kernel=kernel,
        initrd=b"\x1f\x8b" + b"I" * 5000,
        isolinux_bin=ISOLINUX_BIN.read_bytes(),
        ldlinux_c32=LDLINUX_C32.read_bytes(),
        append=APPEND,
        extra_files={"preseed.cfg": b"d-i time/zone string UTC\n", "/d-i/Long-Name.with.dots.cfg": b"x"},
    )


def test_files_and_boot_catalog(iso: Path) -> None:
    info = describe_iso(iso)
    assert info["volume_id"] == "BUILDER_INSTALL"
    assert info["joliet"] and info["rock_ridge"]
    files = info["files"]
    assert files["/install/vmlinuz"] == 10000
    assert files["/install/initrd.gz"] == 5002
    assert files["/isolinux/isolinux.bin"] == ISOLINUX_BIN.stat().st_size
    assert files["/isolinux/ldlinux.c32"] == LDLINUX_C32.stat().st_size
    assert files["/preseed.cfg"] == 25
    assert files["/d-i/Long-Name.with.dots.cfg"] == 1
    assert info["boot_catalog"] == "/isolinux/boot.cat"
    (entry,) = info["eltorito"]
    assert entry["platform"] == 0 and entry["platform_name"] == "x86"
    assert entry["bootable"] is True
    assert entry["media"] == "noemul"
    assert entry["sectors"] == 4
    assert entry["load_segment"] == 0
    assert entry["boot_file"] == "/isolinux/isolinux.bin"
    assert not list(iso.parent.glob(".*tmp")), "temporary file left behind"


def test_contents_read_back(iso: Path) -> None:
    assert read_iso_file(iso, "/isolinux/isolinux.cfg").decode() == isolinux_cfg(APPEND)
    assert read_iso_file(iso, "/preseed.cfg") == b"d-i time/zone string UTC\n"
    assert read_iso_file(iso, "/isolinux/ldlinux.c32") == LDLINUX_C32.read_bytes()
    # The boot info table (bytes 8-63) was patched in: primary volume descriptor at LBA 16, the file's own
    # LBA and length.
    boot = read_iso_file(iso, "/isolinux/isolinux.bin")
    info = describe_iso(iso)
    pvd_lba, file_lba, length, _csum = struct.unpack("<IIII", boot[8:24])
    assert pvd_lba == 16
    assert file_lba == info["eltorito"][0]["load_rba"]
    assert length == len(boot)
    assert boot[:8] == ISOLINUX_BIN.read_bytes()[:8] and boot[64:] == ISOLINUX_BIN.read_bytes()[64:]


def test_the_output_is_replaced_atomically(iso: Path) -> None:
    before = iso.stat().st_ino
    build_iso(iso, kernel=b"k", initrd=b"i", isolinux_bin=ISOLINUX_BIN.read_bytes(),
              ldlinux_c32=LDLINUX_C32.read_bytes(), append="x")
    assert iso.stat().st_ino != before
    assert describe_iso(iso)["files"]["/install/vmlinuz"] == 1


@needs_syslinux
def test_bad_inputs(tmp_path: Path) -> None:
    good = {"kernel": b"k", "initrd": b"i", "isolinux_bin": ISOLINUX_BIN.read_bytes(),
            "ldlinux_c32": LDLINUX_C32.read_bytes(), "append": "x"}
    for change in ({"isolinux_bin": b"\0" * 4096}, {"kernel": b""}, {"kernel": tmp_path / "missing"},
                   {"extra_files": {"../x": b""}}, {"extra_files": {"isolinux/isolinux.cfg": b""}},
                   {"extra_files": {"a b": b""}}, {"volume_id": "lower"}):
        with pytest.raises(MediaError):
            build_iso(tmp_path / "bad.iso", **{**good, **change})
        assert not (tmp_path / "bad.iso").exists()
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(MediaError):
        describe_iso(tmp_path / "missing.iso")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("xorriso") is None, reason="xorriso not installed")
def test_xorriso_sees_the_el_torito_entry(iso: Path) -> None:
    out = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "El Torito cat path : /isolinux/boot.cat" in out
    assert "El Torito img path :   1  /isolinux/isolinux.bin" in out
    boot = next(ln for ln in out.splitlines() if ln.startswith("El Torito boot img :   1"))
    # N Pltf B Emul Ld_seg Hdpt Ldsiz LBA
    assert boot.split()[6:12] == ["BIOS", "y", "none", "0x0000", "0x00", "4"]
    assert "boot-info-table" in out
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-find", "/", "-type", "f"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    for path in ("/install/vmlinuz", "/install/initrd.gz", "/isolinux/isolinux.cfg", "/preseed.cfg"):
        assert f"'{path}'" in listing


def test_grub_cfg_boots_the_installer_at_once() -> None:
    from builder.installer.efi import grub_cfg

    cfg = grub_cfg("auto=true log_host=10.0.2.2 --- console=ttyS0,115200 it's", kernel="/install/vmlinuz",
                   initrd="/install/initrd.gz")
    assert "set timeout=0" in cfg and "serial --unit=0 --speed=115200" in cfg
    assert "    linux /install/vmlinuz 'auto=true' 'log_host=10.0.2.2' '---' 'console=ttyS0,115200' 'it'\\''s'" in cfg
    assert "    initrd /install/initrd.gz" in cfg
    with pytest.raises(MediaError, match="single line"):
        grub_cfg("a\nb", kernel="/k", initrd="/i")


@pytest.mark.skipif(shutil.which("mkfs.fat") is None or shutil.which("mcopy") is None,
                    reason="dosfstools and mtools needed")
def test_efi_entry_and_fat_image_read_back(tmp_path: Path) -> None:
    """A second El Torito entry (platform 0xEF) whose FAT image holds shim, GRUB and the hand-over config."""
    from builder.installer.efi import DISK_INFO, EFI_IMAGE, GRUB_CFG, list_efi_image, read_efi_file

    if not (ISOLINUX_BIN.is_file() and LDLINUX_C32.is_file()):
        pytest.skip("isolinux and syslinux-common needed")
    shim, grub = b"MZ" + b"s" * 9000, b"MZ" + b"g" * 20000  # stand-ins: only the PE magic is checked here
    out = build_iso(tmp_path / "x.iso", kernel=b"K" * 4096, initrd=b"I" * 4096,
                    isolinux_bin=ISOLINUX_BIN.read_bytes(), ldlinux_c32=LDLINUX_C32.read_bytes(),
                    append="auto=true", efi=(shim, grub))
    info = describe_iso(out)
    assert [(e["platform_name"], e["boot_file"]) for e in info["eltorito"]] == [
        ("x86", "/isolinux/isolinux.bin"), ("efi", EFI_IMAGE)]
    assert info["eltorito"][1]["sectors"] * 512 == info["files"][EFI_IMAGE]
    assert {DISK_INFO, GRUB_CFG} <= set(info["files"])
    assert b"linux /install/vmlinuz 'auto=true'" in read_iso_file(out, GRUB_CFG)
    fat = read_iso_file(out, EFI_IMAGE)
    assert list_efi_image(fat) == {"/EFI/BOOT/BOOTX64.EFI": len(shim), "/EFI/BOOT/grubx64.efi": len(grub),
                                   "/EFI/debian/grub.cfg": len(read_efi_file(fat, "/EFI/debian/grub.cfg"))}
    assert read_efi_file(fat, "/EFI/BOOT/BOOTX64.EFI") == shim
    assert b"search --file --set=root /.disk/info" in read_efi_file(fat, "/EFI/debian/grub.cfg")
    with pytest.raises(MediaError, match="PE"):
        build_iso(tmp_path / "y.iso", kernel=b"K" * 4096, initrd=b"I" * 4096, isolinux_bin=ISOLINUX_BIN.read_bytes(),
                  ldlinux_c32=LDLINUX_C32.read_bytes(), append="", efi=(b"not a PE", grub))
