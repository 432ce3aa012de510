"""Stage ``verify``: the finished qcow2, still in the staging directory, booted under every firmware its disk
layout promises (BIOS and UEFI for a hybrid disk) with a NoCloud seed and checked (:mod:`builder.verify`).

A failed check fails the build before anything is published; the reports go into the output (``verify/``).
"""

from __future__ import annotations

from pathlib import Path

from ..context import BuildContext
from ..errors import VerifyError
from ..verify import default_firmwares, verify_all
from .finalize import FinalImage


def run(ctx: BuildContext, final: FinalImage, *, mok_cert: Path | None = None) -> None:
    cfg = ctx.config
    firmwares = default_firmwares(cfg)
    reports = verify_all(cfg, final.image, final.staging / "verify", firmwares=firmwares, mok_cert=mok_cert,
                         emitter=ctx.emitter)
    ctx.manifest["verify"] = {r.firmware: {"ok": r.ok, "ssh_seconds": round(r.boot_seconds, 1),
                                           "failed": [c.name for c in r.checks if not c.ok]} for r in reports}
    failed = [f"{r.firmware}: {c.name} ({c.detail})" for r in reports for c in r.checks if not c.ok]
    if failed:
        raise VerifyError(f"the image failed {len(failed)} check(s) after the build; nothing was published",
                          stage="verify", log_tail=failed)
    ctx.emitter.info("verified under " + ", ".join(f"{r.firmware} (SSH after {r.boot_seconds:.0f} s)"
                                                    for r in reports))
