"""publish() on a small real disk: compressed qcow2 in a staging dir, checksums, manifest, logs without the
throw-away private key, then swapped into the output directory atomically (an old output is replaced whole)."""

import hashlib
import json
import subprocess
import time

import pytest

from builder import image
from builder.archive.http import FetchStats
from builder.events import Emitter
from builder.inputs import InstallerInputs
from builder.lock import read_lock
from builder.pipeline import publish

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
    lock = read_lock(default_config.lock_path)
    inputs = InstallerInputs(lock, disk, disk, b"", b"", b"", {}, b"InRelease")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-file").write_text("from an older build")
    res = publish(default_config, disk, out, inputs=inputs, manifest={"name": "t"}, emitter=Emitter(),
                  stats=FetchStats(), started=time.monotonic(), workdir=work)
    assert res.image == out / "cloud-gpu-worker.qcow2" and res.image.is_file()
    assert not (out / "stale-file").exists()  # the old output was replaced as a whole
    assert not list(tmp_path.glob(".out.*")), "staging or old output left behind"
    digest = hashlib.sha256(res.image.read_bytes()).hexdigest()
    assert (out / "SHA256SUMS").read_text() == f"{digest}  cloud-gpu-worker.qcow2\n" and res.sha256 == digest
    info = image.info(res.image)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    assert image.check(res.image).get("compressed-clusters", 1) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"] == digest and manifest["installer"]["netboot"] == lock.netboot.version
    assert (out / "packages.txt").read_text().startswith("openssh-server")
    assert "c2VjcmV0" not in (out / "logs" / "install.syslog").read_text()
