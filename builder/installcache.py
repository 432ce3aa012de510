"""A cache of installed disks, keyed by what the installer is given.

The unattended install is the slowest stage under TCG (~30 min). What it writes depends only on what it is
fed: the rendered preseed, the installer's kernel command line, the lock (netboot build, udebs), the disk and
the firmware. The key is the hash of exactly that, with the build's throw-away SSH keys and the per-build
syslog port masked (they differ in every build and are not part of what the installed system is). When the
key matches, the next build reuses the installed disk (as a qcow2 backing file, never modified) together with
the SSH keys that install baked in. The guest reaches the gateway at a fixed address (builder.vm.guestnet),
so nothing build-specific is in the disk and it is reused as it is.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive.cache import cache_base
from .lock import Lock
from .ssh import KeyPair

log = logging.getLogger(__name__)

KEY_FORMAT = 2  # bump when what the key covers changes meaning


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every line of every secret (keys, as the preseed writes them) replaced by a marker."""
    lines = sorted({ln.strip() for sec in secrets for ln in sec.splitlines() if len(ln.strip()) >= 16},
                   key=len, reverse=True)
    for ln in lines:
        text = text.replace(ln, "<masked>")
    return text


_NOT_FED = ("witness", "witnessed", "inrelease_sha256")  # where a pin is vouched for: not what the installer gets


def _fed(data: Any) -> Any:
    """The lock's JSON without the fields that record which signed index vouched for a pin."""
    if isinstance(data, dict):
        return {k: _fed(v) for k, v in data.items() if k not in _NOT_FED}
    if isinstance(data, list):
        return [_fed(v) for v in data]
    return data


