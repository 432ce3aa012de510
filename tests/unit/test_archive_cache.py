"""ContentCache: verified put/get, corruption detection, memoized hashing, the cross-process lock."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from builder.archive import cache as cache_mod
from builder.archive.cache import ContentCache, cache_base
from builder.errors import VerificationError

DATA = b"hello blob\n" * 1000
KEY = hashlib.sha256(DATA).hexdigest()
REPO = Path(__file__).resolve().parents[2]


def test_put_get_roundtrip(tmp_path: Path) -> None:
    c = ContentCache(tmp_path)
    assert c.get(KEY) is None
    p = c.put(DATA, KEY)
    assert p == c.path(KEY) == tmp_path / KEY[:2] / KEY
    assert p.read_bytes() == DATA
    assert c.get(KEY) == p and c.get(KEY, len(DATA)) == p
    assert KEY in c and c.read(KEY) == DATA
    assert not list(p.parent.glob(".*")), "no temp files left behind"


def test_put_rejects_wrong_hash(tmp_path: Path) -> None:
    c = ContentCache(tmp_path)
    with pytest.raises(VerificationError, match="expected"):
        c.put(DATA + b"x", KEY)
    assert c.get(KEY) is None
    assert not c.path(KEY).exists()


def test_put_moves_a_file_in(tmp_path: Path) -> None:
    c = ContentCache(tmp_path / "cache")
    src = tmp_path / "download.part"
    src.write_bytes(DATA)
    p = c.put(src, KEY)
    assert not src.exists() and p.read_bytes() == DATA
    bad = tmp_path / "bad.part"
    bad.write_bytes(b"nope")
    with pytest.raises(VerificationError):
        c.put(bad, KEY)


def test_key_must_be_a_sha256(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ContentCache(tmp_path).path("../../etc/passwd")


def test_corrupted_entry_is_detected_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = ContentCache(tmp_path)
    p = c.put(DATA, KEY)
    before = p.stat().st_mtime_ns
    with open(p, "r+b") as f:  # flip one byte in place, same size
        f.seek(100)
        f.write(b"X")
    if p.stat().st_mtime_ns == before:  # coarse clocks: make sure the file state differs, as a real edit would
        os.utime(p, ns=(before + 1000, before + 1000))
    assert c.get(KEY) is None
    assert not p.exists()
    assert "corrupted" in caplog.text


def test_wrong_size_is_detected_without_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = ContentCache(tmp_path)
    c.put(DATA, KEY)
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: pytest.fail("hashed"))
    assert c.get(KEY, size=len(DATA) + 1) is None
    assert not c.path(KEY).exists()


def test_hash_is_memoized_per_file_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = ContentCache(tmp_path)
    p = c.path(KEY)
    p.parent.mkdir(parents=True)
    p.write_bytes(DATA)  # placed behind the cache's back: must be hashed once
    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda path: calls.append(path) or real(path))
    assert c.get(KEY) == p
    assert ContentCache(tmp_path).get(KEY) == p  # another instance, same process: memo is shared
    assert len(calls) == 1
    os.utime(p, ns=(1, 1))  # file state changed: hash again
    assert c.get(KEY) == p
    assert len(calls) == 2


def test_cache_base_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BUILDER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_base() == tmp_path / "xdg" / "builder"
    assert ContentCache().root == tmp_path / "xdg" / "builder" / "blobs"
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "b"))
    assert ContentCache().root == tmp_path / "b" / "blobs"


def test_staging_file_is_removed_unless_moved(tmp_path: Path) -> None:
    c = ContentCache(tmp_path)
    with c.staging() as (tmp, f):
        f.write(b"partial")
    assert not tmp.exists()
    with c.staging() as (tmp, f):
        f.write(DATA)
        f.close()
        c.put(tmp, KEY)
    assert c.get(KEY) is not None


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from builder.archive.cache import ContentCache
    root, key, counter, go = Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])
    data = b"hello blob\\n" * 1000
    cache = ContentCache(root)
    while not go.exists():          # start both workers at the same moment
        time.sleep(0.005)
    with cache.locked(key):
        path = cache.get(key)
        if path is None:            # "fetch if absent": only one process may get here
            with open(counter, "a") as f:
                f.write("downloaded\\n")
            time.sleep(0.5)         # a slow download: the other process must wait, not download too
            path = cache.put(data, key)
    print(path.read_bytes() == data)
    """
)


@pytest.mark.timeout(60)
def test_lock_two_processes_fetch_once(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    go = tmp_path / "go"
    root = tmp_path / "cache"
    argv = [sys.executable, "-c", WORKER, str(REPO), str(root), KEY, str(counter), str(go)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(0.3)  # let both import and wait at the start line
    go.touch()
    outs = [p.communicate(timeout=50) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
        assert out.strip() == b"True"
    assert counter.read_text().splitlines() == ["downloaded"]
    assert ContentCache(root).read(KEY) == DATA


def test_lock_timeout(tmp_path: Path) -> None:
    from builder.errors import FetchError

    c = ContentCache(tmp_path)
    with c.locked(KEY), pytest.raises(FetchError, match="waiting for the cache lock"), c.locked(KEY, timeout=0.3):
        pass  # flock conflicts between two open files even in one process
