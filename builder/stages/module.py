"""The NVIDIA module compiled on the build host while the installer runs (:mod:`builder.hostmodule`).

Started as soon as the archive gateway is up (``prepare``), in a thread of its own: it reads the same verified
archives the guest will install from, through the same gateway, so the module is built from exactly the
packages and kernel the guest gets. Joined before provisioning; its tarball reaches the role
``nvidia-gpu-drivers`` as the extra variable ``nvidia_dkms_tarball``, and what the role did with it comes back
in the manifest as ``nvidia_module``.

``provision.host_module: auto`` builds on the host when the role takes the driver from Debian
(``nvidia_driver_source: debian``); a failure fails the build with its own message, except a missing host tool
(mmdebstrap), which warns and leaves the compile to DKMS in the guest. ``off``: DKMS compiles in the guest.

DKMS source patches (:mod:`builder.dkmspatches`): :func:`dkms_patches` resolves the role's list once (its
``nvidia_dkms_patches`` from ``provision.extra_vars``, else the flavour's ``dkms_patches`` in the role's vars);
the host build gets it, and the playbook gets the same list, with absolute paths, as ``nvidia_dkms_patches``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dkmspatches
from ..archive.cache import ContentCache, atomic_write
from ..config import ImageConfig, read_role_yaml, role_file
from ..dkmspatches import DkmsPatch
from ..errors import HostModuleError
from ..gateway.signing import combined_keyring
from ..hostmodule import HostModule, Sources, build_module

if TYPE_CHECKING:
    from ..context import BuildContext

NVIDIA_ROLE = "nvidia-gpu-drivers"
TARBALL_VAR = "nvidia_dkms_tarball"  # the role's variable: the prebuilt module's tarball on the controller
REPORT_VAR = "nvidia_module_report"  # the role's variable: where it records what it did
NICENESS = 10  # the build root yields the CPU to the installer VM it runs beside
TARGET_KEYRING = "target-apt-keyring.gpg"  # in the work directory: what apt in the target trusts under a lock


def role_vars(cfg: ImageConfig) -> dict[str, Any] | None:
    """The nvidia role's variables as the play sees them (defaults, then its vars, then the image's
    ``provision.extra_vars``), or None when the role is not on the roles path."""
    defaults, rvars = role_file(cfg, NVIDIA_ROLE, "defaults/main.yml"), role_file(cfg, NVIDIA_ROLE, "vars/main.yml")
    if defaults is None or rvars is None:
        return None
    return {**read_role_yaml(defaults, f"the {NVIDIA_ROLE} role's defaults"),
            **read_role_yaml(rvars, f"the {NVIDIA_ROLE} role's vars"), **cfg.provision.extra_vars}


def report_path(cfg: ImageConfig) -> str | None:
    """Where the role records what it did with the module on the guest (None: nowhere, or no such role)."""
    rv = role_vars(cfg)
    path = rv.get(REPORT_VAR) if rv is not None else None
    return path if isinstance(path, str) and path.startswith("/") else None


def dkms_package(cfg: ImageConfig) -> tuple[str | None, str]:
    """The DKMS source package to build on the host, or None and why not."""
    if cfg.provision.host_module == "off":
        return None, "provision.host_module is off"
    if not cfg.provision.enabled:
        return None, "provisioning is off"
    if cfg.provision.extra_vars.get(TARBALL_VAR):
        return None, f"provision.extra_vars sets {TARBALL_VAR} already"
    rv = role_vars(cfg)
    if rv is None:
        return None, f"the {NVIDIA_ROLE} role is not on the roles path"
    source, flavor = rv.get("nvidia_driver_source"), rv.get("nvidia_driver_flavor")
    if source != "debian":
        return None, f"nvidia_driver_source is {source!r}: only Debian's driver packages are built on the host"
    flavors = rv.get("nvidia_debian_flavors")
    entry = flavors.get(flavor) if isinstance(flavors, dict) and isinstance(flavor, str) else None
    package = entry.get("dkms_package") if isinstance(entry, dict) else None
    if not isinstance(package, str) or not package:
        return None, f"nvidia_driver_flavor {flavor!r} names no DKMS package in the role's nvidia_debian_flavors"
    return package, f"nvidia_driver_flavor {flavor}"


def dkms_patches(cfg: ImageConfig) -> tuple[DkmsPatch, ...]:
    """The DKMS source patches of the module the role installs: ``provision.extra_vars.nvidia_dkms_patches``
    when set, else the flavour's ``dkms_patches`` (``nvidia_debian_flavors`` or, for NVIDIA's repository,
    ``nvidia_repo_flavors``), as the role's default computes it. () when the role is not on the roles path. A
    bad list or a missing file is a one-line ConfigError."""
    rv = role_vars(cfg)
    if rv is None:
        return ()
    defaults = role_file(cfg, NVIDIA_ROLE, "defaults/main.yml")
    patches_dir = defaults.parent.parent / dkmspatches.PATCHES_DIR if defaults is not None else None
    if dkmspatches.VAR in cfg.provision.extra_vars:
        return dkmspatches.load(cfg.provision.extra_vars[dkmspatches.VAR], patches_dir=patches_dir,
                                where=f"provision.extra_vars.{dkmspatches.VAR}")
    if rv.get("nvidia_driver_source") == "nvidia":
        table, choice = "nvidia_repo_flavors", rv.get("nvidia_kernel_modules")
    else:
        table, choice = "nvidia_debian_flavors", rv.get("nvidia_driver_flavor")
    flavors = rv.get(table)
    entry = flavors.get(choice) if isinstance(flavors, dict) and isinstance(choice, str) else None
    if not isinstance(entry, dict):
        return ()
    return dkmspatches.load(entry.get(dkmspatches.FLAVOR_KEY), patches_dir=patches_dir,
                            where=f"the {NVIDIA_ROLE} role's {table}.{choice}.{dkmspatches.FLAVOR_KEY}")


def patch_script(cfg: ImageConfig) -> Path | None:
    """The role's dkms-patches.sh (what gives a source tree its patches, on the target and in the build root)."""
    return role_file(cfg, NVIDIA_ROLE, dkmspatches.SCRIPT)


