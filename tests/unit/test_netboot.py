import pytest

from builder.installer import netboot


def test_candidate_versions_binnmu():
    assert netboot.candidate_versions("1.47.2-3+b12")[:2] == ["1.47.2-3+b11", "1.47.2-3+b10"]
    assert "1.47.2-3" in netboot.candidate_versions("1.47.2-3+b12")


def test_candidate_versions_hints_first():
    c = netboot.candidate_versions("2.41.5-0+deb13u1", hints=("2.41-5",))
    assert c[0] == "2.41-5" and "2.41-5+b1" in c and "2.41.5-0" in c


def test_candidate_versions_point_release():
    c = netboot.candidate_versions("20250803+deb13u8")
    assert c[:2] == ["20250803+deb13u7", "20250803+deb13u6"] and "20250803" in c
    assert "20250803+deb13u8" not in c


def test_candidate_versions_rebuild_up():
    assert "6.13.0-2+b1" in netboot.candidate_versions("6.13.0-2+deb13u1")


def test_abi_of_module_udeb():
    assert netboot.abi_of_module_udeb("nic-modules-6.12.94+deb13-amd64-di") == "6.12.94+deb13-amd64"
    assert netboot.abi_of_module_udeb("kernel-image-6.12.94+deb13-amd64-di") == "6.12.94+deb13-amd64"
    assert netboot.abi_of_module_udeb("anna") is None


def test_parse_status_and_built_using():
    st = "Package: a\nStatus: install ok installed\nVersion: 1\n\nPackage: b\nVersion: 2:3-4\n"
    assert netboot.parse_status(st) == {"a": "1", "b": "2:3-4"}
    assert netboot.parse_built_using("linux (= 6.12.94-1), util-linux (= 2.41-5)") == {
        "linux": "6.12.94-1", "util-linux": "2.41-5"}


def test_pool_filename():
    st = {"Package": "libuuid1-udeb", "Architecture": "amd64",
          "Filename": "pool/main/u/util-linux/libuuid1-udeb_2.41.5-0+deb13u1_amd64.udeb"}
    assert netboot.pool_filename(st, "2.41-5") == "pool/main/u/util-linux/libuuid1-udeb_2.41-5_amd64.udeb"
    st2 = {**st, "Package": "busybox-udeb", "Filename": "pool/main/b/busybox/busybox-udeb_1.37.0-6+b9_amd64.udeb"}
    assert netboot.pool_filename(st2, "1:1.37.0-6+b8").endswith("busybox-udeb_1.37.0-6+b8_amd64.udeb")


def test_kernel_release_from_header():
    img = bytearray(0x1000)
    img[0x202:0x206] = b"HdrS"
    img[0x20E:0x210] = (0x300).to_bytes(2, "little")
    text = b"6.12.94+deb13-amd64 (debian-kernel@lists.debian.org) #1 SMP\0"
    img[0x500:0x500 + len(text)] = text
    assert netboot.kernel_release(bytes(img)) == "6.12.94+deb13-amd64"
    with pytest.raises(ValueError):
        netboot.kernel_release(b"\0" * 0x1000)
