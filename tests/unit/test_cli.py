import subprocess
import sys

import yaml


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_validate_default_image(repo):
    p = run("validate", str(repo / "images/cloud-gpu-worker.yaml"))
    assert p.returncode == 0, p.stderr
    assert "ok" in p.stdout + p.stderr


def test_validate_reports_every_problem_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("disk: {size: 30Q}\nvm: {cpus: 0}\nunknown_key: 1\n")
    p = run("validate", str(bad))
    assert p.returncode == 2
    out = p.stdout + p.stderr
    for path in ("disk.size", "vm.cpus", "unknown_key"):
        assert path in out
    assert "Traceback" not in out


def test_malformed_yaml_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("disk: [\n")
    p = run("validate", str(bad))
    assert p.returncode == 2 and "malformed YAML" in p.stdout + p.stderr


def test_show_config_with_var(repo):
    p = run("show-config", str(repo / "images/cloud-gpu-worker.yaml"), "--var", "disk.size=40G")
    assert p.returncode == 0, p.stderr
    data = yaml.safe_load(p.stdout)
    assert data["disk"]["size"] == "40G" and data["debian"]["suite"] == "trixie"


def test_bad_var_and_usage_exit_2(repo):
    p = run("validate", str(repo / "images/cloud-gpu-worker.yaml"), "--var", "novalue")
    assert p.returncode == 2 and "KEY.PATH=VALUE" in p.stdout + p.stderr
    assert run("frobnicate").returncode == 2
    assert run("--version").stdout.startswith("builder ")


def test_build_refuses_existing_output(repo, tmp_path):
    """Every variant's output is checked before anything starts (here the second one's)."""
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "cloud-gpu-worker-open.qcow2").write_bytes(b"x")
    p = run("build", str(repo / "images/cloud-gpu-worker.yaml"), "--output", str(tmp_path))
    assert p.returncode == 1 and "--force" in p.stdout + p.stderr and "cloud-gpu-worker-open.qcow2" in p.stderr
    p = run("build", str(repo / "images/cloud-gpu-worker.yaml"), "--output", str(tmp_path), "--only", "nope")
    assert p.returncode == 2 and "unknown variant nope" in p.stderr and "current, open, tesla-535" in p.stderr


def test_build_names_every_missing_tool_before_fetching(repo, tmp_path):
    """A host without qemu-img and socat learns both at once, with the packages, before anything is fetched."""
    import os
    import shutil

    from builder.preflight import BUILD_TOOLS, EFI_TOOLS

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in [*BUILD_TOOLS, *EFI_TOOLS, "python3"]:
        found = shutil.which(tool)
        if found and tool not in ("qemu-img", "socat"):
            (bin_dir / tool).symlink_to(found)
    cache = tmp_path / "cache"
    env = dict(os.environ, PATH=str(bin_dir), BUILDER_CACHE_DIR=str(cache))
    p = subprocess.run([sys.executable, "-m", "builder", "build", str(repo / "images/cloud-gpu-worker.yaml"),
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "required tool not found: qemu-img, socat" in p.stderr
    assert "apt-get install qemu-utils socat" in p.stderr and "Traceback" not in p.stderr
    assert not (cache / "work").exists() or not any((cache / "work").iterdir())
    assert not (cache / "blobs").exists()  # nothing was fetched
