"""LibvirtMachine against a real libvirtd (qemu:///system by default, BUILDER_LIBVIRT_URI to change).

Skipped with the reason when libvirt-python is not installed or no libvirtd answers. Boots a stock Debian
kernel (fetched with ``apt-get download``, verified by apt against the host's signed lists; see
conftest_vm.py) in a transient TCG domain.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from builder.vm import Drive, VmSpec, find_free_port, open_machine

try:
    from conftest_vm import debian_kernel, require_libvirt
except ImportError:  # tests/ imported as a package
    from .conftest_vm import debian_kernel, require_libvirt

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.libvirt]

URI = os.environ.get("BUILDER_LIBVIRT_URI", "qemu:///system")


@pytest.fixture(scope="session")  # before the (session) kernel fixture: skip without downloading
def libvirt_conn() -> None:
    require_libvirt(URI)


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return debian_kernel(tmp_path_factory)


@pytest.mark.timeout(180)
def test_transient_domain_boots_kernel(libvirt_conn: None, tmp_path: Path, kernel: Path) -> None:
    from builder import image

    disk = image.create(tmp_path / "disk.qcow2", 1 << 30)
    spec = VmSpec(
        name=f"builder-test-{os.getpid()}",
        memory_mib=512,
        cpus=1,
        accel="tcg",
        drives=(Drive(disk),),
        kernel=kernel,
        append="console=ttyS0 panic=-1",
        ssh_forward=find_free_port(),
        no_reboot=True,
    )
    with open_machine(spec, tmp_path, backend="libvirt", libvirt_uri=URI) as vm:
        t0 = time.monotonic()
        assert vm.is_running()
        assert vm.status() in ("running", "exited")
        assert vm.wait_for_serial(r"Linux version \S+", timeout=120), vm.serial_tail()
        print(f"libvirt: kernel banner after {time.monotonic() - t0:.1f} s")
        rc = vm.wait(timeout=120)  # panic=-1 → reboot → on_reboot=destroy
        assert rc == 0, vm.stderr_tail()
        assert not vm.is_running()
    assert "Kernel panic" in vm.serial_log.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_exit_destroys_the_domain(libvirt_conn: None, tmp_path: Path) -> None:
    import libvirt

    name = f"builder-test-kill-{os.getpid()}"
    spec = VmSpec(name=name, memory_mib=256, cpus=1, accel="tcg")
    with open_machine(spec, tmp_path, backend="libvirt", libvirt_uri=URI) as vm:
        assert vm.status() == "running"
        shot = vm.screendump(tmp_path / "screen.ppm")
        assert shot.read_bytes().startswith(b"P6\n")
    conn = libvirt.open(URI)
    try:
        assert name not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()
    assert vm.stop_method == "kill"


@pytest.mark.timeout(60)
def test_start_failure_names_the_problem(libvirt_conn: None, tmp_path: Path) -> None:
    from builder.errors import VmError

    spec = VmSpec(name=f"builder-test-fail-{os.getpid()}", memory_mib=256, cpus=1, accel="tcg",
                  drives=(Drive(tmp_path / "missing.qcow2"),))
    with pytest.raises(VmError, match="libvirt could not start") as info, \
            open_machine(spec, tmp_path, backend="libvirt", libvirt_uri=URI):
        pass
    assert "missing.qcow2" in str(info.value)
