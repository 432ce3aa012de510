"""parse_release and the Packages parser: pure functions on text."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from builder.archive.packages import all_versions, iter_stanzas, parse_packages
from builder.archive.release import FileEntry, parse_release
from builder.errors import VerificationError

H1 = "a" * 64
H2 = "b" * 64

RELEASE = f"""Origin: Debian
Label: Debian
Suite: stable
Version: 13.8
Codename: trixie
Date: Sat, 21 Nov 2026 09:15:44 UTC
Acquire-By-Hash: yes
Architectures: all amd64 arm64
Components: main contrib non-free-firmware non-free
Description: Debian 13.8 Released 21 November 2026
MD5Sum:
 3e498904a30e240573dac8ddac594e6f  1961125 main/binary-amd64/Packages.xz
SHA256:
 {H1}  9679304 main/binary-amd64/Packages.xz
 {H2.upper()}    53936 main/debian-installer/binary-amd64/Packages.xz
""".encode()


def test_parse_release_fields() -> None:
    rel = parse_release(RELEASE)
    assert (rel.suite, rel.codename, rel.version) == ("stable", "trixie", "13.8")
    assert rel.acquire_by_hash is True
    assert rel.components == ("main", "contrib", "non-free-firmware", "non-free")
    assert rel.architectures == ("all", "amd64", "arm64")
    assert rel.files["main/binary-amd64/Packages.xz"] == FileEntry("main/binary-amd64/Packages.xz", H1, 9679304)
    assert rel.files["main/debian-installer/binary-amd64/Packages.xz"].sha256 == H2  # lower-cased
    assert len(rel.files) == 2  # MD5Sum is ignored
    assert rel.text == RELEASE
    assert rel.matches_suite("trixie") and rel.matches_suite("stable") and not rel.matches_suite("bookworm")
    assert rel.date_parsed == datetime(2026, 11, 21, 9, 15, 44, tzinfo=UTC)
    assert not rel.is_expired()
    with pytest.raises(TypeError):
        rel.files["x"] = rel.files["main/binary-amd64/Packages.xz"]  # type: ignore[index]


def test_release_is_hashable_and_frozen() -> None:
    rel = parse_release(RELEASE)
    assert hash(rel) == hash(parse_release(RELEASE))
    with pytest.raises(AttributeError):
        rel.suite = "x"  # type: ignore[misc]


def test_valid_until() -> None:
    rel = parse_release(
        RELEASE.replace(b"Acquire-By-Hash", b"Valid-Until: Sat, 28 Nov 2026 09:15:44 UTC\nAcquire-By-Hash")
    )
    assert rel.is_expired(datetime(2026, 11, 29, tzinfo=UTC))
    assert not rel.is_expired(datetime(2026, 11, 27, tzinfo=UTC))


@pytest.mark.parametrize(
    "text, match",
    [
        (b"Origin: Debian\nMD5Sum:\n 3e49 1 x\n", "no SHA256"),
        (RELEASE.replace(b"9679304", b"12x"), "malformed SHA256"),
        (RELEASE.replace(H1.encode(), b"abc"), "malformed SHA256"),
        (b"Origin Debian\n", "malformed line"),
        (b" leading: continuation\n", "continuation"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_parse_release_rejects_malformed(text: bytes, match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        parse_release(text)


PACKAGES = b"""Package: hello
Version: 1.0
Description: a test
 continuation line
 .
 more

Package: hello
Version: 1:0.5
Filename: pool/h/hello_0.5.deb

Package: hello
Version: 1.0~rc1

Package: zed
Version: 2.0
"""


def test_parse_packages_keeps_the_highest_version() -> None:
    pk = parse_packages(PACKAGES)
    assert set(pk) == {"hello", "zed"}
    assert pk["hello"]["Version"] == "1:0.5"  # epoch wins
    assert pk["hello"]["Filename"] == "pool/h/hello_0.5.deb"


def test_iter_stanzas_matches_deb822_folding() -> None:
    first = next(iter_stanzas(PACKAGES))
    assert first == {"Package": "hello", "Version": "1.0", "Description": "a test\n continuation line\n .\n more"}
    assert [s["Version"] for s in all_versions(PACKAGES, "hello")] == ["1:0.5", "1.0", "1.0~rc1"]


def test_parse_packages_crlf_and_errors() -> None:
    assert parse_packages(PACKAGES.replace(b"\n", b"\r\n"))["zed"]["Version"] == "2.0"
    with pytest.raises(VerificationError, match="without a Package"):
        parse_packages(b"Version: 1\n")
    with pytest.raises(VerificationError, match="malformed stanza"):
        parse_packages(b"Package: a\n\n no field here\n")
