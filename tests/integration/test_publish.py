"""publish() on a small real disk: compressed qcow2 in a staging dir, checksums, manifest, SBOM and provenance,
logs without the throw-away private key, then swapped into the output directory atomically (an old output is
replaced whole)."""

import hashlib
import json
import lzma
import re
import subprocess
from contextlib import ExitStack

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder import image
from builder.archive.cache import ContentCache
from builder.archive.release import parse_release
from builder.context import BuildContext, BuildOptions, Services
from builder.diagnostics import Diagnostics
from builder.events import Emitter
from builder.gateway.server import Gateway
from builder.lock import read_lock
from builder.stages import finalize, publish
from builder.stages.fetch import InstallerInputs

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
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sums[0] == f"{digest}  cloud-gpu-worker.qcow2" and res.sha256 == digest
    assert [line.split("  ")[1] for line in sums[1:]] == ["cloud-gpu-worker.cdx.json",
                                                          "cloud-gpu-worker.provenance.json"]
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
    assert set(sums) == {"cloud-gpu-worker.qcow2", "cloud-gpu-worker.mok.der", "cloud-gpu-worker.mok.pem",
                         "cloud-gpu-worker.cdx.json", "cloud-gpu-worker.provenance.json"}
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert sums["cloud-gpu-worker.qcow2"] == res.sha256
    assert (out / "cloud-gpu-worker.mok.der").read_bytes() == der_bytes(pair.cert)
    assert (out / "cloud-gpu-worker.mok.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    sb = json.loads((out / "manifest.json").read_text())["secure_boot"]
    assert sb["signing_cert"] == "cloud-gpu-worker.mok.der" and sb["subject"] == "CN=publish test module signing"
    assert sb["sha256_fingerprint"] == pair.fingerprint


PACKAGES_TSV = (
    "openssh-server\t1:10.0p1-7\tamd64\topenssh\t1:10.0p1-7\tii \thttps://www.openssh.com/\n"
    "nvidia-kernel-dkms\t550.163.01-2\tamd64\tnvidia-graphics-drivers\t550.163.01-2\tii \t\n"
    "libfoo1\t1.0-1\tamd64\tfoo\t1.0-1\tii \t\n"
)
KERNEL = "6.12.94+deb13-amd64"
MODULES = {"modules": [{"name": "nvidia", "version": "550.163.01", "license": "NVIDIA", "kernel": KERNEL,
                        "path": f"/lib/modules/{KERNEL}/updates/dkms/nvidia-current.ko.xz", "sha256": "a1" * 32,
                        "vermagic": f"{KERNEL} SMP preempt mod_unload modversions"}],
           "dkms": [{"module": "nvidia-current", "version": "550.163.01", "kernel": KERNEL, "arch": "x86_64",
                     "status": "installed", "source_package": "nvidia-kernel-dkms"}]}


def _index_and_release(tmp_path):
    """A Packages.xz listing openssh-server, in a content cache, and the Release (taken as verified) naming it."""
    ssh_sha = hashlib.sha256(b"openssh-server.deb").hexdigest()
    packages = (f"Package: openssh-server\nSource: openssh\nVersion: 1:10.0p1-7\nArchitecture: amd64\n"
                f"Filename: pool/main/o/openssh/openssh-server_10.0p1-7_amd64.deb\nSize: 18\nSHA256: {ssh_sha}\n")
    xz = lzma.compress(packages.encode())
    xz_sha = hashlib.sha256(xz).hexdigest()
    cache = ContentCache(tmp_path / "blobs")
    cache.put(xz, xz_sha)
    release = parse_release(f"Suite: stable\nCodename: trixie\nComponents: main\nArchitectures: amd64\nSHA256:\n"
                            f" {xz_sha} {len(xz)} main/binary-amd64/Packages.xz\n".encode())
    return cache, release, ssh_sha, xz_sha


@pytest.mark.timeout(120)
def test_publish_writes_sbom_and_provenance(default_config, repo, tmp_path):
    disk = tmp_path / "disk.qcow2"
    image.create(disk, 64 << 20)
    work = tmp_path / "work"
    work.mkdir()
    (work / "packages.tsv").write_text(PACKAGES_TSV)
    (work / "packages.txt").write_text("openssh-server 1:10.0p1-7\nnvidia-kernel-dkms 550.163.01-2\nlibfoo1 1.0-1\n")
    (work / "licenses.tsv").write_text("openssh-server\tBSD-3-clause\tOpenSSH\n")
    (work / "kernel-modules.json").write_text(json.dumps(MODULES))
    kernel, initrd = tmp_path / "linux", tmp_path / "initrd.gz"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    inrelease = b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: stable\n"
    inputs = InstallerInputs(read_lock(repo / "images" / "cloud-gpu-worker.lock.json"), kernel, initrd, b"", b"",
                             b"", {}, inrelease)
    cache, release, ssh_sha, xz_sha = _index_and_release(tmp_path)
    gw = Gateway(upstreams={"debian": "http://127.0.0.1:9/debian"}, cache=cache,
                 keyring=default_config.debian.keyring, fingerprints=(), state_dir=tmp_path / "gw", offline=True)
    gw.add_release("debian", "trixie", release)
    out = tmp_path / "out"
    with ExitStack() as stack:
        ctx = BuildContext(default_config, BuildOptions(out), work, Emitter(), stack, Diagnostics(work), cache=cache,
                           services=Services(gw, None, None, None), accel="tcg",  # type: ignore[arg-type]
                           manifest={"provision": {"facts": ["13.2", KERNEL]}})
        res = publish.run(ctx, finalize.compress(ctx, disk), inputs)
    # SHA256SUMS covers the image and both documents, as sha256sum checks it
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 3, check.stdout + check.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["sbom"], manifest["provenance"]) == ("cloud-gpu-worker.cdx.json",
                                                          "cloud-gpu-worker.provenance.json")

    bom_text = (out / "cloud-gpu-worker.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(bom_text) is None
    bom = json.loads(bom_text)
    assert bom["metadata"]["component"]["hashes"][0]["content"] == res.sha256
    comps = {c["name"]: c for c in bom["components"]}
    assert comps["openssh-server"]["hashes"] == [{"alg": "SHA-256", "content": ssh_sha}]
    assert [x["license"].get("id", x["license"].get("name")) for x in comps["openssh-server"]["licenses"]] == [
        "BSD-3-Clause", "OpenSSH"]
    assert "hashes" not in comps["libfoo1"] and "licenses" not in comps["libfoo1"]
    assert comps["nvidia-driver"]["components"][0]["hashes"][0]["content"] == "a1" * 32

    st = json.loads((out / "cloud-gpu-worker.provenance.json").read_text())
    # the documented check: the image's digest is the statement's subject
    assert st["subject"] == [{"name": "cloud-gpu-worker.qcow2",
                              "digest": {"sha256": hashlib.sha256(res.image.read_bytes()).hexdigest()}}]
    assert st["_type"] == "https://in-toto.io/Statement/v1" and st["predicateType"] == "https://slsa.dev/provenance/v1"
    bd, rd = st["predicate"]["buildDefinition"], st["predicate"]["runDetails"]
    deps = bd["resolvedDependencies"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d["digest"]["sha256"]) for d in deps)
    kinds = {d["annotations"]["kind"] for d in deps}
    assert kinds >= {"image-definition", "lock", "playbook", "role", "preseed-template", "keyring", "netboot",
                     "netboot-kernel", "netboot-initrd", "boot-loader-package", "udeb-index", "inrelease",
                     "packages-index"}
    lock = inputs.lock
    netboot = next(d for d in deps if d["annotations"]["kind"] == "netboot")
    assert netboot["name"] == f"{lock.netboot.package}_{lock.netboot.version}"
    assert netboot["digest"] == {"sha256": lock.netboot.sha256} and netboot["uri"].endswith(lock.netboot.filename)
    by_name = {d["name"]: d for d in deps}
    assert by_name["images/cloud-gpu-worker.yaml"]["digest"]["sha256"] == hashlib.sha256(
        (repo / "images" / "cloud-gpu-worker.yaml").read_bytes()).hexdigest()
    assert by_name["debian/dists/trixie/InRelease"]["digest"]["sha256"] == hashlib.sha256(inrelease).hexdigest()
    assert by_name["debian/dists/trixie/main/binary-amd64/Packages.xz"]["digest"]["sha256"] == xz_sha
    assert by_name["netboot 20250803+deb13u6: kernel"]["digest"]["sha256"] == hashlib.sha256(b"kernel").hexdigest()
    assert bd["externalParameters"]["config"]["name"] == "cloud-gpu-worker"
    assert bd["internalParameters"]["accel"] == "tcg"
    assert rd["builder"]["version"]["builder"] == manifest["builder_version"]
    assert rd["metadata"]["startedOn"] <= rd["metadata"]["finishedOn"]
    sbom_sha = hashlib.sha256(bom_text.encode()).hexdigest()
    assert {"name": "cloud-gpu-worker.cdx.json", "digest": {"sha256": sbom_sha},
            "mediaType": "application/vnd.cyclonedx+json"} in rd["byproducts"]
