"""Accelerator choice: the pure parts and the decision logic (the real probe is an integration test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import VmError
from builder.vm import accel


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    accel.clear_cache()
    yield
    accel.clear_cache()


def test_kernel_ran_markers() -> None:
    assert accel._kernel_ran("") is None
    assert accel._kernel_ran("Linux version 6.1.0\n") is None
    panic = "[0.0] Linux version 6.1.0\n[1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n"
    assert accel._kernel_ran(panic) == "VFS: Unable to mount root"
    many = "Linux version 6.1\n" + "x\n" * 40
    assert accel._kernel_ran(many) is not None
    assert accel._kernel_ran("Kernel panic before the banner\n") is None


def test_probe_argv() -> None:
    argv = accel.probe_argv(Path("/k/vmlinuz"), serial=Path("/t/s,1.log"))
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1"
    assert "-initrd" not in argv and "-no-reboot" in argv
    assert "file,id=probe0,path=/t/s,,1.log" in argv
    fw = accel.probe_argv(None, serial=Path("/t/d.log"))
    assert "isa-debugcon,iobase=0x402,chardev=probe0" in fw and "-kernel" not in fw


def test_no_dev_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = accel.os.path.exists
    monkeypatch.setattr(accel.os.path, "exists", lambda p: False if p == "/dev/kvm" else real_exists(p))
    assert accel.kvm_works(Path("/nonexistent")) == (False, "no /dev/kvm")


def test_choose_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path | None] = []

    def fake(kernel: Path | None, **_: object) -> tuple[bool, str]:
        calls.append(kernel)
        return False, "failed to set MSR 0x10a"

    monkeypatch.setattr(accel, "kvm_works", fake)
    assert accel.choose_accel("tcg", None) == ("tcg", "accel: tcg requested")
    assert calls == []
    chosen, why = accel.choose_accel("auto", Path("/k"))
    assert chosen == "tcg" and "failed to set MSR" in why
    with pytest.raises(VmError, match="kvm was requested") as info:
        accel.choose_accel("kvm", Path("/k"))
    assert "tcg" in (info.value.hint or "")
    assert calls == [Path("/k")]  # memoized: probed once
    with pytest.raises(VmError, match="unknown accelerator"):
        accel.choose_accel("hvf", None)  # type: ignore[arg-type]


def test_choose_accel_kvm_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_works", lambda kernel, **_: (True, "the guest ran"))
    assert accel.choose_accel("auto", None) == ("kvm", "the guest ran")
    assert accel.choose_accel("kvm", None)[0] == "kvm"
