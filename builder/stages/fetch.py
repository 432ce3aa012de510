"""Stage ``fetch``: every input of the installer, verified, cached and pinned by the lock.

Result: the netboot kernel and initrd, the boot loader files, and the installer's udeb suite as the builder
decides it (the verified upstream index with the lock's overrides), ready for the gateway and the media.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import witness
from ..archive.cache import ContentCache, atomic_write
from ..archive.client import Archive
from ..archive.deb import deb_extract
from ..archive.http import FetchStats
from ..archive.packages import parse_packages
from ..config import ImageConfig
from ..errors import FetchError, LockError, OfflineError, VerificationError
from ..events import Emitter
from ..gateway import udeb as udeb_suite
from ..gateway.server import Pin
from ..installer import efi, netboot
from ..lock import UDEB_INDEX, FilePin, Lock, UdebOverride, read_lock, resolve_lock
from ..pkgfetch import TargetInputs, package_lock_in_force, target_inputs
from ..pkglock import PackageLock
from ..pkgresolve import coverage_gaps

if TYPE_CHECKING:
    from ..context import BuildContext

log = logging.getLogger(__name__)

ISOLINUX_BIN = "usr/lib/ISOLINUX/isolinux.bin"
LDLINUX_C32 = "usr/lib/syslinux/modules/bios/ldlinux.c32"
# the boot files each pinned boot-loader package gives the installer ISO
BOOT_MEMBERS = {"isolinux": (ISOLINUX_BIN,), "syslinux-common": (LDLINUX_C32,),
                efi.SHIM_PACKAGE: (efi.SHIM_MEMBER,), efi.GRUB_PACKAGE: (efi.GRUB_CD_MEMBER,)}


@dataclass(frozen=True)
class InstallerInputs:
    lock: Lock
    kernel: Path
    initrd: Path
    isolinux_bin: bytes
    ldlinux_c32: bytes
    udeb_packages: bytes           # the rewritten debian-installer Packages index
    udeb_pins: dict[str, Pin]      # pool path → pin, for every udeb of the generated suite
    inrelease: bytes               # the suite's InRelease as served (verified)
    udebs_verified: int = 0        # how many of udeb_pins were fetched and checked now (the rest: when served)
    efi: tuple[bytes, bytes] | None = None  # signed shim and CD GRUB (None: a lock made before UEFI support)
    target: TargetInputs | None = None  # the package lock in force and the target's view (None: no lock)
    security_release: str = ""  # the Date of the security suite's Release the target gets ("" not known)

    @property
    def kernel_abi(self) -> str:
        return self.lock.kernel_abi


def make_archive(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, emitter: Emitter | None = None,
                 suite: str | None = None, *, offline: bool = False) -> Archive:
    def progress(label: str, done: int, total: int | None) -> None:
        if emitter is not None:
            emitter.progress(label, done, total, unit="bytes")

    return Archive(cfg.debian.mirror, suite or cfg.debian.suite, keyring=cfg.debian.keyring,
                   fingerprints=cfg.debian.trusted_fingerprints, cache=cache, stats=stats, on_progress=progress,
                   offline=offline)


def load_or_resolve_lock(cfg: ImageConfig, main: Archive, emitter: Emitter) -> Lock:
    if cfg.lock_path.is_file():
        lock = read_lock(cfg.lock_path)
        if lock.suite != cfg.debian.suite or lock.arch != cfg.debian.arch:
            raise LockError(f"{cfg.lock_path} is for {lock.suite}/{lock.arch}, the image wants "
                            f"{cfg.debian.suite}/{cfg.debian.arch}", hint="run: python -m builder lock IMAGE.yaml")
        emitter.info(f"using lock {cfg.lock_path.name} (netboot {lock.netboot.version}, kernel {lock.kernel_abi})")
        return lock
    if main.offline:
        raise LockError(f"offline, and there is no lock file {cfg.lock_path.name}: the installer cannot be resolved "
                        "without the mirror", hint="online, run: python -m builder lock IMAGE.yaml")
    emitter.warning(f"no lock file {cfg.lock_path.name}: resolving the installer from the live archive "
                    "(run `python -m builder lock` to pin it)")
    return resolve_lock(cfg, main, report=emitter.info)


def _fetch_pin(main: Archive, pin: FilePin | UdebOverride, field: str) -> Path:
    """The file a lock entry pins, fetched (or found in the cache) and checked against its size and sha256."""
    try:
        return main.fetch(pin.filename, pin.sha256, pin.size)
    except VerificationError as exc:
        raise VerificationError(f"the lock's {field} ({pin.package} {pin.version}) does not match: {exc}",
                                hint="the lock or the mirror changed: run python -m builder lock IMAGE.yaml"
                                ) from exc


def fetch_overrides(main: Archive, lock: Lock) -> int:
    """Fetch and check every override udeb the lock pins (no signed index vouches for them: only the lock
    does). Returns how many were checked."""
    for i, o in enumerate(lock.overrides):
        _fetch_pin(main, o, f"overrides[{i}]")
    return len(lock.overrides)


def inputs_summary(lock: Lock, abi: str, suite_udebs: int, udebs_verified: int) -> str:
    """What fetch verified, and only that: the rest of the suite's udebs are checked when they are served."""
    rest = suite_udebs - udebs_verified
    return (f"installer inputs verified: netboot {lock.netboot.version} (kernel {abi}), {len(lock.boot)} boot "
            f"loader packages, the udeb index, {udebs_verified} of {suite_udebs} udebs "
            f"({len(lock.overrides)} overridden, {len(lock.removed)} removed)"
            + (f"; the other {rest} are checked against their pins when the gateway serves them" if rest else ""))


