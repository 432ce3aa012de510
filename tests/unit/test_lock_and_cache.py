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


def _store(disks, tmp_path, key="0" * 32, **kw):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"qcow")
    return disks.store(key, disk, generate_keypair("c"), generate_keypair("h"), **kw)


def _age(entry, seconds):
    """Make a cache entry look ``seconds`` old."""
    import time

    meta = json.loads((entry / "meta.json").read_text())
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))
    (entry / "meta.json").write_text(json.dumps(meta))


def test_a_base_older_than_max_age_is_not_reused_and_a_new_one_replaces_nothing(tmp_path):
    disks = InstalledDiskCache(tmp_path / "installed")
    key = "a" * 32
    old = _store(disks, tmp_path, key, security_release="Mon, 30 Nov 2026 00:22:33 UTC", package_lock="d" * 64).parent
    hit = disks.lookup(key, max_age=7 * 86400)
    assert hit is not None and hit.entry == old and hit.security_release.startswith("Mon, 30 Nov")
    assert hit.package_lock == "d" * 64 and hit.age() < 60
    _age(old, 8 * 86400)
    assert disks.lookup(key, max_age=7 * 86400) is None and disks.lookup(key) is not None
    assert disks.stale(key, max_age=7 * 86400).entry == old
    assert disks.lookup(key, max_age=0) is None  # 0: never reuse
    # a new install goes to a new entry: a build still using the old one keeps it
    new = _store(disks, tmp_path, key).parent
    assert new != old and old.is_dir() and disks.lookup(key, max_age=7 * 86400).entry == new
    assert disks.prune(key, max_age=7 * 86400, in_use={old}) == [] and old.is_dir()
    assert disks.prune(key, max_age=7 * 86400, in_use=set()) == [old] and not old.exists() and new.is_dir()


def test_entries_of_older_builders_are_still_read(tmp_path):
    disks = InstalledDiskCache(tmp_path / "installed")
    key = "b" * 32
    entry = _store(disks, tmp_path, key).parent
    legacy = entry.with_name(key)
    entry.rename(legacy)
    assert disks.lookup(key).entry == legacy and disks.lookup(key).security_release == ""


def test_clean_older_than_spares_fresh_bases_and_those_in_use(tmp_path, monkeypatch):
    import os

    from builder.pipeline import clean

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path))
    disks = InstalledDiskCache(tmp_path / "installed")
    fresh = _store(disks, tmp_path, "1" * 32, image="a").parent
    old = _store(disks, tmp_path, "2" * 32, image="a").parent
    used = _store(disks, tmp_path, "3" * 32, image="a").parent
    other = _store(disks, tmp_path, "4" * 32, image="b").parent
    for e in (old, used, other):
        _age(e, 10 * 86400)
    live = tmp_path / "work" / f"a-pid{os.getpid()}-live"
    live.mkdir(parents=True)
    (live / "BASE").write_text(f"{used / 'disk.qcow2'}\n")
    lines = clean(older_than=7 * 86400, image="a")
    assert fresh.is_dir() and used.is_dir() and other.is_dir() and not old.exists()
    assert f"removed {old} (10 d 0 h old)" in lines
    assert any(line.startswith(f"skipped {used}") and "running build" in line for line in lines)
    assert live.is_dir()  # work directories are not what --older-than is about
    assert clean(older_than=30 * 86400) == ["no installed disk older than 30 d 0 h"]


def test_max_base_age_takes_durations(tmp_path):
    from builder.config import from_dict, parse_duration

    assert [parse_duration(v) for v in ("7d", "12h", "30m", "90s", "2w", "0", 3600)] == [
        604800, 43200, 1800, 90, 1209600, 0, 3600]
    mirrors = {"mirror": "http://127.0.0.1:9/debian", "security_mirror": "http://127.0.0.1:9/debian-security"}
    assert from_dict({"debian": mirrors}).installer.max_base_age == 7 * 86400
    assert from_dict({"debian": mirrors, "installer": {"max_base_age": "36h"}}).installer.max_base_age == 36 * 3600
    from builder.errors import ConfigError

    with pytest.raises(ConfigError, match=r"installer\.max_base_age"):
        from_dict({"debian": mirrors, "installer": {"max_base_age": "soon"}})
