"""Boot the installer ISO in QEMU (TCG): ISOLINUX → kernel with our command line → concatenated initrd.

The payload is a stock Debian kernel (the host's ``linux-image-amd64`` dependency, fetched with ``apt-get
download``, so apt verifies it) and an initrd made here: a gzip'ed newc archive with a static busybox and an
``/init`` script, followed (``append_to_initrd``) by a second archive with ``preseed.cfg``. /init prints
its command line and the appended file to ttyS0 and powers off, so the test sees every link of the chain.

``BUILDER_TEST_KERNEL=/path/to/vmlinuz`` skips the download. ``BUILDER_TEST_NETBOOT_DIR`` (a directory with
the netboot ``linux`` and ``initrd.gz``) enables a second test that boots the real debian-installer with the
rendered preseed and waits for the "preseed loaded" milestone.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from builder.installer.cpio import CpioEntry, append_to_initrd, cpio_newc
from builder.installer.iso import build_iso

pytestmark = [pytest.mark.integration, pytest.mark.vm]

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
QEMU = shutil.which("qemu-system-x86_64")
INIT = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
{ echo "INIT-OK from base archive"; echo "CMDLINE $(/bin/busybox cat /proc/cmdline)";
  echo "PRESEED-BEGIN"; /bin/busybox cat /preseed.cfg; echo "PRESEED-END"; } > /dev/ttyS0
echo o > /proc/sysrq-trigger
/bin/busybox sleep 30
"""

pytest.importorskip("pycdlib")
if QEMU is None or not ISOLINUX_BIN.is_file() or not LDLINUX_C32.is_file():
    pytest.skip("needs qemu-system-x86, isolinux and syslinux-common", allow_module_level=True)


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = base / "builder-tests" / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _deb(package_glob: str, apt_name: str) -> Path:
    """A .deb from the host's (apt-verified) archive, cached between runs."""
    cache = _cache_dir()
    found = sorted(cache.glob(package_glob))
    if not found:
        subprocess.run(["apt-get", "download", apt_name], cwd=cache, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = sorted(cache.glob(package_glob))
    if not found:
        pytest.skip(f"could not download {apt_name}")
    return found[-1]


def _deb_member(deb: Path, pattern: str) -> bytes:
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True,
                               timeout=300).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf.getmembers():
            if m.isfile() and re.fullmatch(pattern, m.name.lstrip("./")):
                f = tf.extractfile(m)
                assert f is not None
                return f.read()
    raise AssertionError(f"{pattern} not in {deb}")


@pytest.fixture(scope="module")
def stock_kernel() -> bytes:
    if env := os.environ.get("BUILDER_TEST_KERNEL"):
        return Path(env).read_bytes()
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb")
    depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    m = re.search(r"Depends: (linux-image-\S+-amd64)", depends)
    if not m:
        pytest.skip("the host's apt knows no linux-image-amd64")
    deb = _deb(f"{m.group(1)}_*.deb", m.group(1))
    return _deb_member(deb, r"boot/vmlinuz-.*")


@pytest.fixture(scope="module")
def busybox() -> bytes:
    return _deb_member(_deb("busybox-static_*.deb", "busybox-static"), r"bin/busybox")


