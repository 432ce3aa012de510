"""Plain HTTP(S) for the archive client: urllib only, a User-Agent, timeouts, bounded retries, byte counting.

Retries (with exponential backoff) happen only on connection errors, timeouts, truncated bodies and HTTP 5xx;
never on 4xx. Every byte received is counted in :class:`FetchStats`, whether or not the transfer succeeded.

Every download is bounded (:class:`Limits`): in size (the caller's known size, else a cap) and in time (an
overall deadline on top of the per-read ``timeout``, so a mirror dripping a byte now and then cannot hold a
build forever). Both failures are :class:`FetchError` subclasses naming the URL, and neither is retried.
"""

from __future__ import annotations

import contextlib
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
MiB = 1 << 20
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


@dataclass(frozen=True)
class Limits:
    """Bounds on every download. A body of known size may not exceed that size; one of unknown size may not
    exceed ``max_index_size`` when it is read into memory (InRelease, indexes, pass-through files) or
    ``max_file_size`` when it is streamed to disk (pool files). A download must finish within
    ``deadline(size)`` = max(``min_deadline``, size / ``min_rate``) seconds."""

    max_index_size: int = 256 * MiB
    max_file_size: int = 4096 * MiB
    min_deadline: float = 300.0
    min_rate: float = 1 * MiB  # bytes per second

    def deadline(self, size: int) -> float:
        return max(self.min_deadline, size / self.min_rate)


class TransientError(Exception):
    """A failure worth retrying (the caller's stream broke, the server said 5xx…)."""


class NotFound(FetchError):
    """HTTP 404/410."""


class TooLarge(FetchError):
    """The body is (or announces itself) larger than the download's size bound."""

    def __init__(self, message: str, *, limit: int, **kw: object) -> None:
        self.limit = limit
        super().__init__(message, **kw)  # type: ignore[arg-type]


class DeadlineExceeded(FetchError):
    """The download did not finish within its overall deadline."""


class _Short(TransientError):
    """The connection closed before the announced length arrived (retried)."""


class HttpClient:
    def __init__(
        self,
        stats: FetchStats,
        *,
        timeout: float = 60,
        retries: int = 3,
        backoff: float = 0.3,
        limits: Limits | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.stats = stats
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.limits = limits or Limits()
        self.user_agent = user_agent
        self._opener = urllib.request.build_opener()

    def _request(self, url: str, method: str) -> urllib.request.Request:
        return urllib.request.Request(url, method=method, headers={"User-Agent": self.user_agent})

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
        if isinstance(last, _Short):
            raise FetchError(
                f"short read from the mirror for {url}: {last} (after {self.retries + 1} attempts)",
                hint="the mirror (or a proxy) keeps cutting the transfer short; try again later or another mirror",
            ) from last
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

    def get(
        self, url: str, on_chunk: Callable[[int, int | None], None] | None = None, *, max_size: int | None = None
    ) -> bytes:
        """The whole body of ``url``, in memory (for small files: indexes, InRelease).

        ``max_size`` is the body's known size when the caller knows it (a larger body is refused), else
        ``limits.max_index_size`` applies."""
        bound = self.limits.max_index_size if max_size is None else max_size

        def attempt() -> bytes:
            buf = bytearray()
            for chunk, total in self._chunks(url, bound, known=max_size is not None):
                buf += chunk
                if on_chunk:
                    on_chunk(len(buf), total)
            return bytes(buf)

        return self.retrying(url, attempt)  # type: ignore[no-any-return]

    def stream(
        self,
        url: str,
        sink: Callable[[bytes, int | None], None],
        reset: Callable[[], None],
        *,
        max_size: int | None = None,
    ) -> int:
        """Stream ``url`` into ``sink(chunk, content_length)``; ``reset()`` is called before each retry.

        ``max_size`` as for :meth:`get`, with ``limits.max_file_size`` when the size is not known."""
        bound = self.limits.max_file_size if max_size is None else max_size
        first = True

        def attempt() -> int:
            nonlocal first
            if not first:
                reset()
            first = False
            n = 0
            for chunk, total in self._chunks(url, bound, known=max_size is not None):
                sink(chunk, total)
                n += len(chunk)
            return n

        return self.retrying(url, attempt)  # type: ignore[no-any-return]

    def _chunks(self, url: str, bound: int, *, known: bool) -> Iterator[tuple[bytes, int | None]]:
        """The body in chunks, at most ``bound`` bytes, within the overall deadline."""
        started = time.monotonic()
        what = "the expected size" if known else "the limit for this download"
        try:
            with self._open(url) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > bound:
                    raise TooLarge(f"{url}: the mirror announces {total} bytes, more than {bound} bytes ({what}); "
                                   "refusing it", limit=bound)
                seconds = self.limits.deadline(total if total is not None else bound)
                deadline = started + seconds
                read = getattr(resp, "read1", resp.read)
                got = 0
                while True:
                    _read_timeout(resp, min(self.timeout, max(0.05, deadline - time.monotonic())))
                    try:
                        chunk = read(CHUNK)
                    except http.client.IncompleteRead as exc:
                        got += len(exc.partial)
                        self.stats.add(bytes_fetched=len(exc.partial))
                        raise _Short(f"connection closed after {got} bytes, in the middle of a chunk") from exc
                    except TimeoutError as exc:
                        if time.monotonic() >= deadline:
                            raise self._late(url, got, total, seconds) from exc
                        raise
                    if not chunk:
                        break
                    got += len(chunk)
                    self.stats.add(bytes_fetched=len(chunk))
                    if got > bound:
                        raise TooLarge(f"{url}: more than {bound} bytes ({what}); refusing it", limit=bound)
                    if time.monotonic() > deadline:
                        raise self._late(url, got, total, seconds)
                    yield chunk, total
                if total is not None and got < total:
                    raise _Short(f"connection closed after {got} of {total} bytes")
        finally:
            self.stats.add(seconds=time.monotonic() - started)

    @staticmethod
    def _late(url: str, got: int, total: int | None, seconds: float) -> DeadlineExceeded:
        of = f" of {total}" if total is not None else ""
        return DeadlineExceeded(
            f"{url}: download did not finish within its deadline of {seconds:.{0 if seconds >= 10 else 1}f} s "
            f"({got}{of} bytes received)",
            hint="the mirror is far too slow; try another mirror (debian.mirror)",
        )


def _read_timeout(resp: Any, seconds: float) -> None:
    """Make the next socket read of ``resp`` give up after ``seconds`` (best effort: urllib hides the socket)."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)
