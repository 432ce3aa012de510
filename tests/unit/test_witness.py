"""Pins rooted in signatures: ``lock`` stores the signed InRelease (and a small index) that listed each pinned file,
and ``fetch`` checks the pin against them with gpgv; a stored InRelease altered by one byte is refused. Re-locking
after upstream stopped listing a pin keeps the witness it had, if that still verifies. A fake signed archive on
127.0.0.1 with a throwaway key stands in for the mirror."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
from pathlib import Path

import pytest
from archive_testlib import SUITE, ArchiveServer, FakeArchive, GpgKey
from test_lock_and_cache import sample_lock

from builder import witness
from builder.archive import Archive, ContentCache
from builder.config import from_dict
from builder.errors import MalformedLockError, OfflineError, VerificationError
from builder.lock import Lock, read_lock, write_lock
from builder.witness import find_witnesses, lock_dir, store_files, unwitnessed, verify_lock
from builder.witness import offline_missing as witness_missing

DI = "main/debian-installer/binary-amd64/Packages.xz"


def config(tmp_path: Path, key: GpgKey, url: str):  # type: ignore[no-untyped-def]
    return from_dict({"debian": {"suite": SUITE, "mirror": url, "security_mirror": url + "-security",
                                 "keyring": str(key.keyring), "trusted_fingerprints": [key.fingerprint]}},
                     source=tmp_path / "images" / "img.yaml")


def fake_lock(fake: FakeArchive) -> Lock:
    """netboot: the archive's hello 1.0 (listed); boot: a file no index lists; override: the udeb index's anna."""
    lock = sample_lock()
    hello = dataclasses.replace(lock.netboot, package="hello", version="1.0", filename=fake.pool_file,
                                sha256=hashlib.sha256(fake.pool_data).hexdigest(), size=len(fake.pool_data),
                                trust="lock")
    anna = dataclasses.replace(lock.overrides[0], package="anna", version="1.90",
                               filename="pool/main/a/anna/anna_1.90_amd64.udeb", sha256="1" * 64, size=10)
    di = fake.files[DI]
    return dataclasses.replace(
        lock, suite=SUITE, codename=SUITE, netboot=hello, overrides=(anna,),
        udeb_index=dataclasses.replace(lock.udeb_index, release_suite=SUITE, path=DI,
                                       sha256=hashlib.sha256(di).hexdigest(), size=len(di)))


def witnessed(tmp_path: Path, key: GpgKey, server: ArchiveServer, fake: FakeArchive):  # type: ignore[no-untyped-def]
    cfg = config(tmp_path, key, server.url)
    cfg.lock_path.parent.mkdir(parents=True, exist_ok=True)
    cache = ContentCache(tmp_path / "c")
    main = Archive(server.url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint], cache=cache, retries=0)
    lock, files = find_witnesses(cfg, main, fake_lock(fake), report=lambda m: None)
    store_files(cfg.lock_path, files)
    write_lock(lock, cfg.lock_path)
    return cfg, cache, main, lock


@pytest.mark.timeout(60)
def test_lock_stores_the_signed_index_of_each_pin(tmp_path: Path, key: GpgKey, server: ArchiveServer,
                                                  fake: FakeArchive) -> None:
    cfg, cache, main, lock = witnessed(tmp_path, key, server, fake)
    assert lock.witnessed and read_lock(cfg.lock_path) == lock
    w = lock.netboot.witness
    assert w is not None and w.suite == SUITE and w.index == "main/binary-amd64/Packages.xz"
    assert w.index_stored == "lock.d"  # small: kept with the lock
    inrelease = (fake.dists / "InRelease").read_bytes()
    assert w.inrelease_sha256 == hashlib.sha256(inrelease).hexdigest()
    d = lock_dir(cfg.lock_path)
    assert d.name == "img.lock.d" and (d / f"{w.inrelease_sha256}.InRelease").read_bytes() == inrelease
    assert lock.overrides[0].witness is not None and lock.overrides[0].witness.index == DI
    assert lock.boot[0].witness is None  # no signed index lists it: the lock says so
    assert lock.udeb_index.inrelease_sha256 == w.inrelease_sha256
    assert ("no signed index this lock could find lists these; fetch trusts their recorded sha256 and warns: "
            "isolinux 3:6.04") in lock.notes
    # fetch checks them from the signature; the unlisted one is named in a warning
    assert verify_lock(cfg, lock, cache, main) == [
        "1 installer files are pinned by the lock's sha256 alone (no signed index the lock could find lists them): "
        "isolinux 3:6.04"]
    # a lock made before witnesses: one warning, nothing checked
    legacy = dataclasses.replace(lock, witnessed=False)
    assert "records no signed index for its pins" in verify_lock(cfg, legacy, cache, main)[0]


def alter_one_byte(stored: Path) -> None:
    """Flip one bit inside a signed file entry of a stored InRelease: its signature no longer verifies."""
    raw = stored.read_bytes()
    i = raw.index(b"SHA256:") + 20
    stored.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])


@pytest.mark.timeout(60)
def test_a_stored_inrelease_altered_by_one_byte_is_refused(tmp_path: Path, key: GpgKey, server: ArchiveServer,
                                                           fake: FakeArchive) -> None:
    cfg, cache, main, lock = witnessed(tmp_path, key, server, fake)
    assert lock.netboot.witness is not None
    alter_one_byte(lock_dir(cfg.lock_path) / f"{lock.netboot.witness.inrelease_sha256}.InRelease")
    with pytest.raises(VerificationError, match="signature verification failed"):
        verify_lock(cfg, lock, cache, main)


@pytest.mark.timeout(60)
def test_a_pin_its_signed_index_does_not_list_is_refused(tmp_path: Path, key: GpgKey, server: ArchiveServer,
                                                         fake: FakeArchive) -> None:
    cfg, cache, main, lock = witnessed(tmp_path, key, server, fake)
    other = dataclasses.replace(lock, netboot=dataclasses.replace(lock.netboot, sha256="f" * 64))
    with pytest.raises(VerificationError, match=r"netboot \(hello 1\.0\): its signed index .* does not list"):
        verify_lock(cfg, other, cache, main)
    # a stored index that is not the one the InRelease signs
    w = lock.netboot.witness
    assert w is not None
    stored = lock_dir(cfg.lock_path) / f"{w.index_sha256}.Packages.xz"
    stored.write_bytes(b"x" + stored.read_bytes()[1:])
    fresh = ContentCache(tmp_path / "c2")
    offline = Archive("http://127.0.0.1:9/debian", SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
                      cache=fresh, offline=True)
    with pytest.raises(VerificationError, match="is not the one its InRelease signs"):
        verify_lock(cfg, lock, fresh, offline)


@pytest.mark.timeout(60)
def test_a_missing_witness_is_named(tmp_path: Path, key: GpgKey, server: ArchiveServer, fake: FakeArchive) -> None:
    cfg, cache, main, lock = witnessed(tmp_path, key, server, fake)
    w = lock.overrides[0].witness
    assert w is not None
    (lock_dir(cfg.lock_path) / f"{w.inrelease_sha256}.InRelease").unlink()
    missing = witness_missing(cfg, lock, ContentCache(tmp_path / "empty"))
    assert missing == [f"img.lock.d/{w.inrelease_sha256}.InRelease"]
    with pytest.raises(VerificationError, match="the signed InRelease that listed it is missing"):
        verify_lock(cfg, lock, cache, main)
    data = json.loads(cfg.lock_path.read_text())
    data["netboot"]["witness"]["index_stored"] = "elsewhere"
    with pytest.raises(MalformedLockError, match="index_stored"):
        Lock.from_json(json.dumps(data))


@pytest.mark.timeout(60)
def test_a_large_index_stays_in_the_cache_and_is_fetched_by_hash(tmp_path: Path, key: GpgKey,
                                                                 server: ArchiveServer, fake: FakeArchive,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(witness, "STORE_LIMIT", 0)
    cfg, _cache, _main, lock = witnessed(tmp_path, key, server, fake)
    w = lock.netboot.witness
    assert w is not None and w.index_stored == "cache"
    assert not (lock_dir(cfg.lock_path) / f"{w.index_sha256}.Packages.xz").exists()
    # the lock says what the proof needs (an excerpt of the index could not be checked from the signature)
    assert (f"the signed index {w.index} of dists/{SUITE} (sha256 {w.index_sha256[:16]}…, {w.index_size} bytes) is "
            "too large to store with the lock (over 0 bytes) and cannot be cut down without breaking its signature: "
            "it is kept in the content cache only, so checking hello 1.0 from their signature needs that cache, or "
            "the mirror while it serves that index by hash") in lock.notes
    offline = Archive("http://127.0.0.1:9/debian", SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
                      cache=ContentCache(tmp_path / "c2"), offline=True)
    assert (f"the signed index {w.index} of dists/{SUITE} (sha256 {w.index_sha256[:16]}…): too large to store "
            "with the lock, it is kept in the content cache only") in witness_missing(cfg, lock, offline.cache)
    with pytest.raises(OfflineError, match="its proof needs the content cache or the mirror, and neither has it"):
        verify_lock(cfg, lock, offline.cache, offline)
    fresh = ContentCache(tmp_path / "c3")  # online: fetched from the mirror by its hash, then cached
    online = Archive(server.url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint], cache=fresh)
    verify_lock(cfg, lock, fresh, online)
    assert fresh.get(w.index_sha256) is not None
    assert any("/by-hash/SHA256/" + w.index_sha256 in path for _, path in server.requests)


def unlist(fake: FakeArchive, *, udeb_index: bool = False) -> None:
    """The archive moves on: its main index lists hello 1.1, no longer the pinned 1.0, and the superseded index is
    gone from by-hash too (with ``udeb_index``, the udeb index as well): only the lock's directory still has them."""
    old = {p: d for p, d in fake.files.items() if p.startswith("main/binary-amd64/") or (udeb_index and p == DI)}
    plain = lzma.decompress(fake.files["main/binary-amd64/Packages.xz"])
    fake.write_index("main/binary-amd64/Packages", plain.replace(
        b"Version: 1.0\nArchitecture: all\nFilename: pool/main/h/hello/hello_1.0_all.deb",
        b"Version: 1.1\nArchitecture: all\nFilename: pool/main/h/hello/hello_1.1_all.deb"))
    if udeb_index:
        del fake.files[DI]
        (fake.dists / DI).unlink()
    fake.publish()
    for path, data in old.items():
        (fake.dists / path).parent.joinpath("by-hash", "SHA256", hashlib.sha256(data).hexdigest()).unlink()


