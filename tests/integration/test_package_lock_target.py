"""The package lock end to end on the real archive (the host's mirror, through builder.hostapt):

* ``lock`` writes a package lock from the verified indexes that reads back identical;
* the gateway serves a real apt, in the debootstrapped trixie tree (a chroot on 127.0.0.1), a builder-signed view
  of the archive restricted to a small lock: apt trusts it with the build's key only, installs the locked
  version for real, and cannot see a version or a package the lock does not pin.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder.archive.cache import ContentCache
from builder.archive.http import FetchStats
from builder.events import Emitter
from builder.gateway.server import Gateway
from builder.gateway.signing import EphemeralKey
from builder.gateway.target import KEY_FILE
from builder.pkgfetch import target_inputs
from builder.pkglock import PackageLock, read_package_lock, write_package_lock
from builder.pkgresolve import Universe, load_universe, moved, resolve, resolve_package_lock
from builder.services import sign

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

pytestmark = pytest.mark.integration
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def universe(default_config) -> Universe:
    t0 = time.monotonic()
    uni = load_universe(default_config, ContentCache(), FetchStats(), report=lambda m: None)
    TIMINGS["load the signed indexes"] = time.monotonic() - t0
    return uni


@pytest.mark.timeout(900)
def test_package_lock_round_trip_on_the_real_archive(default_config, universe, tmp_path, capsys):
    t0 = time.monotonic()
    lock = resolve_package_lock(default_config, universe, report=lambda m: None)
    TIMINGS["resolve"] = time.monotonic() - t0
    names = lock.by_name()
    # the seeds, what debootstrap installs, the kernel and the NVIDIA driver are all in
    for want in ("openssh-server", "cloud-init", "libc6", "apt", "linux-image-amd64", "nvidia-kernel-dkms",
                 "linux-headers-amd64", "grub-cloud-amd64"):
        assert want in names, want
    # the kernel image and its headers are one version (DKMS builds for the kernel that boots)
    img, hdr = names["linux-image-amd64"], names["linux-headers-amd64"]
    assert img.version == hdr.version
    for p in lock.packages:
        idx = lock.index(p.archive, p.suite)
        assert idx is not None and idx.date == p.date and len(p.sha256) == 64
    path = tmp_path / "x.packages.lock"
    write_package_lock(lock, path)
    assert read_package_lock(path) == lock
    assert PackageLock.from_json(lock.to_json()) == lock
    with capsys.disabled():
        print(f"\npackage lock: {len(lock.packages)} packages, {sum(p.size for p in lock.packages) >> 20} MiB; "
              f"timings {({k: round(v, 1) for k, v in TIMINGS.items()})}")


def _older_version_case(uni: Universe, installed: set[str]) -> tuple[str, str, str]:
    """A small package the tree lacks, listed at two versions, whose older one resolves adding at most three
    packages of 2 MiB in all: (name, older, newer)."""
    cases = []
    for name, vs in uni.versions.items():
        newer = uni.candidates[name].version
        olders = [c for c in vs if c.version != newer]
        if olders and name not in installed:
            cases.append((int(olders[0].stanza["Size"]), name, olders[0].version, newer))
    for _size, name, older, newer in sorted(cases):
        res = resolve(uni, [f"{name}={older}"], priorities=())
        new = [n for n in res.selected if n not in installed]
        if not res.problems and len(new) <= 3 and sum(int(res.selected[n].stanza["Size"]) for n in new) < 2 << 20:
            return name, older, newer
    raise AssertionError("no small package listed at two versions")


def _chroot(tree: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["chroot", str(tree), *cmd], capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                            "LC_ALL": "C"})
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_real_apt_sees_only_the_locked_versions(default_config, universe, tmp_path, capsys):
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed")
    cfg = default_config
    t0 = time.monotonic()
    pristine = tt.pristine_tree()
    tree = tt.working_copy(pristine, tmp_path / "root")
    TIMINGS["tree"] = time.monotonic() - t0
    status = (tree / "var/lib/dpkg/status").read_text()
    installed = {ln.split(": ", 1)[1] for ln in status.splitlines() if ln.startswith("Package: ")}
    name, older, newer = _older_version_case(universe, installed)
    # the lock: hello and that package at its *older* version, with their closures
    res = resolve(universe, ["hello", f"{name}={older}"], priorities=())
    assert not res.problems, res.problems
    pins = tuple(sorted((c.pin() for c in res.selected.values()), key=lambda p: p.name))
    lock = PackageLock(cfg.debian.suite, universe.indexes[0].codename, cfg.debian.arch, "2026-01-01T00:00:00Z",
                       "resolve", tuple(universe.indexes), pins)
    # what `lock --check` reports: the package pinned below its candidate has moved upstream
    ahead = {m.name: m for m in moved(lock, universe)}
    assert ahead[name].now == newer and ahead[name].security == universe.candidates[name].suite.endswith("-security")
    t0 = time.monotonic()
    stats = FetchStats()
    target = target_inputs(cfg, lock, ContentCache(), stats, Emitter())
    TIMINGS["fetch the locked files"] = time.monotonic() - t0
    with EphemeralKey("builder test target view") as key:
        generated: dict[str, bytes] = {}
        for view in target.views:
            generated.update(sign(view.files, key, f"{view.prefix}/dists/{view.suite}"))
        gw = Gateway(upstreams={"debian": cfg.debian.mirror, "debian-security": cfg.debian.security_mirror},
                     cache=ContentCache(), keyring=cfg.debian.keyring,
                     fingerprints={"debian": cfg.debian.trusted_fingerprints,
                                   "debian-security": cfg.debian.security_fingerprints},
                     generated=generated, pins=target.pins, pinned_pool_only=True, state_dir=tmp_path / "gw")
        with gw, tt.chroot_mounts(tree):
            base = f"http://127.0.0.1:{gw.port}"
            comps = " ".join(cfg.debian.components)
            (tree / "etc/apt/sources.list.d/debian.sources").unlink(missing_ok=True)
            (tree / "etc/apt/sources.list").write_text(  # as debian-installer's apt-setup writes them
                f"deb {base}/debian {cfg.debian.suite} {comps}\n"
                f"deb {base}/debian {lock.codename}-updates {comps}\n"
                f"deb {base}/debian-security {lock.codename}-security {comps}\n")
            # without the build's key apt refuses the view
            upd = _chroot(tree, "apt-get", "update", check=False)
            assert upd.returncode != 0 or "NO_PUBKEY" in upd.stdout + upd.stderr, upd.stdout
            keyfile = tree / KEY_FILE.lstrip("/")
            keyfile.write_bytes(key.public_key())
            t0 = time.monotonic()
            upd = _chroot(tree, "apt-get", "update")
            TIMINGS["apt-get update"] = time.monotonic() - t0
            assert "W:" not in upd.stdout + upd.stderr and "E:" not in upd.stdout + upd.stderr, upd.stderr
            policy = _chroot(tree, "apt-cache", "policy", name).stdout
            assert f"Candidate: {older}" in policy, policy
            assert newer not in policy, policy
            # the newer version is not installable, nor a package the lock does not pin
            bad = _chroot(tree, "apt-get", "install", "--simulate", f"{name}={newer}", check=False)
            assert bad.returncode != 0 and f"Version '{newer}' for '{name}' was not found" in bad.stderr, bad
            other = next(n for n in ("sl", "cowsay", "figlet") if n in universe.candidates and n not in installed)
            bad = _chroot(tree, "apt-get", "install", "--simulate", other, check=False)
            assert bad.returncode != 0 and f"Unable to locate package {other}" in bad.stderr, bad
            sim = _chroot(tree, "apt-get", "install", "--simulate", name).stdout
            assert f"Inst {name} ({older} " in sim, sim
            # a pool file the lock does not pin is not served either
            not_pinned = universe.candidates[other].stanza["Filename"]
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(f"{base}/debian/{not_pinned}", timeout=30)
            assert exc.value.code == 404
            # a real install of a small package, at the locked version
            t0 = time.monotonic()
            _chroot(tree, "apt-get", "install", "-y", "--no-install-recommends", "hello")
            TIMINGS["apt-get install hello"] = time.monotonic() - t0
            got = _chroot(tree, "dpkg-query", "-W", "-f", "${Version}", "hello").stdout
            assert got == lock.by_name()["hello"].version
            assert _chroot(tree, "hello").stdout.strip() == "Hello, world!"
        assert not tt.mounts_under(tree)
    with capsys.disabled():
        print(f"\nlocked view: {len(pins)} packages; {name} pinned at {older} (candidate upstream {newer}); "
              f"{stats.bytes_fetched} bytes fetched; timings {({k: round(v, 1) for k, v in TIMINGS.items()})}")
    shutil.rmtree(tree, ignore_errors=True)
