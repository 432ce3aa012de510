"""A verifying client for one Debian suite on one mirror.

Trust chain: ``dists/<suite>/InRelease`` is verified with gpgv against the archive keyring and the trusted
primary fingerprints; indexes are checked against the SHA256 entries of that verified text (and fetched
by-hash when the Release offers it); pool files against the SHA256 of their index stanza. Verified blobs
live in a :class:`ContentCache`, so a second run fetches nothing but InRelease.

Every verified InRelease is kept in the cache too (its bytes by sha256, and which one a URL served last).
``offline=True`` never contacts the mirror: InRelease comes from the cache and is verified with gpgv from those
bytes (an expired one is accepted with a warning: what it vouches for is pinned), indexes and pool files come
from the cache, and anything absent is an :class:`~builder.errors.OfflineError` naming it.
"""

from __future__ import annotations

import bz2
import difflib
import gzip
import hashlib
import logging
import lzma
import posixpath
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FetchError, OfflineError, VerificationError
from .cache import ContentCache, PathMap
from .http import FetchStats, HttpClient, Limits, NotFound, TooLarge
from .packages import parse_packages
from .release import FileEntry, Release, parse_release
from .verify import verify_inrelease

log = logging.getLogger(__name__)

Progress = Callable[[str, int, "int | None"], None]
Decompress = Callable[[bytes], bytes]

# Preferred order of compressed variants of an index, with their decompressors.
_VARIANTS: tuple[tuple[str, Decompress], ...] = (
    (".xz", lzma.decompress),
    (".gz", gzip.decompress),
    (".bz2", bz2.decompress),
    ("", lambda b: b),
)

__all__ = ["Archive", "FetchStats", "VerifiedIndex"]


@dataclass(frozen=True)
class VerifiedIndex:
    """An index blob in the cache and the signed Release entry it was verified against."""

    path: str  # the requested name, e.g. main/binary-amd64/Packages
    entry: FileEntry  # the variant fetched (e.g. main/binary-amd64/Packages.xz) as listed in the Release
    release: Release  # the Release whose signature covers it
    suite: str  # dists/<suite> of that Release (differs from the Archive's suite for a fallback)
    blob: Path  # the compressed blob in the ContentCache
    decompress: Decompress = field(repr=False, compare=False)

    def data(self) -> bytes:
        """The decompressed index."""
        raw = self.blob.read_bytes()
        try:
            return self.decompress(raw)
        except (lzma.LZMAError, OSError, EOFError, zlib.error, ValueError) as exc:
            raise VerificationError(f"{self.entry.path}: verified blob does not decompress: {exc}") from exc