def module_manifest(built: HostModule | None, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's ``nvidia_module``: where the module the image boots with came from (``host-built``,
    ``cache`` or ``guest-compiled``), from the role's record and the host build."""
    if record is None:
        if built is None:
            return None
        return {**_five(built.origin, built.module, built.version, built.kver, built.seconds),
                "note": "the playbook recorded nothing: whether it used the prebuilt module is unknown"}
    prebuilt = record.get("origin") == "prebuilt"
    origin = (built.origin if built is not None else "prebuilt") if prebuilt else "guest-compiled"
    seconds = (built.seconds if built is not None else None) if prebuilt else record.get("guest_seconds")
    out = _five(origin, record.get("module"), record.get("version"), record.get("kver"), seconds)
    if isinstance(record.get("kernels"), dict):
        out["kernels"] = {k: (origin if v == "prebuilt" else v) for k, v in record["kernels"].items()}
    if isinstance(record.get("dkms_patches"), list):  # what the role named in the target's dkms.conf
        out["dkms_patches"] = [str(p) for p in record["dkms_patches"]]
    return out


def _five(origin: Any, module: Any, version: Any, kver: Any, seconds: Any) -> dict[str, Any]:
    return {"origin": origin, "module": module, "version": version, "kver": kver,
            "seconds": round(float(seconds), 1) if isinstance(seconds, int | float | str) and seconds != "" else None}


_ONE_AT_A_TIME = threading.Lock()  # one build root compiling at a time on this host


class ModuleJob:
    """The host-side build of ``package`` in a background thread: :meth:`join` waits for it, :meth:`stop`
    cancels it (its build root's processes are stopped, the thread ends)."""

    def __init__(self, ctx: BuildContext, package: str, *, label: str = "",
                 patches: tuple[DkmsPatch, ...] = ()) -> None:
        self.ctx = ctx
        self.package = package
        self.label = label
        self.patches = patches
        self.cancel = threading.Event()
        self.result: HostModule | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="host-module", daemon=True)

    def _run(self) -> None:
        ctx = self.ctx
        try:
            # variants' builds queue up (the same module a second time is a cache hit); a cancel ends the wait
            while not _ONE_AT_A_TIME.acquire(timeout=0.5):
                if self.cancel.is_set():
                    raise HostModuleError("the host-side module build was cancelled")
            try:
                if self.cancel.is_set():
                    raise HostModuleError("the host-side module build was cancelled")
                self.result = build_here(
                    ctx, self.package, self.patches,
                    workdir=ctx.workdir / ("hostmodule-" + self.label if self.label else "hostmodule"),
                    niceness=NICENESS, cancel=self.cancel)
            finally:
                _ONE_AT_A_TIME.release()
        except BaseException as exc:  # handed to the thread that joins
            self.error = exc
            if isinstance(exc, HostModuleError) and exc.missing_tool is not None:  # said now, not after the install
                ctx.emitter.warning(fallback_warning(exc))
            elif isinstance(exc, HostModuleError) and not self.cancel.is_set():
                # said now, while the installer runs: the image (variant) that needs it fails when it reaches
                # provisioning, before its VM boots; the others go on
                ctx.emitter.warning(f"{exc.message}; {self.label or ctx.config.name} will fail at provisioning"
                                    + (f" ({exc.hint})" if exc.hint else ""))

    def start(self) -> ModuleJob:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.cancel.set()
        self.thread.join(timeout=60)

    def join(self) -> HostModule:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def start(ctx: BuildContext, *, label: str = "") -> ModuleJob | None:
    """Start the host-side build (stopped with the build's ExitStack), or None when it does not apply. ``label``
    names a variant's build (its own build root)."""
    package, why = dkms_package(ctx.config)
    if package is None:
        ctx.manifest["host_module"] = {"status": "not used", "why": why}
        ctx.emitter.info(f"the NVIDIA module is compiled in the guest: {why}")
        return None
    patches = dkms_patches(ctx.config)  # a bad patch list fails the build now, not after the install
    ctx.emitter.info(f"building the NVIDIA module ({package}, {why}) on this host while the installer runs"
                     + (f", with the DKMS patches {', '.join(p.name for p in patches)}" if patches else ""))
    job = ModuleJob(ctx, package, label=label, patches=patches).start()
    ctx.stack.callback(job.stop)
    return job


