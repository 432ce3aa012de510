"""A content-addressed blob store: every file is stored under its sha256 and checked before it is used.

Layout under the root (default ``$XDG_CACHE_HOME/builder/blobs``, or ``$BUILDER_CACHE_DIR/blobs``)::

    ab/abcdef…          the blob whose sha256 is abcdef…
    locks/abcdef….lock  per-key lock file (fcntl.flock), so parallel builds fetch a blob once
    tmp/                staging files (``<pid>.<host>.<name>``); renamed into place atomically once verified

Blobs are immutable, so the cache is safe to share between builds and processes. A corrupted entry (wrong size
or hash) is detected on :meth:`ContentCache.get`, logged, removed, and reported as absent. Staging files carry
their writer's PID and host, so those of a process that died (SIGKILL, power loss) are removed the next time a
cache is opened on the same host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import FetchError, VerificationError
from ..run import pid_alive

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGING_RE = re.compile(r"(\d+)\.([0-9a-f]{8})\.")  # <pid>.<host>. at the start of a staging file's name

# (path, st_dev, st_ino, st_mtime_ns, st_size) -> sha256 already verified in this process.
_verified: dict[tuple[str, int, int, int, int], str] = {}
_verified_lock = threading.Lock()


def cache_base() -> Path:
    """The builder cache directory: ``$BUILDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/builder``, else ~/.cache/builder."""
    env = os.environ.get("BUILDER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "builder"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_key(sha256: str) -> str:
    key = sha256.lower()
    if not _SHA256_RE.fullmatch(key):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return key


def _memo_key(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    return (str(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ContentCache:
    """Immutable blobs keyed by sha256, verified on the way in and (once per process and file state) on the way out."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_base() / "blobs"
        self.sweep_staging()

    def __repr__(self) -> str:
        return f"ContentCache({str(self.root)!r})"

    # -------------------------------------------------------------------------------------------- paths

    def path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it is present)."""
        key = _check_key(sha256)
        return self.root / key[:2] / key

    @property
    def tmp_dir(self) -> Path:
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _mkstemp(self, prefix: str) -> tuple[int, str]:
        return tempfile.mkstemp(prefix=f"{os.getpid()}.{_HOST}.{prefix}", dir=self.tmp_dir)

    def sweep_staging(self) -> list[Path]:
        """Remove the staging files of writers on this host that are gone; return them."""
        try:
            entries = list(os.scandir(self.root / "tmp"))
        except OSError:
            return []
        removed = []
        for entry in entries:
            m = _STAGING_RE.match(entry.name)
            if m is None or m.group(2) != _HOST or pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        if removed:
            log.info("removed %d partial downloads left by processes that died: %s", len(removed),
                     ", ".join(p.name for p in removed))
        return removed

    @contextlib.contextmanager
    def staging(self, prefix: str = "blob-") -> Iterator[tuple[Path, BinaryIO]]:
        """A temp file on the cache's filesystem, for streaming a download before :meth:`put`.

        Yields (path, binary file object). The file is removed on exit unless it was moved into the cache;
        if the process dies first, the next cache open removes it (its name carries the PID).
        """
        fd, name = self._mkstemp(prefix)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                yield path, f
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -------------------------------------------------------------------------------------------- reads

    def get(self, sha256: str, size: int | None = None) -> Path | None:
        """The path of the blob if it is present and valid, else None (a corrupted entry is removed)."""
        path = self.path(sha256)
        key = path.name
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if size is not None and st.st_size != size:
            self._discard(path, f"size {st.st_size} != expected {size}")
            return None
        memo = _memo_key(path, st)
        with _verified_lock:
            if _verified.get(memo) == key:
                return path
        started = time.monotonic()
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            return None
        if actual != key:
            self._discard(path, f"content hash is {actual}")
            return None
        took = time.monotonic() - started
        if took > 0.2:
            log.debug("verified cached %s (%d bytes) in %.2f s", key[:12], st.st_size, took)
        with _verified_lock:
            _verified[memo] = key
        return path

    def size_conflict(self, sha256: str, size: int) -> int | None:
        """The real size of the intact blob ``sha256`` when it is not ``size`` (so the caller's size is wrong,
        not the blob: it is kept), else None. Hashes the blob only in that case."""
        try:
            actual = self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        if actual == size or self.get(sha256) is None:
            return None
        return actual

    def __contains__(self, sha256: str) -> bool:
        return self.get(sha256) is not None

    def read(self, sha256: str, size: int | None = None) -> bytes | None:
        """The blob's bytes if present and valid."""
        path = self.get(sha256, size)
        return path.read_bytes() if path is not None else None

    def _discard(self, path: Path, why: str) -> None:
        log.warning("cache entry %s is corrupted (%s); removing it", path, why)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with _verified_lock:
            for k in [k for k in _verified if k[0] == str(path)]:
                del _verified[k]

    # -------------------------------------------------------------------------------------------- writes

    def put(self, data: bytes | Path, sha256: str) -> Path:
        """Store ``data`` (bytes, or a file that is moved in) under ``sha256`` after checking its hash.

        Atomic: the blob is written to a temp file in the cache, fsynced, then renamed into place.
        Raises VerificationError when the content does not hash to ``sha256`` (nothing is stored then).
        """
        key = _check_key(sha256)
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, (bytes, bytearray, memoryview)):
            actual = hashlib.sha256(data).hexdigest()
            if actual != key:
                raise VerificationError(f"refusing to cache blob: sha256 is {actual}, expected {key}")
            fd, tmp = self._mkstemp(f"put-{key[:12]}-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        else:
            src = Path(data)
            actual = sha256_file(src)
            if actual != key:
                raise VerificationError(f"refusing to cache {src}: sha256 is {actual}, expected {key}")
            self._move_in(src, dest)
        _fsync_dir(dest.parent)
        st = dest.stat()
        with _verified_lock:
            _verified[_memo_key(dest, st)] = key
        log.debug("cached %s (%d bytes)", key[:12], st.st_size)
        return dest

    def _move_in(self, src: Path, dest: Path) -> None:
        with open(src, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.replace(src, dest)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another filesystem: copy, then rename
                raise
        fd, tmp = self._mkstemp(f"put-{dest.name[:12]}-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        src.unlink()

    # -------------------------------------------------------------------------------------------- locking

    @contextlib.contextmanager
    def locked(self, sha256: str, *, timeout: float | None = None) -> Iterator[None]:
        """Hold an exclusive lock for this key (across processes and threads).

        Use it around "fetch if absent": the first holder downloads, the others wait and then find the blob.
        With ``timeout`` (seconds), give up waiting with a FetchError.
        """
        key = _check_key(sha256)
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock_path = lock_dir / f"{key}.lock"
        with open(lock_path, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process fetching %s", key[:12])
                self._wait_lock(f, lock_path, timeout)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _wait_lock(f: BinaryIO, lock_path: Path, timeout: float | None) -> None:
        if timeout is None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FetchError(
                        f"timed out after {timeout:.0f} s waiting for the cache lock {lock_path}",
                        hint="another builder process is fetching the same file; is it stuck?",
                    ) from None
                time.sleep(0.1)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a small file so readers see the old or the new content, never a part (safe across threads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class PathMap:
    """Remembers which blob a mirror file held when it was fetched without a pinned hash (its full upstream
    URL → sha256), so a second fetch of an immutable pool file is served from the :class:`ContentCache`.
    Keyed by the URL, mirror included: what one mirror served is never handed out for another."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _file(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        try:
            value = self._file(key).read_text().strip().lower()
        except (OSError, UnicodeDecodeError):
            return None
        return value if _SHA256_RE.fullmatch(value) else None

    def put(self, key: str, sha256: str) -> None:
        atomic_write(self._file(key), sha256.encode())
