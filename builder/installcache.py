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

import hashlib
import json
import logging
import os
import re
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


class InstalledDiskCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_base() / "installed"

    def lookup(self, key: str) -> InstalledDisk | None:
        d = self.root / key
        try:
            meta = json.loads((d / "meta.json").read_text())
            boot = meta.get("direct_boot")
            return InstalledDisk(
                d / "disk.qcow2",
                KeyPair((d / "client_key").read_text(), meta["client_pub"]),
                KeyPair((d / "host_key").read_text(), meta["host_pub"]),
                meta["created"],
                DirectBoot(d / "kernel", d / "initrd", str(boot["append"])) if boot else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def image_of(entry: Path) -> str | None:
        """The image name a cache entry was made for (None when unknown)."""
        try:
            name = json.loads((entry / "meta.json").read_text()).get("image")
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) else None

    def store(self, key: str, disk: Path, client_key: KeyPair, host_key: KeyPair, *,
              direct_boot: DirectBoot | None = None, image: str | None = None) -> Path:
        """Move ``disk`` into the cache (same filesystem: a rename) with its keys (and, for a disk booted
        directly, copies of its kernel and initrd); return the cached path."""
        d = self.root / key
        tmp = self.root / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        client_key.write(tmp, "client_key")
        host_key.write(tmp, "host_key")
        shutil.move(str(disk), tmp / "disk.qcow2")
        (tmp / "disk.qcow2").chmod(0o444)
        meta: dict[str, Any] = {"client_pub": client_key.public_openssh, "host_pub": host_key.public_openssh,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if image is not None:
            meta["image"] = image
        if direct_boot is not None:
            shutil.copyfile(direct_boot.kernel, tmp / "kernel")
            shutil.copyfile(direct_boot.initrd, tmp / "initrd")
            meta["direct_boot"] = {"append": direct_boot.append}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        log.info("installed disk cached as %s", d)
        return d / "disk.qcow2"