def udeb_index(cfg: ImageConfig, lock: Lock, cache: ContentCache, main: Archive) -> bytes:
    """The pinned debian-installer index: from the cache by its sha256, else from the Release that signed it."""
    pin = lock.udeb_index
    actual = cache.size_conflict(pin.sha256, pin.size)
    if actual is not None:
        raise LockError(f"the lock's udeb_index.size is {pin.size}, but {pin.path} with its sha256 {pin.sha256} "
                        f"has {actual} bytes", hint="run: python -m builder lock IMAGE.yaml")
    blob = cache.read(pin.sha256, pin.size)
    if blob is None and pin.inrelease_sha256:  # the copy kept with the lock (witness.verify_lock checks its InRelease)
        stored = witness.lock_dir(cfg.lock_path) / f"{pin.sha256}.{pin.path.rsplit('/', 1)[-1]}"
        data = stored.read_bytes() if stored.is_file() else b""
        if hashlib.sha256(data).hexdigest() == pin.sha256 and len(data) == pin.size:
            blob = data
            cache.put(data, pin.sha256)
    if blob is None:
        alias = main if pin.release_suite == main.suite else Archive(
            main.mirror, pin.release_suite, keyring=main.keyring, fingerprints=main.fingerprints, cache=cache,
            stats=main.stats, on_progress=main.on_progress, offline=main.offline)
        rel = alias.release()
        ent = rel.files.get(pin.path)
        if ent is None or ent.sha256 != pin.sha256 or ent.size != pin.size:
            listed = f"{ent.sha256[:16]}… ({ent.size} bytes)" if ent else "nothing"
            raise LockError(
                f"the lock pins {pin.path} {pin.sha256[:16]}… ({pin.size} bytes) from dists/{pin.release_suite}, "
                f"but that Release now lists {listed} and the pinned copy is not cached",
                hint="the mirror moved on: run python -m builder lock IMAGE.yaml")
        alias.index(pin.path.rsplit(".", 1)[0] if pin.path.endswith((".xz", ".gz")) else pin.path)
        blob = cache.read(pin.sha256, pin.size)
        if blob is None:
            raise VerificationError(f"{pin.path}: the verified index did not land in the cache")
    if pin.path.endswith(".xz"):
        return lzma.decompress(blob)
    if pin.path.endswith(".gz"):
        return gzip.decompress(blob)
    return blob


