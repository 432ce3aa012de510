"""The KVM probe against this host's real /dev/kvm, with a real Debian kernel.

On the build machines /dev/kvm is a PVM module that cannot run a stock kernel: the probe must say so (fast)
and ``auto`` must fall back to TCG. On a host with working KVM the same tests check the opposite. The kernel
is a stock Debian kernel fetched with ``apt-get download`` (verified by apt against the host's signed package
lists) and unpacked with ``dpkg-deb -x``; see conftest_vm.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import VmError
from builder.vm import accel, choose_accel, kvm_works

try:
    from conftest_vm import debian_kernel
except ImportError:  # tests/ imported as a package
    from .conftest_vm import debian_kernel

pytestmark = [pytest.mark.integration, pytest.mark.vm]

# PVM (or no /dev/kvm at all): KVM cannot run a stock kernel here
KVM_BROKEN = not os.path.exists("/dev/kvm") or os.path.isdir("/sys/module/kvm_pvm")


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return debian_kernel(tmp_path_factory)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    accel.clear_cache()
    yield
    accel.clear_cache()


@pytest.mark.timeout(90)
def test_kvm_works_reports_this_host(kernel: Path) -> None:
    t0 = time.monotonic()
    ok, reason = kvm_works(kernel, timeout=30)
    elapsed = time.monotonic() - t0
    print(f"kvm_works: {ok} in {elapsed:.2f} s: {reason}")
    if KVM_BROKEN:
        assert ok is False
        assert reason  # e.g. "QEMU failed: failed to set MSR 0x10a to 0x69 (kernel probe, …)"
        if os.path.exists("/dev/kvm"):
            assert "failed to set MSR" in reason or "KVM internal error" in reason or "within" in reason
    else:
        assert ok is True, reason


@pytest.mark.timeout(120)
def test_choose_accel_on_this_host(kernel: Path) -> None:
    assert choose_accel("tcg", kernel)[0] == "tcg"
    if KVM_BROKEN:
        chosen, why = choose_accel("auto", kernel)
        assert chosen == "tcg" and "KVM is unusable" in why
        t0 = time.monotonic()
        with pytest.raises(VmError, match="kvm was requested"):
            choose_accel("kvm", kernel)
        assert time.monotonic() - t0 < 0.5  # memoized, not probed again
    else:
        assert choose_accel("auto", kernel)[0] == "kvm"
        assert choose_accel("kvm", kernel)[0] == "kvm"


@pytest.mark.timeout(90)
def test_probe_recognises_a_working_boot_under_tcg(kernel: Path) -> None:
    """The same probe machinery under TCG must see the kernel run (so a False above is KVM's fault)."""
    ok, reason = accel.boot_probe(kernel, accel="tcg,thread=multi", cpu="max", timeout=60)
    assert ok, reason
    ok, reason = accel.boot_probe(None, accel="tcg", cpu="max", timeout=30)
    assert ok, reason


@pytest.mark.timeout(60)
def test_missing_kernel_is_an_error(tmp_path: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the probe never gets to the kernel")
    with pytest.raises(VmError, match="does not exist"):
        kvm_works(tmp_path / "vmlinuz")
