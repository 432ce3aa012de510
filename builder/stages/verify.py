"""Stage ``verify``: the finished qcow2, still in the staging directory, booted under every firmware its disk
layout promises (BIOS and UEFI for a hybrid disk) with a NoCloud seed and checked (:mod:`builder.verify`).

A failed check fails the build before anything is published; the reports go into the output (``verify/``).
"""

from __future__ import annotations

from ..context import BuildContext
from ..errors import VerifyError
from ..secureboot import load_cert, pem_bytes
from ..verify import default_firmwares, verify_all
from ..vm.firmware import FirmwareKind
from .finalize import FinalImage
from .provision import SIGNING_CERT


def run(ctx: BuildContext, final: FinalImage) -> None:
    """With ``secure_boot`` set, also under ``uefi-secure``: the module-signing certificate enrolled as a MOK,
    the NVIDIA module's signature accepted."""
    cfg = ctx.config
    firmwares: tuple[FirmwareKind, ...] = default_firmwares(cfg)
    mok_cert = None
    der = ctx.workdir / SIGNING_CERT
    if der.is_file() and cfg.disk.boot != "bios":
        mok_cert = ctx.workdir / "module-signing.pem"
        mok_cert.write_bytes(pem_bytes(load_cert(der)))
        firmwares = (*firmwares, "uefi-secure")
    # the reports name the files as published (the image and NAME.mok.pem next to verify/), not the staging
    # directory and the work directory, which are gone once the build is published
    reports = verify_all(cfg, final.image, final.staging / "verify", firmwares=firmwares, mok_cert=mok_cert,
                         emitter=ctx.emitter, accel=ctx.accel or None,  # type: ignore[arg-type]
                         label=final.image.name, cert_label=f"{cfg.name}.mok.pem" if mok_cert else "")
    ctx.manifest["verify"] = {r.firmware: {"ok": r.ok, "ssh_seconds": round(r.boot_seconds, 1),
                                           "failed": [c.name for c in r.checks if not c.ok]} for r in reports}
    failed = [f"{r.firmware}: {c.name} ({c.detail})" for r in reports for c in r.checks if not c.ok]
    if failed:
        raise VerifyError(f"the image failed {len(failed)} check(s) after the build; nothing was published",
                          stage="verify", log_tail=failed)
    ctx.emitter.info("verified under " + ", ".join(f"{r.firmware} (SSH after {r.boot_seconds:.0f} s)"
                                                    for r in reports))