def _boot(iso: Path, serial: Path, until: str, timeout: float, memory: int = 1024,
          firmware: list[str] | None = None) -> str:
    """Run QEMU until ``until`` shows on the serial log or QEMU exits; always kill it by its PID."""
    assert QEMU is not None
    argv = [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory), "-nodefaults",
            "-display", "none", "-cdrom", str(iso), "-serial", f"file:{serial}", "-no-reboot",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0", *(firmware or [])]
    err = serial.with_suffix(".qemu.log")
    with open(err, "wb") as errf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = serial.read_text(errors="replace") if serial.exists() else ""
                if until in text or proc.poll() is not None:
                    break
                time.sleep(1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    return serial.read_text(errors="replace").replace("\r", "")


@pytest.mark.timeout(180)
def test_iso_boots_kernel_and_appended_initrd(tmp_path: Path, stock_kernel: bytes, busybox: bytes) -> None:
    preseed = b"d-i time/zone string UTC\n# appended archive\n"
    initrd = make_initrd(busybox, preseed)
    append = "auto=true priority=critical DEBIAN_FRONTEND=text console=ttyS0,115200n8 --- console=ttyS0,115200"
    iso = build_iso(tmp_path / "boot.iso", kernel=stock_kernel, initrd=initrd,
                    isolinux_bin=ISOLINUX_BIN.read_bytes(), ldlinux_c32=LDLINUX_C32.read_bytes(),
                    append=append, extra_files={"preseed.cfg": preseed})
    t0 = time.monotonic()
    log = _boot(iso, tmp_path / "serial.log", until="PRESEED-END", timeout=150)
    elapsed = time.monotonic() - t0
    assert "ISOLINUX" in log, log[-2000:]
    assert "Linux version" in log, log[-2000:]
    assert re.search(r"Command line: BOOT_IMAGE=/install/vmlinuz initrd=/install/initrd.gz " + re.escape(append),
                     log), log[-3000:]
    assert "INIT-OK from base archive" in log, log[-3000:]
    assert f"CMDLINE BOOT_IMAGE=/install/vmlinuz initrd=/install/initrd.gz {append}" in log
    body = log.split("PRESEED-BEGIN\n", 1)[1].split("PRESEED-END", 1)[0]
    assert body == preseed.decode()
    print(f"booted to /init and read the appended preseed in {elapsed:.1f} s")


@pytest.fixture(scope="module")
def signed_efi() -> tuple[bytes, bytes]:
    """Debian's signed shim and CD GRUB, as the build gets them: pinned by the committed lock, verified."""
    from builder.archive.cache import ContentCache
    from builder.archive.http import FetchStats
    from builder.config import load_config
    from builder.events import Emitter
    from builder.stages.fetch import fetch_inputs

    cfg = load_config(Path(__file__).resolve().parents[2] / "images" / "cloud-gpu-worker.yaml")
    inputs = fetch_inputs(cfg, ContentCache(), FetchStats(), Emitter())
    assert inputs.efi is not None
    return inputs.efi


@pytest.mark.timeout(300)
def test_iso_boots_under_ovmf_through_signed_shim_and_grub(tmp_path: Path, stock_kernel: bytes, busybox: bytes,
                                                          signed_efi: tuple[bytes, bytes]) -> None:
    """The ISO's EFI El Torito entry: OVMF → shim (Microsoft-signed) → Debian's CD GRUB → our grub.cfg → the
    kernel with our command line → the appended initrd. The same ISO still boots under BIOS (the test above)."""
    from builder.installer.efi import EFI_IMAGE, list_efi_image, read_efi_file
    from builder.installer.iso import describe_iso, read_iso_file
    from builder.vm.firmware import prepare

    preseed = b"d-i time/zone string UTC\n# appended archive (UEFI)\n"
    initrd = make_initrd(busybox, preseed)
    append = "auto=true priority=critical console=ttyS0,115200n8 log_port=5140 --- console=ttyS0,115200"
    iso = build_iso(tmp_path / "boot.iso", kernel=stock_kernel, initrd=initrd,
                    isolinux_bin=ISOLINUX_BIN.read_bytes(), ldlinux_c32=LDLINUX_C32.read_bytes(),
                    append=append, efi=signed_efi)
    info = describe_iso(iso)
    assert [e["platform_name"] for e in info["eltorito"]] == ["x86", "efi"]
    efi_entry = info["eltorito"][1]
    assert efi_entry["boot_file"] == EFI_IMAGE and efi_entry["sectors"] * 512 == info["files"][EFI_IMAGE]
    fat_image = read_iso_file(iso, EFI_IMAGE)
    fat = list_efi_image(fat_image)
    assert fat["/EFI/BOOT/BOOTX64.EFI"] == len(signed_efi[0]) and fat["/EFI/BOOT/grubx64.efi"] == len(signed_efi[1])
    shim = read_efi_file(fat_image, "/EFI/BOOT/BOOTX64.EFI")
    assert shim == signed_efi[0] and authenticode_size(shim) > 0  # a signed PE: its certificate table is there
    assert b"Microsoft" in shim[-authenticode_size(shim):]  # shim is signed by Microsoft's UEFI CA
    fw = prepare("uefi", tmp_path / "vars.fd")
    assert fw.code is not None
    pflash = ["-machine", "q35", "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
              "-drive", f"if=pflash,format=raw,unit=1,file={fw.vars}"]
    t0 = time.monotonic()
    log = _boot(iso, tmp_path / "serial.log", until="PRESEED-END", timeout=270, firmware=pflash)
    elapsed = time.monotonic() - t0
    assert "BdsDxe: starting" in log and "DVD-ROM" in log, log[-2000:]
    assert "efi: EFI v" in log, log[-3000:]  # the kernel came up through EFI, not a BIOS fallback
    assert f"Command line: BOOT_IMAGE=/install/vmlinuz {append}" in log, log[-3000:]
    assert "INIT-OK from base archive" in log, log[-3000:]
    body = log.split("PRESEED-BEGIN\n", 1)[1].split("PRESEED-END", 1)[0]
    assert body == preseed.decode()
    print(f"UEFI: booted to /init and read the appended preseed in {elapsed:.1f} s")


def authenticode_size(pe: bytes) -> int:
    """The size of a PE image's certificate table (data directory 4): non-zero for a signed binary."""
    import struct

    off = struct.unpack_from("<I", pe, 0x3C)[0]
    assert pe[off:off + 4] == b"PE\0\0"
    opt = off + 24
    magic = struct.unpack_from("<H", pe, opt)[0]
    dirs = opt + (112 if magic == 0x20B else 96)  # PE32+ : PE32
    _addr, size = struct.unpack_from("<II", pe, dirs + 4 * 8)
    return int(size)


def make_initrd(busybox: bytes, preseed: bytes) -> bytes:
    """busybox + /init (prints the command line and /preseed.cfg, powers off), then the preseed appended."""
    base = gzip_cpio([
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.file("init", INIT, 0o755),
    ])
    return append_to_initrd(base, {"preseed.cfg": preseed})


def gzip_cpio(entries: list[CpioEntry]) -> bytes:
    import gzip

    return gzip.compress(cpio_newc(entries), mtime=0)


@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.environ.get("BUILDER_TEST_NETBOOT_DIR"), reason="set BUILDER_TEST_NETBOOT_DIR")
def test_real_installer_loads_the_preseed(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from builder.config import load_config
    from builder.installer.preseed import (
        MILESTONE_LOADED,
        PreseedContext,
        check_preseed_syntax,
        installer_cmdline,
        render_preseed,
    )

    d = Path(os.environ["BUILDER_TEST_NETBOOT_DIR"])
    k = Ed25519PrivateKey.generate()
    pem = k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    pub = k.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    cfg = load_config(Path(__file__).resolve().parents[2] / "images" / "cloud-gpu-worker.yaml",
                      ["provision.enabled=false"])
    ctx = PreseedContext(cfg, mirror_host="10.0.2.2:9", host_key_private=pem, host_key_public=pub,
                         authorized_key=pub)
    text = render_preseed(ctx)
    check_preseed_syntax(text)
    initrd = append_to_initrd((d / "initrd.gz").read_bytes(), {"preseed.cfg": text.encode()})
    iso = build_iso(tmp_path / "installer.iso", kernel=d / "linux", initrd=initrd,
                    isolinux_bin=ISOLINUX_BIN.read_bytes(), ldlinux_c32=LDLINUX_C32.read_bytes(),
                    append=installer_cmdline(ctx, log_port=9), extra_files={"preseed.cfg": text.encode()})
    log = _boot(iso, tmp_path / "serial.log", until=f"BUILDER {MILESTONE_LOADED}", timeout=540, memory=2048)
    assert f"BUILDER {MILESTONE_LOADED}" in log, log[-3000:]
    assert "Prompt: '?' for help" not in log.split(f"BUILDER {MILESTONE_LOADED}")[0]
