"""builder.image against the real qemu-img (and qemu-io to write data)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder import image
from builder.errors import ImageError

pytestmark = [pytest.mark.integration]

GIB = 1 << 30


def _qemu_io(img: Path, *commands: str) -> None:
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io (qemu-utils) not installed")
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(img)], check=True, capture_output=True)


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A 1 GiB qcow2 with 96 MiB of (compressible) data at two places."""
    img = image.create(tmp_path / "src.qcow2", GIB)
    _qemu_io(img, "write -P 0x61 0 64M", "write -P 0x12 512M 32M")
    return img


@pytest.mark.timeout(60)
def test_create_info_check(tmp_path: Path) -> None:
    img = image.create(tmp_path / "sub" / "disk.qcow2", GIB)
    info = image.info(img)
    assert info["format"] == "qcow2" and info["virtual-size"] == GIB
    result = image.check(img)
    assert result["check-errors"] == 0 and result.get("allocated-clusters", 0) == 0
    raw = image.create(tmp_path / "disk.raw", 1 << 20, fmt="raw")
    assert image.info(raw)["format"] == "raw"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_convert_compressed(tmp_path: Path, written: Path, compression: str) -> None:
    seen: list[float] = []
    out = image.convert(written, tmp_path / "out" / "final.qcow2", compression=compression,  # type: ignore[arg-type]
                        on_progress=seen.append)
    assert out.exists() and not out.with_name("final.qcow2.part").exists()
    assert seen and seen[-1] == 100.0
    assert seen == sorted(seen) and len(seen) > 2, seen
    result = image.check(out)
    assert result["compressed-clusters"] > 0
    assert result["compressed-clusters"] == result["allocated-clusters"]
    info = image.info(out)
    assert info["format-specific"]["data"]["compression-type"] == compression
    assert out.stat().st_size < 2 << 20  # 96 MiB of patterns compress to almost nothing
    # same content
    subprocess.run(["qemu-img", "compare", str(written), str(out)], check=True, capture_output=True)


@pytest.mark.timeout(60)
def test_convert_uncompressed_drops_zero_clusters(tmp_path: Path) -> None:
    src = image.create(tmp_path / "z.qcow2", GIB)
    _qemu_io(src, "write -P 0x00 0 64M", "write -P 0x33 128M 1M")
    out = image.convert(src, tmp_path / "z-out.qcow2", compression="none")
    result = image.check(out)
    assert result.get("compressed-clusters", 0) == 0
    assert result["allocated-clusters"] * 65536 < 4 << 20  # the 64 MiB of zeros are gone, 1 MiB of data stays


@pytest.mark.timeout(60)
def test_overlay(tmp_path: Path, written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the backing path is recorded absolute: works from anywhere
    ov = image.overlay(written, Path("over.qcow2"))
    info = image.info(ov)
    assert info["backing-filename"] == str(written.absolute())
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == GIB
    _qemu_io(ov, "write -P 0x77 0 1M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x61 0 64M", str(written)], check=True,
                   capture_output=True)  # the base is untouched
    with pytest.raises(ImageError, match="does not exist"):
        image.overlay(tmp_path / "nope.qcow2", tmp_path / "x.qcow2")


@pytest.mark.timeout(60)
def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        image.info(tmp_path / "missing.qcow2")
    with pytest.raises(ImageError, match="does not exist"):
        image.convert(tmp_path / "missing.qcow2", tmp_path / "o.qcow2", compression="zlib")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00" * 4096)  # qcow2 magic, garbage header
    with pytest.raises(ImageError) as info:
        image.check(bad)
    assert str(info.value)
    with pytest.raises(ImageError, match="creating"):
        image.create(tmp_path / "x.img", GIB, fmt="nosuchformat")
    with pytest.raises(ImageError, match="onto itself"):
        image.convert(bad, bad, compression="zlib")


@pytest.mark.timeout(60)
def test_convert_failure_leaves_no_partial_file(tmp_path: Path, written: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    dst = ro / "final.qcow2"
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores directory permissions: use a path qemu-img cannot create
            dst = tmp_path / "no-such-dir-file" / "x" / "final.qcow2"
            (tmp_path / "no-such-dir-file").write_text("a file, not a directory")
        with pytest.raises((ImageError, OSError)):
            image.convert(written, dst, compression="zlib")
        assert not dst.exists() and not dst.with_name(dst.name + ".part").exists()
    finally:
        ro.chmod(0o700)


@pytest.mark.timeout(120)
def test_qemu_img_progress_through_a_pipe_parses_to_rising_percentages(tmp_path: Path, written: Path) -> None:
    """What ``qemu-img convert -p`` really writes into a pipe (not a terminal) is what parse_progress reads."""
    proc = subprocess.run(["qemu-img", "convert", "-p", "-c", "-O", "qcow2", str(written), str(tmp_path / "o.qcow2")],
                          check=True, capture_output=True, timeout=100)
    assert b"\r" in proc.stdout or b"\n" in proc.stdout
    pcts = image.parse_progress(proc.stdout)
    assert len(pcts) > 2 and pcts == sorted(pcts) and pcts[-1] == 100.0, proc.stdout[:300]


@pytest.mark.timeout(120)
def test_compression_progress_events_reach_on_event(tmp_path: Path, written: Path) -> None:
    """The finalize stage's compression: progress events (unit percent, rising to 100 of 100) through the
    Emitter to the Python API's on_event, the same events the live display and the JSON lines get."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from builder.events import Emitter, Event
    from builder.stages import finalize

    seen: list[Event] = []
    emitter = Emitter(seen.append)
    with ExitStack() as stack:
        ctx = SimpleNamespace(options=SimpleNamespace(output=tmp_path / "out"), stack=stack, name="img",
                              config=SimpleNamespace(disk=SimpleNamespace(compression="zlib")), emitter=emitter)
        with emitter.stage("finalize"):
            final = finalize.compress(ctx, written)  # type: ignore[arg-type]
        assert final.image.is_file()
    events = [ev for ev in seen if ev.kind == "progress"]
    assert len(events) > 2 and all(ev.stage == "finalize" and ev.message == "compress" for ev in events)
    assert all(ev.data == {"unit": "percent"} and ev.total == 100 for ev in events)
    pcts = [ev.current for ev in events]
    assert pcts == sorted(pcts) and pcts[-1] == 100.0, pcts
