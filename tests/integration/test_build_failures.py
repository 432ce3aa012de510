"""A real ``python -m builder build`` that fails in provisioning, on a small real disk instead of a full install
(small_disk.py stores it as the image's cached installed disk, so the build goes fetch → prepare → media →
install (cached) → provision for real: gateway, QEMU/TCG, SSH with the pinned key, ansible-runner).

* a role with a failing task: exit 1, the failing task named, a diagnostics bundle beside the output holding a
  PNG screendump and the serial log, no QEMU process left, nothing in the output directory;
* the VM killed while a playbook runs: reported as a dead VM, within 30 s of the kill.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.archive.cache import cache_base
from builder.config import load_config

try:
    import small_disk
except ImportError:  # tests/ made a package
    from . import small_disk

REPO = Path(__file__).resolve().parents[2]
NAME = "small-worker"

pytestmark = [pytest.mark.integration, pytest.mark.vm]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if shutil.which("debootstrap") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs debootstrap and e2fsprogs")
    work = tmp_path_factory.mktemp("small-build")
    real = cache_base()
    cache = work / "cache"
    cache.mkdir()
    for sub in ("blobs", "gateway", "extracted"):  # share the downloads, keep work dirs and disks apart
        (real / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real / sub)
    _write(work / "roles/broken/tasks/main.yml",
           "---\n- name: Fail on purpose\n  ansible.builtin.fail:\n    msg: this role fails [on purpose]\n")
    _write(work / "roles/sleeper/tasks/main.yml",
           "---\n- name: Sleep\n  ansible.builtin.command: sleep 600\n  changed_when: false\n")
    for book, role in (("fail.yml", "broken"), ("sleep.yml", "sleeper")):
        _write(work / book, f"---\n- hosts: all\n  become: true\n  gather_facts: false\n  roles: [{role}]\n")
    image = _write(work / f"{NAME}.yaml", f"""name: {NAME}
vm: {{accel: tcg, memory: 1536M}}
provision:
  playbook: {work / 'fail.yml'}
  finalize_playbook: {REPO / 'playbooks/finalize.yml'}
  roles_path: [{REPO / 'roles'}, {work / 'roles'}]
  memory: 1536M
  host_module: off  # these playbooks do not use the nvidia role: no NVIDIA compile on the host
output: {{dir: {work / 'out'}}}
""")
    shutil.copyfile(REPO / "images/cloud-gpu-worker.lock.json", work / f"{NAME}.lock.json")  # the same installer
    if (REPO / "images/cloud-gpu-worker.lock.d").is_dir():  # the signed indexes its pins are checked against
        shutil.copytree(REPO / "images/cloud-gpu-worker.lock.d", work / f"{NAME}.lock.d")
    env = dict(os.environ, BUILDER_CACHE_DIR=str(cache), COLUMNS="400")
    old = os.environ.get("BUILDER_CACHE_DIR")
    os.environ["BUILDER_CACHE_DIR"] = str(cache)
    try:
        small_disk.seed_installed_cache(load_config(image), work)
    finally:
        if old is None:
            os.environ.pop("BUILDER_CACHE_DIR")
        else:
            os.environ["BUILDER_CACHE_DIR"] = old
    return {"work": work, "image": image, "env": env}


def _qemu_processes(name: str) -> list[int]:
    """PIDs of QEMU processes of this test's VM (read from /proc; never used to kill)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and name.encode() in argv:
                found.append(int(d.name))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


