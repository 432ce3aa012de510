"""The host side of a build, started once after ``fetch`` (the ``prepare`` step of the build):

* the archive gateway (:mod:`builder.gateway`), serving the installer suite signed by a fresh ephemeral key;
* the installer's syslog listener and the tracker that turns its lines into progress;
* the accelerator, chosen by a real boot probe (KVM that exists may still be unusable), or by a remote
  libvirt host's capabilities.

Everything started here lives on the build's ExitStack and is stopped when the build ends, however it ends.
"""

from __future__ import annotations

from .config import ImageConfig
from .context import BuildContext, Services
from .events import Emitter
from .gateway import udeb as udeb_suite
from .gateway.server import Gateway
from .gateway.signing import EphemeralKey
from .installer.progress import InstallTracker, SyslogListener
from .stages.fetch import InstallerInputs
from .vm.accel import pick_accel

UDEB_SUITE = "builder-installer"


def sign(files: dict[str, bytes], key: EphemeralKey, where: str) -> dict[str, bytes]:
    """A generated suite's files with ``Release.gpg`` and ``InRelease`` added, keyed by gateway path
    (``where``: e.g. ``debian/dists/<suite>``)."""
    files = dict(files)
    files["Release.gpg"] = key.detach_sign(files["Release"])
    files["InRelease"] = key.clearsign(files["Release"])
    return {f"{where}/{k}": v for k, v in files.items()}


def signed_suite(inputs: InstallerInputs, key: EphemeralKey) -> dict[str, bytes]:
    """The generated installer suite, signed, keyed by gateway path."""
    files = udeb_suite.suite_files(inputs.udeb_packages, suite=UDEB_SUITE, codename=UDEB_SUITE)
    return sign(files, key, f"debian/dists/{UDEB_SUITE}")


def signed_target_views(inputs: InstallerInputs, key: EphemeralKey) -> dict[str, bytes]:
    """With a package lock: the target's suites (only the locked packages), signed, keyed by gateway path."""
    out: dict[str, bytes] = {}
    for view in inputs.target.views if inputs.target else ():
        out.update(sign(view.files, key, f"{view.prefix}/dists/{view.suite}"))
    return out


def gateway_for(ctx: BuildContext, inputs: InstallerInputs, key: EphemeralKey) -> Gateway:
    """The archive gateway of this build (not started). With a package lock it serves the target only the
    locked packages; offline it never contacts the mirrors."""
    cfg = ctx.config
    pins = dict(inputs.udeb_pins)
    if inputs.target is not None:
        pins.update(inputs.target.pins)
    return Gateway(
        upstreams=cfg.debian.upstreams,
        cache=ctx.cache, keyring=cfg.debian.keyring,
        fingerprints={"debian": cfg.debian.trusted_fingerprints, "debian-security": cfg.debian.security_fingerprints},
        generated={**signed_suite(inputs, key), **signed_target_views(inputs, key)}, pins=pins,
        pinned_pool_only=inputs.target is not None, offline=ctx.options.offline,
    )


def start(ctx: BuildContext, inputs: InstallerInputs) -> BuildContext:
    """``ctx`` with the services started (on ``ctx.stack``) and the accelerator chosen."""
    stack, emitter = ctx.stack, ctx.emitter
    # the private key lives in the work directory (gone with it); the next build sweeps a killed build's agent
    key = stack.enter_context(EphemeralKey(f"builder {ctx.name} installer suite", home_parent=ctx.workdir))
    gateway = stack.enter_context(gateway_for(ctx, inputs, key))
    tracker = InstallTracker(on_step=lambda step: emitter.info(f"installer: {step}"))
    syslog = stack.enter_context(SyslogListener(ctx.workdir / "install.syslog", tracker))
    gateway.on_request = lambda path, status, size: tracker.touch()  # downloads count as installer progress
    vm = ctx.config.vm
    accel = pick_accel(vm.accel, inputs.kernel, emitter,
                       libvirt_uri=vm.libvirt_host(ctx.name) if vm.backend == "libvirt" else None)
    ctx.manifest["accel"] = accel
    ctx.manifest["vm"] = vm.host_record(ctx.name)
    plock = inputs.target.lock if inputs.target is not None else None
    return ctx.with_(services=Services(gateway, key, syslog, tracker, plock), accel=accel)


def variant_accel(ctx: BuildContext, vcfg: ImageConfig, inputs: InstallerInputs, emitter: Emitter) -> str:
    """The accelerator of a variant's VMs: the build's (:func:`start`) when they run on the install's libvirt
    host, else chosen for the variant's host (its libvirt's word, or the probe here for a local URI)."""
    vm, base = vcfg.vm, ctx.config.vm
    if vm.backend != "libvirt":
        return ctx.accel
    uri = vm.libvirt_host(vcfg.name)
    if uri == base.libvirt_host(ctx.name):
        return ctx.accel
    return pick_accel(vm.accel, inputs.kernel, emitter, libvirt_uri=uri)
