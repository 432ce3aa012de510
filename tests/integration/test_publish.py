"""publish() on a small real disk: compressed qcow2 in a staging dir, checksums, manifest, logs without the
throw-away private key, then swapped into the output directory atomically (an old output is replaced whole)."""

import hashlib
import json
import subprocess
from contextlib import ExitStack

import pytest

from builder import image
from builder.context import BuildContext, BuildOptions
from builder.diagnostics import Diagnostics
from builder.events import Emitter
from builder.stages import finalize, publish

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_publish_small_disk(default_config, tmp_path):
    disk = tmp_path / "disk.qcow2"
    image.create(disk, 64 << 20)
    subprocess.run(["qemu-io", "-c", "write -P 0x61 0 8M", str(disk)], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "packages.txt").write_text("openssh-server 1:10.0p1-7\n")
    (work / "install.syslog").write_text("late ( echo '-----BEGIN OPENSSH PRIVATE KEY-----'; echo 'c2VjcmV0'; "
                                         "echo '-----END OPENSSH PRIVATE KEY-----' )\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-file").write_text("from an older build")
    with ExitStack() as stack:
        ctx = BuildContext(default_config, BuildOptions(out), work, Emitter(), stack, Diagnostics(work),
                           manifest={"installer": {"netboot": "20250803+deb13u6"}})
        final = finalize.compress(ctx, disk)
        assert final.image.parent.parent == tmp_path and final.image.is_file()  # staged beside the output
        assert not (out / "cloud-gpu-worker.qcow2").exists()  # nothing published before publish
        res = publish.run(ctx, final)
    assert res.image == out / "cloud-gpu-worker.qcow2" and res.image.is_file()
    assert not (out / "stale-file").exists()  # the old output was replaced as a whole
    assert not list(tmp_path.glob(".out.*")), "staging or old output left behind"
    digest = hashlib.sha256(res.image.read_bytes()).hexdigest()
    assert (out / "SHA256SUMS").read_text() == f"{digest}  cloud-gpu-worker.qcow2\n" and res.sha256 == digest
    info = image.info(res.image)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    assert image.check(res.image).get("compressed-clusters", 1) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"] == digest and manifest["installer"]["netboot"] == "20250803+deb13u6"
    assert manifest["raw_disk_bytes"] >= 8 << 20 and "stages" in manifest
    assert (out / "packages.txt").read_text().startswith("openssh-server")
    assert "c2VjcmV0" not in (out / "logs" / "install.syslog").read_text()


@pytest.mark.timeout(120)
def test_publish_ships_the_module_signing_certificate(default_config, tmp_path):
    """With secure_boot the provision stage leaves the certificate in the work directory: it is published as
    NAME.mok.der and NAME.mok.pem, in SHA256SUMS, and described in the manifest."""
    from builder.secureboot import der_bytes, write_pair
    from builder.stages.provision import SIGNING_CERT

    pair = write_pair(tmp_path / "keys", "publish test")
    disk = tmp_path / "disk.qcow2"
    image.create(disk, 16 << 20)
    work = tmp_path / "work"
    work.mkdir()
    (work / SIGNING_CERT).write_bytes(der_bytes(pair.cert))
    out = tmp_path / "out"
    with ExitStack() as stack:
        ctx = BuildContext(default_config, BuildOptions(out), work, Emitter(), stack, Diagnostics(work))
        res = publish.run(ctx, finalize.compress(ctx, disk))
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"cloud-gpu-worker.qcow2", "cloud-gpu-worker.mok.der", "cloud-gpu-worker.mok.pem"}
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert sums["cloud-gpu-worker.qcow2"] == res.sha256
    assert (out / "cloud-gpu-worker.mok.der").read_bytes() == der_bytes(pair.cert)
    assert (out / "cloud-gpu-worker.mok.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    sb = json.loads((out / "manifest.json").read_text())["secure_boot"]
    assert sb["signing_cert"] == "cloud-gpu-worker.mok.der" and sb["subject"] == "CN=publish test module signing"
    assert sb["sha256_fingerprint"] == pair.fingerprint
