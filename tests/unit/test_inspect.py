"""`inspect` on the default image: every variable with its source, the stages, roles, pinned inputs, and what a
build would reuse — with no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builder.inspect import BASE_STAGES, IMAGE_STAGES, STAGES, inspect

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
    # the default image has variants: one install, then each variant's own provision … verify … publish
    assert "stages: " + " → ".join(BASE_STAGES) + " → for each variant: " + " → ".join(IMAGE_STAGES) in text
    assert "verify" in IMAGE_STAGES
    for flavour, package in (("current", "nvidia-kernel-dkms"), ("open", "nvidia-open-kernel-dkms"),
                             ("tesla-535", "nvidia-tesla-535-kernel-dkms")):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  variant {flavour}:"))
        assert f"compile {package} on this host" in line, line
    assert "netboot 20250803+deb13u6" in text and "29 overridden udebs" in text
    assert "run the install (no installed disk for key" in text  # the cache is empty
    assert "find 0 of 5 pinned installer packages" in text


def test_inspect_verb_exits_0_and_prints(tmp_path):
    p = subprocess.run([sys.executable, "-m", "builder", "inspect", str(IMAGE)], capture_output=True, text=True,
                       timeout=60, env={"BUILDER_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "variables (value  ← where it comes from):" in p.stdout and "a build now would:" in p.stdout


def test_inspect_without_variants_lists_every_stage_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))
    image = tmp_path / "one.yaml"
    text = IMAGE.read_text().split("\nvariants:")[0]
    image.write_text(text.replace("../playbooks", str(REPO / "playbooks")).replace("../roles", str(REPO / "roles")))
    out = inspect(image, []).text()
    assert "stages: " + " → ".join(STAGES) + "\n" in out
    assert "variant " not in out and "compile nvidia-kernel-dkms on this host" in out
