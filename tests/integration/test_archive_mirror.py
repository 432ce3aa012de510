"""The archive trust chain against the real Debian mirror of this host (from its apt sources) and the real keyring.

Network: the mirror only. Every test has a timeout. Nothing large is downloaded (the netboot .deb is only HEAD-ed).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from pathlib import Path

import pytest

from builder.archive import Archive, ContentCache, FetchStats, parse_release, verify_inrelease
from builder.config import DebianConfig
from builder.errors import FetchError, VerificationError
from builder.hostapt import debian_mirrors

pytestmark = pytest.mark.integration

SUITE = "trixie"
DEBIAN = DebianConfig(mirror="", security_mirror="")
KEYRING = DEBIAN.keyring
TRUSTED = DEBIAN.trusted_fingerprints
BULLSEYE_ONLY = Path("/usr/share/keyrings/debian-archive-bullseye-stable.gpg")
DI = "main/debian-installer/binary-amd64/Packages"
NETBOOT = "debian-installer-13-netboot-amd64"


@pytest.fixture(scope="module")
def mirror() -> str:
    m = debian_mirrors()[0]
    if not m:
        pytest.skip("no Debian mirror in the host's apt sources")
    return m


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> ContentCache:
    return ContentCache(tmp_path_factory.mktemp("blobs"))


def make(mirror: str, cache: ContentCache, **kw: object) -> Archive:
    return Archive(mirror, SUITE, keyring=KEYRING, fingerprints=TRUSTED, cache=cache, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def inrelease(mirror: str, cache: ContentCache) -> bytes:
    return make(mirror, cache).get_url(f"dists/{SUITE}/InRelease")


# ------------------------------------------------------------------------------------------------ gpgv


@pytest.mark.timeout(60)
def test_real_inrelease_verifies(inrelease: bytes) -> None:
    text = verify_inrelease(inrelease, KEYRING, TRUSTED)
    assert text.startswith(b"Origin: Debian")
    assert b"-----BEGIN PGP" not in text  # only the signed text, no armor
    assert text in inrelease.replace(b"\n- ", b"\n")  # the body, dash-unescaped


@pytest.mark.timeout(60)
def test_tampered_inrelease_is_rejected(inrelease: bytes) -> None:
    # Change one byte of the signed body: a hex digit of the first SHA256 entry.
    m = re.search(rb"\nSHA256:\n ([0-9a-f])", inrelease)
    assert m
    i = m.start(1)
    tampered = inrelease[:i] + (b"0" if inrelease[i : i + 1] != b"0" else b"1") + inrelease[i + 1 :]
    assert len(tampered) == len(inrelease)
    with pytest.raises(VerificationError, match="signature verification failed"):
        verify_inrelease(tampered, KEYRING, TRUSTED)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keyring", ["empty", "bullseye"])
def test_keyring_without_the_keys(inrelease: bytes, tmp_path: Path, keyring: str) -> None:
    if keyring == "empty":
        path = tmp_path / "empty.gpg"
        path.write_bytes(b"")
    else:
        path = BULLSEYE_ONLY
        if not path.is_file():
            pytest.skip(f"{path} not installed")
    with pytest.raises(VerificationError) as exc:
        verify_inrelease(inrelease, path, TRUSTED)
    assert str(path) in str(exc.value)


@pytest.mark.timeout(60)
def test_fingerprint_not_trusted(inrelease: bytes) -> None:
    # Good signatures from keys in the keyring, but none whose primary key is in the allowed list.
    other = "A4285295FC7B1A81600062A9605C66F00D6C9793"  # Debian Stable Release Key (11/bullseye): not a signer
    with pytest.raises(VerificationError, match="no signature by a trusted key") as exc:
        verify_inrelease(inrelease, KEYRING, [other])
    assert "04B54C3CDCA79751B16BC6B5225629DF75B188BD" in str(exc.value)  # the keys seen are named


@pytest.mark.timeout(60)
def test_parse_real_release(inrelease: bytes) -> None:
    rel = parse_release(verify_inrelease(inrelease, KEYRING, TRUSTED))
    assert rel.codename == "trixie"
    assert rel.acquire_by_hash
    assert "main" in rel.components and "amd64" in rel.architectures
    entry = rel.files[DI + ".xz"]
    assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256) and entry.size > 1000
    assert "main/binary-amd64/Packages.xz" in rel.files


# ------------------------------------------------------------------------------------------------ indexes


@pytest.mark.timeout(120)
def test_di_index_signed_by_trixie_or_skew_reported(mirror: str, cache: ContentCache) -> None:
    """Either the mirror serves the d-i index the trixie InRelease signs, or the error says exactly why.

    (Measured 2026-11-30: this mirror serves the 13.7 d-i index under a 13.8 InRelease: by-hash 404, the
    plain Packages.xz has another size. dists/stable/InRelease (13.7) still signs it; see the next test.)
    """
    a = make(mirror, cache)
    try:
        data = a.index(DI)
    except VerificationError as exc:
        msg = str(exc)
        assert "no copy that matches the signed trixie Release" in msg
        assert "by-hash/SHA256/" in msg and "does not match" in msg
    else:
        assert data.startswith(b"Package: ")


@pytest.fixture(scope="module")
def di_archive(mirror: str, cache: ContentCache) -> Archive:
    """An Archive that can get a signed d-i index on this mirror: trixie, else dists/stable if it is trixie."""
    return make(mirror, cache, fallback_suites=("stable",))


@pytest.mark.timeout(120)
def test_di_index_cache_corruption_is_detected_and_refetched(di_archive: Archive, cache: ContentCache) -> None:
    stats = di_archive.stats
    vi = di_archive.index_file(DI)
    assert vi.release.codename == "trixie"
    first = vi.data()
    assert b"\nPackage: anna\n" in b"\n" + first
    blob = cache.path(vi.entry.sha256)
    assert blob.is_file() and blob.stat().st_size == vi.entry.size
    # Flip bytes of the cached blob on disk.
    before = blob.stat().st_mtime_ns
    raw = bytearray(blob.read_bytes())
    for i in (0, len(raw) // 2, len(raw) - 1):
        raw[i] ^= 0xFF
    blob.write_bytes(bytes(raw))
    if blob.stat().st_mtime_ns == before:  # coarse timestamps: make the changed state visible
        os.utime(blob, ns=(before + 1000, before + 1000))
    fetched = stats.bytes_fetched
    again = di_archive.index(DI)
    assert again == first
    assert stats.bytes_fetched - fetched >= vi.entry.size  # it was downloaded again
    assert cache.get(vi.entry.sha256, vi.entry.size) == blob


@pytest.mark.timeout(120)
def test_release_entry_with_wrong_hash_is_a_verification_error(mirror: str, tmp_path: Path) -> None:
    # Constructed edge case: the real signed Release cannot be altered, so a Release whose d-i entries carry a
    # wrong sha256 is patched into the Archive (standing in for an index tampered with after signing).
    a = make(mirror, ContentCache(tmp_path))
    rel = a.release()
    bad = {p: dataclasses.replace(e, sha256="0" * 64) if p.startswith(DI) else e for p, e in rel.files.items()}
    a._release = dataclasses.replace(rel, files=types.MappingProxyType(bad))
    with pytest.raises(VerificationError, match="does not match"):
        a.index(DI)


@pytest.mark.timeout(180)
def test_netboot_stanza_and_exists(mirror: str, cache: ContentCache) -> None:
    stats = FetchStats()
    a = make(mirror, cache, stats=stats)
    pkgs = a.packages("main")
    assert len(pkgs) > 50000
    st = pkgs[NETBOOT]
    assert st["Package"] == NETBOOT
    assert st["Filename"].startswith("pool/main/d/debian-installer-netboot-images/" + NETBOOT + "_")
    assert st["Filename"].endswith("_all.deb")
    assert re.fullmatch(r"[0-9a-f]{64}", st["SHA256"])
    assert int(st["Size"]) > 50_000_000
    before = stats.bytes_fetched
    assert a.exists(st["Filename"]) is True
    assert a.exists("pool/main/d/debian-installer-netboot-images/no-such-file.deb") is False
    assert a.exists(f"dists/{SUITE}/InRelease") is True
    assert stats.bytes_fetched == before  # HEAD only: nothing downloaded


@pytest.mark.timeout(30)
def test_unreachable_mirror(cache: ContentCache) -> None:
    a = Archive("http://127.0.0.1:9/debian", SUITE, keyring=KEYRING, fingerprints=TRUSTED, cache=cache, backoff=0.05)
    with pytest.raises(
        FetchError, match=re.escape("mirror unreachable: http://127.0.0.1:9/debian/dists/trixie/InRelease")
    ):
        a.release()


@pytest.mark.timeout(180)
def test_warm_cache_fetches_only_inrelease(mirror: str, cache: ContentCache) -> None:
    make(mirror, cache).index("main/binary-amd64/Packages")  # cold (or already warm from the test above)
    warm = FetchStats()
    b = make(mirror, cache, stats=warm)
    b.index("main/binary-amd64/Packages")
    assert warm.bytes_fetched == len(b.inrelease_raw)
    assert warm.cache_hits == 1
