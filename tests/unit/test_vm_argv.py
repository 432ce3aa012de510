"""qemu_argv() and VmSpec/Drive are pure: compare against expected command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import VmError
from builder.vm import Drive, VmSpec, qemu_argv
from builder.vm.guestnet import GuestService

SOCK = Path("/run/b/vm.qmp")


def test_installer_spec_argv() -> None:
    spec = VmSpec(
        name="install",
        memory_mib=3072,
        cpus=2,
        accel="tcg",
        drives=(Drive(Path("/w/disk.qcow2")), Drive(Path("/w/installer.iso"), media="cdrom")),
        boot="cdrom",
        kernel=Path("/w/linux"),
        initrd=Path("/w/initrd.gz"),
        append="auto=true priority=critical console=ttyS0,115200",
        serial_log=Path("/w/serial.log"),
        ssh_forward=10022,
        extra_forwards=((10080, 80),),
        guest_services=(GuestService("10.0.2.100", 80, 40123),),
    )
    assert qemu_argv(spec, qmp_socket=SOCK) == [
        "qemu-system-x86_64",
        "-name", "install",
        "-nodefaults",
        "-no-user-config",
        "-machine", "q35",
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-smp", "2",
        "-m", "3072M",
        "-display", "none",
        "-device", "VGA",
        "-qmp", "unix:/run/b/vm.qmp,server=on,wait=off",
        "-chardev", "file,id=serial0,path=/w/serial.log",
        "-serial", "chardev:serial0",
        "-drive", "if=none,id=drive0,file=/w/disk.qcow2,format=qcow2,cache=writeback,discard=unmap,detect-zeroes=unmap",
        "-device", "virtio-blk-pci,drive=drive0,bootindex=2",  # -kernel boots first (bootindex 0 is its)
        "-drive", "if=none,id=drive1,file=/w/installer.iso,format=raw,cache=writeback,readonly=on",
        "-device", "ide-cd,drive=drive1,bus=ide.0,bootindex=1",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22,hostfwd=tcp:127.0.0.1:10080-:80,"
                   "guestfwd=tcp:10.0.2.100:80-cmd:socat STDIO TCP:127.0.0.1:40123",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        "-kernel", "/w/linux",
        "-initrd", "/w/initrd.gz",
        "-append", "auto=true priority=critical console=ttyS0,115200",
        "-no-reboot",
    ]  # fmt: skip


def test_minimal_kvm_spec_argv() -> None:
    spec = VmSpec(
        name="verify",
        memory_mib=1024,
        cpus=1,
        accel="kvm",
        drives=(Drive(Path("/o/a,b.qcow2"), discard=False, cache="unsafe"),),
        no_reboot=False,
        machine="pc",
        nic_model="e1000",
        extra_args=("-snapshot",),
    )
    assert qemu_argv(spec, qmp_socket=Path("/tmp/q,1.sock"), binary="/usr/bin/qemu-system-x86_64") == [
        "/usr/bin/qemu-system-x86_64",
        "-name", "verify",
        "-nodefaults",
        "-no-user-config",
        "-machine", "pc",
        "-accel", "kvm",
        "-cpu", "host",
        "-smp", "1",
        "-m", "1024M",
        "-display", "none",
        "-device", "VGA",
        "-qmp", "unix:/tmp/q,,1.sock,server=on,wait=off",
        "-serial", "null",
        "-drive", "if=none,id=drive0,file=/o/a,,b.qcow2,format=qcow2,cache=unsafe",
        "-device", "virtio-blk-pci,drive=drive0,bootindex=0",
        "-netdev", "user,id=net0",
        "-device", "e1000,netdev=net0,romfile=",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        "-snapshot",
    ]  # fmt: skip


def test_boot_order_and_cdrom_buses() -> None:
    spec = VmSpec(
        name="x",
        memory_mib=512,
        cpus=1,
        accel="tcg",
        cpu_model="qemu64",
        drives=(
            Drive(Path("a.iso"), media="cdrom"),
            Drive(Path("d1.qcow2")),
            Drive(Path("seed.img"), format="raw", media="cdrom"),
            Drive(Path("d2.raw"), format="raw", readonly=True),
        ),
        boot="disk",
    )
    argv = qemu_argv(spec, qmp_socket=SOCK)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "ide-cd,drive=drive0,bus=ide.0,bootindex=2" in devices
    assert "virtio-blk-pci,drive=drive1,bootindex=0" in devices
    assert "ide-cd,drive=drive2,bus=ide.1,bootindex=3" in devices
    assert "virtio-blk-pci,drive=drive3,bootindex=1" in devices
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[3] == "if=none,id=drive3,file=d2.raw,format=raw,cache=writeback,readonly=on"
    assert argv[argv.index("-cpu") + 1] == "qemu64"


def test_drive_iso_defaults_to_raw_and_cdrom_helper() -> None:
    assert Drive(Path("/x/Installer.ISO"), media="cdrom").format == "raw"
    assert Drive(Path("/x/disk.qcow2")).format == "qcow2"
    cd = Drive.cdrom(Path("/x/seed.img"))
    assert (cd.format, cd.media, cd.readonly) == ("raw", "cdrom", True)
    assert isinstance(Drive("rel/path.qcow2").path, Path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "name"),
        ({"memory_mib": 16}, "memory_mib"),
        ({"cpus": 0}, "cpus"),
        ({"accel": "auto"}, "choose_accel"),
        ({"initrd": Path("/i")}, "initrd given without kernel"),
        ({"append": "quiet"}, "append"),
        ({"ssh_forward": 70000}, "out of range"),
        ({"ssh_forward": 2222, "extra_forwards": ((2222, 80),)}, "twice"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "ok", "memory_mib": 512, "cpus": 1, "accel": "tcg"}
    base.update(kwargs)
    with pytest.raises(VmError, match=message):
        VmSpec(**base)  # type: ignore[arg-type]


def test_drive_validation() -> None:
    with pytest.raises(VmError, match="media"):
        Drive(Path("x"), media="floppy")  # type: ignore[arg-type]
    with pytest.raises(VmError, match="format"):
        Drive(Path("x"), format="qcow2,file=/etc/passwd")
    with pytest.raises(VmError, match="cache"):
        Drive(Path("x"), cache="fast")  # type: ignore[arg-type]


def test_spec_is_frozen_and_hashable() -> None:
    spec = VmSpec(name="a", memory_mib=512, cpus=1, accel="tcg", drives=[Drive(Path("d"))])  # type: ignore[arg-type]
    assert isinstance(spec.drives, tuple)
    hash(spec)
    with pytest.raises(AttributeError):
        spec.cpus = 2  # type: ignore[misc]
    assert spec.forwards == ()
    assert VmSpec(name="a", memory_mib=512, cpus=1, accel="tcg", ssh_forward=5).forwards == ((5, 22),)
