"""Offline rebuilds on the real archive: ``fetch --all`` fills the cache (online, the host's mirror), then with the
mirror URLs pointing at a closed port on 127.0.0.1 the fetch and media stages and the gateway work from the
cache alone, with 0 bytes fetched; what the cache lacks is named in one error line before anything starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from builder.archive.cache import ContentCache
from builder.archive.http import FetchStats
from builder.config import load_config
from builder.events import Emitter
from builder.gateway.server import Gateway
from builder.gateway.signing import EphemeralKey
from builder.services import signed_suite, signed_target_views
from builder.stages import media
from builder.stages.fetch import fetch_inputs

pytestmark = pytest.mark.integration
CLOSED = "http://127.0.0.1:9"
OFFLINE_VARS = [f"debian.mirror={CLOSED}/debian", f"debian.security_mirror={CLOSED}/debian-security"]


def image_copy(repo: Path, tmp_path: Path, *, extra_pin: dict[str, object] | None = None) -> Path:
    """The default image with its locks, in tmp_path (paths made absolute)."""
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    data = yaml.safe_load((repo / "images/cloud-gpu-worker.yaml").read_text())
    data["provision"]["playbook"] = str(repo / "playbooks/cloud-gpu-worker.yml")
    data["provision"]["roles_path"] = [str(repo / "roles")]
    data["output"] = {"dir": str(tmp_path / "out")}
    data["debian"]["package_lock"] = "required"  # an offline build installs the locked packages only
    img = d / "cloud-gpu-worker.yaml"
    img.write_text(yaml.safe_dump(data))
    shutil.copyfile(repo / "images/cloud-gpu-worker.lock.json", d / "cloud-gpu-worker.lock.json")
    if (repo / "images/cloud-gpu-worker.lock.d").is_dir():  # the signed indexes of the pins
        shutil.copytree(repo / "images/cloud-gpu-worker.lock.d", d / "cloud-gpu-worker.lock.d")
    plock = json.loads((repo / "images/cloud-gpu-worker.packages.lock").read_text())
    if extra_pin is not None:
        plock["packages"].append(extra_pin)
    (d / "cloud-gpu-worker.packages.lock").write_text(json.dumps(plock))
    return img


def cli(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="200"))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_offline_fetch_media_and_gateway_fetch_nothing(repo: Path, tmp_path: Path, capsys) -> None:
    img = image_copy(repo, tmp_path)
    t0 = time.monotonic()
    filled = cli("fetch", str(img), "--all")
    fill_s = time.monotonic() - t0
    assert filled.returncode == 0, filled.stderr[-3000:]
    # the CLI, offline: everything checked from the cache, nothing fetched
    t0 = time.monotonic()
    off = cli("fetch", str(img), "--offline", *(a for v in OFFLINE_VARS for a in ("--var", v)))
    offline_s = time.monotonic() - t0
    assert off.returncode == 0, off.stderr[-3000:]
    assert "; 0 bytes fetched upstream" in off.stderr and "packages of cloud-gpu-worker.packages.lock" in off.stderr
    # the fetch and media stages in process, and the gateway, with the mirrors unreachable
    cfg = load_config(img, OFFLINE_VARS)
    stats = FetchStats()
    inputs = fetch_inputs(cfg, ContentCache(), stats, Emitter(), packages=True, offline=True)
    assert inputs.target is not None and len(inputs.target.lock.packages) > 300
    with EphemeralKey("builder offline test") as key:
        m = media.render(cfg, inputs, log_port=5140)
        iso = media.make_iso(cfg, inputs, m, key, tmp_path / "installer.iso")
        assert iso.stat().st_size > 20 << 20
        pins = {**inputs.udeb_pins, **inputs.target.pins}
        with Gateway(upstreams={"debian": cfg.debian.mirror, "debian-security": cfg.debian.security_mirror},
                     cache=ContentCache(), keyring=cfg.debian.keyring,
                     fingerprints={"debian": cfg.debian.trusted_fingerprints,
                                   "debian-security": cfg.debian.security_fingerprints},
                     generated={**signed_suite(inputs, key), **signed_target_views(inputs, key)}, pins=pins,
                     pinned_pool_only=True, offline=True, state_dir=tmp_path / "gw") as gw:
            base = f"http://127.0.0.1:{gw.port}"
            assert get(f"{base}/debian/dists/trixie/InRelease")[0] == 200
            assert get(f"{base}/debian-security/dists/trixie-security/InRelease")[0] == 200
            assert get(f"{base}/debian/dists/builder-installer/Release")[0] == 200
            pkg = inputs.target.lock.by_name()["openssh-server"]
            status, body = get(f"{base}/debian/{pkg.filename}")
            assert status == 200 and len(body) == pkg.size
            udeb = next(iter(inputs.udeb_pins))
            assert get(f"{base}/{udeb}")[0] == 200
            assert get(f"{base}/debian/pool/main/h/hello/hello_2.10-5_amd64.deb")[0] == 404  # not locked
            assert gw.stats.upstream_bytes == 0 and gw.stats.upstream_requests == 0
    assert stats.bytes_fetched == 0 and stats.requests == 0
    with capsys.disabled():
        print(f"\noffline: fetch --all {fill_s:.0f} s (online), fetch --offline {offline_s:.1f} s, 0 bytes; "
              f"ISO {iso.stat().st_size >> 20} MiB")


@pytest.mark.timeout(600)
def test_what_the_cache_lacks_is_named_in_one_line(repo: Path, tmp_path: Path) -> None:
    missing = {"name": "nosuchpkg", "version": "1.0", "architecture": "all",
               "filename": "pool/main/n/nosuchpkg/nosuchpkg_1.0_all.deb", "size": 1234, "sha256": "e" * 64,
               "archive": "debian", "suite": "trixie", "date": "Sat, 21 Nov 2026 09:15:44 UTC"}
    img = image_copy(repo, tmp_path, extra_pin=missing)
    assert cli("fetch", str(img), "--all").returncode != 0  # online: the mirror does not have it either
    p = cli("fetch", str(img), "--offline", *(a for v in OFFLINE_VARS for a in ("--var", v)))
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, p.stderr
    assert errors[0].endswith("error: offline: 1 inputs are not in the cache: "
                              "nosuchpkg 1.0 (pool/main/n/nosuchpkg/nosuchpkg_1.0_all.deb)"), errors[0]
    assert "fetch IMAGE.yaml --all" in p.stderr  # the hint
