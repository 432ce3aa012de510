"""A cache of installed disks, keyed by everything that decides what the installer writes.

The unattended install is the slowest stage under TCG (~25 min). Its result depends only on the lock (installer,
udebs), the preseed templates, the image's debian/installer/disk settings and builder's version; when none of
them changed, the next build reuses the installed disk (as a qcow2 backing file, never modified) together with
the SSH keys that install baked in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .archive.cache import cache_base
from .config import ImageConfig
from .lock import Lock
from .ssh import KeyPair

log = logging.getLogger(__name__)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def install_key(cfg: ImageConfig, lock: Lock, template_dir: Path) -> str:
    data = {
        "builder": __version__,
        "lock": json.loads(lock.to_json()) | {"created": None},
        "templates": _tree_digest(template_dir),
        "debian": cfg.debian.model_dump(mode="json", exclude={"mirror", "security_mirror"}),
        "installer": cfg.installer.model_dump(mode="json", exclude={"timeout", "stall_timeout"}),
        "disk": cfg.disk.size,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class InstalledDisk:
    disk: Path
    client_key: KeyPair
    host_key: KeyPair
    created: str


class InstalledDiskCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_base() / "installed"

    def lookup(self, key: str) -> InstalledDisk | None:
        d = self.root / key
        try:
            meta = json.loads((d / "meta.json").read_text())
            return InstalledDisk(
                d / "disk.qcow2",
                KeyPair((d / "client_key").read_text(), meta["client_pub"]),
                KeyPair((d / "host_key").read_text(), meta["host_pub"]),
                meta["created"],
            )
        except (OSError, ValueError, KeyError):
            return None

    def store(self, key: str, disk: Path, client_key: KeyPair, host_key: KeyPair) -> Path:
        """Move ``disk`` into the cache (same filesystem: a rename) with its keys; return the cached path."""
        d = self.root / key
        tmp = self.root / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        client_key.write(tmp, "client_key")
        host_key.write(tmp, "host_key")
        shutil.move(str(disk), tmp / "disk.qcow2")
        (tmp / "disk.qcow2").chmod(0o444)
        meta = {"client_pub": client_key.public_openssh, "host_pub": host_key.public_openssh,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        log.info("installed disk cached as %s", d)
        return d / "disk.qcow2"
