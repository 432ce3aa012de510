"""The package lock at build time: which lock is in force, every locked file fetched and checked, and the
target's view of the archive made from them (:mod:`builder.gateway.target`).

``fetch`` fetches every locked .deb (from the cache when it has it) before any VM starts, so a file the mirror
no longer serves fails the build at once with every such file named, and an offline build needs nothing the
cache does not hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .archive.cache import ContentCache, atomic_write
from .archive.client import Archive
from .archive.deb import deb_control
from .archive.http import FetchStats, NotFound
from .config import ImageConfig
from .errors import FetchError, LockError, OfflineError, VerificationError
from .events import Emitter
from .gateway.server import Pin
from .gateway.target import SuiteView, target_views, view_pins, view_stanza
from .pkglock import PackageLock, PackagePin, read_package_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetInputs:
    """What the gateway needs to serve the target the locked view: the suites (unsigned) and the pins."""

    lock: PackageLock
    views: list[SuiteView]
    pins: dict[str, Pin]
    fetched: int  # files downloaded now (the rest came from the cache)


def package_lock_in_force(cfg: ImageConfig, emitter: Emitter | None = None) -> PackageLock | None:
    """The package lock the build uses under ``debian.package_lock`` (auto: the file when it exists)."""
    mode, path = cfg.debian.package_lock, cfg.package_lock_path
    if mode == "off":
        return None
    if not path.is_file():
        if mode == "required":
            raise LockError(f"debian.package_lock is required, but there is no {path.name}",
                            hint="create it with: python -m builder lock IMAGE.yaml")
        if emitter is not None:
            emitter.info(f"no package lock {path.name}: the target installs the newest packages of the archive "
                         "(pin them with: python -m builder lock IMAGE.yaml)")
        return None
    lock = read_package_lock(path)
    if lock.suite != cfg.debian.suite or lock.arch != cfg.debian.arch:
        raise LockError(f"{path.name} is for {lock.suite}/{lock.arch}, the image wants {cfg.debian.suite}/"
                        f"{cfg.debian.arch}", hint="run: python -m builder lock IMAGE.yaml")
    return lock


def archives(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, *, offline: bool = False,
             on_progress: Callable[[str, int, int | None], None] | None = None) -> dict[str, Archive]:
    """The Archive of each upstream prefix (only pool files are fetched through them: no Release is needed)."""
    deb = cfg.debian
    return {
        "debian": Archive(deb.mirror, deb.suite, keyring=deb.keyring, fingerprints=deb.trusted_fingerprints,
                          cache=cache, stats=stats, offline=offline, on_progress=on_progress),
        "debian-security": Archive(deb.security_mirror, deb.suite, keyring=deb.keyring,
                                   fingerprints=deb.security_fingerprints, cache=cache, stats=stats, offline=offline,
                                   on_progress=on_progress),
    }


def fetch_packages(lock: PackageLock, arch: dict[str, Archive]) -> tuple[dict[str, Path], int]:
    """Every locked file, fetched or from the cache and checked against its pin. One error names every file
    that is missing (gone from the mirror, or offline not cached). Returns pin key → blob, and how many were
    downloaded."""
    paths: dict[str, Path] = {}
    gone: list[str] = []
    uncached: list[str] = []
    downloaded = 0
    for p in lock.packages:
        a = arch[p.archive]
        before = a.stats.files_fetched
        try:
            paths[p.key] = a.fetch(p.filename, p.sha256, p.size)
        except OfflineError:
            uncached.append(f"{p.name} {p.version} ({p.filename})")
            continue
        except NotFound:
            gone.append(f"{p.name} {p.version}: {a.url(p.filename)} (404)")
            continue
        except VerificationError as exc:
            raise VerificationError(f"the package lock's {p.name} {p.version} does not match: {exc}",
                                    hint="the lock or the mirror changed: python -m builder lock IMAGE.yaml "
                                         "--update") from exc
        except FetchError as exc:
            gone.append(f"{p.name} {p.version}: {exc}")
            continue
        downloaded += a.stats.files_fetched - before
    if uncached:
        raise OfflineError(f"offline: {len(uncached)} locked packages are not in the cache: "
                           + ", ".join(u.split(" (")[0] for u in uncached[:10]) + (" …" if len(uncached) > 10 else ""),
                           missing=uncached, log_tail=uncached)
    if gone:
        raise LockError(f"{len(gone)} files the package lock pins are gone from the mirror: "
                        + ", ".join(g.split(":")[0] for g in gone[:10]) + (" …" if len(gone) > 10 else ""),
                        log_tail=gone, hint="refresh the lock: python -m builder lock IMAGE.yaml --update")
    return paths, downloaded


def control_stanza(cache: ContentCache, pin: PackagePin, deb: Path) -> str:
    """The view's stanza of a locked .deb (its control fields are read once, then remembered by its sha256)."""
    memo = cache.root.parent / "extracted" / "control" / f"{pin.sha256}.json"
    control = None
    try:
        control = json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(control, dict):
        control = deb_control(deb)
        atomic_write(memo, json.dumps(control).encode())
    return view_stanza(control, pin)


def target_inputs(cfg: ImageConfig, lock: PackageLock, cache: ContentCache, stats: FetchStats, emitter: Emitter, *,
                  offline: bool = False) -> TargetInputs:
    """Fetch and check every locked file; the target's view made from them."""
    def progress(label: str, done: int, total: int | None) -> None:
        emitter.progress(label, done, total, unit="bytes")

    paths, downloaded = fetch_packages(lock, archives(cfg, cache, stats, offline=offline, on_progress=progress))
    stanzas = {p.key: control_stanza(cache, p, paths[p.key]) for p in lock.packages}
    views = target_views(lock, stanzas, components=cfg.debian.components)
    pins = {k: Pin(sha, size, src) for k, (sha, size, src) in view_pins(lock).items()}
    total = sum(p.size for p in lock.packages)
    emitter.info(f"package lock {cfg.package_lock_path.name}: {len(lock.packages)} packages ({total >> 20} MiB) "
                 f"verified, {downloaded} downloaded now; the target sees only these")
    return TargetInputs(lock, views, pins, downloaded)


__all__ = ["TargetInputs", "fetch_packages", "package_lock_in_force", "target_inputs"]