@pytest.mark.timeout(1200)
def test_failing_task_leaves_a_bundle_and_nothing_else(small):
    work = small["work"]
    proc = subprocess.run([sys.executable, "-m", "builder", "build", str(small["image"])], env=small["env"],
                          capture_output=True, text=True, timeout=1100, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "reusing the installed disk" in out
    assert "task 'broken : Fail on purpose' failed" in out and "this role fails [on purpose]" in out, out[-3000:]
    bundles = sorted(work.glob(f"{NAME}-failed-*"))
    assert len(bundles) == 1, bundles
    bundle = bundles[0]
    assert str(bundle) in out  # the error names it
    files = {p.name for p in bundle.iterdir()}
    pngs = [p for p in bundle.iterdir() if p.suffix == ".png"]
    assert pngs and pngs[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), files
    assert "provision.serial.log" in files and (bundle / "provision.serial.log").stat().st_size > 0
    assert {"error.txt", "build.log", "manifest.json", f"{NAME}-provision.qemu.log", "ansible-events.jsonl"} <= files
    assert "Fail on purpose" in (bundle / "error.txt").read_text()
    assert "qemu-system-x86_64" in (bundle / f"{NAME}-provision.qemu.log").read_text()  # the argv, first line
    assert not _qemu_processes(f"{NAME}-provision")
    assert not (work / "out").exists() or not any((work / "out").iterdir())
    assert not list(work.glob(".out.staging-*"))
    assert not list((work / "cache" / "work").iterdir())  # the work directory is gone (--on-error=cleanup)
    print(f"\nbundle {bundle.name}: {sorted(files)}")


@pytest.mark.timeout(1200)
def test_vm_killed_during_a_playbook_is_a_dead_vm(small):
    work = small["work"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", "build", str(small["image"]), "--var",
         f"provision.playbook={work / 'sleep.yml'}"],
        env=small["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 900
    qemu = None
    for line in proc.stdout:
        lines.append(line)
        if "ansible: Sleep" in line:
            time.sleep(3)  # the task is running in the guest now
            qemu = next((c for c in _children(proc.pid) if c in _qemu_processes(f"{NAME}-provision")), None)
            break
        if time.monotonic() > deadline:
            break
    if qemu is None:
        proc.kill()
        pytest.fail("the playbook never started:\n" + "".join(lines)[-3000:])
    os.kill(qemu, signal.SIGKILL)
    t_kill = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    took = time.monotonic() - t_kill
    out = "".join(lines) + rest
    assert proc.returncode == 1, out[-3000:]
    error = out[out.index("error:"):] if "error:" in out else out[-3000:]
    assert "died during provisioning (in task 'sleeper : Sleep')" in error, error
    print("\n" + error.splitlines()[0])
    assert took < 30, f"the dead VM was reported after {took:.0f} s"
    print(f"\ndead VM reported {took:.1f} s after the kill")


@pytest.mark.timeout(1800)
def test_a_failing_variant_does_not_stop_the_others(small):
    """Two variants from the one cached disk: ``bad`` fails in its role, ``good`` is still published whole;
    the failure is reported by name with its own bundle, and the exit code says something failed."""
    work = small["work"]
    good_book = _write(work / "good.yml", "---\n- hosts: all\n  become: true\n  gather_facts: false\n  tasks:\n"
                                          "    - name: Mark the variant\n      ansible.builtin.copy:\n"
                                          "        dest: /etc/variant\n        content: good\n")
    variants = f"""name: {NAME}
variants:
  good: {{provision: {{playbook: {good_book}}}}}
  bad: {{provision: {{playbook: {work / 'fail.yml'}}}}}
"""
    image = _write(work / f"{NAME}-variants.yaml", small["image"].read_text().replace(f"name: {NAME}\n", variants, 1))
    shutil.copyfile(work / f"{NAME}.lock.json", work / f"{NAME}-variants.lock.json")
    if (work / f"{NAME}.lock.d").is_dir():
        shutil.copytree(work / f"{NAME}.lock.d", work / f"{NAME}-variants.lock.d", dirs_exist_ok=True)
    out_dir = work / "variants-out"
    # the base disk is the small disk (no boot loader: it boots by direct kernel), so no firmware verify
    proc = subprocess.run([sys.executable, "-m", "builder", "build", str(image), "--output", str(out_dir),
                           "--no-verify", "--parallel", "1"], env=small["env"], capture_output=True, text=True,
                          timeout=1700, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "building 2 variant(s) from one installed disk" in out and "reusing the installed disk" in out
    good = out_dir / "good"
    assert (good / f"{NAME}-good.qcow2").is_file() and (good / "SHA256SUMS").is_file(), out[-3000:]
    manifest = (good / "manifest.json").read_text()
    assert '"variant": "good"' in manifest
    assert not (out_dir / "bad").exists()
    assert "failed bad:" in out and "task 'broken : Fail on purpose' failed" in out, out[-3000:]
    assert sorted(out_dir.glob(f"{NAME}-bad-failed-*")), "the failing variant's diagnostics bundle"
    assert not _qemu_processes(f"{NAME}-good-provision") and not _qemu_processes(f"{NAME}-bad-provision")
