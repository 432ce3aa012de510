"""Stage ``publish``: checksums, manifest, package list, SBOM (CycloneDX), provenance (in-toto/SLSA), the
module-signing certificate (``NAME.mok.der`` and ``NAME.mok.pem``, with ``secure_boot``) and the build's logs
(throw-away keys removed) beside the compressed qcow2 in the staging directory, then the staging directory swapped
in as the output directory in one rename (an older output is replaced whole; nothing half-built is ever under the
output's name).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__, attest, image
from ..archive.cache import sha256_file
from ..context import BuildContext
from ..errors import BuilderError, OutputError
from ..redact import redact_private_keys
from ..secureboot import SigningError, der_bytes, fingerprint, load_cert, pem_bytes, serial_hex, subject
from .finalize import FinalImage
from .provision import SIGNING_CERT

if TYPE_CHECKING:
    from .fetch import InstallerInputs

LOGS = ("install.syslog", "install.serial.log", "provision.serial.log", "preseed.cfg", "ansible-events.jsonl")


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


def _signing_cert(der: Path, staging: Path, name: str) -> tuple[dict[str, str], list[str]]:
    """The certificate the modules were signed with (provision left it in the work directory when
    ``secure_boot`` is set) as ``NAME.mok.der`` and ``NAME.mok.pem`` in ``staging``: its manifest entry and the
    files written. Nothing without one."""
    if not der.is_file():
        return {}, []
    try:
        cert = load_cert(der)
    except SigningError as exc:
        raise OutputError(f"cannot publish the module-signing certificate: {exc}") from exc
    files = [f"{name}.mok.der", f"{name}.mok.pem"]
    (staging / files[0]).write_bytes(der_bytes(cert))
    (staging / files[1]).write_bytes(pem_bytes(cert))
    return {"signing_cert": files[0], "signing_cert_pem": files[1], "sha256_fingerprint": fingerprint(cert),
            "subject": subject(cert), "serial": serial_hex(cert)}, files


def run(ctx: BuildContext, final: FinalImage, inputs: InstallerInputs | None = None) -> BuildResult:
    """The stage: the output directory, complete, or an OutputError and the old output untouched. ``inputs``
    (fetch's) name the installer's pinned files in the provenance; without them, what the manifest says."""
    cfg, out_dir, staging, target = ctx.config, ctx.options.output, final.staging, final.image
    name = target.name
    try:
        digest = sha256_file(target)
        secure_boot, cert_files = _signing_cert(ctx.workdir / SIGNING_CERT, staging, cfg.name)
        if (ctx.workdir / "packages.txt").is_file():
            shutil.copy2(ctx.workdir / "packages.txt", staging / "packages.txt")
        docs = attest.write_documents(ctx, staging, name, digest, inputs)
        extra = [*(staging / f for f in cert_files), *docs]
        (staging / "SHA256SUMS").write_text(f"{digest}  {name}\n"
                                            + "".join(f"{sha256_file(d)}  {d.name}\n" for d in extra))
        for logname in LOGS:
            src = ctx.workdir / logname
            if src.is_file() and src.stat().st_size > 0:  # no empty installer log for a cached install
                (staging / "logs").mkdir(exist_ok=True)
                # the preseed (and d-i's log of the late_command) carry the build's throw-away host key
                (staging / "logs" / logname).write_text(redact_private_keys(src.read_text(errors="replace")))
        info = image.info(target)
        gw_stats = ctx.services.gateway.stats.as_dict() if ctx.services is not None else {}
        gw_upstream = int(gw_stats.get("upstream_bytes", 0))
        manifest = ctx.manifest
        manifest.update({
            "name": cfg.name, "builder_version": __version__,
            "image": name, "sha256": digest, "size_bytes": target.stat().st_size,
            "sbom": docs[0].name, "provenance": docs[1].name,
            "virtual_size": info.get("virtual-size"), "raw_disk_bytes": final.raw_disk_bytes,
            "compression": cfg.disk.compression,
            # the module-signing certificate to enroll (None: DKMS's own key; the module does not load under SB)
            "secure_boot": secure_boot or None,
            "debian": {"suite": cfg.debian.suite, "release": cfg.debian.release},
            # the installer inputs (fetch) and what the VMs fetched through the gateway (udebs, packages)
            "bytes_fetched_upstream": ctx.stats.bytes_fetched + gw_upstream,
            "gateway": gw_stats,
            "build_host": {"python": platform.python_version(), "machine": platform.machine()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        # every stage's time, this one's up to here
        stages = {k: round(v, 1) for k, v in ctx.emitter.durations.items()}
        if ctx.emitter.stage_started is not None:
            stages["publish"] = round(time.monotonic() - ctx.emitter.stage_started, 1)
        manifest["stages"] = stages
        manifest["duration_s"] = round(time.monotonic() - ctx.started, 1)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BuilderError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot publish to {out_dir}: {exc}") from exc
    final_image = out_dir / name
    size = final_image.stat().st_size
    ctx.emitter.info(f"published {final_image} ({size / 2**20:.0f} MiB, sha256 {digest[:16]}…)")
    return BuildResult(final_image, out_dir, digest, size, int(info.get("virtual-size", 0)),
                       time.monotonic() - ctx.started, dict(ctx.emitter.durations), out_dir / "manifest.json",
                       ctx.stats.bytes_fetched + gw_upstream)
