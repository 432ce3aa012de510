"""Reading .deb files with the stdlib reader, against packages built by the real dpkg-deb."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.archive.deb import MissingMemberError, ar_members, deb_control, deb_extract, deb_list, deb_member_names
from builder.errors import BuilderError, VerificationError

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")

KERNEL = b"\x7fELF fake kernel" * 100


def build_deb(tmp_path: Path, compression: str = "xz", name: str = "tiny") -> Path:
    root = tmp_path / f"{name}-{compression}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 1.2-3\nArchitecture: all\nMaintainer: Test <test@localhost>\n"
        "Description: tiny test package\n with a second line\n"
    )
    images = root / "usr/lib/debian-installer/images/13/amd64/text/debian-installer/amd64"
    images.mkdir(parents=True)
    (images / "linux").write_bytes(KERNEL)
    (images / "initrd.gz").write_bytes(b"initrd")
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "usr/share/doc/readme").write_text("hi\n")
    (root / "usr/share/doc/link").symlink_to("readme")
    (root / "usr/vmlinuz").symlink_to("/usr/lib/debian-installer/images/13/amd64/text/debian-installer/amd64/linux")
    out = tmp_path / f"{name}_{compression}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deb(tmp_path_factory.mktemp("deb"))


def test_ar_members(deb: Path) -> None:
    members = ar_members(deb.read_bytes())
    assert list(members) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    assert members["debian-binary"] == b"2.0\n"
    assert deb_member_names(deb) == list(members)


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_control(deb: Path, as_bytes: bool) -> None:
    ctl = deb_control(deb.read_bytes() if as_bytes else deb)
    assert ctl["Package"] == "tiny"
    assert ctl["Version"] == "1.2-3"
    assert ctl["Description"] == "tiny test package\n with a second line"


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_other_compressions(tmp_path: Path, compression: str) -> None:
    p = build_deb(tmp_path, compression)
    assert deb_control(p)["Package"] == "tiny"
    assert deb_extract(p, ["usr/share/doc/readme"]) == {"usr/share/doc/readme": b"hi\n"}


def test_list(deb: Path) -> None:
    names = deb_list(deb)
    assert "usr/share/doc/readme" in names
    assert "usr/lib/debian-installer/images/13/amd64/text/debian-installer/amd64/linux" in names
    assert "usr/share/doc/" in names
    assert not any(n.startswith("./") for n in names)


def test_extract_with_and_without_dot_slash(deb: Path) -> None:
    k = "usr/lib/debian-installer/images/13/amd64/text/debian-installer/amd64/linux"
    got = deb_extract(deb, [k, "./usr/share/doc/readme"])
    assert got == {k: KERNEL, "./usr/share/doc/readme": b"hi\n"}
    assert deb_extract(deb.read_bytes(), ["/" + k]) == {"/" + k: KERNEL}


def test_extract_follows_links(deb: Path) -> None:
    got = deb_extract(deb, ["usr/share/doc/link", "usr/vmlinuz"])
    assert got == {"usr/share/doc/link": b"hi\n", "usr/vmlinuz": KERNEL}


def test_missing_member(deb: Path) -> None:
    with pytest.raises(MissingMemberError, match="no-such-file") as exc:
        deb_extract(deb, ["usr/share/doc/readme", "usr/no-such-file"])
    assert isinstance(exc.value, BuilderError) and isinstance(exc.value, KeyError)
    assert str(deb) in str(exc.value)
    with pytest.raises(MissingMemberError, match="not a regular file"):
        deb_extract(deb, ["usr/share/doc"])


def test_malformed(tmp_path: Path, deb: Path) -> None:
    with pytest.raises(VerificationError, match="not an ar archive"):
        deb_control(b"this is not a deb")
    with pytest.raises(VerificationError, match="not an ar archive"):
        ar_members(b"PK\x03\x04 zip file")
    blob = deb.read_bytes()
    with pytest.raises(VerificationError, match="truncated"):
        deb_control(blob[: len(blob) // 2])  # a truncated download
    corrupt = bytearray(blob)
    corrupt[len(blob) - 200 : len(blob) - 100] = b"\0" * 100  # garbage inside data.tar.xz
    with pytest.raises(VerificationError, match=r"data\.tar\.xz"):
        deb_extract(bytes(corrupt), ["usr/lib/debian-installer/images/13/amd64/text/debian-installer/amd64/linux"])
    with pytest.raises(VerificationError, match="cannot open"):
        deb_control(tmp_path / "missing.deb")
    # An ar archive that is not a Debian package.
    ar = b"!<arch>\n" + b"foo/            0           0     0     644     4         `\n" + b"abcd"
    assert ar_members(ar) == {"foo": b"abcd"}
    with pytest.raises(VerificationError, match="debian-binary"):
        deb_control(ar)
