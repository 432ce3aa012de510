"""``Archive(offline=True)`` never contacts the mirror: the InRelease a run verified before comes from the cache and
is verified again with gpgv from those bytes, indexes and pool files come from the cache, and what is not there
is an OfflineError naming it. The mirror of the offline runs is a closed port on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_testlib import SUITE, ArchiveServer, FakeArchive, GpgKey, gpg_key, make_archive, serve

from builder.archive import Archive, ContentCache, FetchStats
from builder.archive.cache import PathMap
from builder.archive.release import Release
from builder.errors import OfflineError, VerificationError

MAIN = "main/binary-amd64/Packages"
CLOSED = "http://127.0.0.1:9/debian"


@pytest.fixture(scope="module")
def key() -> Iterator[GpgKey]:
    with gpg_key("builder offline test key") as k:
        yield k


@pytest.fixture
def fake(tmp_path: Path, key: GpgKey) -> FakeArchive:
    return make_archive(tmp_path / "mirror", key)


@pytest.fixture
def server(fake: FakeArchive) -> Iterator[ArchiveServer]:
    with serve(fake.root) as srv:
        yield srv


def archive(url: str, key: GpgKey, cache: ContentCache, **kw: object) -> Archive:
    return Archive(url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint], cache=cache, retries=0,  # type: ignore[arg-type]
                   timeout=5, **kw)


def fill(server: ArchiveServer, key: GpgKey, fake: FakeArchive, cache: ContentCache) -> None:
    online = archive(server.url, key, cache)
    online.packages("main")
    online.fetch_package(online.packages("main")["hello"])


@pytest.mark.timeout(30)
def test_offline_serves_release_indexes_and_pool_files_from_the_cache(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    cache = ContentCache(tmp_path / "c")
    fill(server, key, fake, cache)
    stats = FetchStats()
    for url in (server.url, CLOSED):  # the same mirror, now unreachable, or another URL: the same cached bytes
        off = archive(url, key, cache, offline=True, stats=stats)
        assert off.release().codename == SUITE
        assert off.inrelease_raw == (fake.dists / "InRelease").read_bytes()
        hello = off.packages("main")["hello"]
        assert off.fetch_package(hello).read_bytes() == fake.pool_data
    assert stats.bytes_fetched == 0 and stats.requests == 0


@pytest.mark.timeout(30)
def test_offline_names_what_is_not_cached(server: ArchiveServer, key: GpgKey, fake: FakeArchive,
                                          tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c")
    with pytest.raises(OfflineError, match=f"offline: {CLOSED}/dists/{SUITE}/InRelease is not in the cache"):
        archive(CLOSED, key, cache, offline=True).release()
    archive(server.url, key, cache).release()  # only the InRelease
    off = archive(CLOSED, key, cache, offline=True)
    with pytest.raises(OfflineError, match=f"offline: {MAIN} of dists/{SUITE} .* is not in the cache") as exc:
        off.index(MAIN)
    assert exc.value.missing == [f"dists/{SUITE}/{MAIN}.xz"]
    with pytest.raises(OfflineError, match=r"pool/x\.deb"):
        off.fetch("pool/x.deb", "0" * 64, 1)
    with pytest.raises(OfflineError):
        off.exists("pool/x.deb")


@pytest.mark.timeout(30)
def test_a_cached_inrelease_altered_by_one_byte_is_refused(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    cache = ContentCache(tmp_path / "c")
    archive(server.url, key, cache).release()
    raw = (fake.dists / "InRelease").read_bytes()
    i = raw.index(b"Codename: ") + len(b"Codename: ")
    bad = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]  # the signed text, one byte off
    sha = hashlib.sha256(bad).hexdigest()
    cache.put(bad, sha)
    PathMap(cache.root.parent / "archive" / "inrelease").put(f"{server.url}/dists/{SUITE}/InRelease", sha)
    with pytest.raises(VerificationError, match="signature verification failed"):
        archive(server.url, key, cache, offline=True).release()


@pytest.mark.timeout(30)
def test_offline_accepts_a_cached_release_that_expired_since_with_a_warning(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.publish(extra_release="Valid-Until: Sat, 01 Jan 2999 00:00:00 UTC")
    cache = ContentCache(tmp_path / "c")
    archive(server.url, key, cache).release()
    monkeypatch.setattr(Release, "is_expired", lambda self, now=None: True)  # time has passed
    with pytest.raises(VerificationError, match="expired"):
        archive(server.url, key, cache).release()  # online: a stale mirror
    with caplog.at_level(logging.WARNING):
        assert archive(CLOSED, key, cache, offline=True).release().codename == SUITE
    assert "offline: the cached" in caplog.text and "expired on Sat, 01 Jan 2999" in caplog.text