def cancel_all(jobs: list[ModuleJob]) -> None:
    """Tell every job to stop (each is joined by its own stop, registered when it started)."""
    for job in jobs:
        job.cancel.set()


def finish(ctx: BuildContext, job: ModuleJob | None) -> HostModule | None:
    """The built module (None: DKMS compiles in the guest). Waits for the build; its failure is the build's,
    except a missing host tool, which is a warning."""
    if job is None:
        return None
    if job.thread.is_alive():
        ctx.emitter.info("waiting for the host-side NVIDIA module build")
    try:
        built = job.join()
    except HostModuleError as exc:
        _fallback(ctx, exc, warn=False)  # the thread warned already
        return None
    ctx.manifest["host_module"] = {"status": "used", **built.manifest()}
    return built


def for_kernel(ctx: BuildContext, built: HostModule, kver: str) -> HostModule | None:
    """``built``, or the same package's module for ``kver`` when the guest booted another kernel than the
    archive's newest (a cached installed disk from before a kernel update): built on the host now, in minutes,
    rather than left to the guest (~45 minutes under TCG). None: a host tool is missing, the guest compiles."""
    if not kver or kver == built.kver:
        return built
    ctx.emitter.info(f"the installed system runs kernel {kver}, not {built.kver} (an older cached installed disk?): "
                     f"building {built.package} for {kver} on this host")
    try:
        again = build_here(ctx, built.package, built.patches, workdir=ctx.workdir / "hostmodule", kver=kver,
                           niceness=None)
    except HostModuleError as exc:
        _fallback(ctx, exc, warn=True)
        return None
    ctx.manifest["host_module"] = {"status": "used", **again.manifest(), "rebuilt_for_the_guest_kernel": True}
    return again


def build_here(ctx: BuildContext, package: str, patches: tuple[DkmsPatch, ...], **kw: Any) -> HostModule:
    """:func:`~builder.hostmodule.build_module` as this build runs it, for the first module and for a rebuild
    alike: through the build's gateway with its own client cache, signed with the build's key pair (an unsigned
    module cannot load under Secure Boot), with the role's patch script; ``kw`` the rest (workdir, kver, …)."""
    key, cert = ctx.config.signing_paths or (None, None)
    return build_module(gateway_sources(ctx), package, cache=gateway_client_cache(ctx), report=ctx.emitter.info,
                        signing_key=key, signing_cert=cert, patches=patches, patch_script=patch_script(ctx.config),
                        **kw)


def gateway_client_cache(ctx: BuildContext) -> ContentCache:
    """The blob cache of a client in this process that reads the archives through the build's own gateway: never
    the gateway's cache. A client holds a key's cache lock while it fetches that file, and the gateway, serving the
    request from a cold cache, waits for the same lock: one cache for both stalls the read until the client times
    out (what a cold build did before). The indexes come from the gateway's local copy, so a second copy costs
    little; it lives in the work directory and goes with it."""
    return ContentCache(ctx.workdir / "gateway-client-blobs")


def gateway_sources(ctx: BuildContext) -> Sources:
    """The image's archives as the build's gateway serves them on this host. Under a package lock the gateway
    serves the lock's view, signed by the build's key: verified, as apt in the target verifies it, with Debian's
    keyring plus that key (written once to the work directory), under the suite names the view has (the lock's
    suite, its codename's -updates and -security), and the build root holds only locked packages."""
    gw = ctx.gateway
    sources = Sources.of(ctx.config.debian, mirror=gw.url("debian"), security_mirror=gw.url("debian-security"))
    services = ctx.services
    if services is None or services.package_lock is None:
        return sources
    keyring = ctx.workdir / TARGET_KEYRING
    if not keyring.is_file():  # the same bytes whichever job writes them (atomic_write: safe across threads)
        atomic_write(keyring, combined_keyring(ctx.config.debian.keyring, services.signing_key.public_key()))
    lock = services.package_lock
    return sources.locked_view(keyring, services.signing_key.fingerprint, suite=lock.suite, codename=lock.codename)


def _fallback(ctx: BuildContext, exc: HostModuleError, *, warn: bool) -> None:
    """A missing host tool: the guest compiles (recorded, and warned when ``warn``); anything else fails."""
    if exc.missing_tool is None:
        exc.stage = exc.stage or "provision"
        raise exc
    if warn:
        ctx.emitter.warning(fallback_warning(exc))
    ctx.manifest["host_module"] = {"status": "fell back to the guest", "why": exc.message}


def fallback_warning(exc: HostModuleError) -> str:
    return (f"{exc.message}: DKMS compiles the NVIDIA module in the guest instead"
            + (f" ({exc.hint})" if exc.hint else ""))


__all__ = ["ModuleJob", "dkms_package", "dkms_patches", "finish", "for_kernel", "module_manifest", "patch_script",
           "report_path", "role_vars", "start"]