def fetch_inputs(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, emitter: Emitter, *,
                 all_udebs: bool = False, packages: bool = False, offline: bool = False) -> InstallerInputs:
    """Verify and cache everything the installer will read (``all_udebs``: every udeb of the suite too;
    ``packages``: every file of the package lock in force, and the target's view of the archive made from them).
    ``offline``: nothing is fetched; everything missing from the cache is named in one OfflineError first."""
    main = make_archive(cfg, cache, stats, emitter, offline=offline)
    lock = load_or_resolve_lock(cfg, main, emitter)  # a malformed lock fails here, before any download
    plock = package_lock_in_force(cfg, emitter) if packages else None
    if offline:
        missing = offline_missing(cfg, lock, plock, cache, all_udebs=all_udebs or packages)
        missing += witness.offline_missing(cfg, lock, cache) if cfg.lock_path.is_file() else []
        if missing:
            raise OfflineError(f"offline: {len(missing)} inputs are not in the cache: " + "; ".join(missing[:6])
                               + (f"; … ({len(missing) - 6} more)" if len(missing) > 6 else ""),
                               missing=missing, log_tail=missing)
    main.release()
    if cfg.lock_path.is_file():  # every pin checked against the signed index that listed it
        for warning in witness.verify_lock(cfg, lock, cache, main):
            emitter.warning(warning)
    kernel, initrd = _netboot_images(cfg, lock, main, cache)
    abi = netboot.kernel_release(kernel.read_bytes())
    if abi != lock.kernel_abi:
        raise VerificationError(f"netboot {lock.netboot.version} carries kernel {abi}, the lock says {lock.kernel_abi}")
    boot: dict[str, bytes] = {}
    for i, pin in enumerate(lock.boot):
        members = list(BOOT_MEMBERS.get(pin.package, ()))
        if members:
            boot.update(deb_extract(_fetch_pin(main, pin, f"boot[{i}]"), members))
    efi_pair = ((boot[efi.SHIM_MEMBER], boot[efi.GRUB_CD_MEMBER])
                if efi.SHIM_MEMBER in boot and efi.GRUB_CD_MEMBER in boot else None)
    index = udeb_index(cfg, lock, cache, main)
    verified = {o.filename for o in lock.overrides}
    fetch_overrides(main, lock)
    udebs = udeb_suite.rewrite_index(index, lock.override_fields(), [r.package for r in lock.removed])
    pins = {}
    for name, st in parse_packages(udebs, source="installer suite").items():
        pins[f"debian/{st['Filename']}"] = Pin(st["SHA256"], int(st["Size"]))
        mod_abi = netboot.abi_of_module_udeb(name)
        if all_udebs and (mod_abi is None or mod_abi == abi) and st["Filename"] not in verified:
            try:
                main.fetch(st["Filename"], st["SHA256"], int(st["Size"]))
                verified.add(st["Filename"])
            except FetchError as exc:
                emitter.warning(f"udeb {name} not fetched: {exc}")
    n_verified = sum(1 for p in pins if p.removeprefix("debian/") in verified)
    emitter.info(inputs_summary(lock, abi, len(pins), n_verified))
    target = target_inputs(cfg, plock, cache, stats, emitter, offline=offline) if plock is not None else None
    security = security_release(cfg, main, plock, offline=offline) if packages else ""
    return InstallerInputs(lock, kernel, initrd, boot[ISOLINUX_BIN], boot[LDLINUX_C32], udebs, pins,
                           main.inrelease_raw, n_verified, efi_pair, target, security)