def install_key(*, preseed: str, cmdline: str, lock: Lock, secrets: Iterable[str] = (),
                settings: Mapping[str, Any] | None = None) -> str:
    """The installed-disk cache key: a hash of what the installer is fed (see the module docstring)."""
    data = {
        "format": KEY_FORMAT,
        "preseed": hashlib.sha256(mask_secrets(preseed, secrets).encode()).hexdigest(),
        "cmdline": re.sub(r"\blog_port=\d+", "log_port=*", cmdline),
        "lock": _fed(json.loads(lock.to_json())) | {"created": None},
        "settings": dict(settings or {}),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DirectBoot:
    """Boot a disk's kernel directly (QEMU ``-kernel``/``-initrd``/``-append``) instead of its boot loader: for
    a root file system made without the installer (a disk image from another tool, the tests' small disks)."""

    kernel: Path
    initrd: Path
    append: str


@dataclass(frozen=True)
class InstalledDisk:
    disk: Path
    client_key: KeyPair
    host_key: KeyPair
    created: str
    direct_boot: DirectBoot | None = None
    security_release: str = ""  # the Date of the security suite's Release the install saw ("" unknown)
    package_lock: str = ""  # the digest of the package lock it was installed with ("" none)

    @property
    def entry(self) -> Path:
        return self.disk.parent

    def age(self, now: float | None = None) -> float:
        """Seconds since the install (an unreadable date counts as infinitely old)."""
        return age_of(self.created, now)


def age_of(created: str, now: float | None = None) -> float:
    try:
        t = calendar.timegm(time.strptime(created, TIME_FORMAT))
    except (ValueError, TypeError):
        return float("inf")
    return max(0.0, (time.time() if now is None else now) - t)


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_ENTRY_RE = re.compile(r"([^.]+)(?:\.(\d{8}T\d{6}Z)-(\d+)-[0-9a-f]+)?")


class InstalledDiskCache:
    """Entries ``<root>/<key>.<UTC time>-<pid>-<random>/`` (and ``<root>/<key>/`` of older builders): a new install of a
    key goes to a new entry, so a build using an older one never sees it replaced; old entries go only when no
    live build uses them (:meth:`prune`, ``clean``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_base() / "installed"

    def entries(self, key: str) -> list[InstalledDisk]:
        """Every readable entry of ``key``, newest first."""
        out = []
        try:
            dirs = [d for d in self.root.iterdir() if (m := _ENTRY_RE.fullmatch(d.name)) and m.group(1) == key]
        except OSError:
            return []
        for d in dirs:
            disk = self.read(d)
            if disk is not None:
                out.append(disk)
        return sorted(out, key=lambda e: (e.created, e.entry.name), reverse=True)

    @staticmethod
    def read(d: Path) -> InstalledDisk | None:
        try:
            meta = json.loads((d / "meta.json").read_text())
            boot = meta.get("direct_boot")
            return InstalledDisk(
                d / "disk.qcow2",
                KeyPair((d / "client_key").read_text(), meta["client_pub"]),
                KeyPair((d / "host_key").read_text(), meta["host_pub"]),
                meta["created"],
                DirectBoot(d / "kernel", d / "initrd", str(boot["append"])) if boot else None,
                str(meta.get("security_release", "")), str(meta.get("package_lock", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def lookup(self, key: str, *, max_age: float | None = None, now: float | None = None) -> InstalledDisk | None:
        """The newest entry of ``key`` no older than ``max_age`` seconds (None: any age; 0: none is fresh)."""
        for disk in self.entries(key):
            if max_age is None or (max_age > 0 and disk.age(now) <= max_age):
                return disk
        return None

    def stale(self, key: str, *, max_age: float, now: float | None = None) -> InstalledDisk | None:
        """The newest entry of ``key`` when it is too old to reuse (for the message saying so)."""
        entries = self.entries(key)
        return entries[0] if entries and self.lookup(key, max_age=max_age, now=now) is None else None

    @staticmethod
    def image_of(entry: Path) -> str | None:
        """The image name a cache entry was made for (None when unknown)."""
        try:
            name = json.loads((entry / "meta.json").read_text()).get("image")
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) else None

    def store(self, key: str, disk: Path, client_key: KeyPair, host_key: KeyPair, *,
              direct_boot: DirectBoot | None = None, image: str | None = None, security_release: str = "",
              package_lock: str = "") -> Path:
        """Move ``disk`` into a new entry of the cache (same filesystem: a rename) with its keys (and, for a disk
        booted directly, copies of its kernel and initrd); return the cached path. Entries of the same key that
        are there already are left alone (a running build may use them)."""
        created = time.strftime(TIME_FORMAT, time.gmtime())
        d = self.root / f"{key}.{created.replace('-', '').replace(':', '')}-{os.getpid()}-{secrets.token_hex(3)}"
        tmp = self.root / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        client_key.write(tmp, "client_key")
        host_key.write(tmp, "host_key")
        shutil.move(str(disk), tmp / "disk.qcow2")
        (tmp / "disk.qcow2").chmod(0o444)
        meta: dict[str, Any] = {"client_pub": client_key.public_openssh, "host_pub": host_key.public_openssh,
                                "created": created, "security_release": security_release,
                                "package_lock": package_lock}
        if image is not None:
            meta["image"] = image
        if direct_boot is not None:
            shutil.copyfile(direct_boot.kernel, tmp / "kernel")
            shutil.copyfile(direct_boot.initrd, tmp / "initrd")
            meta["direct_boot"] = {"append": direct_boot.append}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, d)
        log.info("installed disk cached as %s", d)
        return d / "disk.qcow2"

    def prune(self, key: str, *, max_age: float, in_use: Iterable[Path], now: float | None = None) -> list[Path]:
        """Remove the entries of ``key`` too old to reuse that no live build uses; return them."""
        busy = {Path(p) for p in in_use}
        gone = []
        for disk in self.entries(key):
            if disk.age(now) > max_age and disk.entry not in busy:
                shutil.rmtree(disk.entry, ignore_errors=True)
                gone.append(disk.entry)
        return gone


def bases_in_use(work: Path | None = None) -> set[Path]:
    """The cache entries that live builds use (the BASE file of each work directory whose builder still runs)."""
    from .run import pid_alive

    work = work or cache_base() / "work"
    out: set[Path] = set()
    for d in work.glob("*-pid*-*") if work.is_dir() else ():
        m = re.search(r"-pid(\d+)-", d.name)
        if m is None or not pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            out.add(Path((d / "BASE").read_text().strip()).parent)
    return out
