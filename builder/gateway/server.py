"""The archive gateway: the mirror the installer (and later apt in the guest) talks to.

It listens on 127.0.0.1; QEMU user networking shows it to the guest as 10.0.2.2. Routes, for each upstream
prefix (``/debian`` → the Debian mirror, ``/debian-security`` → the security mirror):

* generated files (the builder-signed installer suite) are served from memory;
* ``dists/<suite>/{InRelease,Release,Release.gpg}`` are passed through unchanged (fetched once per gateway
  and kept for offline rebuilds); an ``InRelease`` that verifies against the archive keyring is remembered,
  and every index it lists is then served by its SHA256 (by-hash upstream, checked, content-cached) — so a
  stale plain path on the mirror cannot reach the installer;
* ``pool/…`` files with a known hash (udebs of the installer suite, lock pins, the package lock's files) are
  served from the content cache, fetched and checked on first use; other pool files are fetched once, stored by
  their SHA256 and served from the cache afterwards (apt in the target verifies them against the signed
  indexes) — unless ``pinned_pool_only`` (a package lock is in force): then they are a 404.

Request paths are decoded once and normalised before anything else: a path with control characters, spaces,
backslashes or non-ASCII (raw or percent-encoded) is a 400; one with a ``.`` or ``..`` segment (however it is
encoded) a 404; what goes upstream is re-encoded from the clean path, so it cannot leave the upstream's tree.
Upstream downloads go through :class:`~builder.archive.http.HttpClient`: retried as the archive client
retries, bounded in size and time (:class:`~builder.archive.http.Limits`), and a body that is short or fails
its size or hash is never stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ..archive.cache import ContentCache, PathMap, atomic_write, sha256_file
from ..archive.http import FetchStats, HttpClient, Limits, NotFound, TooLarge
from ..archive.release import Release, parse_release
from ..archive.verify import verify_inrelease
from ..errors import BuilderError, FetchError, GatewayError, VerificationError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RELEASE_FILES = ("InRelease", "Release", "Release.gpg")
USER_AGENT = "builder-gateway/0.1"
_BAD_CHARS = re.compile(r"[^\x21-\x7e]|\\")  # control characters, space, DEL, non-ASCII, backslash
_SAFE = "/+~:@!$&'()*,;="  # left unencoded in the path sent upstream


class BadRequest(GatewayError):
    """The client's request path is malformed (answered with 400)."""


def clean_path(url_path: str) -> str | None:
    """The request path decoded once and normalised (no leading slash, no empty segments); None when it
    has a ``.`` or ``..`` segment; :class:`BadRequest` for control characters, non-ASCII or bad encoding."""
    raw = url_path.split("?", 1)[0].split("#", 1)[0]
    if _BAD_CHARS.search(raw):
        raise BadRequest(f"bad request path {url_path!r}: control, space or non-ASCII characters")
    try:
        decoded = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"bad request path {url_path!r}: not UTF-8 once decoded") from exc
    if _BAD_CHARS.search(decoded):
        raise BadRequest(f"bad request path {url_path!r}: encodes control, space or non-ASCII characters")
    parts = [p for p in decoded.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts)


@dataclass
class GatewayStats:
    requests: int = 0
    served_bytes: int = 0
    upstream_requests: int = 0
    upstream_bytes: int = 0
    cache_hits: int = 0
    not_found: int = 0
    errors: int = 0
    paths: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "paths"}


@dataclass(frozen=True)
class Pin:
    sha256: str
    size: int
    source: str = ""  # "<prefix>/<path>" to fetch it from when that is not the request path (else "")