def relock(tmp_path: Path, key: GpgKey, server: ArchiveServer, cfg, pins: Lock, said: list[str]):  # type: ignore[no-untyped-def]
    """``lock`` again over the moved archive, the same ``pins`` resolved, with a cache that never held the old
    indexes, as write_locks does it; and an offline archive with an empty cache, for fetch."""
    main = Archive(server.url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
                   cache=ContentCache(tmp_path / "relock-cache"), retries=0)
    lock, files = find_witnesses(cfg, main, pins, previous=read_lock(cfg.lock_path), report=said.append)
    store_files(cfg.lock_path, files)
    write_lock(lock, cfg.lock_path)
    offline = Archive("http://127.0.0.1:9/debian", SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
                      cache=ContentCache(tmp_path / "fetch-cache"), offline=True)
    return lock, files, offline


@pytest.mark.timeout(60)
def test_relock_keeps_the_witness_of_a_pin_upstream_stopped_listing(tmp_path: Path, key: GpgKey,
                                                                    server: ArchiveServer, fake: FakeArchive) -> None:
    cfg, _cache, _main, old = witnessed(tmp_path, key, server, fake)
    w, anna = old.netboot.witness, old.overrides[0].witness
    assert w is not None and anna is not None
    pins = fake_lock(fake)
    unlist(fake)
    said: list[str] = []
    lock, files, offline = relock(tmp_path, key, server, cfg, pins, said)
    assert lock.netboot.witness == w  # the signed index that listed hello 1.0 when the lock was made
    assert any(m.startswith("netboot (hello 1.0): no current signed index lists it; keeps the previous lock's "
                            "witness") for m in said)
    # a witness in a current index wins: anna is listed by today's InRelease
    new_anna = lock.overrides[0].witness
    assert new_anna is not None and new_anna.inrelease_sha256 != anna.inrelease_sha256
    assert unwitnessed(lock) == ["isolinux 3:6.04"]
    assert not any("hello" in n for n in lock.notes if n.startswith("no signed index"))
    d = lock_dir(cfg.lock_path)
    for name in (f"{w.inrelease_sha256}.InRelease", f"{w.index_sha256}.Packages.xz"):
        assert name in files and (d / name).is_file()  # what the kept witness needs stays with the lock
    # fetch checks it from the stored signature alone: offline, a cache that never held the old index
    assert verify_lock(cfg, read_lock(cfg.lock_path), offline.cache, offline) == [
        "1 installer files are pinned by the lock's sha256 alone (no signed index the lock could find lists them): "
        "isolinux 3:6.04"]


