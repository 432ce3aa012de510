"""Helpers for the VM integration tests: a stock Debian kernel to boot, process checks.

The kernel is fetched with ``apt-get download`` of the host's ``linux-image-cloud-amd64`` kernel package
(falling back to ``linux-image-amd64``): apt checks the .deb's SHA256 against the host's Packages index,
which it verified against the archive's signed InRelease at ``apt-get update``. ``dpkg-deb -x`` then unpacks
``/boot/vmlinuz-*``. If apt's lists are stale (the version is gone from the mirror), ``apt-get update`` runs
once and the download is retried. ``BUILDER_TEST_KERNEL=/path/to/vmlinuz`` skips all that.

Test modules import :func:`debian_kernel` and wrap it in a session fixture; the result is memoized per
process, so the download happens once per test run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

_kernel: Path | None = None
_kernel_error: str | None = None


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
    from builder.vm.logs import pid_alive

    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
