"""Plain HTTP(S) for the archive client: urllib only, a User-Agent, timeouts, bounded retries, byte counting.

Retries (with exponential backoff) happen only on connection errors, timeouts, truncated bodies and HTTP 5xx;
never on 4xx. Every byte received is counted in :class:`FetchStats`, whether or not the transfer succeeded.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import FetchError

log = logging.getLogger(__name__)

USER_AGENT = "builder/0.1"
CHUNK = 1 << 20
_TRANSIENT = (
    urllib.error.URLError,  # connection refused, DNS, TLS
    http.client.HTTPException,  # IncompleteRead, RemoteDisconnected, BadStatusLine
    ConnectionError,
    socket.timeout,
    TimeoutError,
)


@dataclass
class FetchStats:
    """What the archive client did. ``bytes_fetched`` counts every byte received from upstream."""

    requests: int = 0
    bytes_fetched: int = 0
    cache_hits: int = 0
    files_fetched: int = 0
    retries: int = 0
    not_found: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class TransientError(Exception):
    """A failure worth retrying (the caller's stream broke, the server said 5xx…)."""


class NotFound(FetchError):
    """HTTP 404/410."""


class HttpClient:
    def __init__(
        self,
        stats: FetchStats,
        *,
        timeout: float = 60,
        retries: int = 3,
        backoff: float = 0.3,
    ) -> None:
        self.stats = stats
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._opener = urllib.request.build_opener()

    def _request(self, url: str, method: str) -> urllib.request.Request:
        return urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT})

    def retrying(self, url: str, attempt_fn: Callable[[], Any]) -> Any:
        """Call ``attempt_fn`` until it succeeds, retrying transient errors; map failures to FetchError."""
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * (2 ** (attempt - 1))
                n = self.retries + 1
                log.info("retrying %s in %.1f s (attempt %d of %d): %s", url, delay, attempt + 1, n, last)
                self.stats.add(retries=1)
                time.sleep(delay)
            try:
                return attempt_fn()
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in (404, 410):
                    self.stats.add(not_found=1)
                    raise NotFound(f"not found on the mirror (HTTP {exc.code}): {url}") from exc
                if exc.code < 500:
                    raise FetchError(f"HTTP {exc.code} {exc.reason} from the mirror for {url}") from exc
                last = exc
            except (TransientError, *_TRANSIENT) as exc:
                last = exc
        assert last is not None
        if isinstance(last, urllib.error.HTTPError):
            raise FetchError(
                f"HTTP {last.code} {last.reason} for {url} (after {self.retries + 1} attempts)",
                hint="the mirror is having trouble; try again later",
            ) from last
        reason = getattr(last, "reason", None) or last
        raise FetchError(
            f"mirror unreachable: {url}: {reason} (after {self.retries + 1} attempts)",
            hint="check the network and the mirror in the host's apt sources (or set debian.mirror)",
        ) from last

    @contextmanager
    def _open(self, url: str, method: str = "GET") -> Iterator[http.client.HTTPResponse]:
        self.stats.add(requests=1)
        log.debug("%s %s", method, url)
        with self._opener.open(self._request(url, method), timeout=self.timeout) as resp:
            yield resp

    def head(self, url: str) -> bool:
        """True for 200, False for 404/410; FetchError for anything else."""

        def attempt() -> bool:
            with self._open(url, "HEAD") as resp:
                if resp.status == 200:
                    return True
                raise FetchError(f"unexpected HTTP {resp.status} for HEAD {url}")

        try:
            return bool(self.retrying(url, attempt))
        except NotFound:
            return False

    def get(self, url: str, on_chunk: Callable[[int, int | None], None] | None = None) -> bytes:
        """The whole body of ``url`` (for small files: indexes, InRelease)."""

        def attempt() -> bytes:
            buf = bytearray()
            for chunk, total in self._chunks(url):
                buf += chunk
                if on_chunk:
                    on_chunk(len(buf), total)
            return bytes(buf)

        return self.retrying(url, attempt)  # type: ignore[no-any-return]

    def stream(self, url: str, sink: Callable[[bytes, int | None], None], reset: Callable[[], None]) -> int:
        """Stream ``url`` into ``sink(chunk, content_length)``; ``reset()`` is called before each retry."""
        first = True

        def attempt() -> int:
            nonlocal first
            if not first:
                reset()
            first = False
            n = 0
            for chunk, total in self._chunks(url):
                sink(chunk, total)
                n += len(chunk)
            return n

        return self.retrying(url, attempt)  # type: ignore[no-any-return]

    def _chunks(self, url: str) -> Iterator[tuple[bytes, int | None]]:
        started = time.monotonic()
        try:
            with self._open(url) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                got = 0
                while chunk := resp.read(CHUNK):
                    got += len(chunk)
                    self.stats.add(bytes_fetched=len(chunk))
                    yield chunk, total
                if total is not None and got < total:
                    raise TransientError(f"connection closed after {got} of {total} bytes")
        finally:
            self.stats.add(seconds=time.monotonic() - started)