@pytest.mark.timeout(60)
def test_relock_keeps_the_udeb_index_inrelease_too(tmp_path: Path, key: GpgKey, server: ArchiveServer,
                                                   fake: FakeArchive) -> None:
    cfg, _cache, _main, old = witnessed(tmp_path, key, server, fake)
    pins = fake_lock(fake)
    unlist(fake, udeb_index=True)  # today's Release lists no udeb index: anna and the index keep the old proof
    lock, files, offline = relock(tmp_path, key, server, cfg, pins, [])
    assert lock.overrides[0].witness == old.overrides[0].witness
    assert lock.udeb_index.inrelease_sha256 == old.udeb_index.inrelease_sha256 != ""
    assert f"{lock.udeb_index.sha256}.Packages.xz" in files
    assert len(verify_lock(cfg, read_lock(cfg.lock_path), offline.cache, offline)) == 1


@pytest.mark.timeout(60)
def test_relock_drops_a_witness_whose_stored_inrelease_was_altered(tmp_path: Path, key: GpgKey,
                                                                   server: ArchiveServer, fake: FakeArchive) -> None:
    cfg, _cache, _main, old = witnessed(tmp_path, key, server, fake)
    assert old.netboot.witness is not None
    alter_one_byte(lock_dir(cfg.lock_path) / f"{old.netboot.witness.inrelease_sha256}.InRelease")
    pins = fake_lock(fake)
    unlist(fake)
    said: list[str] = []
    lock, _files, offline = relock(tmp_path, key, server, cfg, pins, said)
    assert lock.netboot.witness is None
    assert any(m.startswith("netboot (hello 1.0): the previous lock's witness no longer holds")
               and "signature verification failed" in m for m in said)
    assert unwitnessed(lock) == ["hello 1.0", "isolinux 3:6.04"]
    assert ("no signed index this lock could find lists these; fetch trusts their recorded sha256 and warns: "
            "hello 1.0, isolinux 3:6.04") in lock.notes
    assert verify_lock(cfg, read_lock(cfg.lock_path), offline.cache, offline) == [
        "2 installer files are pinned by the lock's sha256 alone (no signed index the lock could find lists them): "
        "hello 1.0, isolinux 3:6.04"]
