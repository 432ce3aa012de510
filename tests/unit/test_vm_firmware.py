"""Firmware in the VM description: OVMF flash drives (QEMU), loader/nvram/SMM (libvirt), the per-VM VARS copy,
and the MOK list written by virt-fw-vars (a real run of the tool on the host's real OVMF template)."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from builder.errors import MissingToolError, VmError
from builder.vm import Drive, VmSpec, qemu_argv
from builder.vm import firmware as fwmod
from builder.vm.firmware import Firmware, locate, prepare
from builder.vm.libvirt import domain_xml

SOCK = Path("/run/b/vm.qmp")
CODE, VARS = Path("/fw/OVMF_CODE_4M.secboot.fd"), Path("/w/vm.vars.fd")


def _spec(fw: Firmware, machine: str = "q35") -> VmSpec:
    return VmSpec(name="t", memory_mib=1024, cpus=1, accel="tcg", drives=(Drive(Path("/w/d.qcow2")),),
                  machine=machine, firmware=fw)


def test_bios_is_the_default_and_adds_nothing() -> None:
    argv = qemu_argv(_spec(fwmod.BIOS), qmp_socket=SOCK)
    assert not any("pflash" in a for a in argv) and "-global" not in argv
    assert "<loader" not in domain_xml(_spec(fwmod.BIOS))


def test_uefi_argv_has_readonly_code_and_the_vms_own_vars() -> None:
    argv = qemu_argv(_spec(Firmware("uefi", Path("/fw/OVMF_CODE_4M.fd"), VARS)), qmp_socket=SOCK)
    assert argv[argv.index("-machine") + 1] == "q35"
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/OVMF_CODE_4M.fd" in argv
    assert f"if=pflash,format=raw,unit=1,file={VARS}" in argv
    assert "-global" not in argv


def test_secure_boot_argv_turns_on_smm_and_locks_the_flash() -> None:
    argv = qemu_argv(_spec(Firmware("uefi-secure", CODE, VARS)), qmp_socket=SOCK)
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert argv[argv.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"


def test_libvirt_xml_loader_nvram_smm() -> None:
    root = ET.fromstring(domain_xml(_spec(Firmware("uefi-secure", CODE, VARS))))
    loader = root.find("os/loader")
    assert loader is not None and loader.text == str(CODE)
    assert loader.attrib == {"readonly": "yes", "type": "pflash", "secure": "yes"}
    assert root.findtext("os/nvram") == str(VARS)
    assert root.find("features/smm").attrib == {"state": "on"}  # type: ignore[union-attr]
    plain = ET.fromstring(domain_xml(_spec(Firmware("uefi", Path("/fw/OVMF_CODE_4M.fd"), VARS))))
    assert plain.find("os/loader").attrib["secure"] == "no"  # type: ignore[union-attr]
    assert plain.find("features/smm") is None


def test_uefi_needs_q35_and_its_files() -> None:
    with pytest.raises(VmError, match="q35"):
        _spec(Firmware("uefi", CODE, VARS), machine="pc")
    with pytest.raises(VmError, match="variable store"):
        Firmware("uefi", CODE, None)
    with pytest.raises(VmError, match="not a firmware"):
        Firmware("efi")  # type: ignore[arg-type]


def test_missing_ovmf_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(MissingToolError) as exc:
        locate("uefi-secure", dirs=[tmp_path])
    assert "OVMF_CODE_4M.secboot.fd" in exc.value.message and "apt-get install ovmf" in (exc.value.hint or "")


@pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").is_file(), reason="needs the ovmf package")
def test_prepare_copies_the_template_per_vm(tmp_path: Path) -> None:
    a = prepare("uefi", tmp_path / "a.fd")
    b = prepare("uefi", tmp_path / "b.fd")
    assert a.vars != b.vars and a.vars is not None and b.vars is not None
    assert a.vars.read_bytes() == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes()
    assert oct(a.vars.stat().st_mode & 0o777) == "0o600"
    a.vars.write_bytes(b"x")  # a guest writing its store touches no other VM's nor the template
    assert b.vars.read_bytes() == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes()


@pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").is_file(), reason="needs the ovmf package")
def test_prepare_enrolls_a_mok_certificate_with_virt_fw_vars(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    key, pem = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(pem), "-days", "3", "-subj", "/CN=builder test module signing"], check=True,
                   capture_output=True)
    fw = prepare("uefi-secure", tmp_path / "sb.fd", mok_certs=[pem])
    assert fw.secure and fw.vars is not None
    dump = subprocess.run([fwmod._virt_fw_vars(), "-i", str(fw.vars), "--print", "--verbose"],
                          capture_output=True, text=True, check=True).stdout
    assert "MokList" in dump and "builder test module signing" in dump
    assert "SecureBoot" in dump