def security_release(cfg: ImageConfig, main: Archive, plock: PackageLock | None, *, offline: bool) -> str:
    """The Date of the security Release the target's packages come from: the package lock's, else the live one."""
    codename = main.release().codename
    if plock is not None:
        idx = plock.index("debian-security", f"{codename}-security")
        return idx.date if idx else ""
    sec = Archive(cfg.debian.security_mirror, f"{codename}-security", keyring=cfg.debian.keyring,
                  fingerprints=cfg.debian.security_fingerprints, cache=main.cache, stats=main.stats, offline=offline)
    try:
        return sec.release().date
    except (FetchError, VerificationError) as exc:
        log.info("the security suite's Release is unknown: %s", exc)
        return ""


def suite_udebs(lock: Lock, index: bytes) -> dict[str, dict[str, str]]:
    """The installer suite's udebs (the pinned index with the lock's decisions), by name."""
    rewritten = udeb_suite.rewrite_index(index, lock.override_fields(), [r.package for r in lock.removed])
    return parse_packages(rewritten, source="installer suite")


def offline_missing(cfg: ImageConfig, lock: Lock, plock: PackageLock | None, cache: ContentCache, *,
                    all_udebs: bool) -> list[str]:
    """Every input an offline build needs that the cache does not hold, one line each (checked from the cache
    alone: nothing is fetched)."""
    out: list[str] = []
    main = make_archive(cfg, cache, FetchStats(), offline=True)
    try:
        main.release()
    except OfflineError as exc:
        out += exc.missing
    extracted = cache.root.parent / "extracted" / f"{lock.netboot.sha256}.json"
    try:
        known = json.loads(extracted.read_text())
        have_netboot = cache.get(known["kernel"]) is not None and cache.get(known["initrd"]) is not None
    except (OSError, ValueError, KeyError, TypeError):
        have_netboot = False
    pins: list[FilePin | UdebOverride] = [] if have_netboot else [lock.netboot]
    pins += [*lock.boot, *lock.overrides]
    out += [f"{p.package} {p.version} ({p.filename})" for p in pins if cache.get(p.sha256, p.size) is None]
    ui = lock.udeb_index
    kept = witness.lock_dir(cfg.lock_path) / f"{ui.sha256}.{ui.path.rsplit('/', 1)[-1]}"
    index = cache.read(ui.sha256, ui.size) or (kept.read_bytes() if ui.inrelease_sha256 and kept.is_file() else None)
    if index is None:
        out.append(f"the udeb index {lock.udeb_index.path} of dists/{lock.udeb_index.release_suite} "
                   f"(sha256 {lock.udeb_index.sha256[:16]}…)")
    elif all_udebs:
        data = lzma.decompress(index) if lock.udeb_index.path.endswith(".xz") else (
            gzip.decompress(index) if lock.udeb_index.path.endswith(".gz") else index)
        for name, st in suite_udebs(lock, data).items():
            mod_abi = netboot.abi_of_module_udeb(name)
            if (mod_abi is None or mod_abi == lock.kernel_abi) and cache.get(st["SHA256"], int(st["Size"])) is None:
                out.append(f"udeb {name} {st['Version']} ({st['Filename']})")
    if plock is not None:
        out += [f"{p.name} {p.version} ({p.filename})" for p in plock.packages
                if cache.get(p.sha256, p.size) is None]
    return out


def _netboot_images(cfg: ImageConfig, lock: Lock, main: Archive, cache: ContentCache) -> tuple[Path, Path]:
    """Kernel and initrd of the pinned netboot package, extracted once and then taken from the content cache
    (an index file maps the package's sha256 to theirs)."""
    index = cache.root.parent / "extracted" / f"{lock.netboot.sha256}.json"
    try:
        known = json.loads(index.read_text())
        if known.get("deb_size") == lock.netboot.size:  # else: the .deb is fetched, and its size checked
            kernel, initrd = cache.get(known["kernel"]), cache.get(known["initrd"])
            if kernel is not None and initrd is not None:
                return kernel, initrd
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    deb = _fetch_pin(main, lock.netboot, "netboot")
    members = netboot.image_members(cfg.debian.release, cfg.debian.arch)
    files = deb_extract(deb, [members["kernel"], members["initrd"]])
    shas = {k: hashlib.sha256(files[m]).hexdigest() for k, m in members.items()}
    kernel = cache.put(files[members["kernel"]], shas["kernel"])
    initrd = cache.put(files[members["initrd"]], shas["initrd"])
    atomic_write(index, json.dumps({**shas, "deb_size": deb.stat().st_size}).encode())
    return kernel, initrd


