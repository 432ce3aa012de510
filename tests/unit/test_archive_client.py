"""Archive client against a fake signed archive served from 127.0.0.1 (real gpgv, real HTTP, no internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import lzma
import shutil
import time
import types
from pathlib import Path

import pytest
from archive_testlib import SUITE, ArchiveServer, FakeArchive, GpgKey, sha256

from builder.archive import Archive, ContentCache, FetchStats
from builder.archive.cache import PathMap
from builder.archive.release import FileEntry, Release
from builder.errors import FetchError, OfflineError, VerificationError

DI = "main/debian-installer/binary-amd64/Packages"
MAIN = "main/binary-amd64/Packages"


def archive(server: ArchiveServer, key: GpgKey, cache: ContentCache, **kw: object) -> Archive:
    kw.setdefault("backoff", 0.01)
    return Archive(server.url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint], cache=cache, **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_release_and_inrelease_raw(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    a = archive(server, key, ContentCache(tmp_path / "c"))
    rel = a.release()
    assert rel.codename == SUITE and rel.acquire_by_hash
    assert a.inrelease_raw == (fake.dists / "InRelease").read_bytes()
    assert a.release() is rel
    assert server.gets("InRelease") == [f"dists/{SUITE}/InRelease"]  # memoized: one request


@pytest.mark.timeout(30)
def test_release_of_another_suite_is_refused(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    # A correctly signed Release for another codename served under dists/testsuite/ (a replay) is refused.
    signed = key.clearsign(b"Suite: oldstable\nCodename: othersuite\nSHA256:\n")
    (fake.dists / "InRelease").write_bytes(signed)
    with pytest.raises(VerificationError, match="othersuite"):
        archive(server, key, ContentCache(tmp_path / "c")).release()


@pytest.mark.timeout(30)
def test_expired_release_is_refused(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    fake.publish(extra_release="Valid-Until: Sat, 01 Jan 2000 00:00:00 UTC")
    with pytest.raises(VerificationError, match="expired"):
        archive(server, key, ContentCache(tmp_path / "c")).release()


@pytest.mark.timeout(30)
def test_index_by_hash_cold_then_warm(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c")
    stats = FetchStats()
    a = archive(server, key, cache, stats=stats)
    data = a.index(DI)
    assert data.startswith(b"Package: anna")
    xz = fake.files[DI + ".xz"]
    assert server.gets()[-1] == f"dists/{SUITE}/main/debian-installer/binary-amd64/by-hash/SHA256/{sha256(xz)}"
    assert stats.bytes_fetched == len(a.inrelease_raw) + len(xz)
    assert cache.get(sha256(xz)) is not None
    # Warm: a new Archive (as in a second build) fetches only InRelease.
    stats2 = FetchStats()
    b = archive(server, key, cache, stats=stats2)
    assert b.index(DI) == data
    assert stats2.bytes_fetched == len(b.inrelease_raw)
    assert stats2.cache_hits == 1 and stats2.requests == 1


@pytest.mark.timeout(30)
def test_index_prefers_xz_and_falls_back_to_the_name(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    for p in (fake.dists / "main/binary-amd64/by-hash/SHA256").iterdir():
        p.unlink()  # by-hash not served: the plain name (checked against the same hash) is used
    a = archive(server, key, ContentCache(tmp_path / "c"))
    assert b"Package: other" in a.index(MAIN)
    assert a.index_file(MAIN).entry.path == MAIN + ".xz"
    assert server.gets("Packages.xz") == [f"dists/{SUITE}/{MAIN}.xz"]


@pytest.mark.timeout(30)
def test_index_uses_gz_when_xz_is_stale(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    (fake.dists / (MAIN + ".xz")).write_bytes(lzma.compress(b"Package: stale\n"))
    for p in (fake.dists / "main/binary-amd64/by-hash/SHA256").iterdir():
        p.unlink()
    a = archive(server, key, ContentCache(tmp_path / "c"))
    vi = a.index_file(MAIN)
    assert vi.entry.path == MAIN + ".gz" and vi.suite == SUITE
    assert b"Package: hello" in vi.data()


@pytest.mark.timeout(30)
def test_skewed_index_is_a_verification_error(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    # The situation of the real mirror: the signed index is not served, an older one is (by name).
    (fake.dists / (DI + ".xz")).write_bytes(lzma.compress(b"Package: older\n"))
    for p in (fake.dists / "main/debian-installer/binary-amd64/by-hash/SHA256").iterdir():
        p.unlink()
    a = archive(server, key, ContentCache(tmp_path / "c"))
    with pytest.raises(VerificationError) as exc:
        a.index(DI)
    msg = str(exc.value)
    assert "no copy that matches the signed" in msg and "404" in msg and "does not match the signed size" in msg


@pytest.mark.timeout(30)
def test_unknown_index_lists_what_exists(server: ArchiveServer, key: GpgKey, tmp_path: Path) -> None:
    a = archive(server, key, ContentCache(tmp_path / "c"))
    with pytest.raises(FetchError, match=r"main/binary-amd64/Packages\.xz") as exc:
        a.index("main/binary-amd64/Sources")
    assert "not listed" in str(exc.value)


@pytest.mark.timeout(30)
def test_corrupted_cache_entry_is_refetched(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    cache = ContentCache(tmp_path / "c")
    a = archive(server, key, cache)
    good = a.index(MAIN)
    blob = cache.path(sha256(fake.files[MAIN + ".xz"]))
    raw = bytearray(blob.read_bytes())
    raw[10] ^= 0xFF
    blob.write_bytes(bytes(raw))
    n = len(server.gets())
    assert a.index(MAIN) == good
    assert len(server.gets()) == n + 1  # detected, fetched again


@pytest.mark.timeout(30)
def test_release_entry_with_wrong_hash(server: ArchiveServer, key: GpgKey, tmp_path: Path) -> None:
    # Edge case constructed on purpose: a Release whose entry does not match the served file (as if the index
    # had been tampered with after signing). Patched in, because a real signed Release cannot be altered.
    a = archive(server, key, ContentCache(tmp_path / "c"))
    rel = a.release()
    bad = {p: dataclasses.replace(e, sha256="0" * 64) if p.startswith(DI) else e for p, e in rel.files.items()}
    a._release = dataclasses.replace(rel, files=types.MappingProxyType(bad))
    with pytest.raises(VerificationError, match=r"sha256 \w+ does not match"):
        a.index(DI)


@pytest.mark.timeout(30)
def test_packages(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    a = archive(server, key, ContentCache(tmp_path / "c"))
    pk = a.packages("main")
    assert pk["hello"]["Version"] == "1.0"
    assert pk["other"]["Version"] == "2:1.0-1"
    assert a.packages("main") is pk  # memoized
    assert a.packages("main", udeb=True)["anna"]["Version"] == "1.90"


@pytest.mark.timeout(30)
def test_fetch_package_streams_verifies_and_caches(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    progress: list[tuple[str, int, int | None]] = []
    stats = FetchStats()
    a = archive(server, key, ContentCache(tmp_path / "c"), stats=stats, on_progress=lambda *a: progress.append(a))
    stanza = a.packages("main")["hello"]
    before = stats.bytes_fetched
    p = a.fetch_package(stanza)
    assert p.read_bytes() == fake.pool_data
    assert stats.bytes_fetched - before == len(fake.pool_data)
    pool_progress = [x for x in progress if x[0] == "hello_1.0_all.deb"]
    assert pool_progress[-1] == ("hello_1.0_all.deb", len(fake.pool_data), len(fake.pool_data))
    assert len(pool_progress) >= 4  # one call per chunk
    assert a.fetch_package(stanza) == p
    assert stats.cache_hits >= 1 and stats.bytes_fetched - before == len(fake.pool_data)


@pytest.mark.timeout(30)
def test_fetch_wrong_content_is_not_retried(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    cache = ContentCache(tmp_path / "c")
    a = archive(server, key, cache)
    server.override[fake.pool_file] = b"Y" * len(fake.pool_data)
    with pytest.raises(VerificationError, match="sha256"):
        a.fetch(fake.pool_file, sha256(fake.pool_data), len(fake.pool_data))
    assert server.gets(fake.pool_file) == [fake.pool_file]
    assert cache.get(sha256(fake.pool_data)) is None
    assert not list(cache.tmp_dir.iterdir()), "staging file removed"
    server.override[fake.pool_file] = fake.pool_data + b"extra"
    with pytest.raises(VerificationError, match="larger than"):
        a.fetch(fake.pool_file, sha256(fake.pool_data), len(fake.pool_data))


@pytest.mark.timeout(30)
def test_fetch_short_file_is_downloaded_once_more(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    a = archive(server, key, ContentCache(tmp_path / "c"))
    server.override[fake.pool_file] = fake.pool_data[:1000]
    with pytest.raises(VerificationError, match="twice"):
        a.fetch(fake.pool_file, sha256(fake.pool_data), len(fake.pool_data))
    assert len(server.gets(fake.pool_file)) == 2


@pytest.mark.timeout(30)
def test_truncated_transfer_is_retried(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    stats = FetchStats()
    a = archive(server, key, ContentCache(tmp_path / "c"), stats=stats)
    server.override[fake.pool_file] = fake.pool_data[:5000]
    server.claim_length[fake.pool_file] = len(fake.pool_data)  # connection "drops" after 5000 bytes
    with pytest.raises(FetchError, match="after 4 attempts"):
        a.fetch(fake.pool_file, sha256(fake.pool_data), len(fake.pool_data))
    assert stats.retries == 3 and stats.bytes_fetched == 4 * 5000


@pytest.mark.timeout(30)
def test_5xx_is_retried_404_is_not(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    stats = FetchStats()
    a = archive(server, key, ContentCache(tmp_path / "c"), stats=stats)
    server.fail[fake.pool_file] = [503, 502]
    p = a.fetch(fake.pool_file, sha256(fake.pool_data), len(fake.pool_data))
    assert p.read_bytes() == fake.pool_data and stats.retries == 2
    with pytest.raises(FetchError, match="HTTP 404"):
        a.fetch("pool/main/n/nope/nope.deb", "1" * 64, 10)
    assert server.gets("nope.deb") == ["pool/main/n/nope/nope.deb"]
    server.fail["pool/x"] = [500] * 10
    with pytest.raises(FetchError, match="HTTP 500"):
        a.get_url("pool/x")
    server.fail["pool/y"] = [403]
    with pytest.raises(FetchError, match="HTTP 403"):
        a.get_url("pool/y")


@pytest.mark.timeout(30)
def test_exists(server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path) -> None:
    a = archive(server, key, ContentCache(tmp_path / "c"))
    assert a.exists(fake.pool_file) is True
    assert a.exists("pool/main/n/nope/nope.deb") is False
    server.fail["pool/z"] = [401]
    with pytest.raises(FetchError, match="401"):
        a.exists("pool/z")
    assert ("HEAD", fake.pool_file) in server.requests


@pytest.mark.timeout(30)
def test_fallback_suite_with_same_codename(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path
) -> None:
    # dists/stable is an older, validly signed Release of the same codename that matches the served index.
    shutil.copytree(fake.dists, fake.root / "dists/stable", symlinks=True)
    (fake.dists / (DI + ".xz")).write_bytes(lzma.compress(b"Package: skewed\n"))
    fake.files[DI + ".xz"] = lzma.compress(b"Package: newer\n")  # what the new Release will sign...
    fake.publish(serve_plain=False, by_hash=True)
    for p in (fake.dists / "main/debian-installer/binary-amd64/by-hash/SHA256").iterdir():
        if p.read_bytes() == fake.files[DI + ".xz"]:
            p.unlink()  # ...but is not served
    strict = archive(server, key, ContentCache(tmp_path / "c"))
    with pytest.raises(VerificationError):
        strict.index(DI)
    a = archive(server, key, ContentCache(tmp_path / "c"), fallback_suites=["stable"])
    vi = a.index_file(DI)
    assert vi.suite == "stable" and vi.release.codename == SUITE
    assert vi.data().startswith(b"Package: anna")


@pytest.mark.timeout(20)
def test_unreachable_mirror_fails_fast(key: GpgKey, tmp_path: Path) -> None:
    a = Archive(
        "http://127.0.0.1:9/debian", SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
        cache=ContentCache(tmp_path / "c"), timeout=5,
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        a.release()
    assert time.monotonic() - started < 5
    msg = str(exc.value)
    assert "mirror unreachable" in msg and "http://127.0.0.1:9/debian/dists/testsuite/InRelease" in msg


def test_file_entry_is_hashable() -> None:
    assert {FileEntry("a", "0" * 64, 1)} == {FileEntry("a", "0" * 64, 1)}


# ------------------------------------------------------------------------------------------------ offline
# ``Archive(offline=True)`` never contacts the mirror: the InRelease a run verified before comes from the cache and
# is verified again with gpgv from those bytes, indexes and pool files come from the cache, and what is not there
# is an OfflineError naming it. The mirror of the offline runs is a closed port on 127.0.0.1.

CLOSED = "http://127.0.0.1:9/debian"


def archive_at(url: str, key: GpgKey, cache: ContentCache, **kw: object) -> Archive:
    return Archive(url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint], cache=cache, retries=0,  # type: ignore[arg-type]
                   timeout=5, **kw)


def fill(server: ArchiveServer, key: GpgKey, fake: FakeArchive, cache: ContentCache) -> None:
    online = archive_at(server.url, key, cache)
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
        off = archive_at(url, key, cache, offline=True, stats=stats)
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
        archive_at(CLOSED, key, cache, offline=True).release()
    archive_at(server.url, key, cache).release()  # only the InRelease
    off = archive_at(CLOSED, key, cache, offline=True)
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
    archive_at(server.url, key, cache).release()
    raw = (fake.dists / "InRelease").read_bytes()
    i = raw.index(b"Codename: ") + len(b"Codename: ")
    bad = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]  # the signed text, one byte off
    sha = hashlib.sha256(bad).hexdigest()
    cache.put(bad, sha)
    PathMap(cache.root.parent / "archive" / "inrelease").put(f"{server.url}/dists/{SUITE}/InRelease", sha)
    with pytest.raises(VerificationError, match="signature verification failed"):
        archive_at(server.url, key, cache, offline=True).release()


@pytest.mark.timeout(30)
def test_offline_accepts_a_cached_release_that_expired_since_with_a_warning(
    server: ArchiveServer, key: GpgKey, fake: FakeArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.publish(extra_release="Valid-Until: Sat, 01 Jan 2999 00:00:00 UTC")
    cache = ContentCache(tmp_path / "c")
    archive_at(server.url, key, cache).release()
    monkeypatch.setattr(Release, "is_expired", lambda self, now=None: True)  # time has passed
    with pytest.raises(VerificationError, match="expired"):
        archive_at(server.url, key, cache).release()  # online: a stale mirror
    with caplog.at_level(logging.WARNING):
        assert archive_at(CLOSED, key, cache, offline=True).release().codename == SUITE
    assert "offline: the cached" in caplog.text and "expired on Sat, 01 Jan 2999" in caplog.text
