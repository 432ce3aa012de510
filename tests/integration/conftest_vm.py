"""Helpers for the VM integration tests: a stock Debian kernel to boot, process checks.

The kernel is fetched with ``apt-get download`` of the host's ``linux-image-cloud-amd64`` kernel package
(falling back to ``linux-image-amd64``): apt checks the .deb's SHA256 against the host's Packages index,
which it verified against the archive's signed InRelease at ``apt-get update``. ``dpkg-deb -x`` then unpacks
``/boot/vmlinuz-*``. If apt's lists are stale (the version is gone from the mirror), ``apt-get update`` runs
once and the download is retried. ``BUILDER_TEST_KERNEL=/path/to/vmlinuz`` skips all that.

:func:`acpi_initrd` builds a tiny initramfs (busybox from ``apt-get download busybox-static``, verified the
same way, plus the kernel's ``button`` and ``evdev`` modules) whose init powers the guest off when the ACPI
power button is pressed: enough to test a graceful ``system_powerdown``.

Test modules import these and wrap them in session fixtures; results are memoized per process, so the
downloads happen once per test run.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_kernel: Path | None = None
_kernel_error: str | None = None
_initrd: Path | None = None


def _sh(*argv: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def _kernel_package(meta: str) -> str | None:
    """linux-image-cloud-amd64 → linux-image-6.1.0-57-cloud-amd64 (the real package the metapackage wants)."""
    proc = _sh("apt-cache", "depends", "--no-recommends", "--no-suggests", meta)
    m = re.search(r"Depends:\s*(linux-image-\d\S*)", proc.stdout)
    return m.group(1) if m else None


def _download(pkg: str, dest: Path) -> Path | None:
    for attempt in range(2):
        proc = _sh("apt-get", "download", pkg, cwd=dest)
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[-1]
        if attempt == 0:
            _sh("apt-get", "update", "-qq", timeout=600)
    return None


def _fetch(dest: Path) -> Path:
    if env := os.environ.get("BUILDER_TEST_KERNEL"):
        return Path(env)
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise RuntimeError("apt-get/dpkg-deb not available to fetch a Debian kernel")
    for meta in ("linux-image-cloud-amd64", "linux-image-amd64"):
        pkg = _kernel_package(meta)
        if pkg is None:
            continue
        deb = _download(pkg, dest)
        if deb is None:
            continue
        root = dest / "root"
        proc = _sh("dpkg-deb", "-x", str(deb), str(root))
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if proc.returncode == 0 and kernels:
            deb.unlink()
            return kernels[0]
    raise RuntimeError("could not apt-get download a Debian kernel (linux-image-cloud-amd64 / linux-image-amd64)")


def debian_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock Debian vmlinuz (see the module docstring for how it is fetched and verified), under the
    session's pytest temp dir; skips the test when none can be had."""
    global _kernel, _kernel_error
    if _kernel is None and _kernel_error is None:
        try:
            _kernel = _fetch(tmp_path_factory.mktemp("debian-kernel"))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _kernel_error = str(exc)
    if _kernel is None:
        pytest.skip(f"no Debian kernel to boot: {_kernel_error}")
    return _kernel


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` is no longer a live process (gone, or a zombie nobody reaps); True if it is gone."""
    from builder.run import pid_alive

    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


INIT = """#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox insmod /button.ko
/bin/busybox insmod /evdev.ko
echo 'PWRF poweroff' > /etc/acpid.conf
printf '#!/bin/busybox sh\\n/bin/busybox poweroff -f\\n' > /etc/poweroff
/bin/busybox chmod +x /etc/poweroff
/bin/busybox acpid -d -c /etc -a /etc/acpid.conf &
/bin/busybox sleep 2
echo 'builder-test: ready'
exec /bin/busybox sleep 100000
"""


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio 'newc' archive of (name, mode, data) entries."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _module(kernel: Path, name: str) -> bytes:
    root = kernel.parent.parent  # <root>/boot/vmlinuz-* → <root>
    for path in root.glob(f"lib/modules/*/kernel/drivers/*/{name}.ko*"):
        data = path.read_bytes()
        return lzma.decompress(data) if path.suffix == ".xz" else data
    raise RuntimeError(f"kernel module {name} not found under {root}/lib/modules")


def acpi_initrd(tmp_path_factory: pytest.TempPathFactory, kernel: Path) -> Path:
    """An initramfs for ``kernel`` whose init prints 'builder-test: ready' and powers off on the ACPI power
    button (see the module docstring); skips the test when it cannot be built."""
    global _initrd
    if _initrd is not None:
        return _initrd
    dest = tmp_path_factory.mktemp("acpi-initrd")
    deb = _download("busybox-static", dest)
    if deb is None:
        pytest.skip("could not apt-get download busybox-static")
    if _sh("dpkg-deb", "-x", str(deb), str(dest / "bb")).returncode != 0:
        pytest.skip("could not unpack busybox-static")
    try:
        button, evdev = _module(kernel, "button"), _module(kernel, "evdev")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    d, x, f = 0o040755, 0o100755, 0o100644
    entries = [("bin", d, b""), ("dev", d, b""), ("proc", d, b""), ("etc", d, b""),
               ("bin/busybox", x, (dest / "bb/bin/busybox").read_bytes()), ("init", x, INIT.encode()),
               ("button.ko", f, button), ("evdev.ko", f, evdev)]
    path = dest / "initrd.gz"
    path.write_bytes(gzip.compress(_newc(entries)))
    _initrd = path
    return path


def require_libvirt(uri: str) -> ModuleType:
    """libvirt-python, with a libvirtd answering at ``uri``; skips the test without them, fails it in CI (which
    starts libvirtd with scripts/libvirtd.sh and sets BUILDER_TEST_LIBVIRT=1)."""
    unavailable = pytest.fail if os.environ.get("BUILDER_TEST_LIBVIRT") == "1" else pytest.skip
    try:
        import libvirt
    except ImportError:
        unavailable("libvirt-python is not installed (pip install builder[libvirt])")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as exc:
        unavailable(f"no libvirtd at {uri}: {exc}")
    return libvirt


def installer_context(stack: ExitStack, cfg: Any, workdir: Path) -> tuple[Any, Any]:
    """What the pipeline has before the install stage, on ``stack``: a build context with its services
    started (gateway, syslog listener, accelerator) and the installer media (ISO included)."""
    from builder import services
    from builder.context import BuildContext, BuildOptions
    from builder.diagnostics import Diagnostics
    from builder.events import Emitter
    from builder.stages import fetch, media

    diagnostics = stack.enter_context(Diagnostics(workdir))
    ctx = BuildContext(cfg, BuildOptions(workdir / "out", use_cache=False), workdir, Emitter(), stack, diagnostics)
    inputs = fetch.run(ctx)
    ctx = services.start(ctx, inputs)
    assert ctx.services is not None
    return ctx, media.run(ctx, inputs)