__all__ = ["UDEB_INDEX", "InstallerInputs", "check_lock_covers", "fetch_inputs"]


def check_lock_covers(cfg: ImageConfig, plock: PackageLock, images: Mapping[str, ImageConfig]) -> None:
    """LockError naming every package the build installs that the package lock in force does not hold: what
    debian-installer installs on every install of ``cfg`` (the one install the variants share:
    :func:`~builder.pkgresolve.installer_installs`), then, per variant of ``images`` (name → config; "" the
    image itself), its seeds and NVIDIA packages. Under the lock the target sees only locked packages, so the
    install or provisioning would fail on them, an hour into the build."""
    parts = coverage_gaps(plock, cfg, images)
    if not parts:
        return
    raise LockError(f"the package lock {cfg.package_lock_path.name} lacks packages the build needs: "
                    + "; ".join(parts),
                    hint="python -m builder lock IMAGE.yaml --update adds them (the lock is seeded with every "
                         "variant's packages and what debian-installer installs), as does lock --from-build; or "
                         "build without the lock (debian.package_lock: off)")


def run(ctx: BuildContext, images: Mapping[str, ImageConfig] | None = None) -> InstallerInputs:
    """The stage: the verified installer inputs of ``ctx.config`` (from the cache when it has them). ``images``:
    the configurations the build provisions (variant name → config; default: the image itself), whose packages
    the package lock in force must hold (checked first, before anything is fetched)."""
    cfg = ctx.config
    plock = package_lock_in_force(cfg)
    if ctx.options.offline and plock is None:
        off = cfg.debian.package_lock == "off" and cfg.package_lock_path.is_file()
        raise LockError("an offline build needs a package lock in force: without one, what the target installs is "
                        f"not known in advance, and the mirror is not there to ask ({cfg.package_lock_path.name}"
                        + (" exists, but debian.package_lock is off)" if off else ")"),
                        hint=("add --var debian.package_lock=auto (to fetch --all too, so that the cache holds the "
                              "locked packages)" if off else
                              "online, run: python -m builder lock IMAGE.yaml, then: python -m builder fetch "
                              "IMAGE.yaml --all --var debian.package_lock=auto"))
    if plock is not None:
        check_lock_covers(cfg, plock, images if images is not None else {"": cfg})
    inputs = fetch_inputs(cfg, ctx.cache, ctx.stats, ctx.emitter, packages=True, offline=ctx.options.offline)
    if inputs.target is not None:
        t = inputs.target.lock
        ctx.manifest["package_lock"] = {"file": ctx.config.package_lock_path.name, "method": t.method,
                                        "created": t.created, "packages": len(t.packages), "digest": t.digest(),
                                        "indexes": {f"{i.archive}/{i.suite}": i.date for i in t.indexes}}
    ctx.manifest["offline"] = ctx.options.offline
    ctx.manifest["installer"] = {
        "netboot": inputs.lock.netboot.version, "netboot_sha256": inputs.lock.netboot.sha256,
        "kernel_abi": inputs.lock.kernel_abi, "udeb_index_sha256": inputs.lock.udeb_index.sha256,
        "udeb_overrides": len(inputs.lock.overrides),
    }
    ctx.manifest["inrelease_sha256"] = hashlib.sha256(inputs.inrelease).hexdigest()
    return inputs
