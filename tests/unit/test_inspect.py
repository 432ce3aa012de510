"""`inspect` on the default image: every variable with its source, the stages, roles, pinned inputs, and what a
build would reuse — with no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builder.inspect import STAGES, inspect

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "images" / "cloud-gpu-worker.yaml"


def test_inspect_default_image(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))  # empty caches: nothing to reuse
    vf = tmp_path / "vars.yaml"
    vf.write_text("disk: {size: 40G}\n")
    res = inspect(IMAGE, ["vm.cpus=4"], var_files=[vf])
    src = {k: s for k, _, s in res.variables}
    val = {k: v for k, v, _ in res.variables}
    assert src["vm.cpus"] == "--var" and val["vm.cpus"] == "4"
    assert src["disk.size"] == f"--var-file {vf}" and val["disk.size"] == "40G"
    assert src["installer.hostname"] == "image file cloud-gpu-worker.yaml"
    assert src["installer.build_user"] == "builder's default"
    assert src["debian.mirror"] == "this host's apt sources"
    assert src["provision.extra_vars.nvidia_driver_flavor"] == "image file cloud-gpu-worker.yaml"
    assert {"base", "nvidia-gpu-drivers", "finalize"} <= dict(res.roles).keys()
    text = res.text()
    assert "stages: " + " → ".join(STAGES) in text
    assert "netboot 20250803+deb13u6" in text and "29 overridden udebs" in text
    assert "run the install (no installed disk for key" in text  # the cache is empty
    assert "find 0 of 5 pinned installer packages" in text


def test_inspect_verb_exits_0_and_prints(tmp_path):
    p = subprocess.run([sys.executable, "-m", "builder", "inspect", str(IMAGE)], capture_output=True, text=True,
                       timeout=60, env={"BUILDER_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "variables (value  ← where it comes from):" in p.stdout and "a build now would:" in p.stdout
