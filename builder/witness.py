"""Pins rooted in signatures: the signed index that listed each pinned installer file, stored with the lock.

When ``lock`` pins a file (the netboot package, the boot loaders, the override udebs, the udeb index itself) it
looks for a signed Release of the suite — the suite, its codename and suite alias, ``-updates``,
``-proposed-updates`` — whose index lists that very file (package, version, sha256, size). The InRelease that
signs it is stored next to the lock (``images/NAME.lock.d/<sha256>.InRelease``, a few hundred KB), and the index
too when it is small (the udeb index, compressed as the mirror serves it); a large index (the main Packages,
~10 MB) stays in the content cache under its sha256, which the lock records, and is fetched by hash when the cache
lost it. The pin's ``witness`` records all of it.

``fetch`` then checks every witnessed pin from the signature, with gpgv against the archive keyring and the
trusted fingerprints, not from the recorded hash alone: the stored InRelease must verify, list the index at its
sha256 and size, and the index must list the pinned file. A pin no signed index the lock could find lists
(neither a current index of those suites nor a stored one of the previous lock; ``witness: null`` in a lock with
``witnessed: true``) rests on the lock's sha256 alone: the build names it in a warning. A lock made before
witnesses were recorded says so too.

A large index is not reduced to the stanzas the lock needs: the InRelease signs the index file's sha256, so any
excerpt of it would no longer be checkable from the signature. Such a pin's proof needs the content cache, or the
mirror while it serves that index by hash; the lock's notes say so, and ``fetch`` says so when neither has it.

Re-locking keeps what was proved: a pin that did not change (same file, same sha256) and that no current index
lists any more keeps the previous lock's witness, once its stored InRelease and index verify again (gpgv, the
index's hash in the InRelease, the file in the index); its files stay in ``NAME.lock.d``. A witness found in a
current index wins. Without this, the pins the witnesses are for — the ones upstream has stopped listing — would
lose their proof on the next ``lock`` that changed anything else.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
import posixpath
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .archive.cache import ContentCache
from .archive.client import Archive
from .archive.packages import iter_stanzas
from .archive.release import Release, parse_release
from .archive.verify import verify_inrelease
from .config import ImageConfig
from .errors import FetchError, OfflineError, VerificationError
from .lock import UDEB_INDEX, FilePin, Lock, UdebOverride, Witness

log = logging.getLogger(__name__)

STORE_LIMIT = 1 << 20  # indexes up to this size are stored next to the lock; larger ones stay in the cache
MAIN_INDEX = "main/binary-{arch}/Packages"
Report = Callable[[str], None]


def lock_dir(lock_path: Path) -> Path:
    """``images/NAME.lock.d`` for ``images/NAME.lock.json``."""
    return lock_path.with_name(lock_path.name.removesuffix(".json") + ".d")


def _decompress(path: str, data: bytes) -> bytes:
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".bz2"):
        return bz2.decompress(data)
    return data


def _lists(index: bytes, package: str, version: str, sha256: str, size: int) -> bool:
    """Whether the (decompressed) index has a stanza for exactly this file."""
    text = index.decode("utf-8", "replace")
    needle = f"\nSHA256: {sha256}"
    at = text.find(needle)
    while at >= 0:
        start = text.rfind("\n\n", 0, at) + 1
        end = text.find("\n\n", at)
        st = next(iter_stanzas(text[start:end if end >= 0 else len(text)]), {})
        if (st.get("Package"), st.get("Version"), st.get("Size")) == (package, version, str(size)):
            return True
        at = text.find(needle, at + 1)
    return False


# ---------------------------------------------------------------------------------------------- lock time


class _Finder:
    def __init__(self, cfg: ImageConfig, main: Archive, report: Report) -> None:
        self.cfg, self.main, self.report = cfg, main, report
        rel = main.release()
        self.codename = rel.codename
        self.suites = list(dict.fromkeys([main.suite, rel.codename, rel.suite, f"{rel.codename}-updates",
                                          f"{rel.codename}-proposed-updates"]))
        self.archives: dict[str, Archive | None] = {}
        self.indexes: dict[tuple[str, str], tuple[Archive, bytes, str, str, int] | None] = {}
        self.files: dict[str, bytes] = {}

    def archive(self, suite: str) -> Archive | None:
        if suite not in self.archives:
            a = self.main if suite == self.main.suite else Archive(
                self.main.mirror, suite, keyring=self.main.keyring, fingerprints=self.main.fingerprints,
                cache=self.main.cache, stats=self.main.stats, on_progress=self.main.on_progress)
            try:
                ok = a.release().codename == self.codename
            except (FetchError, VerificationError) as exc:
                log.debug("witness: dists/%s: %s", suite, exc)
                ok = False
            self.archives[suite] = a if ok else None
        return self.archives[suite]

    def index(self, suite: str, path: str) -> tuple[Archive, bytes, str, str, int] | None:
        """(archive, decompressed index, path as listed, its sha256, size) of an index the suite serves intact."""
        key = (suite, path)
        if key not in self.indexes:
            a = self.archive(suite)
            found = None
            if a is not None:
                try:
                    vi = a.index_file(path)
                    if vi.suite == suite:  # not a fallback suite's copy
                        found = (a, vi.data(), vi.entry.path, vi.entry.sha256, vi.entry.size)
                except (FetchError, VerificationError) as exc:
                    log.debug("witness: dists/%s/%s: %s", suite, path, exc)
            self.indexes[key] = found
        return self.indexes[key]

    def record(self, suite: str, a: Archive, listed: str, sha: str, size: int) -> Witness:
        raw = a.inrelease_raw
        inrelease_sha = hashlib.sha256(raw).hexdigest()
        self.files[f"{inrelease_sha}.InRelease"] = raw
        stored = "cache"
        if size <= STORE_LIMIT:
            blob = a.cache.read(sha, size)
            if blob is not None:
                self.files[f"{sha}.{posixpath.basename(listed)}"] = blob
                stored = "lock.d"
        return Witness(suite, a.release().date, inrelease_sha, listed, sha, size, stored)

    def find(self, pin: FilePin | UdebOverride, index_path: str) -> Witness | None:
        for suite in self.suites:
            idx = self.index(suite, index_path)
            if idx is not None and _lists(idx[1], pin.package, pin.version, pin.sha256, pin.size):
                return self.record(suite, idx[0], idx[2], idx[3], idx[4])
        return None


def find_witnesses(cfg: ImageConfig, main: Archive, lock: Lock, *, previous: Lock | None = None,
                   report: Report | None = None) -> tuple[Lock, dict[str, bytes]]:
    """``lock`` with the witness of every pin (None where no signed index lists it), and the files to store in
    ``NAME.lock.d`` (name → bytes). ``previous`` is the lock being replaced: an unchanged pin no current index
    lists keeps its witness when that still verifies (:func:`_keep_witnesses`)."""
    say = report or (lambda m: log.info("%s", m))
    f = _Finder(cfg, main, say)
    arch = cfg.debian.arch
    main_index, udeb_index = MAIN_INDEX.format(arch=arch), UDEB_INDEX.format(arch=arch)
    netboot = replace(lock.netboot, witness=f.find(lock.netboot, main_index))
    boot = tuple(replace(b, witness=f.find(b, main_index)) for b in lock.boot)
    overrides = tuple(replace(o, witness=f.find(o, udeb_index)) for o in lock.overrides)
    ui = lock.udeb_index
    a = f.archive(ui.release_suite)
    inrelease = ""
    if a is not None:
        ent = a.release().files.get(ui.path)
        if ent is not None and (ent.sha256, ent.size) == (ui.sha256, ui.size):
            inrelease = f.record(ui.release_suite, a, ui.path, ui.sha256, ui.size).inrelease_sha256
    out = replace(lock, netboot=netboot, boot=boot, overrides=overrides,
                  udeb_index=replace(ui, inrelease_sha256=inrelease), witnessed=True)
    if previous is not None and previous.witnessed:
        out = _keep_witnesses(cfg, main, previous, out, f.files, say)
    alone = unwitnessed(out)
    say(f"pins rooted in a signed index: {len(out.pins()) - len(alone)} of {len(out.pins())}"
        + (f"; pinned by the lock's sha256 alone: {', '.join(alone)}" if alone else ""))
    cached = cache_only(out)
    for line in cached:
        say(line)
    notes = [n for n in out.notes if not n.startswith(ALONE_NOTE) and CACHE_NOTE not in n]
    if alone:
        notes.append(f"{ALONE_NOTE}; fetch trusts their recorded sha256 and warns: {', '.join(alone)}")
    return replace(out, notes=(*notes, *cached)), f.files


ALONE_NOTE = "no signed index this lock could find lists these"
CACHE_NOTE = "is kept in the content cache only"


def cache_only(lock: Lock) -> list[str]:
    """One line per witness index kept in the content cache only (over STORE_LIMIT), naming the pins whose
    proof therefore needs that cache or the mirror: a lost cache is otherwise a surprise at the next fetch."""
    by_index: dict[tuple[str, str, str, int], list[str]] = {}
    for _, p in lock.pins():
        w = p.witness
        if w is not None and w.index_stored == "cache":
            by_index.setdefault((w.suite, w.index, w.index_sha256, w.index_size), []).append(f"{p.package} {p.version}")
    return [f"the signed index {index} of dists/{suite} (sha256 {sha[:16]}…, {size} bytes) is too large to store "
            f"with the lock (over {STORE_LIMIT} bytes) and cannot be cut down without breaking its signature: it "
            f"{CACHE_NOTE}, so checking {', '.join(names)} from their signature needs that cache, or the mirror while "
            "it serves that index by hash"
            for (suite, index, sha, size), names in by_index.items()]


def _identity(field: str, pin: FilePin | UdebOverride) -> tuple[str, str, str, str, str, int]:
    """What makes a pin "the same" across locks: which field kind, and the very file (not how it was trusted)."""
    return (field.split("[", 1)[0], pin.package, pin.version, pin.filename, pin.sha256, pin.size)


def _keep_witnesses(cfg: ImageConfig, main: Archive, old: Lock, new: Lock, files: dict[str, bytes],
                    say: Report) -> Lock:
    """``new`` where each unchanged pin without a current witness takes ``old``'s, if the stored InRelease and
    index still verify with the Verifier ``fetch`` uses; the files those witnesses need are added to ``files``,
    so the lock's directory keeps them whatever else changes there. A witness that no longer holds (a stored
    file altered or gone, a key no longer trusted) is dropped and said: the pin then rests on its sha256."""
    earlier = {_identity(f, p): p.witness for f, p in old.pins() if p.witness is not None}
    v = Verifier(cfg, cfg.lock_path, main.cache, main)
    d = lock_dir(cfg.lock_path)

    def keep_files(inrelease_sha256: str, index: str, sha: str, size: int, stored: str) -> None:
        files[f"{inrelease_sha256}.InRelease"] = (d / f"{inrelease_sha256}.InRelease").read_bytes()
        if stored == "lock.d":
            name = f"{sha}.{posixpath.basename(index)}"
            blob = (d / name).read_bytes() if (d / name).is_file() else main.cache.read(sha, size)
            if blob is not None:  # the Verifier just read it (and cached it); None only if the cache vanished
                files[name] = blob

    def keep(field: str, pin: FilePin | UdebOverride) -> Witness | None:
        w = earlier.get(_identity(field, pin)) if pin.witness is None else None
        if w is None:
            return pin.witness
        try:
            v.check(field, replace(pin, witness=w))
        except (VerificationError, FetchError) as exc:
            say(f"{field} ({pin.package} {pin.version}): the previous lock's witness no longer holds, so it rests on "
                f"its sha256 alone: {exc}")
            return None
        keep_files(w.inrelease_sha256, w.index, w.index_sha256, w.index_size, w.index_stored)
        say(f"{field} ({pin.package} {pin.version}): no current signed index lists it; keeps the previous lock's "
            f"witness (dists/{w.suite} of {w.release_date}), verified again")
        return w

    netboot = replace(new.netboot, witness=keep("netboot", new.netboot))
    boot = tuple(replace(b, witness=keep(f"boot[{i}]", b)) for i, b in enumerate(new.boot))
    overrides = tuple(replace(o, witness=keep(f"overrides[{i}]", o)) for i, o in enumerate(new.overrides))
    ui, oi = new.udeb_index, old.udeb_index
    if (not ui.inrelease_sha256 and oi.inrelease_sha256
            and (ui.release_suite, ui.path, ui.sha256, ui.size) == (oi.release_suite, oi.path, oi.sha256, oi.size)):
        try:
            v.check_udeb_index(replace(new, udeb_index=oi))
        except (VerificationError, FetchError) as exc:
            say(f"udeb_index: the previous lock's InRelease for it no longer holds: {exc}")
        else:
            keep_files(oi.inrelease_sha256, ui.path, ui.sha256, ui.size, "lock.d" if ui.size <= STORE_LIMIT else "")
            ui = replace(ui, inrelease_sha256=oi.inrelease_sha256)
    return replace(new, netboot=netboot, boot=boot, overrides=overrides, udeb_index=ui)


def unwitnessed(lock: Lock) -> list[str]:
    """The pins no signed index vouches for (``package version``)."""
    return [f"{p.package} {p.version}" for _, p in lock.pins() if p.witness is None]


def store_files(lock_path: Path, files: dict[str, bytes]) -> list[Path]:
    """Write the witnesses next to the lock (existing files are content-addressed: left as they are)."""
    d = lock_dir(lock_path)
    out = []
    for name, data in sorted(files.items()):
        target = d / name
        if not target.is_file():
            d.mkdir(exist_ok=True)
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            out.append(target)
    return out


# ---------------------------------------------------------------------------------------------- fetch time


class Verifier:
    """Checks pins against their stored witnesses (gpgv once per InRelease, each index read once)."""

    def __init__(self, cfg: ImageConfig, lock_path: Path, cache: ContentCache, main: Archive) -> None:
        self.cfg, self.dir, self.cache, self.main = cfg, lock_dir(lock_path), cache, main
        self._releases: dict[str, Release] = {}
        self._indexes: dict[str, bytes] = {}

    def release(self, inrelease_sha256: str, suite: str, what: str) -> Release:
        if inrelease_sha256 in self._releases:
            return self._releases[inrelease_sha256]
        path = self.dir / f"{inrelease_sha256}.InRelease"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise VerificationError(f"{what}: the signed InRelease that listed it is missing: {path}",
                                    hint="restore it from version control, or re-run: python -m builder lock "
                                         "IMAGE.yaml") from exc
        text = verify_inrelease(raw, self.cfg.debian.keyring, self.cfg.debian.trusted_fingerprints, name=str(path))
        if hashlib.sha256(raw).hexdigest() != inrelease_sha256:
            raise VerificationError(f"{path}: verifies, but is not the InRelease the lock recorded")
        rel = parse_release(text)
        if not rel.matches_suite(suite):
            raise VerificationError(f"{path} is the Release of {rel.suite}/{rel.codename}, not dists/{suite}")
        self._releases[inrelease_sha256] = rel
        return rel

    def index(self, w: Witness, what: str) -> bytes:
        if w.index_sha256 in self._indexes:
            return self._indexes[w.index_sha256]
        blob: bytes | None = None
        stored = self.dir / f"{w.index_sha256}.{posixpath.basename(w.index)}"
        if w.index_stored == "lock.d" and stored.is_file():
            blob = stored.read_bytes()
        if blob is None:
            blob = self.cache.read(w.index_sha256, w.index_size)
        if blob is None and not self.main.offline:
            d = posixpath.dirname(w.index)
            try:  # the mirror keeps superseded indexes by hash for a while
                blob = self.main.get_url(f"dists/{w.suite}/{d}/by-hash/SHA256/{w.index_sha256}", max_size=w.index_size)
            except FetchError as exc:
                log.debug("witness index by hash: %s", exc)
        if blob is None:
            cls = OfflineError if self.main.offline else VerificationError
            served = ("offline, the mirror is not asked" if self.main.offline
                      else "the mirror no longer serves it by hash")
            index = f"{w.index} of dists/{w.suite} (sha256 {w.index_sha256[:16]}…, {w.index_size} bytes)"
            if w.index_stored == "cache":
                raise cls(f"{what}: cannot check it against its signed index: {index} is too large to be stored with "
                          f"the lock, so its proof needs the content cache or the mirror, and neither has it (the "
                          f"cache lost it; {served})",
                          hint="restore the content cache, or fetch online while the mirror still serves that index "
                               "by hash; else re-run: python -m builder lock IMAGE.yaml (the pin then gets a current "
                               "index, or rests on its sha256 alone with a warning)")
            raise cls(f"{what}: cannot check it against its signed index: {index} belongs in "
                      f"{stored.parent.name}/{stored.name}, which is missing, and it is not cached ({served})",
                      hint="restore it from version control, or re-run: python -m builder lock IMAGE.yaml")
        if (hashlib.sha256(blob).hexdigest(), len(blob)) != (w.index_sha256, w.index_size):
            raise VerificationError(f"{what}: the stored {w.index} is not the one its InRelease signs")
        self.cache.put(blob, w.index_sha256)
        data = _decompress(w.index, blob)
        self._indexes[w.index_sha256] = data
        return data

    def check(self, field: str, pin: FilePin | UdebOverride) -> None:
        """VerificationError unless the pin's stored signed index lists exactly this file."""
        w = pin.witness
        assert w is not None
        what = f"the lock's {field} ({pin.package} {pin.version})"
        rel = self.release(w.inrelease_sha256, w.suite, what)
        ent = rel.files.get(w.index)
        if ent is None or (ent.sha256, ent.size) != (w.index_sha256, w.index_size):
            raise VerificationError(f"{what}: the signed dists/{w.suite}/InRelease does not list {w.index} at "
                                    f"sha256 {w.index_sha256[:16]}…")
        if not _lists(self.index(w, what), pin.package, pin.version, pin.sha256, pin.size):
            raise VerificationError(f"{what}: its signed index {w.index} of dists/{w.suite} does not list that file")

    def check_udeb_index(self, lock: Lock) -> None:
        ui = lock.udeb_index
        if not ui.inrelease_sha256:
            return
        rel = self.release(ui.inrelease_sha256, ui.release_suite, "the lock's udeb_index")
        ent = rel.files.get(ui.path)
        if ent is None or (ent.sha256, ent.size) != (ui.sha256, ui.size):
            raise VerificationError(f"the lock's udeb_index: the signed dists/{ui.release_suite}/InRelease does not "
                                    f"list {ui.path} at sha256 {ui.sha256[:16]}…")


