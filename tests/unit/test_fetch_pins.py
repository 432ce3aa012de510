"""``fetch`` checks every file the lock pins (size and sha256) where it fetches it, and says "verified" only
of what it checked. The mirror is a hostile-mirror fixture on 127.0.0.1; an unreachable 127.0.0.1:9 stands
in where nothing may be downloaded at all."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_mirror import Answer, HostileMirror, hostile_mirror
from test_lock_and_cache import sample_lock

from builder.archive import Archive, ContentCache
from builder.errors import LockError, VerificationError
from builder.lock import Lock
from builder.stages.fetch import _netboot_images, fetch_overrides, inputs_summary, udeb_index

UDEB = b"an override udeb" * 64
UDEB_PATH = "pool/main/u/util-linux/util-linux-udeb_2.41-5_amd64.udeb"
NOWHERE = "http://127.0.0.1:9/debian"


@pytest.fixture()
def mirror() -> Iterator[HostileMirror]:
    with hostile_mirror() as m:
        m.route("/debian/" + UDEB_PATH, Answer(body=UDEB))
        yield m


def archive(url: str, cache: ContentCache) -> Archive:
    return Archive(url, "trixie", keyring=Path("/nonexistent"), fingerprints=(), cache=cache, retries=0, timeout=5)


def lock_with_override(**changes: object) -> Lock:
    lock = sample_lock()
    o = dataclasses.replace(lock.overrides[0], filename=UDEB_PATH, sha256=hashlib.sha256(UDEB).hexdigest(),
                            size=len(UDEB))
    return dataclasses.replace(lock, overrides=(dataclasses.replace(o, **changes),))


@pytest.mark.timeout(20)
def test_override_udebs_are_fetched_and_checked(mirror: HostileMirror, tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c")
    assert fetch_overrides(archive(mirror.url("/debian"), cache), lock_with_override()) == 1
    assert cache.get(hashlib.sha256(UDEB).hexdigest(), len(UDEB)) is not None


@pytest.mark.timeout(20)
def test_a_changed_override_sha256_fails_fetch(mirror: HostileMirror, tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c")
    lock = lock_with_override(sha256="e" * 64)
    with pytest.raises(VerificationError) as exc:
        fetch_overrides(archive(mirror.url("/debian"), cache), lock)
    msg = str(exc.value)
    assert "overrides[0] (util-linux-udeb 2.41-5) does not match" in msg and "e" * 64 in msg


@pytest.mark.timeout(20)
def test_a_changed_override_size_fails_fetch(mirror: HostileMirror, tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c")
    with pytest.raises(VerificationError, match=r"overrides\[0\]"):
        fetch_overrides(archive(mirror.url("/debian"), cache), lock_with_override(size=len(UDEB) - 1))
    fetch_overrides(archive(mirror.url("/debian"), cache), lock_with_override())  # now cached
    before = len(mirror.requests)
    with pytest.raises(VerificationError, match=f"has {len(UDEB)} bytes: the expected size is wrong"):
        fetch_overrides(archive(mirror.url("/debian"), cache), lock_with_override(size=len(UDEB) + 1))
    assert len(mirror.requests) == before  # decided from the cache, without a download
    assert cache.get(hashlib.sha256(UDEB).hexdigest(), len(UDEB)) is not None  # and the good blob kept


def _extracted(tmp_path: Path, deb: bytes) -> tuple[ContentCache, Lock]:
    """A cache as a previous fetch left it: the netboot .deb, its kernel and initrd, the extracted index."""
    cache = ContentCache(tmp_path / "c")
    sha = hashlib.sha256(deb).hexdigest()
    cache.put(deb, sha)
    shas = {}
    for name, data in (("kernel", b"kernel image"), ("initrd", b"initrd image")):
        shas[name] = hashlib.sha256(data).hexdigest()
        cache.put(data, shas[name])
    index = tmp_path / "extracted" / f"{sha}.json"
    index.parent.mkdir()
    index.write_text(json.dumps({**shas, "deb_size": len(deb)}))
    lock = sample_lock()
    return cache, dataclasses.replace(lock, netboot=dataclasses.replace(lock.netboot, sha256=sha, size=len(deb)))


@pytest.mark.timeout(20)
def test_netboot_from_the_extracted_index(tmp_path: Path) -> None:
    cache, lock = _extracted(tmp_path, b"netboot deb" * 10)
    kernel, initrd = _netboot_images(None, lock, archive(NOWHERE, cache), cache)  # type: ignore[arg-type]
    assert kernel.read_bytes() == b"kernel image" and initrd.read_bytes() == b"initrd image"


@pytest.mark.timeout(20)
def test_a_changed_netboot_size_does_not_pass_silently(tmp_path: Path) -> None:
    deb = b"netboot deb" * 10
    cache, lock = _extracted(tmp_path, deb)
    wrong = dataclasses.replace(lock, netboot=dataclasses.replace(lock.netboot, size=len(deb) + 1))
    with pytest.raises(VerificationError, match=r"the lock's netboot .* has 110 bytes"):
        _netboot_images(None, wrong, archive(NOWHERE, cache), cache)  # type: ignore[arg-type]
    assert cache.get(lock.netboot.sha256, len(deb)) is not None


@pytest.mark.timeout(20)
def test_a_changed_udeb_index_size_is_a_lock_error(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "c")
    data = b"Package: anna\n"
    lock = sample_lock()
    pin = dataclasses.replace(lock.udeb_index, path="main/debian-installer/binary-amd64/Packages",
                              sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    cache.put(data, pin.sha256)
    assert udeb_index(None, dataclasses.replace(lock, udeb_index=pin), cache, archive(NOWHERE, cache)) == data  # type: ignore[arg-type]
    wrong = dataclasses.replace(lock, udeb_index=dataclasses.replace(pin, size=99))
    with pytest.raises(LockError, match=r"udeb_index.size is 99, but .* has 14 bytes"):
        udeb_index(None, wrong, cache, archive(NOWHERE, cache))  # type: ignore[arg-type]
    assert cache.get(pin.sha256, len(data)) is not None


def test_summary_claims_only_what_was_checked() -> None:
    lock = sample_lock()
    text = inputs_summary(lock, "6.12", suite_udebs=80, udebs_verified=1)
    assert "1 of 80 udebs" in text and "the other 79 are checked against their pins when the gateway serves" in text
    assert "80 udebs in the suite" not in text
    assert "other" not in inputs_summary(lock, "6.12", suite_udebs=5, udebs_verified=5)
