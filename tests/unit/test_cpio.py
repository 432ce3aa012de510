"""newc cpio writer/reader and initrd appending: round trips in Python, and GNU cpio / zcat for real."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from builder.errors import MediaError
from builder.installer.cpio import (
    CpioEntry,
    append_to_initrd,
    cpio_newc,
    normalize_name,
    read_cpio,
    read_cpio_entries,
)

FILES = {
    "preseed.cfg": b"d-i debian-installer/locale string en_US.UTF-8\n",
    "usr/share/keyrings/archive.gpg": bytes(range(256)) * 3 + b"x",  # odd length: tests data padding
    "a": b"",
}


def sample_entries() -> list[CpioEntry]:
    return [
        CpioEntry.directory("usr"),
        CpioEntry.directory("usr/share"),
        CpioEntry.directory("usr/share/keyrings"),
        CpioEntry.file("preseed.cfg", FILES["preseed.cfg"]),
        CpioEntry.file("usr/share/keyrings/archive.gpg", FILES["usr/share/keyrings/archive.gpg"], 0o600),
        CpioEntry.file("a", b""),
        CpioEntry.symlink("link", "preseed.cfg"),
        CpioEntry.file("bin/tool", b"#!/bin/sh\n", 0o755),
    ]


def test_layout_alignment_and_trailer() -> None:
    data = cpio_newc([CpioEntry.file("ab", b"xyz")])
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    # header 110 + "ab\0" = 113 → padded to 116; data 3 → padded to 4
    assert data[113:116] == b"\0\0\0"
    assert data[116:119] == b"xyz" and data[119:120] == b"\0"
    assert data[120:126] == b"070701"
    assert b"TRAILER!!!\0" in data
    unpadded = cpio_newc([CpioEntry.file("ab", b"xyz")], pad_to=1)
    assert len(unpadded) % 4 == 0 and data.startswith(unpadded)


def test_round_trip() -> None:
    entries = sample_entries()
    back = read_cpio_entries(cpio_newc(entries))
    assert [e.name for e in back] == [e.name for e in entries]
    for want, got in zip(entries, back, strict=True):
        assert got.mode == want.mode
        assert got.data == want.data
    files = read_cpio(cpio_newc(entries))
    assert set(files) == {*FILES, "bin/tool"}
    assert files["usr/share/keyrings/archive.gpg"] == FILES["usr/share/keyrings/archive.gpg"]
    assert stat.S_IMODE(back[4].mode) == 0o600


def test_deterministic() -> None:
    assert cpio_newc(sample_entries()) == cpio_newc(sample_entries())


@pytest.mark.parametrize("name", ["", "/", "../etc/passwd", "a/../b", "a//b", "x\0y", "TRAILER!!!"])
def test_bad_names(name: str) -> None:
    with pytest.raises(MediaError):
        cpio_newc([CpioEntry.file(name, b"x")])


def test_duplicate_names_rejected() -> None:
    with pytest.raises(MediaError, match="duplicate"):
        cpio_newc([CpioEntry.file("x", b"1"), CpioEntry.file("/x", b"2")])


def test_name_normalization() -> None:
    assert normalize_name("./var/lib/dpkg/status") == "var/lib/dpkg/status"
    assert normalize_name("/preseed.cfg") == "preseed.cfg"


def test_append_to_initrd_concatenates_gzip_members() -> None:
    base = gzip.compress(cpio_newc([CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
                                    CpioEntry.file("preseed.cfg", b"old\n")]))
    new = append_to_initrd(base, {"preseed.cfg": b"new\n", "usr/share/keyrings/archive.gpg": (b"k", 0o644)},
                           dirs=["usr", ("usr/share", 0o755)])
    assert new.startswith(base)
    files = read_cpio(new)
    assert files["init"] == b"#!/bin/sh\n"
    assert files["preseed.cfg"] == b"new\n"  # the later archive wins, as in the kernel
    assert files["usr/share/keyrings/archive.gpg"] == b"k"
    # python's gzip reads concatenated members into one stream: two archives back to back
    stream = gzip.decompress(new)
    assert stream.count(b"TRAILER!!!") == 2


def test_append_rejects_garbage() -> None:
    with pytest.raises(MediaError):
        append_to_initrd(b"not an initrd", {"x": b"y"})
    with pytest.raises(MediaError):
        append_to_initrd(gzip.compress(b"x"), {})
    with pytest.raises(MediaError):
        append_to_initrd(gzip.compress(b"x"), {"x": (b"y", stat.S_IFDIR | 0o755)})


def test_read_cpio_handles_padding_and_mixed_members() -> None:
    a = cpio_newc([CpioEntry.file("a", b"1")])
    b = gzip.compress(cpio_newc([CpioEntry.file("b", b"2")]))
    assert read_cpio(a + b"\0" * 64 + b + b"\0" * 4) == {"a": b"1", "b": b"2"}
    whole = cpio_newc([CpioEntry.file("a", b"1")], pad_to=1)
    with pytest.raises(MediaError, match="truncated"):
        read_cpio(whole[:-10])  # cut into the trailer
    with pytest.raises(MediaError, match="truncated"):
        read_cpio(gzip.compress(whole)[:-12])


# ---------------------------------------------------------------------------------------------- real tools


needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")


@pytest.mark.integration
@needs_cpio
def test_gnu_cpio_lists_and_extracts(tmp_path: Path) -> None:
    archive = cpio_newc(sample_entries())
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True, timeout=30)
    names = listing.stdout.decode().split()
    assert names == [e.name for e in sample_entries()]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"], input=archive, cwd=out,
                   check=True, timeout=30)
    assert (out / "preseed.cfg").read_bytes() == FILES["preseed.cfg"]
    assert (out / "usr/share/keyrings/archive.gpg").read_bytes() == FILES["usr/share/keyrings/archive.gpg"]
    assert stat.S_IMODE((out / "usr/share/keyrings/archive.gpg").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "bin/tool").stat().st_mode) == 0o755
    assert (out / "link").is_symlink() and (out / "link").readlink() == Path("preseed.cfg")
    assert (out / "a").read_bytes() == b""


@pytest.mark.integration
@needs_cpio
def test_zcat_and_cpio_read_an_appended_initrd(tmp_path: Path) -> None:
    base = gzip.compress(cpio_newc([CpioEntry.file("init", b"base\n", 0o755)]))
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(append_to_initrd(base, {"preseed.cfg": b"seed\n"}))
    stream = subprocess.run(["zcat", str(initrd)], capture_output=True, check=True, timeout=30).stdout
    # GNU cpio stops at the first trailer, as tools do; the kernel goes on to the next archive.
    first = subprocess.run(["cpio", "-t", "--quiet"], input=stream, capture_output=True, check=True, timeout=30)
    assert first.stdout.decode().split() == ["init"]
    second_start = stream.index(b"TRAILER!!!")
    second_start = stream.index(b"070701", second_start)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-i", "--quiet"], input=stream[second_start:], cwd=out, check=True, timeout=30)
    assert (out / "preseed.cfg").read_bytes() == b"seed\n"
    assert read_cpio(initrd.read_bytes()) == {"init": b"base\n", "preseed.cfg": b"seed\n"}
