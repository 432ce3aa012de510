"""Stage ``media``: the build's throw-away SSH keys, the preseed, the installer's kernel command line, the
installer ISO (pycdlib; the preseed and the keyring that trusts the build's installer suite appended to the
netboot initrd), and the installed-disk cache key computed from exactly what the installer is fed.

:func:`render` is pure apart from key generation; :func:`make_iso` writes the ISO.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from ..archive.http import FetchStats
from ..config import ImageConfig
from ..context import BuildContext
from ..errors import ConfigError, LockError
from ..events import Emitter
from ..gateway.signing import EphemeralKey, combined_keyring
from ..gateway.target import KEY_FILE
from ..installcache import install_key
from ..installer.cpio import DirSpec, FileSpec, append_to_initrd
from ..installer.iso import build_iso
from ..installer.preseed import PreseedContext, check_preseed_syntax, installer_cmdline, render_preseed
from ..lock import Lock
from ..pkglock import PackageLock
from ..services import UDEB_SUITE
from ..ssh import KeyPair, generate_keypair
from ..vm import guestnet
from .fetch import InstallerInputs

INSTALLER_EXTRA_ARGS = ("TERM=dumb",)  # no GNU screen on the serial console: plain text
INSTALL_MACHINE = "q35"


@dataclass(frozen=True)
class Media:
    preseed: str
    cmdline: str
    install_key: str
    client_key: KeyPair
    host_key: KeyPair
    iso: Path | None = None


def preseed_context(cfg: ImageConfig, client: KeyPair, host: KeyPair, *, poweroff: bool = True) -> PreseedContext:
    """The preseed's inputs beyond the config: the gateway as the guest sees it, the build's keys; ``poweroff``
    False: the install ends in a reboot into the installed system (the ``iso`` verb's ``--reboot``)."""
    return PreseedContext(
        config=cfg, mirror_host=guestnet.GATEWAY, mirror_dir="/debian", security_host=guestnet.GATEWAY,
        security_dir="/debian-security", udeb_suite=UDEB_SUITE, authorized_key=client.public_openssh,
        host_key_private=host.private_openssh, host_key_public=host.public_openssh, poweroff=poweroff,
    )


def disk_key(cfg: ImageConfig, lock: Lock, preseed: str, client: KeyPair, host: KeyPair, *,
             package_lock: PackageLock | None = None) -> str:
    """The installed-disk cache key: the rendered preseed and command line (keys and syslog port masked), the
    lock, the package lock in force (what it pins), and the settings that shape the disk outside the preseed."""
    cmdline = installer_cmdline(cfg, log_port=1, extra=INSTALLER_EXTRA_ARGS)
    settings: dict[str, object] = {"disk_size": cfg.disk.size, "firmware": cfg.build_firmware,
                                   "machine": INSTALL_MACHINE}
    if package_lock is not None:
        settings["package_lock"] = package_lock.digest()
    return install_key(preseed=preseed, cmdline=cmdline, lock=lock,
                       secrets=(client.private_openssh, client.public_openssh, host.private_openssh,
                                host.public_openssh),
                       settings=settings)


# With a package lock the target's suites are signed by the build's key: debian-installer runs the scripts in
# /usr/lib/base-installer.d after debootstrap and before it points apt at the mirror, and this one makes apt in
# /target trust that key (roles/finalize removes it from the image).
KEY_IN_INITRD = "usr/share/keyrings/builder-build.gpg"
TRUST_HOOK = "usr/lib/base-installer.d/05builder-build-key"
TRUST_HOOK_SCRIPT = f"""#!/bin/sh
# builder: apt in /target trusts the build's key, which signs the package lock's view of the archive
set -e
mkdir -p /target{posixpath.dirname(KEY_FILE)}
cp /{KEY_IN_INITRD} /target{KEY_FILE}
chmod 0644 /target{KEY_FILE}
"""


def render(cfg: ImageConfig, inputs: InstallerInputs, *, log_port: int, poweroff: bool = True) -> Media:
    """Fresh keys, the checked preseed, the command line and the cache key (no ISO yet)."""
    client = generate_keypair(f"builder@{cfg.name}")
    host = generate_keypair(f"root@{cfg.installer.hostname}")
    preseed = render_preseed(preseed_context(cfg, client, host, poweroff=poweroff))
    check_preseed_syntax(preseed)
    cmdline = installer_cmdline(cfg, log_port=log_port, extra=INSTALLER_EXTRA_ARGS)
    key = disk_key(cfg, inputs.lock, preseed, client, host,
                   package_lock=inputs.target.lock if inputs.target is not None else None)
    return Media(preseed, cmdline, key, client, host)


def installer_initrd(cfg: ImageConfig, inputs: InstallerInputs, preseed: str, public_key: bytes) -> bytes:
    """The netboot initrd with the preseed and the keyring that trusts the build's key appended (and with a package
    lock, the key and the hook that make apt in /target trust it)."""
    keyring = combined_keyring(cfg.debian.keyring, public_key)
    files: dict[str, FileSpec] = {"preseed.cfg": preseed.encode(), "usr/share/keyrings/archive.gpg": keyring}
    dirs: list[DirSpec] = []
    if inputs.target is not None:
        files[KEY_IN_INITRD] = public_key
        files[TRUST_HOOK] = (TRUST_HOOK_SCRIPT.encode(), 0o755)
        dirs.append((posixpath.dirname(TRUST_HOOK), 0o755))
    return append_to_initrd(inputs.initrd.read_bytes(), files, dirs)


def make_iso(cfg: ImageConfig, inputs: InstallerInputs, media: Media, key: EphemeralKey | bytes,
             target: Path) -> Path:
    """The installer initrd (preseed + keyring appended) on a pycdlib ISO at ``target``, bootable under BIOS and,
    when the lock pins Debian's signed shim and GRUB, under UEFI too. ``key`` signs the installer suite the
    gateway serves (or is its public part, binary OpenPGP)."""
    if inputs.efi is None and cfg.build_firmware == "uefi":
        raise LockError(f"the lock {cfg.lock_path.name} pins no shim-signed / grub-efi-amd64-signed: the installer "
                        "ISO cannot boot under UEFI (vm.firmware)", hint="run: python -m builder lock IMAGE.yaml")
    initrd = installer_initrd(cfg, inputs, media.preseed, key if isinstance(key, bytes) else key.public_key())
    iso = build_iso(target, kernel=inputs.kernel, initrd=initrd, isolinux_bin=inputs.isolinux_bin,
                    ldlinux_c32=inputs.ldlinux_c32, append=media.cmdline,
                    extra_files={"preseed.cfg": media.preseed.encode()}, efi=inputs.efi)
    return iso


def run(ctx: BuildContext, inputs: InstallerInputs) -> Media:
    """The stage: keys, preseed (also written to the work directory), command line, ISO, cache key."""
    assert ctx.services is not None
    media = render(ctx.config, inputs, log_port=ctx.services.syslog.port)
    (ctx.workdir / "preseed.cfg").write_text(media.preseed)
    ctx.manifest["install_key"] = media.install_key
    if ctx.options.use_cache and ctx.disks.lookup(media.install_key,
                                                  max_age=ctx.config.installer.max_base_age) is not None:
        ctx.emitter.info("no installer ISO needed: the installed disk for this preseed is cached")
        return media
    iso = make_iso(ctx.config, inputs, media, ctx.services.signing_key, ctx.workdir / "installer.iso")
    return Media(media.preseed, media.cmdline, media.install_key, media.client_key, media.host_key, iso)


# what ``write_iso(ssh_key_out=DIR)`` writes into DIR: the build user's private key (0600) and its public key,
# and the public host key the installed system has
SSH_KEY_FILE = "build_key"
HOST_KEY_FILE = "host_key.pub"


def write_iso(cfg: ImageConfig, out: Path | None, *, emitter: Emitter, stats: FetchStats,
              suite_key: bytes | None = None, ssh_key_out: Path | None = None, reboot: bool = False) -> Path:
    """The ``iso`` verb: the installer ISO alone (its syslog port is a placeholder; nothing listens).

    ``suite_key``: the public key (binary OpenPGP) that signs the installer suite of a running ``gateway`` verb,
    which the installer then trusts (default: a throw-away key, whose suite no gateway serves). ``ssh_key_out``:
    a directory for the SSH keys the preseed installs (:data:`SSH_KEY_FILE`, ``.pub``, :data:`HOST_KEY_FILE`),
    for a tool that logs in as the build user. ``reboot``: the install ends in a reboot into the installed
    system instead of a power-off."""
    from ..archive.cache import ContentCache
    from .fetch import fetch_inputs

    with emitter.stage("fetch"):
        inputs = fetch_inputs(cfg, ContentCache(), stats, emitter)
    with contextlib.ExitStack() as stack, emitter.stage("media"):
        key: EphemeralKey | bytes = suite_key if suite_key is not None else stack.enter_context(EphemeralKey())
        media = render(cfg, inputs, log_port=5140, poweroff=not reboot)
        target = out or cfg.output_dir / "installer.iso"
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        make_iso(cfg, inputs, media, key, part)
        if ssh_key_out is not None:
            try:
                media.client_key.write(ssh_key_out, SSH_KEY_FILE)
                (ssh_key_out / HOST_KEY_FILE).write_text(media.host_key.public_openssh.rstrip("\n") + "\n")
            except OSError as exc:
                part.unlink(missing_ok=True)
                raise ConfigError(f"--ssh-key-out: cannot write the SSH keys into {ssh_key_out}: "
                                  f"{exc.strerror or exc}") from exc
        os.replace(part, target)
    return target
