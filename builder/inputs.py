"""Stage 1 (``fetch``): every input of the installer, verified, cached and pinned by the lock.

Result: the netboot kernel and initrd, the boot loader files, and the installer's udeb suite as the builder
decides it (the verified upstream index with the lock's overrides), ready for the gateway and the media.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path

from .archive.cache import ContentCache, atomic_write
from .archive.client import Archive
from .archive.deb import deb_extract
from .archive.http import FetchStats
from .archive.packages import parse_packages
from .config import ImageConfig
from .errors import FetchError, LockError, VerificationError
from .events import Emitter
from .gateway import udeb as udeb_suite
from .gateway.server import Pin
from .installer import netboot
from .lock import UDEB_INDEX, FilePin, Lock, read_lock, resolve_lock

log = logging.getLogger(__name__)

ISOLINUX_BIN = "usr/lib/ISOLINUX/isolinux.bin"
LDLINUX_C32 = "usr/lib/syslinux/modules/bios/ldlinux.c32"


@dataclass(frozen=True)
class InstallerInputs:
    lock: Lock
    kernel: Path
    initrd: Path
    isolinux_bin: bytes
    ldlinux_c32: bytes
    udeb_packages: bytes           # the rewritten debian-installer Packages index
    udeb_pins: dict[str, Pin]      # pool path → pin, for every udeb of the generated suite
    inrelease: bytes               # the suite's InRelease as served (verified)

    @property
    def kernel_abi(self) -> str:
        return self.lock.kernel_abi


def make_archive(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, emitter: Emitter | None = None,
                 suite: str | None = None) -> Archive:
    def progress(label: str, done: int, total: int | None) -> None:
        if emitter is not None:
            emitter.progress(label, done, total, unit="bytes")

    return Archive(cfg.debian.mirror, suite or cfg.debian.suite, keyring=cfg.debian.keyring,
                   fingerprints=cfg.debian.trusted_fingerprints, cache=cache, stats=stats, on_progress=progress)


def load_or_resolve_lock(cfg: ImageConfig, main: Archive, emitter: Emitter) -> Lock:
    if cfg.lock_path.is_file():
        lock = read_lock(cfg.lock_path)
        if lock.suite != cfg.debian.suite or lock.arch != cfg.debian.arch:
            raise LockError(f"{cfg.lock_path} is for {lock.suite}/{lock.arch}, the image wants "
                            f"{cfg.debian.suite}/{cfg.debian.arch}", hint="run: python -m builder lock IMAGE.yaml")
        emitter.info(f"using lock {cfg.lock_path.name} (netboot {lock.netboot.version}, kernel {lock.kernel_abi})")
        return lock
    emitter.warning(f"no lock file {cfg.lock_path.name}: resolving the installer from the live archive "
                    "(run `python -m builder lock` to pin it)")
    return resolve_lock(cfg, main, report=emitter.info)


def _fetch_pin(main: Archive, pin: FilePin) -> Path:
    return main.fetch(pin.filename, pin.sha256, pin.size)


def udeb_index(cfg: ImageConfig, lock: Lock, cache: ContentCache, main: Archive) -> bytes:
    """The pinned debian-installer index: from the cache by its sha256, else from the Release that signed it."""
    pin = lock.udeb_index
    blob = cache.read(pin.sha256, pin.size)
    if blob is None:
        alias = main if pin.release_suite == main.suite else Archive(
            main.mirror, pin.release_suite, keyring=main.keyring, fingerprints=main.fingerprints, cache=cache,
            stats=main.stats, on_progress=main.on_progress)
        rel = alias.release()
        ent = rel.files.get(pin.path)
        if ent is None or ent.sha256 != pin.sha256:
            raise LockError(
                f"the lock pins {pin.path} {pin.sha256[:16]}… from dists/{pin.release_suite}, but that Release now "
                f"lists {ent.sha256[:16] + '…' if ent else 'nothing'} and the pinned copy is not cached",
                hint="the mirror moved on: run python -m builder lock IMAGE.yaml")
        alias.index(pin.path.rsplit(".", 1)[0] if pin.path.endswith((".xz", ".gz")) else pin.path)
        blob = cache.read(pin.sha256, pin.size)
        if blob is None:
            raise VerificationError(f"{pin.path}: the verified index did not land in the cache")
    if pin.path.endswith(".xz"):
        return lzma.decompress(blob)
    if pin.path.endswith(".gz"):
        return gzip.decompress(blob)
    return blob


def fetch_inputs(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, emitter: Emitter, *,
                 all_udebs: bool = False) -> InstallerInputs:
    """Verify and cache everything the installer will read (``all_udebs``: every udeb of the suite too)."""
    main = make_archive(cfg, cache, stats, emitter)
    lock = load_or_resolve_lock(cfg, main, emitter)  # a malformed lock fails here, before any download
    main.release()
    kernel, initrd = _netboot_images(cfg, lock, main, cache)
    abi = netboot.kernel_release(kernel.read_bytes())
    if abi != lock.kernel_abi:
        raise VerificationError(f"netboot {lock.netboot.version} carries kernel {abi}, the lock says {lock.kernel_abi}")
    boot: dict[str, bytes] = {}
    for pin in lock.boot:
        boot.update(deb_extract(_fetch_pin(main, pin), [m for m in (ISOLINUX_BIN, LDLINUX_C32)
                                                        if _owner(m) == pin.package]))
    index = udeb_index(cfg, lock, cache, main)
    packages = udeb_suite.rewrite_index(index, lock.override_fields(), [r.package for r in lock.removed])
    pins = {}
    for name, st in parse_packages(packages, source="installer suite").items():
        pins[f"debian/{st['Filename']}"] = Pin(st["SHA256"], int(st["Size"]))
        mod_abi = netboot.abi_of_module_udeb(name)
        if all_udebs and (mod_abi is None or mod_abi == abi):
            try:
                main.fetch(st["Filename"], st["SHA256"], int(st["Size"]))
            except FetchError as exc:
                emitter.warning(f"udeb {name} not fetched: {exc}")
    emitter.info(f"installer inputs verified: netboot {lock.netboot.version} (kernel {abi}), "
                 f"{len(pins)} udebs in the suite, {len(lock.overrides)} overridden, {len(lock.removed)} removed")
    return InstallerInputs(lock, kernel, initrd, boot[ISOLINUX_BIN], boot[LDLINUX_C32], packages, pins,
                           main.inrelease_raw)


def _netboot_images(cfg: ImageConfig, lock: Lock, main: Archive, cache: ContentCache) -> tuple[Path, Path]:
    """Kernel and initrd of the pinned netboot package, extracted once and then taken from the content cache
    (an index file maps the package's sha256 to theirs)."""
    index = cache.root.parent / "extracted" / f"{lock.netboot.sha256}.json"
    try:
        known = json.loads(index.read_text())
        kernel, initrd = cache.get(known["kernel"]), cache.get(known["initrd"])
        if kernel is not None and initrd is not None:
            return kernel, initrd
    except (OSError, ValueError, KeyError):
        pass
    deb = _fetch_pin(main, lock.netboot)
    members = netboot.image_members(cfg.debian.release, cfg.debian.arch)
    files = deb_extract(deb, [members["kernel"], members["initrd"]])
    shas = {k: hashlib.sha256(files[m]).hexdigest() for k, m in members.items()}
    kernel = cache.put(files[members["kernel"]], shas["kernel"])
    initrd = cache.put(files[members["initrd"]], shas["initrd"])
    atomic_write(index, json.dumps(shas).encode())
    return kernel, initrd


def _owner(member: str) -> str:
    return "isolinux" if member == ISOLINUX_BIN else "syslinux-common"


__all__ = ["UDEB_INDEX", "InstallerInputs", "fetch_inputs"]
