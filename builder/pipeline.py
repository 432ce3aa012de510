"""The build, top to bottom: config → fetch → keys → gateway → preseed → media → install → provision →
finalize → publish. Each stage lives in its own module; this one only wires them together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, image
from .archive.cache import ContentCache, cache_base, sha256_file
from .archive.http import FetchStats
from .config import ImageConfig
from .errors import BuilderError, OutputError
from .events import Emitter, Event
from .gateway import udeb as udeb_suite
from .gateway.server import Gateway
from .gateway.signing import EphemeralKey, combined_keyring
from .inputs import InstallerInputs, fetch_inputs
from .install import install_spec, run_install
from .installcache import InstalledDiskCache, install_key
from .installer.cpio import append_to_initrd
from .installer.iso import build_iso
from .installer.preseed import (
    PreseedContext,
    check_preseed_syntax,
    installer_cmdline,
    render_preseed,
)
from .installer.progress import InstallTracker, SyslogListener
from .ssh import KeyPair, generate_keypair
from .vm import guestnet
from .vm.accel import choose_accel

log = logging.getLogger(__name__)

UDEB_SUITE = "builder-installer"
INSTALLER_EXTRA_ARGS = ("TERM=dumb",)  # no GNU screen: plain serial text


@dataclass(frozen=True)
class BuildResult:
    image: Path
    output_dir: Path
    sha256: str
    size_bytes: int
    virtual_size: int
    duration_s: float
    stages: dict[str, float] = field(default_factory=dict)
    manifest: Path | None = None
    bytes_fetched: int = 0


def _emitter(on_event: Callable[[Event], None] | Emitter | None) -> Emitter:
    return on_event if isinstance(on_event, Emitter) else Emitter(on_event)


def _sweep_stale_workdirs(base: Path) -> None:
    """Remove work directories of builds that were killed outright (SIGKILL, power loss): their owner PID is
    gone and they were not kept on purpose (``--keep-workdir`` leaves a KEEP file)."""
    for d in base.glob("*-pid*-*"):
        m = re.search(r"-pid(\d+)-", d.name)
        if not m or (d / "KEEP").exists():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


@contextlib.contextmanager
def _workdir(cfg: ImageConfig, keep: bool, emitter: Emitter) -> Iterator[Path]:
    base = cache_base() / "work"
    base.mkdir(parents=True, exist_ok=True)
    _sweep_stale_workdirs(base)
    path = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-pid{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        if keep:
            (path / "KEEP").touch()
            emitter.info(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- installer media


def _preseed_context(cfg: ImageConfig, client: KeyPair, host: KeyPair, gw_host: str = guestnet.GATEWAY,
                     ) -> PreseedContext:
    return PreseedContext(
        config=cfg, mirror_host=gw_host, mirror_dir="/debian", security_host=gw_host,
        security_dir="/debian-security", udeb_suite=UDEB_SUITE, authorized_key=client.public_openssh,
        host_key_private=host.private_openssh, host_key_public=host.public_openssh,
    )


def signed_suite(inputs: InstallerInputs, key: EphemeralKey) -> dict[str, bytes]:
    """The generated installer suite, signed, keyed by gateway path."""
    files = udeb_suite.suite_files(inputs.udeb_packages, suite=UDEB_SUITE, codename=UDEB_SUITE)
    files["Release.gpg"] = key.detach_sign(files["Release"])
    files["InRelease"] = key.clearsign(files["Release"])
    return {f"debian/dists/{UDEB_SUITE}/{k}": v for k, v in files.items()}


def make_media(cfg: ImageConfig, inputs: InstallerInputs, preseed: str, key: EphemeralKey, workdir: Path, *,
               log_port: int) -> Path:
    """The installer initrd (preseed + keyring appended) on a pycdlib ISO."""
    keyring = combined_keyring(cfg.debian.keyring, key.public_key())
    initrd = append_to_initrd(inputs.initrd.read_bytes(), {
        "preseed.cfg": preseed.encode(),
        "usr/share/keyrings/archive.gpg": keyring,
    })
    append = installer_cmdline(cfg, log_port=log_port, extra=INSTALLER_EXTRA_ARGS)
    return build_iso(workdir / "installer.iso", kernel=inputs.kernel, initrd=initrd,
                     isolinux_bin=inputs.isolinux_bin, ldlinux_c32=inputs.ldlinux_c32, append=append,
                     extra_files={"preseed.cfg": preseed.encode()})


def write_iso(cfg: ImageConfig, out: Path | None, *, emitter: Emitter, stats: FetchStats) -> Path:
    """The ``iso`` verb: the installer ISO alone (its gateway address is a placeholder port)."""
    cache = ContentCache()
    with emitter.stage("fetch"):
        inputs = fetch_inputs(cfg, cache, stats, emitter)
    client, host = generate_keypair("builder"), generate_keypair("host")
    with EphemeralKey() as key:
        ctx = _preseed_context(cfg, client, host)
        text = render_preseed(ctx)
        check_preseed_syntax(text)
        target = out or cfg.output_dir / "installer.iso"
        target.parent.mkdir(parents=True, exist_ok=True)
        iso = make_media(cfg, inputs, text, key, target.parent, log_port=5140)
        if iso != target:
            os.replace(iso, target)
    return target


# ---------------------------------------------------------------------------------------------- build


def start_gateway(cfg: ImageConfig, stack: ExitStack, inputs: InstallerInputs, cache: ContentCache) -> tuple[
        Gateway, EphemeralKey]:
    """The archive gateway with the installer suite signed by a fresh ephemeral key (both live on ``stack``)."""
    key = stack.enter_context(EphemeralKey(f"builder {cfg.name} installer suite"))
    gw = stack.enter_context(Gateway(
        upstreams={"debian": cfg.debian.mirror, "debian-security": cfg.debian.security_mirror},
        cache=cache, keyring=cfg.debian.keyring,
        fingerprints={"debian": cfg.debian.trusted_fingerprints, "debian-security": cfg.debian.security_fingerprints},
        generated=signed_suite(inputs, key), pins=inputs.udeb_pins,
    ))
    return gw, key


def pick_accel(cfg: ImageConfig, inputs: InstallerInputs, emitter: Emitter) -> str:
    accel, why = choose_accel(cfg.vm.accel, inputs.kernel)
    say = emitter.info if accel == "kvm" or cfg.vm.accel == "tcg" else emitter.warning
    say(f"accelerator {accel}: {why}")
    return accel


def install_disk(cfg: ImageConfig, inputs: InstallerInputs, stack: ExitStack, workdir: Path, emitter: Emitter, *,
                 gw: Gateway, key: EphemeralKey, accel: str, client_key: KeyPair, host_key: KeyPair,
                 ) -> tuple[Path, dict[str, Any]]:
    """Stages preseed, media and install: an installed disk in ``workdir``."""
    tracker = InstallTracker(on_step=lambda step: emitter.info(f"installer: {step}"))
    listener = stack.enter_context(SyslogListener(workdir / "install.syslog", tracker))
    gw.on_request = lambda path, status, size: tracker.touch()  # downloads count as progress too
    with emitter.stage("preseed"):
        preseed = render_preseed(_preseed_context(cfg, client_key, host_key))
        check_preseed_syntax(preseed)
        (workdir / "preseed.cfg").write_text(preseed)
    with emitter.stage("media"):
        iso = make_media(cfg, inputs, preseed, key, workdir, log_port=listener.port)
    disk = workdir / "installed.qcow2"
    with emitter.stage("install"):
        image.create(disk, cfg.disk.size)
        spec = install_spec(name=f"{cfg.name}-install", iso=iso, disk=disk, accel=accel, cpus=cfg.vm.cpus,
                            memory=cfg.vm.memory, workdir=workdir, gateway_port=gw.port)
        res = run_install(spec, workdir=workdir, tracker=tracker, listener=listener, emitter=emitter,
                          timeout=cfg.installer.timeout, stall_timeout=cfg.installer.stall_timeout,
                          backend=cfg.vm.backend, libvirt_uri=cfg.vm.libvirt_uri)
    facts = {"seconds": round(res.seconds, 1), "udebs": res.udebs, "packages": res.packages,
             "milestones": list(res.milestones), "gateway": gw.stats.as_dict()}
    return disk, facts


def media_key(cfg: ImageConfig, inputs: InstallerInputs, client: KeyPair, host: KeyPair) -> str:
    """The installed-disk cache key of this build: what the installer is fed, keys and ports masked."""
    preseed = render_preseed(_preseed_context(cfg, client, host))
    cmdline = installer_cmdline(cfg, log_port=1, extra=INSTALLER_EXTRA_ARGS)
    return install_key(preseed=preseed, cmdline=cmdline, lock=inputs.lock,
                       secrets=(client.private_openssh, client.public_openssh, host.private_openssh,
                                host.public_openssh),
                       settings={"disk_size": cfg.disk.size, "firmware": cfg.vm.firmware, "machine": "q35"})


def build(cfg: ImageConfig, *, on_event: Callable[[Event], None] | Emitter | None = None, output: Path | None = None,
          force: bool = False, keep_workdir: bool = False, use_cache: bool = True) -> BuildResult:
    """Build the image described by ``cfg``; return where it is. Raises BuilderError subclasses."""
    emitter = _emitter(on_event)
    t0 = time.monotonic()
    out_dir = (output or cfg.output_dir).resolve()
    final_image = out_dir / f"{cfg.name}.qcow2"
    if final_image.exists() and not force:
        raise OutputError(f"{final_image} exists", hint="pass --force to replace it")
    cache = ContentCache()
    stats = FetchStats()
    disks = InstalledDiskCache()
    manifest: dict[str, Any] = {"name": cfg.name, "builder_version": __version__}
    with ExitStack() as stack:
        workdir = stack.enter_context(_workdir(cfg, keep_workdir, emitter))
        with emitter.stage("fetch"):
            inputs = fetch_inputs(cfg, cache, stats, emitter)
        with emitter.stage("keys"):
            gw, key = start_gateway(cfg, stack, inputs, cache)
            accel = pick_accel(cfg, inputs, emitter)
            client_key = generate_keypair(f"builder@{cfg.name}")
            host_key = generate_keypair(f"root@{cfg.installer.hostname}")
            ikey = media_key(cfg, inputs, client_key, host_key)
            cached = disks.lookup(ikey) if use_cache else None
            if cached is not None:
                client_key, host_key = cached.client_key, cached.host_key
        if cached is None:
            installed, manifest["install"] = install_disk(cfg, inputs, stack, workdir, emitter, gw=gw, key=key,
                                                          accel=accel, client_key=client_key, host_key=host_key)
            base = disks.store(ikey, installed, client_key, host_key)
        else:
            emitter.skip("install", f"reusing the installed disk from {cached.created} (input hash {ikey})")
            base = cached.disk
            manifest["install"] = {"cached": cached.created, "key": ikey}
        disk = image.overlay(base, workdir / "disk.qcow2")
        from .guest import boot_and_provision  # the provisioning stage

        with emitter.stage("provision"):
            manifest["provision"] = boot_and_provision(cfg, disk, workdir=workdir, accel=accel, client_key=client_key,
                                                       host_key=host_key, emitter=emitter, gateway_port=gw.port)
        # the provisioning overlay is kept by the next stage only; the cached base is never written
        with emitter.stage("publish"):
            result = publish(cfg, disk, out_dir, inputs=inputs, manifest=manifest, emitter=emitter, stats=stats,
                             started=t0, workdir=workdir)
    return result


def publish(cfg: ImageConfig, disk: Path, out_dir: Path, *, inputs: InstallerInputs, manifest: dict[str, Any],
            emitter: Emitter, stats: FetchStats, started: float, workdir: Path) -> BuildResult:
    """Compress into a staging dir next to the output, write checksums and manifest, then swap it in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        name = f"{cfg.name}.qcow2"
        target = staging / name
        raw_bytes = _chain_actual_size(disk)
        image.convert(disk, target, compression=cfg.disk.compression,
                      on_progress=lambda pct: emitter.progress("compress", pct, 100))
        digest = sha256_file(target)
        (staging / "SHA256SUMS").write_text(f"{digest}  {name}\n")
        if (workdir / "packages.txt").is_file():
            shutil.copy2(workdir / "packages.txt", staging / "packages.txt")
        for logname in ("install.syslog", "install.serial.log", "preseed.cfg", "ansible-events.jsonl"):
            src = workdir / logname
            if src.is_file():
                (staging / "logs").mkdir(exist_ok=True)
                # the preseed (and d-i's log of the late_command) carry the build's throw-away host key
                text = _redact_private_keys(src.read_text(errors="replace"))
                (staging / "logs" / logname).write_text(text)
        info = image.info(target)
        manifest.update({
            "image": name, "sha256": digest, "size_bytes": target.stat().st_size,
            "virtual_size": info.get("virtual-size"), "raw_disk_bytes": raw_bytes,
            "compression": cfg.disk.compression,
            "debian": {"suite": cfg.debian.suite, "codename": inputs.lock.codename},
            "installer": {"netboot": inputs.lock.netboot.version, "netboot_sha256": inputs.lock.netboot.sha256,
                          "kernel_abi": inputs.lock.kernel_abi, "udeb_index_sha256": inputs.lock.udeb_index.sha256,
                          "udeb_overrides": len(inputs.lock.overrides)},
            "inrelease_sha256": hashlib.sha256(inputs.inrelease).hexdigest(),
            "bytes_fetched_upstream": stats.bytes_fetched,
            "build_host": {"python": platform.python_version(), "machine": platform.machine()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        manifest["stages"] = {k: round(v, 1) for k, v in emitter.durations.items()}
        manifest["duration_s"] = round(time.monotonic() - started, 1)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BuilderError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot publish to {out_dir}: {exc}") from exc
    final = out_dir / name
    emitter.info(f"published {final} ({final.stat().st_size / 2**20:.0f} MiB, sha256 {digest[:16]}…)")
    return BuildResult(final, out_dir, digest, final.stat().st_size, int(info.get("virtual-size", 0)),
                       time.monotonic() - started, dict(emitter.durations), out_dir / "manifest.json",
                       stats.bytes_fetched)


def _chain_actual_size(disk: Path) -> int:
    """Bytes the disk really uses on the host, its backing files (the cached installed disk) included."""
    total, path = 0, disk
    for _ in range(8):
        info = image.info(path)
        total += int(info.get("actual-size") or 0)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            break
        path = Path(backing)
    return total


def _redact_private_keys(text: str) -> str:
    return re.sub(r"-----BEGIN OPENSSH PRIVATE KEY-----.*?-----END OPENSSH PRIVATE KEY-----",
                  "<private key removed>", text, flags=re.DOTALL)


def clean(*, all_downloads: bool = False) -> list[str]:
    """Remove work directories (and with ``all_downloads`` the content cache). Returns what was removed."""
    base = cache_base()
    removed = []
    for sub in ("work", "installed") + (("blobs", "gateway") if all_downloads else ()):
        p = base / sub
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(f"removed {p}")
    return removed or ["nothing to clean"]
