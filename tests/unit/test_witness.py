"""Pins rooted in signatures: ``lock`` stores the signed InRelease (and a small index) that listed each pinned file,
and ``fetch`` checks the pin against them with gpgv; a stored InRelease altered by one byte is refused. A fake
signed archive on 127.0.0.1 with a throwaway key stands in for the mirror."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from archive_testlib import SUITE, ArchiveServer, FakeArchive, GpgKey
from test_lock_and_cache import sample_lock

from builder import witness
from builder.archive import Archive, ContentCache
from builder.config import from_dict
from builder.errors import MalformedLockError, OfflineError, VerificationError
from builder.lock import Lock, read_lock, write_lock
from builder.witness import find_witnesses, lock_dir, store_files, verify_lock
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
    assert any("no signed index listed these" in n and "isolinux 3:6.04" in n for n in lock.notes)
    # fetch checks them from the signature; the unlisted one is named in a warning
    assert verify_lock(cfg, lock, cache, main) == [
        "1 installer files are pinned by the lock's sha256 alone (no signed index listed them when the lock was "
        "made): isolinux 3:6.04"]
    # a lock made before witnesses: one warning, nothing checked
    legacy = dataclasses.replace(lock, witnessed=False)
    assert "records no signed index for its pins" in verify_lock(cfg, legacy, cache, main)[0]


@pytest.mark.timeout(60)
def test_a_stored_inrelease_altered_by_one_byte_is_refused(tmp_path: Path, key: GpgKey, server: ArchiveServer,
                                                           fake: FakeArchive) -> None:
    cfg, cache, main, lock = witnessed(tmp_path, key, server, fake)
    assert lock.netboot.witness is not None
    stored = lock_dir(cfg.lock_path) / f"{lock.netboot.witness.inrelease_sha256}.InRelease"
    raw = stored.read_bytes()
    i = raw.index(b"SHA256:") + 20  # inside a signed file entry
    stored.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
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
    offline = Archive("http://127.0.0.1:9/debian", SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
                      cache=ContentCache(tmp_path / "c2"), offline=True)
    assert f"the signed index {w.index} of dists/{SUITE} (sha256 {w.index_sha256[:16]}…)" in witness_missing(
        cfg, lock, offline.cache)
    with pytest.raises(OfflineError, match="neither stored with the lock nor cached nor served"):
        verify_lock(cfg, lock, offline.cache, offline)
    fresh = ContentCache(tmp_path / "c3")  # online: fetched from the mirror by its hash, then cached
    online = Archive(server.url, SUITE, keyring=key.keyring, fingerprints=[key.fingerprint], cache=fresh)
    verify_lock(cfg, lock, fresh, online)
    assert fresh.get(w.index_sha256) is not None
    assert any("/by-hash/SHA256/" + w.index_sha256 in path for _, path in server.requests)
