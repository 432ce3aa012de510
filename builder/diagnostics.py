"""The failure bundle: what a user needs to see why a build failed, kept outside the output directory.

When a build fails after a VM has started, the build leaves ``<output dir's parent>/<name>-failed-<UTC time>/``
holding the QEMU command line and its stderr, the serial console logs, the installer's syslog, a screendump of
each VM that was running when the failure happened (PNG, taken before the VM was stopped), the Ansible events,
the last 200 log lines, the manifest so far and the error itself. Secrets (the build's throw-away private keys)
are removed from every text file. The error's hint names the bundle's path; it never points into the work
directory, which is removed (unless ``--on-error=abort`` or ``--keep-workdir`` keeps it).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .redact import redact_private_keys

if TYPE_CHECKING:
    from .errors import BuilderError
    from .vm import Machine

log = logging.getLogger(__name__)

LOG_LINES = 200
# files of the work directory that go into the bundle (globs); text files are redacted
TEXT_GLOBS = ("*.qemu.log", "*.serial.log", "*.syslog", "*.domain.xml", "ansible-events.jsonl", "preseed.cfg",
              "packages.txt")


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8 bit, as QEMU's screendump writes it) as PNG (pure Python: zlib + CRCs)."""
    parts: list[bytes] = []
    pos = 0
    while len(parts) < 4:  # magic, width, height, maxval, separated by whitespace and comments
        while pos < len(ppm) and ppm[pos:pos + 1].isspace():
            pos += 1
        if ppm[pos:pos + 1] == b"#":
            pos = ppm.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(ppm) and not ppm[end:end + 1].isspace():
            end += 1
        parts.append(ppm[pos:end])
        pos = end
    pos += 1  # the single whitespace before the raster
    magic, width, height, maxval = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    if magic != b"P6" or maxval != 255:
        raise ValueError(f"not an 8-bit binary PPM ({magic!r}, maxval {maxval})")
    stride = width * 3
    raster = ppm[pos:pos + stride * height]
    if len(raster) != stride * height:
        raise ValueError("truncated PPM")
    raw = b"".join(b"\0" + raster[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


class _Ring(logging.Handler):
    def __init__(self, n: int) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=n)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.extend(self.format(record).splitlines())


class Diagnostics:
    """Collects what a failure bundle holds while the build runs; :meth:`write` makes the bundle."""

    def __init__(self, workdir: Path, *, log_lines: int = LOG_LINES) -> None:
        self.workdir = Path(workdir)
        self.machines: list[Machine] = []
        self.screendumps: list[Path] = []
        self.notes: list[str] = []
        self._ring = _Ring(log_lines)
        self._logger = logging.getLogger("builder")

    def __enter__(self) -> Diagnostics:
        self._logger.addHandler(self._ring)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._ring)

    @property
    def vm_started(self) -> bool:
        return bool(self.machines)

    def capture(self, vm: Machine) -> None:
        """A PNG screendump of ``vm`` if it still runs (called on a failure, before the VM is stopped)."""
        if not vm.is_running():
            self.notes.append(f"{vm.name}: not running at the failure (no screendump)")
            return
        ppm = self.workdir / "diagnostics" / f"{vm.name}.screen.ppm"
        try:
            vm.screendump(ppm)
            png = ppm.with_suffix("").with_suffix(".png")
            data = ppm.read_bytes()  # PPM from QEMU; a remote libvirt host's screenshot may already be PNG
            png.write_bytes(data if data.startswith(b"\x89PNG") else ppm_to_png(data))
            ppm.unlink()
            self.screendumps.append(png)
        except Exception as exc:  # the failure being reported matters more than its picture
            self.notes.append(f"{vm.name}: no screendump: {exc}")
            log.debug("screendump of %s failed", vm.name, exc_info=True)

    def write(self, dest: Path, error: BuilderError | BaseException, manifest: dict[str, Any]) -> Path:
        """The bundle at ``dest`` (a new directory); returns it."""
        dest.mkdir(parents=True, exist_ok=False)
        for pattern in TEXT_GLOBS:
            for src in sorted(self.workdir.glob(pattern)):
                if src.is_file() and src.stat().st_size > 0:
                    text = src.read_text(errors="replace")
                    (dest / src.name).write_text(redact_private_keys(text))
        ansible = self.workdir / "ansible" / "artifacts"
        for stdout in sorted(ansible.glob("*/stdout")):
            (dest / f"ansible-{stdout.parent.name}.stdout").write_text(
                redact_private_keys(stdout.read_text(errors="replace")))
        for png in self.screendumps:
            if png.is_file():
                shutil.copy2(png, dest / png.name)
        (dest / "build.log").write_text("\n".join(redact_private_keys(ln) for ln in self._ring.lines) + "\n")
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        describe = error.describe() if hasattr(error, "describe") else f"{type(error).__name__}: {error}"
        notes = "".join(f"note: {n}\n" for n in self.notes)
        (dest / "error.txt").write_text(redact_private_keys(describe) + "\n" + notes)
        return dest


def bundle_path(output_dir: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = output_dir.parent / f"{name}-failed-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
