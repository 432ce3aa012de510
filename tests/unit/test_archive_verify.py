"""gpgv verification of InRelease, hermetic: a throwaway key signs a fake Release (real gpgv, no network)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_testlib import GpgKey, gpg_key

from builder.archive.verify import parse_status, verify_inrelease
from builder.errors import MissingToolError, ToolError, VerificationError

BODY = b"Origin: Test\nSuite: stable\nCodename: testsuite\nSHA256:\n"


@pytest.fixture(scope="module")
def key() -> Iterator[GpgKey]:
    with gpg_key("builder test archive key") as k:
        yield k


@pytest.fixture(scope="module")
def other_key() -> Iterator[GpgKey]:
    with gpg_key("builder untrusted key") as k:
        yield k


def test_good_signature_returns_only_signed_text(key: GpgKey) -> None:
    signed = key.clearsign(BODY)
    assert signed.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    assert verify_inrelease(signed, key.keyring, [key.fingerprint]) == BODY


def test_fingerprint_is_normalized(key: GpgKey) -> None:
    spaced = " ".join(key.fingerprint[i : i + 4] for i in range(0, 40, 4)).lower()
    assert verify_inrelease(key.clearsign(BODY), key.keyring, [spaced]) == BODY


def test_tampered_body_is_rejected(key: GpgKey) -> None:
    signed = key.clearsign(BODY)
    tampered = signed.replace(b"Codename: testsuite", b"Codename: testsuitX")
    with pytest.raises(VerificationError, match="signature verification failed"):
        verify_inrelease(tampered, key.keyring, [key.fingerprint])


def test_key_not_in_keyring(key: GpgKey, other_key: GpgKey) -> None:
    signed = other_key.clearsign(BODY)
    with pytest.raises(VerificationError) as exc:
        verify_inrelease(signed, key.keyring, [key.fingerprint, other_key.fingerprint])
    assert str(key.keyring) in str(exc.value)


def test_valid_signature_by_untrusted_fingerprint(key: GpgKey, other_key: GpgKey) -> None:
    # gpgv accepts any key of the keyring; the fingerprint pin is what rejects it.
    signed = other_key.clearsign(BODY)
    with pytest.raises(VerificationError, match="no signature by a trusted key") as exc:
        verify_inrelease(signed, other_key.keyring, [key.fingerprint])
    assert other_key.fingerprint in str(exc.value)  # the fingerprint seen is named


def test_empty_keyring(key: GpgKey, tmp_path: Path) -> None:
    empty = tmp_path / "empty.gpg"
    empty.write_bytes(b"")
    with pytest.raises(VerificationError):
        verify_inrelease(key.clearsign(BODY), empty, [key.fingerprint])


def test_missing_keyring(key: GpgKey, tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="does not exist"):
        verify_inrelease(key.clearsign(BODY), tmp_path / "nope.gpg", [key.fingerprint])


def test_no_trusted_fingerprints(key: GpgKey) -> None:
    with pytest.raises(VerificationError, match="no trusted fingerprints"):
        verify_inrelease(key.clearsign(BODY), key.keyring, [])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: BODY,  # not signed at all
        lambda s: b"Injected: yes\n" + s,  # data before the signed block
        lambda s: s + b"Injected: yes\n",  # data after it
        lambda s: s + s,  # two signed blocks
    ],
    ids=["unsigned", "prefix", "suffix", "twice"],
)
def test_shape_is_checked_like_apt(key: GpgKey, mangle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(VerificationError):
        verify_inrelease(mangle(key.clearsign(BODY)), key.keyring, [key.fingerprint])


def test_missing_gpgv_is_a_missing_tool_error(key: GpgKey, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    signed = key.clearsign(BODY)
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without gpgv
    with pytest.raises(MissingToolError) as exc:
        verify_inrelease(signed, key.keyring, [key.fingerprint])
    assert isinstance(exc.value, ToolError) and exc.value.package == "gpgv"
    assert exc.value.hint == "install it: apt-get install gpgv"


def test_parse_status_takes_the_primary_fingerprint() -> None:
    status = (
        "[GNUPG:] NEWSIG\n"
        "[GNUPG:] GOODSIG 78DBA3BC47EF2265 Debian Archive Automatic Signing Key (13/trixie)\n"
        "[GNUPG:] VALIDSIG B8E5F13176D2A7A75220028078DBA3BC47EF2265 2026-11-21 1795252581 0 4 0 1 8 01 "
        "04B54C3CDCA79751B16BC6B5225629DF75B188BD\n"
        "[GNUPG:] ERRSIG 6ED0E7B82643E131 1 8 01 1795252580 9 -\n"
        "gpgv: some human text\n"
    )
    valid, problems = parse_status(status)
    assert valid == ["04B54C3CDCA79751B16BC6B5225629DF75B188BD"]  # primary, not the signing subkey
    assert problems and problems[0].startswith("ERRSIG")
