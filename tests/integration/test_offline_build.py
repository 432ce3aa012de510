"""An offline build, for real, at CI size: ``fetch --all`` fills the cache online (the host's mirror), then
``python -m builder build --offline`` runs with the mirror URLs pointing at a closed port on 127.0.0.1.

The installed disk is the small real disk of small_disk.py, stored as the image's cached installed disk (a full
install does not fit CI), with its apt sources at the gateway's address as an installed disk has them. From
there everything is the real build: fetch (from the cache), media, install (cached), provision — QEMU/TCG, SSH,
ansible-runner, and apt in the guest installing a locked package from the gateway's signed view of the package
lock, served from the cache —, finalize, compress, publish. It must fetch 0 bytes, install the locked version,
and publish an SBOM that names that package with the lock's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.archive.cache import cache_base
from builder.config import load_config
from builder.pkglock import read_package_lock
from builder.vm import guestnet

try:
    import small_disk
except ImportError:  # tests/ made a package
    from . import small_disk

REPO = Path(__file__).resolve().parents[2]
NAME = "offline-worker"
CLOSED = "http://127.0.0.1:9"  # nothing listens there: any attempt to reach the mirror fails at once
OFFLINE_VARS = [f"debian.mirror={CLOSED}/debian", f"debian.security_mirror={CLOSED}/debian-security"]
PACKAGE = "htop"  # in the default image's package lock, not in the small disk: apt must fetch it, offline

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.slow]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.timeout(3000)
def test_an_offline_build_fetches_nothing_and_installs_the_locked_version(tmp_path: Path) -> None:
    if shutil.which("debootstrap") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs debootstrap and e2fsprogs")
    real = cache_base()
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("blobs", "gateway", "extracted"):  # share the downloads (test_offline.py's too), not the disks
        (real / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real / sub)
    book = _write(tmp_path / "install.yml", f"""---
- hosts: all
  become: true
  gather_facts: false
  tasks:
    - name: Install a locked package from the gateway's view
      ansible.builtin.apt:
        name: {PACKAGE}
        update_cache: true
        install_recommends: false
""")
    # the default image's package seeds and installer settings, so that its package lock covers this image
    image = _write(tmp_path / f"{NAME}.yaml", f"""name: {NAME}
vm: {{accel: tcg, memory: 1536M}}
debian: {{package_lock: required}}
provision:
  playbook: {book}
  finalize_playbook: {REPO / 'playbooks/finalize.yml'}
  roles_path: [{REPO / 'roles'}]
  memory: 1536M
  host_module: off  # no NVIDIA role here
output: {{dir: {tmp_path / 'out'}}}
""")
    for suffix in (".lock.json", ".packages.lock"):
        shutil.copyfile(REPO / f"images/cloud-gpu-worker{suffix}", tmp_path / f"{NAME}{suffix}")
    if (REPO / "images/cloud-gpu-worker.lock.d").is_dir():  # the signed indexes of the installer pins
        shutil.copytree(REPO / "images/cloud-gpu-worker.lock.d", tmp_path / f"{NAME}.lock.d")
    env = dict(os.environ, BUILDER_CACHE_DIR=str(cache), COLUMNS="400")

    t0 = time.monotonic()
    filled = _cli("fetch", str(image), "--all", env=env, timeout=2400)  # online
    fill_s = time.monotonic() - t0
    assert filled.returncode == 0, filled.stderr[-3000:]

    # the small disk as the installed disk of the offline build (its key: from the cache, under the lock)
    lock = read_package_lock(tmp_path / f"{NAME}.packages.lock")
    locked = lock.by_name()[PACKAGE]
    comps = "main contrib non-free non-free-firmware"
    sources = "".join(f"deb http://{guestnet.GATEWAY}/{archive} {suite} {comps}\n"
                      for archive, suite in (("debian", "trixie"), ("debian", "trixie-updates"),
                                             ("debian-security", "trixie-security")))
    old = os.environ.get("BUILDER_CACHE_DIR")
    os.environ["BUILDER_CACHE_DIR"] = str(cache)
    try:
        small_disk.seed_installed_cache(load_config(image, OFFLINE_VARS), tmp_path, offline=True, sources=sources)
    finally:
        if old is None:
            os.environ.pop("BUILDER_CACHE_DIR")
        else:
            os.environ["BUILDER_CACHE_DIR"] = old

    t0 = time.monotonic()
    built = _cli("build", str(image), "--offline", "--no-verify",
                 *(a for v in OFFLINE_VARS for a in ("--var", v)), env=env, timeout=2400)
    build_s = time.monotonic() - t0
    out = built.stdout + built.stderr
    assert built.returncode == 0, out[-4000:]
    assert "reusing the installed disk" in out
    assert "mirror unreachable" not in out
    published = tmp_path / "out"
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["offline"] is True
    assert manifest["bytes_fetched_upstream"] == 0, manifest.get("gateway")
    assert manifest["package_lock"]["digest"] == lock.digest()
    packages = dict(line.split()[:2] for line in (published / "packages.txt").read_text().splitlines() if line)
    assert packages.get(PACKAGE) == locked.version, (PACKAGE, packages.get(PACKAGE), locked.version)
    sbom = json.loads(next(published.glob("*.cdx.json")).read_text())
    comp = next(c for c in sbom["components"] if c.get("name") == PACKAGE)
    assert comp["version"] == locked.version
    assert {"alg": "SHA-256", "content": locked.sha256} in comp.get("hashes", []), comp
    print(f"\noffline build: fetch --all {fill_s:.0f} s online, build --offline {build_s:.0f} s, "
          f"{manifest['bytes_fetched_upstream']} bytes upstream, {PACKAGE} {locked.version} from the lock")
