"""What a build VM is: a frozen, backend-neutral description (:class:`VmSpec`) of one QEMU guest.

The QEMU backend turns it into an argv (:func:`builder.vm.qemu.qemu_argv`), the libvirt backend into domain XML
(:func:`builder.vm.libvirt.domain_xml`). Both functions are pure; nothing here touches the host.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import VmError
from .firmware import BIOS, Firmware
from .guestnet import GuestService

Accel = Literal["kvm", "tcg"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def vm_name(image: str, role: str) -> str:
    """The name of image ``image``'s ``role`` VM (``NAME-install``, ``NAME-VARIANT-provision``,
    ``NAME-VARIANT-verify``): a libvirt host holds one domain of a name at a time, so parallel variants on one
    host need their own. A name longer than VmSpec allows keeps its start and a hash of the whole image name."""
    name = f"{image}-{role}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(image.encode()).hexdigest()[:8]
    return f"{image[:63 - len(role) - 10]}-{digest}-{role}"


@dataclass(frozen=True)
class Drive:
    """A block device of the guest.

    ``media="disk"`` becomes a virtio disk, ``media="cdrom"`` a CD-ROM on the machine's SATA/IDE bus (always
    read-only). A CD-ROM whose file ends in ``.iso`` and whose format was left at the default is read as
    ``raw`` (an ISO is never qcow2). ``discard`` passes the guest's TRIM through (``discard=unmap``) and turns
    written zeros into holes (``detect-zeroes=unmap``), so ``fstrim`` in the guest shrinks the image.
    ``cache="unsafe"`` ignores the guest's flushes (much faster for a throw-away install disk, but a host crash
    loses data). ``keep=False`` says that what the guest writes is not needed afterwards (a scratch overlay): a
    remote libvirt host does not send it back.
    """

    path: Path
    format: str = "qcow2"
    media: Literal["disk", "cdrom"] = "disk"
    readonly: bool = False
    discard: bool = True
    cache: Literal["writeback", "unsafe", "none", "writethrough", "directsync"] = "writeback"
    keep: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.media not in ("disk", "cdrom"):
            raise VmError(f"drive {self.path}: media must be 'disk' or 'cdrom', not {self.media!r}")
        if self.media == "cdrom" and self.format == "qcow2" and self.path.suffix.lower() == ".iso":
            object.__setattr__(self, "format", "raw")
        if not re.fullmatch(r"[a-z0-9]+", self.format):
            raise VmError(f"drive {self.path}: not an image format: {self.format!r}")
        if self.cache not in ("writeback", "unsafe", "none", "writethrough", "directsync"):
            raise VmError(f"drive {self.path}: not a cache mode: {self.cache!r}")

    @classmethod
    def cdrom(cls, path: Path) -> Drive:
        """A read-only raw CD-ROM (an ISO image)."""
        return cls(path=Path(path), format="raw", media="cdrom", readonly=True, discard=False)


@dataclass(frozen=True)
class VmSpec:
    """One guest. ``ssh_forward`` is a host TCP port on 127.0.0.1 forwarded to the guest's port 22 (QEMU user
    networking; :mod:`builder.vm.guestnet` says how the guest sees the host). ``extra_forwards`` are more
    ``(host_port, guest_port)`` TCP pairs. ``guest_services`` are host services the guest reaches at a fixed
    address of its own (QEMU ``guestfwd``), such as the archive gateway. ``cpu_model=None`` means ``max``
    under TCG and ``host`` under KVM.
    ``firmware`` is SeaBIOS (the default), OVMF, or OVMF with Secure Boot (:mod:`builder.vm.firmware`; its
    variable store is this VM's own copy).
    ``no_reboot`` makes a guest reboot end the VM like a power-off (the installer reboots or powers off at the
    end; both must end the VM). ``serial_log`` receives the guest's first serial port (ttyS0).
    ``udp_to_host`` are the UDP ports on the host's 127.0.0.1 that the guest sends to at
    :data:`~builder.vm.guestnet.HOST` (the installer's syslog): slirp forwards them by itself, nothing for a local
    QEMU to set up; a remote libvirt host relays them back to this machine.
    """

    name: str
    memory_mib: int
    cpus: int
    accel: Accel
    drives: tuple[Drive, ...] = ()
    boot: Literal["cdrom", "disk"] = "disk"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    serial_log: Path | None = None
    ssh_forward: int | None = None
    extra_forwards: tuple[tuple[int, int], ...] = ()
    guest_services: tuple[GuestService, ...] = ()
    udp_to_host: tuple[int, ...] = ()
    nic_model: str = "virtio-net-pci"
    machine: str = "q35"
    cpu_model: str | None = None
    no_reboot: bool = True
    extra_args: tuple[str, ...] = ()
    firmware: Firmware = BIOS

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _NAME_RE.match(self.name):
            problems.append(f"name {self.name!r} must be 1-63 characters of letters, digits, '.', '_', '-'")
        if self.memory_mib < 64:
            problems.append(f"memory_mib {self.memory_mib} is too small (at least 64)")
        if not 1 <= self.cpus <= 256:
            problems.append(f"cpus {self.cpus} must be between 1 and 256")
        if self.accel not in ("kvm", "tcg"):
            problems.append(f"accel must be 'kvm' or 'tcg', not {self.accel!r} (resolve 'auto' with choose_accel)")
        if self.boot not in ("cdrom", "disk"):
            problems.append(f"boot must be 'cdrom' or 'disk', not {self.boot!r}")
        if self.firmware.uefi and not self.machine.startswith("q35"):
            problems.append(f"{self.firmware.kind} firmware needs a q35 machine, not {self.machine!r}")
        if self.initrd is not None and self.kernel is None:
            problems.append("initrd given without kernel")
        if self.append and self.kernel is None:
            problems.append("append (kernel command line) given without kernel")
        ports = [p for p in (self.ssh_forward,) if p is not None] + [h for h, _ in self.extra_forwards]
        for port in ports + [g for _, g in self.extra_forwards] + list(self.udp_to_host):
            if not 1 <= port <= 65535:
                problems.append(f"port {port} is out of range")
        for svc in self.guest_services:
            if not 1 <= svc.guest_port <= 65535 or not 1 <= svc.host_port <= 65535:
                problems.append(f"guest service {svc} has a port out of range")
            if not re.fullmatch(r"10\.0\.2\.\d{1,3}", svc.guest_ip):
                problems.append(f"guest service address {svc.guest_ip} is not in the user network 10.0.2.0/24")
        if len(set(ports)) != len(ports):
            problems.append(f"host ports are forwarded twice: {sorted(ports)}")
        if problems:
            raise VmError(f"invalid VM spec {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "drives", tuple(self.drives))
        object.__setattr__(self, "extra_forwards", tuple((int(h), int(g)) for h, g in self.extra_forwards))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "guest_services", tuple(self.guest_services))
        object.__setattr__(self, "udp_to_host", tuple(int(p) for p in self.udp_to_host))
        for attr in ("kernel", "initrd", "serial_log"):
            value = getattr(self, attr)
            if value is not None:
                object.__setattr__(self, attr, Path(value))

    @property
    def effective_cpu_model(self) -> str:
        if self.cpu_model:
            return self.cpu_model
        return "host" if self.accel == "kvm" else "max"

    @property
    def forwards(self) -> tuple[tuple[int, int], ...]:
        """Every (host port, guest port) TCP forward, SSH first."""
        ssh = ((self.ssh_forward, 22),) if self.ssh_forward is not None else ()
        return ssh + self.extra_forwards

    def user_netdev(self, netdev_id: str) -> str:
        """The ``-netdev user`` value: port forwards on 127.0.0.1 and the guest services (both backends)."""
        opts = [f"user,id={netdev_id}"]
        opts += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.forwards]
        opts += [svc.netdev_option() for svc in self.guest_services]
        return ",".join(opts)

    def boot_order(self) -> list[Drive]:
        """The drives in boot order: the ``boot`` media kind first, then the rest in their given order."""
        first = [d for d in self.drives if d.media == self.boot]
        return first + [d for d in self.drives if d.media != self.boot]
