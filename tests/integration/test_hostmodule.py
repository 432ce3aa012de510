"""The host-side module build for real, with a tiny real DKMS package instead of NVIDIA's (no 10-minute compile):
``dkms-test-dkms``, the DKMS project's own test module from the suite's own dkms source package.

* builder.hostmodule makes a trixie build root with mmdebstrap through a real local archive gateway (the one a
  build starts; 127.0.0.1 only, content cache shared with the other tests), builds the module for the kernel of
  the debootstrapped test tree, signed with a throw-away key and with a DKMS source patch (PATCH[] in dkms.conf,
  given by the role's dkms-patches.sh: it changes the module's description), and packs a binaries-only tarball;
* the second call is a cache hit that makes no build root;
* roles/nvidia-gpu-drivers, run whole with the tiny package standing in for NVIDIA's, takes the prebuilt path
  (no-autoinstall, install, ldtarball, dkms install, vermagic) for the test tree's installed kernel, which is not
  the running one, and compiles in the "guest" only for a second installed kernel that has no prebuilt module;
  the same patch list reaches the tree's source, so that compile is patched too.

Run with ``-s`` to see the timings (TIMINGS …).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder import dkmspatches
from builder import hostmodule as hm
from builder.archive import ContentCache
from builder.config import DebianConfig
from builder.gateway.server import Gateway
from builder.provision import run_playbook

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

ROOT = Path(__file__).resolve().parents[2]
ROLES = [ROOT / "roles"]
PACKAGE = "dkms-test-dkms"
MODULE = "dkms_test"
SIGNER = "builder test module signing"
PATCH_SCRIPT = ROOT / "roles/nvidia-gpu-drivers/files/dkms-patches.sh"
PATCHED = "A Simple dkms test module, patched by DKMS PATCH[]"
# for /usr/src/dkms_test-1.0 of trixie's dkms-test-dkms 3.2.2-1~deb13u1 (checked with patch -p1 --dry-run)
TOY_PATCH = "".join(line + "\n" for line in [
    "--- a/dkms_test.c",
    "+++ b/dkms_test.c",
    "@@ -5,7 +5,7 @@",
    ' #define  DKMS_TEST_VER "1.0"',
    " ",
    ' MODULE_LICENSE("GPL");',
    '-MODULE_DESCRIPTION("A Simple dkms test module");',
    f'+MODULE_DESCRIPTION("{PATCHED}");',
    " ",
    " static int __init dkms_test_init(void)",
    " {",
])
TIMINGS: dict[str, float] = {}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool})")


@pytest.fixture(scope="module")
def debian() -> DebianConfig:
    mirror, security = tt.mirrors()
    return DebianConfig(mirror=mirror, security_mirror=security)


@pytest.fixture(scope="module")
def gateway(debian):
    with Gateway(upstreams={"debian": debian.mirror, "debian-security": debian.security_mirror},
                 cache=ContentCache(), keyring=debian.keyring,
                 fingerprints={"debian": debian.trusted_fingerprints,
                               "debian-security": debian.security_fingerprints}) as gw:
        yield gw


@pytest.fixture(scope="module")
def sources(debian, gateway) -> hm.Sources:
    return hm.Sources.of(debian, mirror=gateway.url("debian"), security_mirror=gateway.url("debian-security"))


@pytest.fixture(scope="module")
def pristine() -> Path:
    _need("debootstrap")
    return tt.pristine_tree()


def module_bytes(path: Path) -> bytes:
    """A kernel module file, decompressed (the host needs no kmod for this)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    assert path.suffix == ".ko", f"unexpected module compression: {path.name}"
    return data


def installed_kernels(tree: Path) -> list[str]:
    return sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))