class Gateway:
    """``with Gateway(upstreams={...}, cache=...) as gw: gw.port``"""

    def __init__(
        self,
        *,
        upstreams: Mapping[str, str],
        cache: ContentCache,
        keyring: Path,
        fingerprints: tuple[str, ...] | Mapping[str, tuple[str, ...]],
        generated: Mapping[str, bytes] | None = None,
        pins: Mapping[str, Pin] | None = None,
        state_dir: Path | None = None,
        bind: str = "127.0.0.1",
        port: int = 0,
        offline: bool = False,
        timeout: float = 60,
        on_request: Callable[[str, int, int], None] | None = None,
        retries: int = 3,
        backoff: float = 0.3,
        limits: Limits | None = None,
        pinned_pool_only: bool = False,
    ) -> None:
        self.pinned_pool_only = pinned_pool_only  # a package lock is in force: no other pool file is served
        self.upstreams = {k.strip("/"): v.rstrip("/") for k, v in upstreams.items()}
        self.cache = cache
        self.keyring = keyring
        # accepted signers per upstream prefix (a plain tuple applies to every prefix)
        self.fingerprints = (dict(fingerprints) if isinstance(fingerprints, Mapping)
                             else dict.fromkeys(self.upstreams, tuple(fingerprints)))
        self.generated = {k.lstrip("/"): v for k, v in (generated or {}).items()}
        self.pins = {k.lstrip("/"): v for k, v in (pins or {}).items()}
        self.state_dir = state_dir or cache.root.parent / "gateway"
        self.bind, self._port = bind, port
        self.offline = offline
        self.timeout = timeout
        self.on_request = on_request
        self.stats = GatewayStats()
        self.fetch_stats = FetchStats()
        self.http = HttpClient(self.fetch_stats, timeout=timeout, retries=retries, backoff=backoff, limits=limits,
                               user_agent=USER_AGENT)
        self.paths = PathMap(self.state_dir / "paths")
        self._releases: dict[tuple[str, str], Release] = {}
        self._meta: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise GatewayError("gateway not started")
        return int(self._server.server_address[1])

    def url(self, prefix: str, host: str = "127.0.0.1") -> str:
        """The URL of the archive served under ``prefix`` (``debian``, ``debian-security``), as seen from ``host``."""
        return f"http://{host}:{self.port}/{prefix.strip('/')}"

    def guest_host(self, guest_gateway: str = "10.0.2.2") -> str:
        return f"{guest_gateway}:{self.port}"

    def start(self) -> None:
        gw = self

        class Handler(_Handler):
            gateway = gw

        try:
            self._server = ThreadingHTTPServer((self.bind, self._port), Handler)
        except OSError as exc:
            raise GatewayError(f"cannot listen on {self.bind}:{self._port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="gateway", daemon=True)
        self._thread.start()
        (self.state_dir / "dists").mkdir(parents=True, exist_ok=True)
        log.info("archive gateway listening on %s:%d", self.bind, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def add_release(self, prefix: str, suite: str, release: Release) -> None:
        """Register an already verified Release (so its indexes are served by hash)."""
        self._releases[(prefix.strip("/"), suite)] = release

    def verified_releases(self) -> dict[tuple[str, str], Release]:
        """(prefix, suite) → the Release of every InRelease that verified here (or was registered), so far."""
        with self._lock:
            return dict(self._releases)

    def release_files(self) -> dict[str, bytes]:
        """Gateway path (``debian/dists/trixie/InRelease``) → the bytes of every upstream Release file passed on."""
        with self._lock:
            return dict(self._meta)

    def upstream_url(self, gateway_path: str) -> str:
        """Where the gateway fetches ``prefix/path`` from ("" for a prefix it does not serve)."""
        prefix, _, path = gateway_path.strip("/").partition("/")
        return self._upstream_url(prefix, path) if prefix in self.upstreams else ""

    # ------------------------------------------------------------------ resolution
    def resolve(self, url_path: str) -> Path | bytes | None:
        """The content for a request path: bytes, a cache file, or None (404). BadRequest for a malformed path."""
        rel = clean_path(url_path)
        if rel is None:
            return None
        prefix, _, path = rel.partition("/")
        if prefix not in self.upstreams:
            return None
        key = f"{prefix}/{path}"
        if key in self.generated:
            return self.generated[key]
        if path in self.generated and prefix == next(iter(self.upstreams)):
            return self.generated[path]
        if key in self.pins or path in self.pins:
            pin = self.pins.get(key) or self.pins[path]
            src_prefix, _, src_path = pin.source.partition("/") if pin.source else (prefix, "/", path)
            return self._blob(src_prefix, src_path, pin.sha256, pin.size)
        parts = path.split("/")
        if len(parts) >= 3 and parts[0] == "dists":
            suite, sub = parts[1], "/".join(parts[2:])
            if sub in RELEASE_FILES:
                return self._release_file(prefix, suite, sub)
            release = self._releases.get((prefix, suite))
            if release is None:
                self._release_file(prefix, suite, "InRelease", quiet=True)
                release = self._releases.get((prefix, suite))
            if release is not None and sub in release.files:
                return self._index(prefix, suite, sub, release)
            if release is not None and "/by-hash/SHA256/" in sub:
                sha = sub.rsplit("/", 1)[1]
                ent2 = next((e for e in release.files.values() if e.sha256 == sha), None)
                if ent2 is not None:
                    return self._blob(prefix, path, sha, ent2.size)
            return self._passthrough(prefix, path)
        if parts[0] == "pool":
            if self.pinned_pool_only:
                log.info("gateway: 404 %s: not pinned by the package lock", key)
                return None
            return self._pool(prefix, path)
        return None

    def _index(self, prefix: str, suite: str, sub: str, release: Release) -> Path | bytes | None:
        """A file a verified Release lists: the copy matching that Release; else the copy another verified
        Release of the same codename (the ``stable`` alias on a skewed mirror) vouches for; else, with a
        warning, the upstream file unchanged — the consumer (apt, debootstrap) verifies it and will refuse a
        mismatch, and d-i's mirror probe only reads a field from it."""
        ent = release.files[sub]
        try:
            return self._blob(prefix, f"dists/{suite}/{sub}", ent.sha256, ent.size, by_hash=release.acquire_by_hash)
        except VerificationError as exc:
            first = exc
        for alias in dict.fromkeys((release.suite, release.codename)):
            if alias == suite or not alias:
                continue
            self._release_file(prefix, alias, "InRelease", quiet=True)
            other = self._releases.get((prefix, alias))
            if other is None or other.codename != release.codename or sub not in other.files:
                continue
            alt = other.files[sub]
            try:
                got = self._blob(prefix, f"dists/{alias}/{sub}", alt.sha256, alt.size, by_hash=other.acquire_by_hash)
            except VerificationError:
                continue
            log.warning("gateway: dists/%s/%s is not served as its Release lists it; serving the copy that "
                        "dists/%s/InRelease (%s) vouches for", suite, sub, alias, other.date)
            return got
        log.warning("gateway: %s; passing dists/%s/%s through unchecked", first, suite, sub)
        return self._passthrough(prefix, f"dists/{suite}/{sub}")

    def _upstream_url(self, prefix: str, path: str) -> str:
        return f"{self.upstreams[prefix]}/{urllib.parse.quote(path, safe=_SAFE)}"

    def _get(self, url: str, *, size: int | None = None) -> bytes | None:
        """GET from upstream into memory (at most ``size``, else the index cap); None on 404/410."""
        with self._upstream(url):
            try:
                return self.http.get(url, max_size=size)
            except NotFound:
                return None

    def _stream(self, url: str, f: BinaryIO, *, size: int | None = None) -> bool:
        """GET from upstream into the file ``f`` (at most ``size``, else the file cap); False on 404/410."""

        def sink(chunk: bytes, _total: int | None) -> None:
            f.write(chunk)

        def reset() -> None:
            f.seek(0)
            f.truncate()

        with self._upstream(url):
            try:
                self.http.stream(url, sink, reset, max_size=size)
            except NotFound:
                return False
        f.flush()
        return True

    @contextlib.contextmanager
    def _upstream(self, url: str) -> Iterator[None]:
        if self.offline:
            raise FetchError(f"offline: not in the cache: {url}")
        try:
            yield
        finally:
            with self._lock:
                self.stats.upstream_requests = self.fetch_stats.requests
                self.stats.upstream_bytes = self.fetch_stats.bytes_fetched

    def _release_file(self, prefix: str, suite: str, name: str, *, quiet: bool = False) -> bytes | None:
        key = f"{prefix}/dists/{suite}/{name}"
        with self._lock:
            if key in self._meta:
                return self._meta[key]
        saved = self.state_dir / "dists" / hashlib.sha256(key.encode()).hexdigest()
        data: bytes | None
        try:
            data = self._get(self._upstream_url(prefix, f"dists/{suite}/{name}"))
        except FetchError:
            if not saved.is_file():
                if quiet:
                    return None
                raise
            log.warning("upstream unreachable, serving the saved %s", key)
            data = saved.read_bytes()
        if data is None:
            return None
        atomic_write(saved, data)
        if name == "InRelease" and (prefix, suite) not in self._releases:
            try:
                text = verify_inrelease(data, self.keyring, self.fingerprints.get(prefix, ()))
                self._releases[(prefix, suite)] = parse_release(text)
            except VerificationError as exc:
                log.warning("%s does not verify (%s); its indexes are passed through unchecked", key, exc)
        with self._lock:
            self._meta[key] = data
        return data

    def _blob(self, prefix: str, path: str, sha256: str, size: int, *, by_hash: bool = False) -> Path | None:
        hit = self.cache.get(sha256, size)
        if hit is not None:
            with self._lock:
                self.stats.cache_hits += 1
            return hit
        with self.cache.locked(sha256):
            hit = self.cache.get(sha256, size)
            if hit is not None:
                return hit
            urls = []
            if by_hash:
                d = path.rsplit("/", 1)[0]
                urls.append(self._upstream_url(prefix, f"{d}/by-hash/SHA256/{sha256}"))
            urls.append(self._upstream_url(prefix, path))
            for url in urls:
                with self.cache.staging(prefix="gw-") as (tmp, f):
                    try:
                        if not self._stream(url, f, size=size):
                            continue
                    except TooLarge:
                        log.warning("%s: larger than the expected %d bytes", url, size)
                        continue
                    f.close()
                    got, n = sha256_file(tmp), tmp.stat().st_size
                    if got != sha256 or n != size:
                        log.warning("%s: %d bytes, sha256 %s; expected %d bytes, sha256 %s", url, n, got, size, sha256)
                        continue
                    return self.cache.put(tmp, sha256)
        raise VerificationError(f"no upstream copy of {prefix}/{path} matches sha256 {sha256}")

    def _pool(self, prefix: str, path: str) -> Path | None:
        url = self._upstream_url(prefix, path)
        known = self.paths.get(url)
        if known is not None:
            hit = self.cache.get(known)
            if hit is not None:
                with self._lock:
                    self.stats.cache_hits += 1
                return hit
        with self.cache.staging(prefix="gw-") as (tmp, f):
            if not self._stream(url, f):
                return None
            f.close()
            sha256 = sha256_file(tmp)
            stored = self.cache.put(tmp, sha256)
        self.paths.put(url, sha256)
        return stored

    def _passthrough(self, prefix: str, path: str) -> bytes | None:
        return self._get(self._upstream_url(prefix, path))


class _Handler(BaseHTTPRequestHandler):
    gateway: Gateway
    protocol_version = "HTTP/1.1"
    server_version = "builder-gateway/0.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("gateway: " + format, *args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        gw = self.gateway
        t0 = time.monotonic()
        with gw._lock:
            gw.stats.requests += 1
        try:
            content = gw.resolve(self.path)
        except BadRequest as exc:
            log.info("gateway: 400 %s", exc)
            self._status(HTTPStatus.BAD_REQUEST, str(exc).encode("ascii", "backslashreplace"))
            return
        except BuilderError as exc:
            log.warning("gateway: %s: %s", self.path, exc)
            with gw._lock:
                gw.stats.errors += 1
            self._status(HTTPStatus.BAD_GATEWAY, str(exc).encode("utf-8", "backslashreplace"))
            return
        except Exception:  # a bug must not kill the server thread silently
            log.exception("gateway: internal error for %s", self.path)
            with gw._lock:
                gw.stats.errors += 1
            self._status(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error")
            return
        if content is None:
            with gw._lock:
                gw.stats.not_found += 1
            log.debug("gateway: 404 %s", self.path)
            self._status(HTTPStatus.NOT_FOUND, b"not found")
            if gw.on_request:
                gw.on_request(self.path, 404, 0)
            return
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not head:
            try:
                if isinstance(content, bytes):
                    self.wfile.write(content)
                else:
                    with open(content, "rb") as f:
                        shutil.copyfileobj(f, self.wfile, CHUNK)
            except (BrokenPipeError, ConnectionResetError):
                return
            with gw._lock:
                gw.stats.served_bytes += size
        if gw.on_request:
            gw.on_request(self.path, 200, size)
        log.debug("gateway: 200 %s %d bytes %.2fs", self.path, size, time.monotonic() - t0)

    def _status(self, code: HTTPStatus, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

