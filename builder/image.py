"""Disk images with qemu-img: create, overlay, inspect, check and the final compressed convert.

Every failure is an :class:`~builder.errors.ImageError` carrying qemu-img's message. Short commands go through
:func:`builder.run.run`; :func:`convert` streams qemu-img's ``-p`` progress and therefore runs it itself.

The output of :func:`convert` is written to ``<dst>.part`` and renamed into place only when qemu-img
succeeded, so a failed or interrupted convert never leaves a truncated image under the final name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from .errors import ImageError, MissingToolError, ToolError
from .run import Child, run, spawn, tail, which

# GPT partition type GUIDs of the hybrid and uefi layouts (lsblk prints them in lower case)
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_TYPE = "21686148-6449-6e6f-744e-656564454649"

log = logging.getLogger(__name__)

Compression = Literal["zlib", "zstd", "none"]

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _qemu_img() -> str:
    return which("qemu-img", package="qemu-utils")


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return run([_qemu_img(), *argv], stage="image")
    except MissingToolError:
        raise
    except ToolError as exc:
        detail = exc.log_tail[-1] if exc.log_tail else f"exit code {exc.returncode}"
        raise ImageError(f"{what} failed: {detail}", log_tail=exc.log_tail) from exc


def create(path: Path, size: int, *, fmt: str = "qcow2") -> Path:
    """A new empty image of ``size`` bytes (sparse). Overwrites an existing file."""
    path = Path(path)
    if size <= 0:
        raise ImageError(f"cannot create {path}: size must be positive, not {size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["create", "-q", "-f", fmt, os.fspath(path), str(size)], f"creating {path}")
    log.debug("created %s image %s (%d bytes)", fmt, path, size)
    return path


def overlay(base: Path, path: Path) -> Path:
    """A qcow2 image at ``path`` whose backing file is the qcow2 ``base`` (absolute path recorded, so the
    overlay works from any directory). Writes go to the overlay; ``base`` stays untouched."""
    base, path = Path(base).absolute(), Path(path)
    if not base.is_file():
        raise ImageError(f"cannot create overlay {path}: backing image {base} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", os.fspath(base), os.fspath(path)],
         f"creating overlay {path} on {base}")
    log.debug("created overlay %s on %s", path, base)
    return path


def rebase_unsafe(path: Path, backing: Path | str, fmt: str = "qcow2") -> Path:
    """Point the qcow2 ``path`` at another backing file (``qemu-img rebase -u``: the header only, nothing is
    copied, the new backing file need not exist here: a remote libvirt host's volume path)."""
    path = Path(path)
    _run(["rebase", "-u", "-F", fmt, "-b", os.fspath(backing), os.fspath(path)],
         f"rebasing {path} onto {backing}")
    return path


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` (with ``--force-share``, so it works while a VM uses the image)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} does not exist")
    proc = _run(["info", "--force-share", "--output=json", os.fspath(path)], f"reading {path}")
    return _json(proc.stdout, f"qemu-img info {path}")


def check(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json``. Leaked clusters (exit code 3) are only logged; corruptions (exit
    code 2) and a failed check (exit code 1) raise ImageError."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} does not exist")
    argv = [_qemu_img(), "check", "--output=json", os.fspath(path)]
    proc = run(argv, check=False, stage="image")
    if proc.returncode not in (0, 2, 3):
        raise ImageError(f"checking {path} failed (exit code {proc.returncode})",
                         log_tail=tail(proc.stderr) or tail(proc.stdout))
    result = _json(proc.stdout, f"qemu-img check {path}")
    if proc.returncode == 2:
        raise ImageError(f"image {path} is corrupt: {result.get('corruptions', '?')} corruptions",
                         log_tail=tail(proc.stdout))
    if proc.returncode == 3:
        log.warning("image %s has %s leaked clusters (harmless; a convert drops them)", path, result.get("leaks"))
    return result


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ImageError(f"{what}: output is not JSON: {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise ImageError(f"{what}: unexpected output {data[:200]!r}")
    return value


def convert_argv(src: Path, dst: Path, *, compression: Compression, src_format: str | None = None,
                 binary: str = "qemu-img") -> list[str]:
    """The ``qemu-img convert`` command line (pure). Zero clusters are always dropped."""
    if compression not in ("zlib", "zstd", "none"):
        raise ImageError(f"unknown compression {compression!r} (zlib, zstd or none)")
    argv = [binary, "convert", "-p"]
    if src_format:
        argv += ["-f", src_format]
    argv += ["-O", "qcow2"]
    if compression != "none":
        argv += ["-c", "-o", f"compression_type={compression}"]
    return [*argv, os.fspath(src), os.fspath(dst)]


def parse_progress(chunk: bytes) -> list[float]:
    """The percentages in a piece of ``qemu-img -p`` output, e.g. b'    (12.50/100%)\\r' → [12.5]."""
    return [float(m.group(1)) for m in _PROGRESS_RE.finditer(chunk)]


def convert(
    src: Path,
    dst: Path,
    *,
    compression: Compression,
    on_progress: Callable[[float], None] | None = None,
) -> Path:
    """Convert ``src`` to a qcow2 at ``dst``, compressed with zlib (portable), zstd (needs QEMU >= 5.1 to
    read) or not at all. ``on_progress`` receives percentages (0.0-100.0) as qemu-img reports them, and 100.0
    at the end. The source format is read from the image, never probed from raw data."""
    src, dst = Path(src), Path(dst)
    if src.absolute() == dst.absolute():
        raise ImageError(f"cannot convert {src} onto itself")
    src_format = str(info(src).get("format", "")) or None
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    argv = convert_argv(src, part, compression=compression, src_format=src_format, binary=_qemu_img())
    log.info("converting %s → %s (%s)", src, dst, compression)
    log.debug("run: %s", " ".join(argv))
    with tempfile.TemporaryFile() as err:
        try:
            # unbuffered stdout: read() returns what is there; the child is stopped and reaped however we leave
            with spawn(argv, stdout=subprocess.PIPE, stderr=err, new_session=False, stage="image") as proc:
                last = _stream_progress(proc, on_progress)
                rc = proc.wait()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise
        if rc != 0:
            err.seek(0)
            lines = tail(err.read())
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            detail = lines[-1] if lines else f"exit code {rc}"
            raise ImageError(f"converting {src} to {dst} failed: {detail}", log_tail=lines)
    os.replace(part, dst)
    if on_progress is not None and last != 100.0:
        on_progress(100.0)
    log.info("converted %s: %d bytes", dst, dst.stat().st_size)
    return dst


def _stream_progress(proc: Child, on_progress: Callable[[float], None] | None) -> float:
    """Feed ``on_progress`` from qemu-img's stdout until it closes; the last percentage seen (-1 if none)."""
    assert proc.stdout is not None
    pending = b""
    last = -1.0
    while True:
        chunk = proc.stdout.read(4096)
        if not chunk:
            break
        pending += chunk
        # a progress item ends with '\r' (or '\n'); keep an unfinished one for the next chunk
        cut = max(pending.rfind(b"\r"), pending.rfind(b"\n"))
        if cut < 0:
            continue
        done, pending = pending[: cut + 1], pending[cut + 1 :]
        for pct in parse_progress(done):
            if pct != last:
                last = pct
                if on_progress is not None:
                    on_progress(pct)
    return last
