import dataclasses
import json

import pytest

from builder.errors import LockError
from builder.installcache import InstalledDiskCache, install_key
from builder.lock import FilePin, IndexPin, Lock, UdebOverride, UdebRemoval, read_lock, write_lock
from builder.ssh import generate_keypair


def sample_lock() -> Lock:
    return Lock(
        suite="trixie", codename="trixie", arch="amd64", created="2026-11-30T00:00:00Z",
        netboot=FilePin("debian-installer-13-netboot-amd64", "20250803+deb13u6", "pool/x.deb", "a" * 64, 10, "lock"),
        kernel_abi="6.12.94+deb13-amd64",
        udeb_index=IndexPin("stable", "Sat, 12 Sep 2026", "main/debian-installer/binary-amd64/Packages.xz",
                            "b" * 64, 5),
        overrides=(UdebOverride("util-linux-udeb", "2.41.5-0+deb13u1", "2.41-5", "pool/u.udeb", "c" * 64, 3, "e" * 32,
                                "libc6-udeb", "not served"),),
        removed=(UdebRemoval("nic-modules-6.12.107+deb13-amd64-di", "6.12.107-1", "other ABI"),),
        boot=(FilePin("isolinux", "3:6.04", "pool/i.deb", "d" * 64, 7, "index:trixie"),),
        notes=("n",),
    )


def test_lock_round_trip(tmp_path):
    lock = sample_lock()
    p = tmp_path / "x.lock.json"
    write_lock(lock, p)
    assert read_lock(p) == lock
    fields = lock.override_fields()["util-linux-udeb"]
    assert fields["Version"] == "2.41-5" and fields["SHA256"] == "c" * 64 and fields["Depends"] == "libc6-udeb"


def test_lock_errors(tmp_path):
    with pytest.raises(LockError, match="no lock file"):
        read_lock(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lock_version": 1, "suite": "trixie"}))
    with pytest.raises(LockError, match="malformed"):
        read_lock(bad)
    bad.write_text(json.dumps({"lock_version": 99}))
    with pytest.raises(LockError, match="unsupported lock version"):
        read_lock(bad)


def test_committed_lock_is_valid(repo):
    lock = read_lock(repo / "images/cloud-gpu-worker.lock.json")
    assert lock.codename == "trixie" and lock.kernel_abi.startswith("6.12.")
    assert {b.package for b in lock.boot} == {"isolinux", "syslinux-common", "shim-signed", "grub-efi-amd64-signed"}
    assert all(len(o.sha256) == 64 for o in lock.overrides)


def test_install_key_is_what_the_installer_is_fed():
    lock = sample_lock()
    c1, h1, c2, h2 = (generate_keypair(n) for n in "abcd")

    def preseed(c, h, extra=""):
        return f"d-i x string y\n{h.private_openssh}\necho '{h.public_openssh}'\necho '{c.public_openssh}'\n{extra}"

    def key(text, cmdline="auto=true log_port=4711 --- console=ttyS0", lk=lock, **settings):
        secrets = [k for kp in (c1, h1, c2, h2) for k in (kp.private_openssh, kp.public_openssh)]
        return install_key(preseed=text, cmdline=cmdline, lock=lk, secrets=secrets, settings=settings or None)

    k1 = key(preseed(c1, h1))
    # the throw-away keys, the syslog port and the lock's creation time are not part of the installed system
    assert key(preseed(c2, h2)) == k1
    assert key(preseed(c1, h1), cmdline="auto=true log_port=9 --- console=ttyS0") == k1
    assert key(preseed(c1, h1), lk=dataclasses.replace(lock, created="later")) == k1
    # everything else is
    assert key(preseed(c1, h1, "d-i other string z")) != k1
    assert key(preseed(c1, h1), cmdline="auto=true log_port=9 --- console=ttyS1") != k1
    assert key(preseed(c1, h1), lk=dataclasses.replace(lock, kernel_abi="other")) != k1
    assert key(preseed(c1, h1), disk_size=40 << 30) != key(preseed(c1, h1), disk_size=30 << 30)


def test_installed_disk_cache_round_trip(tmp_path):
    disks = InstalledDiskCache(tmp_path / "installed")
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"qcow")
    c, h = generate_keypair("c"), generate_keypair("h")
    assert disks.lookup("k") is None
    stored = disks.store("k", disk, c, h)
    assert not disk.exists() and stored.read_bytes() == b"qcow"
    hit = disks.lookup("k")
    assert hit is not None and hit.client_key == c and hit.host_key.public_openssh == h.public_openssh
    assert oct((stored.parent / "client_key").stat().st_mode & 0o777) == "0o600"
