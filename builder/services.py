"""The host side of a build, started once after ``fetch`` (the ``prepare`` step of the build):

* the archive gateway (:mod:`builder.gateway`), serving the installer suite signed by a fresh ephemeral key;
* the installer's syslog listener and the tracker that turns its lines into progress;
* the accelerator, chosen by a real boot probe (KVM that exists may still be unusable), or by a remote
  libvirt host's capabilities.

Everything started here lives on the build's ExitStack and is stopped when the build ends, however it ends.
"""

from __future__ import annotations

from .context import BuildContext, Services
from .gateway import udeb as udeb_suite
from .gateway.server import Gateway
from .gateway.signing import EphemeralKey
from .installer.progress import InstallTracker, SyslogListener
from .stages.fetch import InstallerInputs
from .vm.accel import pick_accel

UDEB_SUITE = "builder-installer"


def signed_suite(inputs: InstallerInputs, key: EphemeralKey) -> dict[str, bytes]:
    """The generated installer suite, signed, keyed by gateway path."""
    files = udeb_suite.suite_files(inputs.udeb_packages, suite=UDEB_SUITE, codename=UDEB_SUITE)
    files["Release.gpg"] = key.detach_sign(files["Release"])
    files["InRelease"] = key.clearsign(files["Release"])
    return {f"debian/dists/{UDEB_SUITE}/{k}": v for k, v in files.items()}


def gateway_for(ctx: BuildContext, inputs: InstallerInputs, key: EphemeralKey) -> Gateway:
    """The archive gateway of this build (not started)."""
    cfg = ctx.config
    return Gateway(
        upstreams={"debian": cfg.debian.mirror, "debian-security": cfg.debian.security_mirror},
        cache=ctx.cache, keyring=cfg.debian.keyring,
        fingerprints={"debian": cfg.debian.trusted_fingerprints, "debian-security": cfg.debian.security_fingerprints},
        generated=signed_suite(inputs, key), pins=inputs.udeb_pins,
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
    return ctx.with_(services=Services(gateway, key, syslog, tracker), accel=accel)