def verify_lock(cfg: ImageConfig, lock: Lock, cache: ContentCache, main: Archive) -> list[str]:
    """Check every witnessed pin of ``lock`` from its signature; return the warnings (pins resting on the lock's
    sha256 alone). VerificationError when a witness does not hold."""
    if not lock.witnessed:
        return [f"{cfg.lock_path.name} records no signed index for its pins (made before they were stored with the "
                "lock): the pins rest on their sha256 alone; re-run: python -m builder lock IMAGE.yaml"]
    v = Verifier(cfg, cfg.lock_path, cache, main)
    v.check_udeb_index(lock)
    for field, pin in lock.pins():
        if pin.witness is not None:
            v.check(field, pin)
    alone = unwitnessed(lock)
    if not alone:
        return []
    return [f"{len(alone)} installer files are pinned by the lock's sha256 alone (no signed index the lock could "
            f"find lists them): {', '.join(alone)}"]


def offline_missing(cfg: ImageConfig, lock: Lock, cache: ContentCache) -> list[str]:
    """The witnesses an offline fetch needs that neither the lock's directory nor the cache holds."""
    d = lock_dir(cfg.lock_path)
    out = []
    for _, pin in lock.pins():
        w = pin.witness
        if w is None:
            continue
        if not (d / f"{w.inrelease_sha256}.InRelease").is_file():
            out.append(f"{d.name}/{w.inrelease_sha256}.InRelease")
        stored = d / f"{w.index_sha256}.{posixpath.basename(w.index)}"
        if not stored.is_file() and cache.get(w.index_sha256, w.index_size) is None:
            out.append(f"the signed index {w.index} of dists/{w.suite} (sha256 {w.index_sha256[:16]}…)"
                       + (": too large to store with the lock, it is kept in the content cache only"
                          if w.index_stored == "cache" else f": {d.name}/{stored.name} is missing"))
    return list(dict.fromkeys(out))


__all__ = ["Verifier", "cache_only", "find_witnesses", "lock_dir", "store_files", "unwitnessed", "verify_lock"]
