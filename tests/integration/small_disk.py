"""Test helper: a small real disk that boots to SSH like an installed image, without a 30-minute install.

The debootstrapped trixie tree (trixie_target.py) becomes an ext4 file system image (``mkfs.ext4 -d``, no mount
needed) with what the preseed would give it: the build user with the build's client key and passwordless
sudo, the pinned SSH host key, DHCP on the NIC (systemd-networkd). It boots by direct kernel boot
(:class:`builder.installcache.DirectBoot`). :func:`seed_installed_cache` stores it as the cached installed disk
of an image definition, so a real ``python -m builder build`` of that definition skips the install and goes
on from the provision stage.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from builder.archive.cache import ContentCache
from builder.archive.http import FetchStats
from builder.config import ImageConfig
from builder.events import Emitter
from builder.installcache import DirectBoot, InstalledDiskCache
from builder.ssh import KeyPair, generate_keypair
from builder.stages import media
from builder.stages.fetch import fetch_inputs

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

APPEND = "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 systemd.show_status=1"


def _chroot(tree: Path, *cmd: str) -> None:
    subprocess.run(["chroot", str(tree), *cmd], check=True, capture_output=True, timeout=600)


def make_small_disk(work: Path, user: str, client: KeyPair, host: KeyPair, *,
                    size: str = "3G", sources: str | None = None) -> tuple[Path, DirectBoot]:
    """(qcow2 disk, how to boot it) in ``work``. ``sources``: the disk's apt sources (one-line format) instead
    of the host's mirror, e.g. the gateway's address as an installed disk has them."""
    tree = tt.working_copy(tt.pristine_tree(), work / "root")
    try:
        if not (tree / "usr/lib/systemd/systemd-networkd").exists():
            with tt.chroot_mounts(tree):
                _chroot(tree, "apt-get", "update", "-qq")
                _chroot(tree, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd-networkd")
        (tree / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        if sources is not None:
            for f in (tree / "etc/apt/sources.list.d").glob("*"):
                f.unlink()
            (tree / "etc/apt/sources.list").write_text(sources)
            shutil.rmtree(tree / "var/lib/apt/lists", ignore_errors=True)
            (tree / "var/lib/apt/lists/partial").mkdir(parents=True)
        (tree / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
        (tree / "etc/hostname").write_text("small\n")
        (tree / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
        (tree / "etc/systemd/network/10-dhcp.network").write_text("[Match]\nName=eth* en*\n\n[Network]\nDHCP=yes\n")
        _chroot(tree, "systemctl", "enable", "systemd-networkd.service", "ssh.service")
        _chroot(tree, "useradd", "--create-home", "--shell", "/bin/bash", user)
        ssh_dir = tree / "home" / user / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(client.public_openssh + "\n")
        _chroot(tree, "chown", "-R", f"{user}:{user}", f"/home/{user}/.ssh")
        (tree / "etc/sudoers.d/90-builder").write_text(f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        (tree / "etc/sudoers.d/90-builder").chmod(0o440)
        for old in (tree / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        hk = tree / "etc/ssh/ssh_host_ed25519_key"
        hk.write_text(host.private_openssh)
        hk.chmod(0o600)
        (tree / "etc/ssh/ssh_host_ed25519_key.pub").write_text(host.public_openssh + "\n")
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        assert kernels, "the trixie tree has no kernel"
        version = kernels[-1].name.removeprefix("vmlinuz-")
        kernel, initrd = work / "vmlinuz", work / "initrd.img"
        shutil.copyfile(tree / "boot" / f"vmlinuz-{version}", kernel)
        shutil.copyfile(tree / "boot" / f"initrd.img-{version}", initrd)
        raw = work / "small.raw"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tree), str(raw), size], check=True,
                       capture_output=True, timeout=900)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    disk = work / "small.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True, timeout=600)
    raw.unlink()
    return disk, DirectBoot(kernel, initrd, APPEND)


def seed_installed_cache(cfg: ImageConfig, work: Path, *, offline: bool = False,
                         sources: str | None = None) -> Path:
    """Make a small disk and store it as ``cfg``'s cached installed disk (in the current cache dir).
    ``offline``: the installer inputs and the package lock in force from the cache alone (the key a
    ``build --offline`` computes; under a package lock the key covers it)."""
    client = generate_keypair(f"builder@{cfg.name}")
    host = generate_keypair(f"root@{cfg.installer.hostname}")
    inputs = fetch_inputs(cfg, ContentCache(), FetchStats(), Emitter(), packages=offline, offline=offline)
    key = media.render(cfg, inputs, log_port=1).install_key
    disk, boot = make_small_disk(work, cfg.installer.build_user, client, host, sources=sources)
    return InstalledDiskCache().store(key, disk, client, host, direct_boot=boot, image=cfg.name)