@pytest.fixture(scope="module")
def signing(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("signing")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SIGNER)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    (d / "mok.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (d / "mok.key").chmod(0o600)
    (d / "mok.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "mok.key", d / "mok.crt"


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> tuple[dkmspatches.DkmsPatch, ...]:
    path = tmp_path_factory.mktemp("patches") / "dkms-test-description.patch"
    path.write_text(TOY_PATCH)
    return dkmspatches.load([{"file": str(path)}], patches_dir=None, where="test")


@pytest.fixture(scope="module")
def built(sources, pristine, signing, patches, tmp_path_factory):
    """The tiny module, built on this host for the test tree's kernel (not the running one)."""
    _need("mmdebstrap")
    kver = installed_kernels(pristine)[0]
    work = tmp_path_factory.mktemp("hostmodule")
    modules = hm.ModuleCache(work / "modules")
    t0 = time.monotonic()
    result = hm.build_module(sources, PACKAGE, workdir=work / "build", cache=ContentCache(), modules=modules,
                             kver=kver, signing_key=signing[0], signing_cert=signing[1], niceness=19,
                             timeout=1800, patches=patches, patch_script=PATCH_SCRIPT)
    TIMINGS["host build (resolve + mmdebstrap + dkms build)"] = time.monotonic() - t0
    log = (work / "build" / "mmdebstrap.log").read_text()
    for line in log.splitlines():
        if line.startswith("I: success in "):
            TIMINGS["of which mmdebstrap"] = float(line.split()[3])
    yield {"result": result, "modules": modules, "work": work, "kver": kver}
    print("\nTIMINGS " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


@pytest.mark.timeout(1800)
def test_host_build_makes_a_signed_binaries_only_tarball(built, signing, patches, tmp_path):
    res, kver = built["result"], built["kver"]
    assert (res.origin, res.module, res.version, res.kver, res.package) == ("host-built", MODULE, "1.0", kver, PACKAGE)
    assert res.signer == SIGNER
    assert res.patches == patches and res.manifest()["dkms_patches"][0]["name"] == "dkms-test-description.patch"
    with tarfile.open(res.tarball) as tf:
        names = tf.getnames()
        tf.extractall(tmp_path, filter="data")
    assert "./dkms_binaries_only/dkms.conf" in names
    assert not [n for n in names if "dkms_source_tree" in n]  # binaries only: no source
    kos = [n for n in names if n.startswith(f"./dkms_main_tree/{kver}/x86_64/module/{MODULE}.ko")]
    assert len(kos) == 1
    assert not [n for n in names if "signing" in n or n.endswith((".key", ".pem", ".crt", "mok.pub"))]
    key = signing[0].read_bytes()
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes() and key not in p.read_bytes(), p
    ko = module_bytes(tmp_path / kos[0])
    assert re.search(rb"\0vermagic=" + re.escape(kver.encode()) + rb" ", ko)  # built for the tree's kernel
    assert ko.endswith(b"~Module signature appended~\n") and SIGNER.encode() in ko[-4096:]  # signed with our key
    assert b"\0description=" + PATCHED.encode() + b"\0" in ko  # DKMS applied the patch before it compiled
    conf = (tmp_path / "dkms_binaries_only/dkms.conf").read_text()
    assert conf.count('PATCH+=("dkms-test-description.patch")') == 1
    # the build root is gone, and nothing is left mounted
    assert not (built["work"] / "build" / "tmp").exists()
    assert not hm.mounts_under(built["work"])


@pytest.mark.timeout(600)
def test_second_build_is_a_cache_hit_without_a_build_root(built, sources, signing, patches, monkeypatch):
    def no_build(*a, **kw):
        raise AssertionError("the cache hit made a build root")

    monkeypatch.setattr(hm, "_run_build", no_build)
    t0 = time.monotonic()
    hit = hm.build_module(sources, PACKAGE, workdir=built["work"] / "build2", cache=ContentCache(),
                          modules=built["modules"], kver=built["kver"], signing_key=signing[0],
                          signing_cert=signing[1], patches=patches, patch_script=PATCH_SCRIPT)
    TIMINGS["cache hit (resolve only)"] = time.monotonic() - t0
    first = built["result"]
    assert (hit.origin, hit.tarball, hit.key, hit.signer) == ("cache", first.tarball, first.key, SIGNER)
    # another signing certificate is another module
    unsigned_plan = hm.plan_module(hm.load_indexes(sources, ContentCache()), PACKAGE, kver=built["kver"],
                                   patches=patches)
    assert unsigned_plan.cache_key() != first.key
    # and the unpatched module is another one
    unpatched = hm.plan_module(hm.load_indexes(sources, ContentCache()), PACKAGE, kver=built["kver"],
                               signing_cert=signing[1])
    assert unpatched.cache_key() != first.key


PLAYBOOK = """
- hosts: all
  become: true
  gather_facts: false
  roles: [nvidia-gpu-drivers]
"""
# The role as a build runs it, with the tiny module standing in for NVIDIA's (extra variables override the role's
# package table); the checks that name NVIDIA's files (nvidia-smi, persistenced, modinfo nvidia-current) are off.
STAND_IN = {
    "nvidia_debian_flavors": {"current": {"dkms_package": PACKAGE, "kernel_module": MODULE, "packages": []}},
    "nvidia_persistenced_enabled": False, "nvidia_verify": False, "nvidia_blacklist_nouveau": False,
}


def chroot(tree: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(tree), *cmd], capture_output=True, text=True, timeout=900)


@pytest.mark.timeout(2400)
def test_role_loads_the_prebuilt_module_and_compiles_only_for_the_other_kernel(built, pristine, sources, gateway,
                                                                                patches, tmp_path_factory):
    kver = built["kver"]
    running = os.uname().release
    assert kver != running
    work = tmp_path_factory.mktemp("role")
    tree = tt.working_copy(pristine, work / "root")
    # apt of the tree through the same gateway (what it fetches stays in the shared cache for the next run)
    (tree / "etc/apt/sources.list.d/debian.sources").write_text("".join(
        f"Types: deb\nURIs: {url}\nSuites: {suite}\nComponents: {' '.join(sources.components)}\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n" for url, suite, _ in sources.archives()))
    # a second installed kernel with headers and no prebuilt module: DKMS compiles for it "in the guest"
    other = hm.image_kernel(hm.load_indexes(sources, ContentCache()))
    t0 = time.monotonic()
    if other != kver:
        assert chroot(tree, "apt-get", "update", "-qq").returncode == 0
        r = subprocess.run(["chroot", str(tree), "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            f"linux-image-{other}", f"linux-headers-{other}"], capture_output=True, text=True,
                           timeout=1800, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    TIMINGS["second kernel installed in the tree"] = time.monotonic() - t0
    playbook = work / "prebuilt.yml"
    playbook.write_text(PLAYBOOK)
    # the patch list as a build hands it to the playbook: the one the host build used
    extra = {**STAND_IN, "nvidia_dkms_tarball": str(built["result"].tarball),
             "nvidia_dkms_patches": [p.role_entry() for p in patches]}
    try:
        with tt.ansible_target(tree, work, "hostmodule-test") as target:
            t0 = time.monotonic()
            first = run_playbook(playbook, target, roles_path=ROLES, extra_vars=extra, workdir=work / "run1",
                                 task_timeout=1200, timeout=2000)
            TIMINGS["role: prebuilt load (+ guest compile of the other kernel)"] = time.monotonic() - t0
            assert first.status == "successful" and first.changed > 0
            second = run_playbook(playbook, target, roles_path=ROLES, extra_vars=extra, workdir=work / "run2",
                                  task_timeout=600, timeout=900)
            assert second.changed == 0
            events = [json.loads(line) for line in (work / "run1" / "ansible-events.jsonl").read_text().splitlines()]
            ran = [e["event_data"]["task"] for e in events if e.get("event") == "runner_on_ok"]
            assert "Keep DKMS from adding or building anything while the packages install (/etc/dkms/no-autoinstall)" \
                in ran
            assert f"Install the prebuilt module for kernel {kver} (dkms install, no compile)" in ran
            compiled = [e["event_data"]["res"].get("_ansible_item_label") for e in events
                        if e.get("event") == "runner_item_on_ok"
                        and e["event_data"]["task"].startswith("Compile the module in the guest")]
            assert compiled == ([other] if other != kver else []), compiled

        status = chroot(tree, "dkms", "status").stdout
        assert f"{MODULE}/1.0, {kver}, x86_64: installed" in status, status
        assert not (tree / "etc/dkms/no-autoinstall").exists()
        assert not (tree / "var/tmp/nvidia-gpu-drivers-prebuilt.dkms.tar.gz").exists()
        mi = chroot(tree, "modinfo", "-k", kver, "-F", "signer", MODULE)
        assert mi.stdout.strip() == SIGNER  # the host-built file: a compile in the tree signs with its own key
        record = json.loads((tree / "var/lib/nvidia-gpu-drivers/module.json").read_text())
        assert (record["origin"], record["module"], record["version"], record["kver"]) == ("prebuilt", MODULE, "1.0",
                                                                                           kver)
        expected = {kver: "prebuilt"} | ({other: "guest-compiled"} if other != kver else {})
        assert record["kernels"] == expected
        assert record["dkms_patches"] == ["dkms-test-description.patch"]
        src = tree / "usr/src/dkms_test-1.0"
        assert (src / "patches/dkms-test-description.patch").read_text() == TOY_PATCH
        assert (src / "dkms.conf").read_text().count('PATCH+=("dkms-test-description.patch")') == 1
        assert chroot(tree, "modinfo", "-k", kver, "-F", "description", MODULE).stdout.strip() == PATCHED
        if other != kver:
            assert f"{MODULE}/1.0, {other}, x86_64: installed" in status, status
            vm = chroot(tree, "modinfo", "-k", other, "-F", "vermagic", MODULE).stdout
            assert vm.startswith(other + " ")
            # compiled in the "guest" from /usr/src, with the patch the role gave it (as a kernel update would be)
            assert chroot(tree, "modinfo", "-k", other, "-F", "description", MODULE).stdout.strip() == PATCHED
        print("\nrole record:", yaml.safe_dump(record, default_flow_style=True).strip())
    finally:
        assert not tt.mounts_under(tree)
        shutil.rmtree(tree, ignore_errors=True)
