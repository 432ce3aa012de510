"""The pure parts of builder.image: convert argv and qemu-img progress parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import ImageError
from builder.image import convert_argv, parse_progress


def test_convert_argv() -> None:
    assert convert_argv(Path("a.qcow2"), Path("b.qcow2"), compression="zlib", src_format="qcow2") == [
        "qemu-img", "convert", "-p", "-f", "qcow2", "-O", "qcow2", "-c", "-o", "compression_type=zlib",
        "a.qcow2", "b.qcow2",
    ]  # fmt: skip
    assert convert_argv(Path("a.raw"), Path("b.qcow2"), compression="none") == [
        "qemu-img", "convert", "-p", "-O", "qcow2", "a.raw", "b.qcow2",
    ]  # fmt: skip
    assert "compression_type=zstd" in convert_argv(Path("a"), Path("b"), compression="zstd")
    with pytest.raises(ImageError, match="unknown compression"):
        convert_argv(Path("a"), Path("b"), compression="xz")  # type: ignore[arg-type]


def test_parse_progress() -> None:
    out = b"    (0.00/100%)\r    (1.04/100%)\r    (100.00/100%)\r\n"
    assert parse_progress(out) == [0.0, 1.04, 100.0]
    assert parse_progress(b"garbage (12/100%)") == [12.0]
    assert parse_progress(b"") == []
