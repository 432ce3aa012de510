"""domain_xml() is pure and always tested (libvirt-python is not needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from builder.errors import VmError
from builder.vm import Drive, VmSpec, open_machine
from builder.vm.libvirt import QEMU_NS, domain_xml

INSTALL_XML = """\
<domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0" type="qemu">
  <name>inst</name>
  <memory unit="MiB">3072</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
  </os>
  <features>
    <acpi />
    <apic />
  </features>
  <cpu mode="maximum" check="none" />
  <clock offset="utc" />
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" cache="writeback" discard="unmap" detect_zeroes="unmap" />
      <source file="/w/disk.qcow2" />
      <target dev="vda" bus="virtio" />
      <boot order="2" />
    </disk>
    <disk type="file" device="cdrom">
      <driver name="qemu" type="raw" cache="writeback" />
      <source file="/w/inst.iso" />
      <target dev="sda" bus="sata" />
      <readonly />
      <boot order="1" />
    </disk>
    <serial type="file">
      <source path="/w/serial.log" />
      <target port="0" />
    </serial>
    <rng model="virtio">
      <backend model="random">/dev/urandom</backend>
    </rng>
    <video>
      <model type="vga" />
    </video>
    <memballoon model="none" />
  </devices>
  <qemu:commandline>
    <qemu:arg value="-netdev" />
    <qemu:arg value="user,id=hn0,hostfwd=tcp:127.0.0.1:2222-:22" />
    <qemu:arg value="-device" />
    <qemu:arg value="virtio-net-pci,netdev=hn0,bus=pcie.0,addr=0x1e,romfile=" />
  </qemu:commandline>
</domain>
"""

VERIFY_XML = """\
<domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0" type="kvm">
  <name>verify</name>
  <memory unit="MiB">1024</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
    <kernel>/k/vmlinuz</kernel>
    <initrd>/k/initrd</initrd>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <features>
    <acpi />
    <apic />
  </features>
  <cpu mode="custom" match="exact" check="none">
    <model fallback="allow">Haswell</model>
  </cpu>
  <clock offset="utc" />
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" cache="writeback" discard="unmap" detect_zeroes="unmap" />
      <source file="/o/img.qcow2" />
      <target dev="vda" bus="virtio" />
      <boot order="1" />
    </disk>
    <disk type="file" device="cdrom">
      <driver name="qemu" type="raw" cache="writeback" />
      <source file="/o/seed.iso" />
      <target dev="hda" bus="ide" />
      <readonly />
      <boot order="2" />
    </disk>
    <serial type="null">
      <target port="0" />
    </serial>
    <rng model="virtio">
      <backend model="random">/dev/urandom</backend>
    </rng>
    <video>
      <model type="vga" />
    </video>
    <memballoon model="none" />
  </devices>
  <qemu:commandline>
    <qemu:arg value="-netdev" />
    <qemu:arg value="user,id=hn0" />
    <qemu:arg value="-device" />
    <qemu:arg value="virtio-net-pci,netdev=hn0,bus=pci.0,addr=0x1e,romfile=" />
    <qemu:arg value="-snapshot" />
  </qemu:commandline>
</domain>
"""


def install_spec() -> VmSpec:
    return VmSpec(
        name="inst",
        memory_mib=3072,
        cpus=2,
        accel="tcg",
        drives=(Drive(Path("/w/disk.qcow2")), Drive(Path("/w/inst.iso"), media="cdrom")),
        boot="cdrom",
        serial_log=Path("/w/serial.log"),
        ssh_forward=2222,
    )


def test_tcg_install_domain_xml() -> None:
    assert domain_xml(install_spec(), uri="qemu:///system") == INSTALL_XML


def test_kvm_remote_domain_xml() -> None:
    spec = VmSpec(
        name="verify",
        memory_mib=1024,
        cpus=1,
        accel="kvm",
        drives=(Drive(Path("/o/img.qcow2")), Drive.cdrom(Path("/o/seed.iso"))),
        kernel=Path("/k/vmlinuz"),
        initrd=Path("/k/initrd"),
        append="console=ttyS0",
        no_reboot=False,
        machine="pc",
        cpu_model="Haswell",
        extra_args=("-snapshot",),
    )
    # a remote URI: the remote host picks its own emulator binary
    assert domain_xml(spec, uri="qemu+ssh://gpu1/system") == VERIFY_XML


def test_kvm_default_cpu_is_host_passthrough_and_xml_parses() -> None:
    spec = VmSpec(name="k", memory_mib=512, cpus=4, accel="kvm")
    root = ET.fromstring(domain_xml(spec))
    assert root.get("type") == "kvm"
    assert root.find("cpu").attrib == {"mode": "host-passthrough", "check": "none"}  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[1] == "user,id=hn0"


def test_libvirt_backend_without_libvirt_python(tmp_path: Path) -> None:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("libvirt-python is installed here")
    with pytest.raises(VmError) as info:
        open_machine(install_spec(), tmp_path, backend="libvirt")
    assert "pip install builder[libvirt]" in (info.value.hint or "")


def test_unknown_backend(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="unknown VM backend"):
        open_machine(install_spec(), tmp_path, backend="xen")  # type: ignore[arg-type]


def test_guest_services_pass_through_to_qemu() -> None:
    """The libvirt backend gives the guest the same fixed gateway address as the QEMU one (guestfwd)."""
    from builder.vm.guestnet import gateway_service

    spec = VmSpec(name="p", memory_mib=1024, cpus=1, accel="tcg", ssh_forward=2222,
                  guest_services=(gateway_service(40123),))
    root = ET.fromstring(domain_xml(spec))
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    assert netdev == ("user,id=hn0,hostfwd=tcp:127.0.0.1:2222-:22,"
                      "guestfwd=tcp:10.0.2.100:80-cmd:socat STDIO TCP:127.0.0.1:40123")
