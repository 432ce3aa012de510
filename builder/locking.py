"""The ``lock`` verb: write, refresh and check both locks of an image.

* ``IMAGE.lock.json`` (:mod:`builder.lock`): the installer's inputs;
* ``IMAGE.packages.lock`` (:mod:`builder.pkglock`): every package the image ends up with. ``lock`` writes it
  whatever ``debian.package_lock`` says: that setting decides whether builds use it (``off``: they do not), not
  whether asking for a lock makes one.

``lock`` resolves both from the verified archive; ``lock --from-build DIR`` pins the packages a finished build
installed (exact); ``lock --update`` refreshes the package lock keeping its package set (new versions, new
dependencies); ``lock --check`` reports what upstream has moved and is false when anything did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .archive.cache import ContentCache
from .archive.http import FetchStats
from .config import ImageConfig
from .events import Emitter
from .lock import lock_differences, read_lock, resolve_lock, write_lock
from .pkglock import PackageLock, differences, keep_unchanged, read_package_lock, summary, write_package_lock
from .pkgresolve import (
    coverage_gaps,
    load_universe,
    lock_from_build,
    moved,
    provisioned,
    resolve_package_lock,
)
from .witness import cache_only, find_witnesses, lock_dir, store_files, unwitnessed


@dataclass
class LockReport:
    lines: list[str] = field(default_factory=list)
    changed: bool = False  # --check: something moved


def _make_archive(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, emitter: Emitter):  # type: ignore[no-untyped-def]
    from .stages.fetch import make_archive

    return make_archive(cfg, cache, stats, emitter)


def write_locks(cfg: ImageConfig, *, cache: ContentCache, stats: FetchStats, emitter: Emitter,
                from_build: Path | None = None, update: bool = False) -> LockReport:
    """``lock`` / ``lock --update`` / ``lock --from-build DIR``."""
    out = LockReport()
    if from_build is None:
        main = _make_archive(cfg, cache, stats, emitter)
        lock = resolve_lock(cfg, main, report=emitter.info)
        old_lock = read_lock(cfg.lock_path) if cfg.lock_path.is_file() else None
        diffs = lock_differences(old_lock, lock) if old_lock is not None else ["new"]
        if diffs or old_lock is None or not old_lock.witnessed:
            out.lines += [f"installer: {d}" for d in diffs if d != "new"]
            # the old lock's witnesses: an unchanged pin upstream stopped listing keeps the proof it had
            lock, files = find_witnesses(cfg, main, lock, previous=old_lock, report=emitter.info)
            stored = store_files(cfg.lock_path, files)
            write_lock(lock, cfg.lock_path)
            out.lines.append(f"wrote {cfg.lock_path}" + (f" and {len(stored)} signed indexes in "
                                                        f"{lock_dir(cfg.lock_path).name}/" if stored else ""))
            alone = unwitnessed(lock)
            if alone:
                out.lines.append(f"no signed index this lock could find lists {len(alone)} of its pins; fetch trusts "
                                 f"their recorded sha256 and warns: {', '.join(alone)}")
            out.lines += cache_only(lock)
        else:
            out.lines.append(f"{cfg.lock_path.name}: unchanged")
    out.lines += _package_lock(cfg, cache=cache, stats=stats, emitter=emitter, from_build=from_build, update=update)
    if cfg.debian.package_lock == "off":  # written all the same: asking for a lock is what `lock` is for
        out.lines.append(off_note(cfg))
    return out


def _package_lock(cfg: ImageConfig, *, cache: ContentCache, stats: FetchStats, emitter: Emitter,
                  from_build: Path | None, update: bool) -> list[str]:
    """Write (or leave as it is) ``IMAGE.packages.lock``; what was done, one line each."""
    lines: list[str] = []
    old = read_package_lock(cfg.package_lock_path) if cfg.package_lock_path.is_file() else None
    uni = load_universe(cfg, cache, stats, report=emitter.info)
    if from_build is not None:
        plock = lock_from_build(cfg, uni, from_build, report=emitter.info)
    else:
        keep = old.packages if old is not None and update else ()
        plock = resolve_package_lock(cfg, uni, extra_seeds=[p.name for p in keep], report=emitter.info)
        if old is not None and update:
            plock = _keep_method(plock, old)
    if old is not None:
        lines += [f"packages: {d}" for d in differences(old, plock)]
        plock = keep_unchanged(old, plock)
        if plock is old:
            return [*lines, f"{cfg.package_lock_path.name}: unchanged ({len(old.packages)} packages)"]
    write_package_lock(plock, cfg.package_lock_path)
    s = summary(plock)
    return [*lines, f"wrote {cfg.package_lock_path} ({s['packages']} packages, {s['bytes'] >> 20} MiB, "
            + ", ".join(f"{n} from {suite}" for suite, n in sorted(s["per_suite"].items())) + ")"]


def off_note(cfg: ImageConfig) -> str:
    """What to do with a package lock the image does not use yet (``debian.package_lock: off``)."""
    where = cfg.source.name if cfg.source is not None else "the image definition"
    return (f"debian.package_lock is off: builds do not use {cfg.package_lock_path.name}; to build with it, set "
            f"debian.package_lock: auto (use it when it exists) or required (fail without it) in {where}, or pass "
            "--var debian.package_lock=auto")


def _keep_method(new: PackageLock, old: PackageLock) -> PackageLock:
    """A refreshed from-build lock keeps saying where its package set came from."""
    if old.method != "build":
        return new
    from dataclasses import replace

    return replace(new, method="build", seeds=old.seeds,
                   notes=(*new.notes, "refreshed by `lock --update`: the build's package set, current versions"))


def check_locks(cfg: ImageConfig, *, cache: ContentCache, stats: FetchStats, emitter: Emitter) -> LockReport:
    """``lock --check``: what upstream moved since the locks were made (``changed`` when anything did)."""
    out = LockReport()
    lock = resolve_lock(cfg, _make_archive(cfg, cache, stats, emitter), report=emitter.info)
    diffs = lock_differences(read_lock(cfg.lock_path), lock)
    out.lines += [f"  {d}" for d in diffs]
    out.lines.append(f"{cfg.lock_path.name}: " + ("differs from the archive" if diffs else "up to date"))
    out.changed = bool(diffs)
    # a lock file is checked even while the image does not use it (debian.package_lock: off): it is what turning
    # the lock on would install
    off = " (not in force: debian.package_lock is off)" if cfg.debian.package_lock == "off" else ""
    if not cfg.package_lock_path.is_file():
        out.lines.append(f"{cfg.package_lock_path.name}: none (create it with: python -m builder lock IMAGE.yaml)"
                         + off)
        return out
    plock = read_package_lock(cfg.package_lock_path)
    gaps = coverage_gaps(plock, cfg, provisioned(cfg))  # what fetch would refuse the build for
    out.lines += [f"  lacks: {g}" for g in gaps]
    uni = load_universe(cfg, cache, stats, report=emitter.info)
    found = moved(plock, uni)
    security = [m for m in found if m.security]
    for m in sorted(found, key=lambda m: (not m.security, m.name)):
        out.lines.append(f"  {m.line()}")
    out.lines.append(f"{cfg.package_lock_path.name}: " + (
        f"{len(found)} of {len(plock.packages)} packages moved upstream ({len(security)} security "
        f"update{'' if len(security) == 1 else 's'}); "
        "refresh with: python -m builder lock IMAGE.yaml --update" if found else
        f"none of {len(plock.packages)} packages moved upstream, but it lacks what the build installs (above): "
        "a build under it would be refused; add them with: python -m builder lock IMAGE.yaml --update" if gaps else
        f"up to date ({len(plock.packages)} packages)") + off)
    out.changed = out.changed or bool(found) or bool(gaps)
    return out


