"""The archive client's HTTP layer against a hostile mirror: short bodies, lies about Content-Length, oversized
answers, a mirror that drips bytes, redirects to file:, 403/500. Sizes and deadlines are tiny parameters here
so every test finishes in a second or two."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_mirror import Answer, HostileMirror, hostile_mirror

from builder.archive import Archive, ContentCache, FetchStats
from builder.archive.http import DeadlineExceeded, HttpClient, Limits, TooLarge
from builder.errors import FetchError, VerificationError

KiB = 1 << 10
MiB = 1 << 20
POOL = "pool/main/t/tool/tool_1_amd64.deb"


@pytest.fixture()
def mirror() -> Iterator[HostileMirror]:
    with hostile_mirror() as m:
        yield m


def client(stats: FetchStats | None = None, **limits: float) -> HttpClient:
    return HttpClient(stats or FetchStats(), timeout=5, retries=2, backoff=0.01, limits=Limits(**limits))  # type: ignore[arg-type]


def archive(mirror: HostileMirror, tmp_path: Path, **limits: float) -> Archive:
    return Archive(mirror.url("/debian"), "x", keyring=tmp_path / "none.gpg", fingerprints=(),
                   cache=ContentCache(tmp_path / "c"), timeout=5, retries=1, backoff=0.01,
                   limits=Limits(**limits))  # type: ignore[arg-type]


def leftovers(tmp_path: Path) -> list[Path]:
    tmp = tmp_path / "c" / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def test_default_limits() -> None:
    lim = Limits()
    assert lim.max_index_size == 256 * MiB
    assert lim.deadline(1) == 300 and lim.deadline(10 << 30) == 10240  # 1 MiB/s, at least 5 minutes


# ------------------------------------------------------------------------------------------- size


@pytest.mark.timeout(20)
def test_huge_announced_index_is_refused_before_reading(mirror: HostileMirror) -> None:
    mirror.route("/dists/x/InRelease", Answer(size=600 * MiB))
    stats = FetchStats()
    with pytest.raises(TooLarge, match=r"announces 629145600 bytes, more than 65536") as exc:
        client(stats, max_index_size=64 * KiB).get(mirror.url("/dists/x/InRelease"))
    assert mirror.url("/dists/x/InRelease") in str(exc.value)
    assert stats.bytes_fetched == 0 and mirror.hits("/dists/x/InRelease") == 1  # not retried


@pytest.mark.timeout(20)
def test_unannounced_oversized_index_stops_at_the_cap(mirror: HostileMirror) -> None:
    mirror.route("/dists/x/InRelease", Answer(size=32 * MiB, length=-1))  # no Content-Length
    stats = FetchStats()
    with pytest.raises(TooLarge, match="more than 65536 bytes"):
        client(stats, max_index_size=64 * KiB).get(mirror.url("/dists/x/InRelease"))
    assert stats.bytes_fetched <= 64 * KiB + MiB  # the cap plus at most one read, not 32 MiB


@pytest.mark.timeout(20)
def test_known_size_is_the_bound(mirror: HostileMirror) -> None:
    mirror.route("/f", Answer(body=b"x" * 2000, length=-1))
    with pytest.raises(TooLarge, match=r"more than 1000 bytes \(the expected size\)"):
        client().get(mirror.url("/f"), max_size=1000)
    assert client().get(mirror.url("/f"), max_size=2000) == b"x" * 2000


@pytest.mark.timeout(20)
def test_index_larger_than_signed_is_a_mismatch_not_a_download(mirror: HostileMirror, tmp_path: Path) -> None:
    from builder.archive.release import FileEntry, Release

    body = b"P" * 100
    entry = FileEntry("main/binary-amd64/Packages", hashlib.sha256(body).hexdigest(), len(body))
    rel = Release(suite="x", codename="x", version="1", date="d", acquire_by_hash=False, text=b"",
                  architectures=("amd64",), components=("main",), files={entry.path: entry})
    mirror.route("/debian/dists/x/main/binary-amd64/Packages", Answer(size=16 * MiB, length=-1))
    a = archive(mirror, tmp_path)
    failures: list[str] = []
    assert a._try_variants(entry.path, rel, [(entry, lambda b: b)], failures) is None
    assert failures and "does not match the signed size 100" in failures[0]
    assert a.stats.bytes_fetched <= 100 + MiB


@pytest.mark.timeout(20)
def test_pool_file_larger_than_signed_is_refused_and_nothing_left(mirror: HostileMirror, tmp_path: Path) -> None:
    mirror.route("/debian/" + POOL, Answer(size=8 * MiB))
    a = archive(mirror, tmp_path)
    with pytest.raises(VerificationError, match="larger than the signed size 1000"):
        a.fetch(POOL, "0" * 64, 1000)
    assert a.stats.bytes_fetched == 0  # the Content-Length was enough to refuse it
    assert leftovers(tmp_path) == []


@pytest.mark.timeout(20)
def test_unpinned_pool_file_is_streamed_and_capped(mirror: HostileMirror, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    mirror.route("/debian/" + POOL, Answer(body=data, length=-1))
    mirror.route("/debian/pool/big.deb", Answer(size=4 * MiB, length=-1))
    a = archive(mirror, tmp_path, max_file_size=2 * MiB)
    p = a.fetch_unpinned(POOL)
    assert p.name == hashlib.sha256(data).hexdigest() and p.read_bytes() == data
    with pytest.raises(TooLarge, match="more than 2097152 bytes"):
        a.fetch_unpinned("pool/big.deb")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- time


@pytest.mark.timeout(20)
def test_dripping_mirror_hits_the_deadline(mirror: HostileMirror) -> None:
    mirror.route("/dists/x/InRelease", Answer(body=b"-----BEGIN PGP" * 100, drip=0.02))  # 28 s in all
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"did not finish within its deadline of 0.6 s") as exc:
        client(min_deadline=0.6).get(mirror.url("/dists/x/InRelease"))
    assert time.monotonic() - started < 3
    assert mirror.url("/dists/x/InRelease") in str(exc.value)
    assert mirror.hits("/dists/x/InRelease") == 1  # a deadline is not retried


@pytest.mark.timeout(20)
def test_dripping_pool_file_hits_the_deadline_and_leaves_nothing(mirror: HostileMirror, tmp_path: Path) -> None:
    body = b"d" * 400
    mirror.route("/debian/" + POOL, Answer(body=body, drip=0.02))
    a = archive(mirror, tmp_path, min_deadline=0.5, min_rate=MiB)
    with pytest.raises(DeadlineExceeded, match=POOL):
        a.fetch(POOL, hashlib.sha256(body).hexdigest(), len(body))
    assert leftovers(tmp_path) == []


@pytest.mark.timeout(20)
def test_a_stalled_read_ends_at_the_deadline_not_the_read_timeout(mirror: HostileMirror) -> None:
    mirror.route("/slow", Answer(body=b"ab", drip=10))  # nothing at all for 10 s; the read timeout is 5 s
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client(min_deadline=0.5).get(mirror.url("/slow"))
    assert time.monotonic() - started < 2


# ------------------------------------------------------------------------------------------- truncation


@pytest.mark.timeout(20)
def test_content_length_lie_is_a_short_read_retried(mirror: HostileMirror) -> None:
    mirror.route("/f", Answer(body=b"x" * 10, length=1000))
    stats = FetchStats()
    with pytest.raises(FetchError, match=r"short read from the mirror for .*/f: connection closed after 10 of 1000"):
        client(stats).get(mirror.url("/f"))
    assert mirror.hits("/f") == 3 and stats.retries == 2


@pytest.mark.timeout(20)
def test_incomplete_chunked_body_is_a_short_read_retried(mirror: HostileMirror) -> None:
    mirror.route("/f", Answer(body=b"x" * 10, chunked=True), Answer(body=b"ok"))
    assert client().get(mirror.url("/f")) == b"ok"  # retried after the IncompleteRead
    mirror.route("/g", Answer(body=b"x" * 10, chunked=True))
    with pytest.raises(FetchError, match=r"short read .* in the middle of a chunk"):
        client().get(mirror.url("/g"))


@pytest.mark.timeout(20)
def test_truncated_pool_file_is_never_cached(mirror: HostileMirror, tmp_path: Path) -> None:
    data = b"z" * 5000
    mirror.route("/debian/" + POOL, Answer(body=data[:10], length=len(data)))
    a = archive(mirror, tmp_path)
    with pytest.raises(FetchError, match="short read"):
        a.fetch(POOL, hashlib.sha256(data).hexdigest(), len(data))
    with pytest.raises(FetchError, match="short read"):
        a.fetch_unpinned(POOL)
    assert a.cache.get(hashlib.sha256(data[:10]).hexdigest()) is None and leftovers(tmp_path) == []


@pytest.mark.timeout(20)
def test_redirect_to_file_is_refused(mirror: HostileMirror) -> None:
    mirror.route("/r", Answer(302, location="file:///etc/passwd"))
    with pytest.raises(FetchError, match="HTTP 302") as exc:
        client().get(mirror.url("/r"))
    assert "root:" not in str(exc.value)
    mirror.route("/forbidden", Answer(403))
    with pytest.raises(FetchError, match="HTTP 403"):
        client().get(mirror.url("/forbidden"))
    assert mirror.hits("/forbidden") == 1


@pytest.mark.timeout(20)
def test_lock_time_unpinned_fetch_is_keyed_by_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.lock import _fetch_unpinned

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "bc"))
    with hostile_mirror() as a, hostile_mirror() as b:
        a.route("/debian/" + POOL, Answer(body=b"from mirror A"))
        b.route("/debian/" + POOL, Answer(body=b"from mirror B"))
        assert _fetch_unpinned(archive(a, tmp_path), POOL).read_bytes() == b"from mirror A"
        assert _fetch_unpinned(archive(b, tmp_path), POOL).read_bytes() == b"from mirror B"
        assert _fetch_unpinned(archive(a, tmp_path), POOL).read_bytes() == b"from mirror A"
        assert a.hits("/debian/" + POOL) == 1 and b.hits("/debian/" + POOL) == 1