class Archive:
    """One suite (e.g. ``trixie``) of one Debian mirror, verified end to end."""

    def __init__(
        self,
        mirror: str,
        suite: str,
        *,
        keyring: Path,
        fingerprints: Iterable[str],
        cache: ContentCache,
        stats: FetchStats | None = None,
        on_progress: Progress | None = None,
        timeout: float = 60,
        retries: int = 3,
        backoff: float = 0.3,
        fallback_suites: Iterable[str] = (),
        limits: Limits | None = None,
        offline: bool = False,
    ) -> None:
        self.mirror = mirror.rstrip("/")
        self.offline = offline
        self.suite = suite
        self.keyring = Path(keyring)
        self.fingerprints = tuple(fingerprints)
        self.cache = cache
        self.stats = stats if stats is not None else FetchStats()
        self.on_progress = on_progress
        self.http = HttpClient(self.stats, timeout=timeout, retries=retries, backoff=backoff, limits=limits)
        self._lock = threading.RLock()
        self._release: Release | None = None
        self._inrelease_raw: bytes | None = None
        self._inreleases = PathMap(cache.root.parent / "archive" / "inrelease")  # URL -> sha256 of the last one
        self.fallback_suites = tuple(fallback_suites)
        self._fallbacks: dict[str, Archive] = {}
        self._index_memo: dict[str, VerifiedIndex] = {}
        self._packages: dict[tuple[str, bool, str], dict[str, dict[str, str]]] = {}

    def __repr__(self) -> str:
        return f"Archive({self.mirror!r}, {self.suite!r})"

    def url(self, path: str) -> str:
        return f"{self.mirror}/{path.lstrip('/')}"

    # -------------------------------------------------------------------------------------------- Release

    def release(self) -> Release:
        """The verified, parsed ``dists/<suite>/InRelease`` (fetched once per Archive)."""
        with self._lock:
            if self._release is not None:
                return self._release
            path = f"dists/{self.suite}/InRelease"
            url = self.url(path)
            started = time.monotonic()
            raw = self._cached_inrelease(url) if self.offline else self.get_url(path)
            text = verify_inrelease(raw, self.keyring, self.fingerprints, name=url)
            rel = parse_release(text)
            if not rel.matches_suite(self.suite):
                raise VerificationError(
                    f"{url} is signed but describes suite {rel.suite!r} / codename {rel.codename!r}, "
                    f"not {self.suite!r}; refusing it (mirror misconfigured or replaying another suite)"
                )
            if rel.is_expired() and self.offline:
                log.warning("offline: the cached %s expired on %s; using it for what the lock pins", url,
                            rel.valid_until)
            elif rel.is_expired():
                raise VerificationError(
                    f"{url} expired on {rel.valid_until}; the mirror is stale",
                    hint="use an up-to-date mirror (debian.mirror)",
                )
            if not self.offline:
                sha = hashlib.sha256(raw).hexdigest()
                self.cache.put(raw, sha)
                self._inreleases.put(url, sha)
                self._inreleases.put(self._suite_key, sha)
            log.info(
                "verified %s: %s %s (%s), %d files, %.2f s",
                url,
                rel.codename,
                rel.version,
                rel.date,
                len(rel.files),
                time.monotonic() - started,
            )
            self._inrelease_raw = raw
            self._release = rel
            return rel

    @property
    def _suite_key(self) -> str:
        return f"suite:{self.suite}:{','.join(sorted(self.fingerprints))}"

    def _cached_inrelease(self, url: str) -> bytes:
        """The InRelease this URL served last; else the last one of this suite and signers from any mirror (it is
        verified with gpgv all the same, and offline the mirror is not there to tell them apart)."""
        for key in (url, self._suite_key):
            sha = self._inreleases.get(key)
            raw = self.cache.read(sha) if sha else None
            if raw is not None:
                return raw
        raise OfflineError(f"offline: {url} is not in the cache", missing=[url])

    @property
    def inrelease_sha256(self) -> str:
        return hashlib.sha256(self.inrelease_raw).hexdigest()

    @property
    def inrelease_raw(self) -> bytes:
        """The InRelease exactly as the mirror served it (verified), for passing through untouched."""
        self.release()
        assert self._inrelease_raw is not None
        return self._inrelease_raw

    # -------------------------------------------------------------------------------------------- indexes

    def _variants(self, rel: Release, path: str) -> list[tuple[FileEntry, Decompress]]:
        return [(rel.files[path + sfx], dec) for sfx, dec in _VARIANTS if path + sfx in rel.files]

    def _not_listed(self, rel: Release, path: str) -> FetchError:
        directory = posixpath.dirname(path)
        near = sorted(p for p in rel.files if posixpath.dirname(p) == directory)
        if not near:
            near = difflib.get_close_matches(path, list(rel.files), n=8, cutoff=0.6)
        listing = ", ".join(near[:20]) or "nothing similar"
        return FetchError(
            f"{path} is not listed in the {self.suite} Release (nearby: {listing})",
            hint=f"components: {' '.join(rel.components)}; architectures: {' '.join(rel.architectures)}",
        )

    def index_file(self, path: str) -> VerifiedIndex:
        """Fetch (or find in the cache) the best compressed variant of index ``path``, verified; not decompressed.

        Variants are tried in order (.xz, .gz, .bz2, plain), each by-hash first when the Release offers it,
        then by name. If none matches the signed Release and ``fallback_suites`` are set, the same path is tried
        against those suites' InRelease (accepted only when their codename is the same as this suite's).
        """
        rel = self.release()
        with self._lock:
            memo = self._index_memo.get(path)
        if memo is not None:
            blob = self.cache.get(memo.entry.sha256, memo.entry.size)
            if blob is not None:
                self.stats.add(cache_hits=1)
                return memo
        variants = self._variants(rel, path)
        if not variants:
            raise self._not_listed(rel, path)
        failures: list[str] = []
        found = self._try_variants(path, rel, variants, failures)
        if found is None and self.offline:
            raise OfflineError(f"offline: {path} of dists/{self.suite} ({rel.date}) is not in the cache",
                               missing=[f"dists/{self.suite}/{variants[0][0].path}"])
        if found is None:
            found = self._try_fallbacks(path, rel, failures)
        if found is None:
            mismatch = any("does not match" in f for f in failures)
            cls = VerificationError if mismatch else FetchError
            raise cls(
                f"{path}: the mirror serves no copy that matches the signed {self.suite} Release "
                f"({rel.version}, {rel.date}): " + "; ".join(failures),
                hint="the mirror is out of sync (or tampered with); try another mirror or fallback_suites",
            )
        with self._lock:
            self._index_memo[path] = found
        return found

    def _try_variants(
        self, path: str, rel: Release, variants: list[tuple[FileEntry, Decompress]], failures: list[str]
    ) -> VerifiedIndex | None:
        for entry, dec in variants:  # first, anything already cached
            blob = self.cache.get(entry.sha256, entry.size)
            if blob is not None:
                self.stats.add(cache_hits=1)
                log.debug("%s: cache hit (%s)", entry.path, entry.sha256[:12])
                return VerifiedIndex(path, entry, rel, self.suite, blob, dec)
        if self.offline:
            return None
        for entry, dec in variants:
            urls = [f"dists/{self.suite}/{entry.path}"]
            if rel.acquire_by_hash:
                urls.insert(0, f"dists/{self.suite}/{posixpath.dirname(entry.path)}/by-hash/SHA256/{entry.sha256}")
            with self.cache.locked(entry.sha256):
                blob = self.cache.get(entry.sha256, entry.size)
                if blob is not None:
                    self.stats.add(cache_hits=1)
                    return VerifiedIndex(path, entry, rel, self.suite, blob, dec)
                for url_path in urls:
                    problem: str | None
                    try:
                        data = self.get_url(url_path, label=entry.path, max_size=entry.size)
                    except NotFound:
                        failures.append(f"{url_path}: 404")
                        continue
                    except TooLarge:
                        data, problem = b"", f"size does not match the signed size {entry.size}: the mirror sends more"
                    else:
                        problem = _mismatch(data, entry)
                    if problem:
                        failures.append(f"{url_path}: {problem}")
                        log.warning("%s%s: %s", self.url(""), url_path, problem)
                        continue
                    blob = self.cache.put(data, entry.sha256)
                    self.stats.add(files_fetched=1)
                    return VerifiedIndex(path, entry, rel, self.suite, blob, dec)
        return None

    def _try_fallbacks(self, path: str, rel: Release, failures: list[str]) -> VerifiedIndex | None:
        for suite in self.fallback_suites:
            alt = self._fallback_archive(suite)
            try:
                alt_rel = alt.release()
            except (FetchError, VerificationError) as exc:
                failures.append(f"fallback {suite}: {exc}")
                continue
            if alt_rel.codename != rel.codename:
                failures.append(f"fallback {suite}: codename {alt_rel.codename!r} is not {rel.codename!r}")
                continue
            found = alt._try_variants(path, alt_rel, self._variants(alt_rel, path), failures)
            if found is not None:
                log.warning(
                    "%s: the copy matching dists/%s/InRelease (%s, %s) is not served; using the one signed by "
                    "dists/%s/InRelease (%s, %s)",
                    path, self.suite, rel.version, rel.date, suite, alt_rel.version, alt_rel.date,
                )  # fmt: skip
                return found
        return None

    def _fallback_archive(self, suite: str) -> Archive:
        with self._lock:
            alt = self._fallbacks.get(suite)
            if alt is None:
                alt = Archive(
                    self.mirror, suite, keyring=self.keyring, fingerprints=self.fingerprints, cache=self.cache,
                    stats=self.stats, on_progress=self.on_progress, offline=self.offline,
                )  # fmt: skip
                alt.http = self.http
                self._fallbacks[suite] = alt
            return alt

    def index(self, path: str) -> bytes:
        """The decompressed content of the index ``path`` (e.g. ``main/binary-amd64/Packages``), verified."""
        return self.index_file(path).data()

    def packages(self, component: str, *, udeb: bool = False, arch: str = "amd64") -> dict[str, dict[str, str]]:
        """Parsed Packages index: name -> stanza (the highest version when several). Memoized."""
        key = (component, udeb, arch)
        with self._lock:
            if key in self._packages:
                return self._packages[key]
        sub = f"debian-installer/binary-{arch}" if udeb else f"binary-{arch}"
        path = f"{component}/{sub}/Packages"
        data = self.index(path)
        started = time.monotonic()
        parsed = parse_packages(data, source=path)
        log.debug("parsed %s: %d packages in %.2f s", path, len(parsed), time.monotonic() - started)
        with self._lock:
            self._packages[key] = parsed
        return parsed

    # -------------------------------------------------------------------------------------------- pool files

    def fetch(self, filename: str, sha256: str, size: int) -> Path:
        """A pool file (``pool/main/…``), verified by size and sha256, as a path in the cache."""
        sha256 = sha256.lower()
        actual = self.cache.size_conflict(sha256, size)
        if actual is not None:
            raise VerificationError(
                f"{filename}: expected {size} bytes with sha256 {sha256}, but the file with that sha256 has "
                f"{actual} bytes: the expected size is wrong (nothing was downloaded)")
        path = self.cache.get(sha256, size)
        if path is not None:
            self.stats.add(cache_hits=1)
            return path
        with self.cache.locked(sha256):
            path = self.cache.get(sha256, size)
            if path is not None:
                self.stats.add(cache_hits=1)
                return path
            for attempt in (1, 2):
                try:
                    path = self._download(filename, sha256, size)
                    break
                except _Truncated as exc:
                    if attempt == 2:
                        raise VerificationError(
                            f"{self.url(filename)}: got {exc.got} bytes twice, expected {size}; "
                            "the mirror serves a different (truncated) file"
                        ) from None
                    log.warning("%s: short file (%d of %d bytes); downloading it once more", filename, exc.got, size)
            self.stats.add(files_fetched=1)
            assert path is not None
            return path

    def _download(self, filename: str, sha256: str, size: int) -> Path:
        url = self.url(filename)
        if self.offline:
            raise OfflineError(f"offline: {filename} (sha256 {sha256[:16]}…) is not in the cache", missing=[filename])
        name = posixpath.basename(filename)
        with self.cache.staging(prefix=f"{name[:40]}-") as (tmp, f):
            h = hashlib.sha256()
            got = 0

            def sink(chunk: bytes, _total: int | None) -> None:
                nonlocal got
                got += len(chunk)
                if got > size:
                    raise VerificationError(f"{url}: larger than the signed size {size}; refusing it")
                h.update(chunk)
                f.write(chunk)
                if self.on_progress:
                    self.on_progress(name, got, size)

            def reset() -> None:
                nonlocal got, h
                got = 0
                h = hashlib.sha256()
                f.seek(0)
                f.truncate()

            if self.on_progress:
                self.on_progress(name, 0, size)
            try:
                self.http.stream(url, sink, reset, max_size=size)
            except TooLarge as exc:
                raise VerificationError(f"{url}: larger than the signed size {size}; refusing it") from exc
            f.flush()
            if got < size:
                raise _Truncated(got)
            actual = h.hexdigest()
            if actual != sha256:
                raise VerificationError(f"{url}: sha256 {actual} does not match the expected {sha256}")
            f.close()
            return self.cache.put(tmp, sha256)

    def fetch_package(self, stanza: Mapping[str, str]) -> Path:
        """Fetch the pool file of a Packages stanza (uses Filename, SHA256 and Size)."""
        try:
            return self.fetch(stanza["Filename"], stanza["SHA256"], int(stanza["Size"]))
        except KeyError as exc:
            pkg = stanza.get("Package", "?")
            raise VerificationError(f"package stanza {pkg} has no {exc.args[0]} field") from exc
        except ValueError as exc:
            pkg = stanza.get("Package", "?")
            raise VerificationError(f"package stanza {pkg}: bad Size {stanza.get('Size')!r}") from exc

    # -------------------------------------------------------------------------------------------- raw access

    def exists(self, filename: str) -> bool:
        """Whether the mirror serves ``filename`` (HEAD: 200 → True, 404 → False, else FetchError)."""
        self._online(filename)
        return self.http.head(self.url(filename))

    def _online(self, what: str) -> None:
        if self.offline:
            raise OfflineError(f"offline: would have to ask the mirror for {what}", missing=[what])

    def fetch_unpinned(self, filename: str) -> Path:
        """A pool file no signed index lists, streamed to disk (within ``limits.max_file_size``) and stored in
        the cache under the sha256 it has now: the caller pins that hash. Unverified: use it only to pin."""
        self._online(filename)
        url = self.url(filename)
        name = posixpath.basename(filename)
        with self.cache.staging(prefix=f"{name[:40]}-") as (tmp, f):
            h = hashlib.sha256()

            def sink(chunk: bytes, total: int | None) -> None:
                h.update(chunk)
                f.write(chunk)
                if self.on_progress:
                    self.on_progress(name, f.tell(), total)

            def reset() -> None:
                nonlocal h
                h = hashlib.sha256()
                f.seek(0)
                f.truncate()

            self.http.stream(url, sink, reset)
            f.close()
            self.stats.add(files_fetched=1)
            return self.cache.put(tmp, h.hexdigest())

    def get_url(self, url_path: str, *, label: str | None = None, max_size: int | None = None) -> bytes:
        """Raw GET of ``<mirror>/<url_path>`` (unverified: the caller verifies). Counted in stats.

        ``max_size``: the known size (a larger body is a :class:`~.http.TooLarge` error); else the index cap."""
        self._online(url_path)
        name = label or posixpath.basename(url_path)
        cb = None
        if self.on_progress is not None:
            progress = self.on_progress

            def cb(done: int, total: int | None) -> None:
                progress(name, done, total)

        return self.http.get(self.url(url_path), cb, max_size=max_size)


def _mismatch(data: bytes, entry: FileEntry) -> str | None:
    if len(data) != entry.size:
        return f"size {len(data)} does not match the signed size {entry.size}"
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        return f"sha256 {actual} does not match the signed {entry.sha256}"
    return None


class _Truncated(Exception):
    def __init__(self, got: int) -> None:
        super().__init__(got)
        self.got = got
