"""Build VMs: a backend-neutral spec, two backends (QEMU subprocess + QMP, libvirt), the accelerator probe.

Usage::

    accel, why = choose_accel(cfg.vm.accel, installer_kernel)      # log `why` as a warning when it fell back
    spec = VmSpec(name="install", memory_mib=3072, cpus=2, accel=accel, drives=(Drive(disk),), ...)
    with open_machine(spec, workdir, **cfg.vm.machine_options(cfg.name)) as vm:
        rc = vm.wait(timeout=3600)
    # no VM is left running here, whatever happened in the block
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from ..errors import VmError
from .accel import choose_accel, kvm_works
from .net import find_free_port
from .qemu import QemuMachine, qemu_argv
from .spec import Drive, VmSpec

__all__ = [
    "Drive",
    "Machine",
    "QemuMachine",
    "VmSpec",
    "choose_accel",
    "find_free_port",
    "kvm_works",
    "open_machine",
    "qemu_argv",
]


@runtime_checkable
class Machine(Protocol):
    """What both backends offer. A Machine is a context manager: entering starts the VM, leaving always
    leaves no VM running (killed/destroyed if needed)."""

    spec: VmSpec
    serial_log: Path
    stop_method: str | None

    @property
    def name(self) -> str: ...

    def start(self) -> None: ...

    def is_running(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> int | None: ...

    def status(self) -> str: ...

    def screendump(self, path: Path) -> Path: ...

    def powerdown(self) -> None: ...

    def shutdown(self, timeout: float = 60) -> int: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...

    def stderr_tail(self, n: int = 20) -> list[str]: ...

    def serial_tail(self, n: int = 20) -> list[str]: ...

    def wait_for_serial(self, pattern: str, timeout: float) -> str | None: ...

    def __enter__(self) -> Machine: ...

    def __exit__(self, *exc: object) -> None: ...


def open_machine(
    spec: VmSpec,
    workdir: Path,
    *,
    backend: Literal["qemu", "libvirt"] = "qemu",
    libvirt_uri: str = "qemu:///system",
    libvirt_pool: str = "default",
    libvirt_pool_dir: str | None = None,
) -> Machine:
    """A not yet started machine for ``spec`` on ``backend`` (use it as a context manager to start it).
    ``libvirt_pool``/``libvirt_pool_dir`` matter for a remote ``libvirt_uri`` only (docs/remote-libvirt.md)."""
    if backend == "qemu":
        return QemuMachine(spec, workdir)
    if backend == "libvirt":
        from .libvirt import LibvirtMachine

        return LibvirtMachine(spec, workdir, uri=libvirt_uri, pool=libvirt_pool, pool_dir=libvirt_pool_dir)
    raise VmError(f"unknown VM backend {backend!r} (qemu or libvirt)")
