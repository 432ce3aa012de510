"""The real roles against a real Debian 13 tree: debootstrap (cached per day) + sshd in a chroot on 127.0.0.1.

The DKMS compile really happens, for the tree's *installed* kernel, while the running (host) kernel is a
different one: the situation the nvidia role must handle. Daemons don't start in the chroot (policy-rc.d
exit 101, and no init). Slow: see the timings printed with ``-s`` (the lead decides whether CI runs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder import guestfacts, sbom
from builder.errors import ProvisionError
from builder.provision import run_playbook

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "cloud-gpu-worker.yml"
ROLES = [ROOT / "roles"]
TIMINGS: dict[str, float] = {}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")


@pytest.fixture(scope="module")
def trixie(tmp_path_factory):
    _need("debootstrap")
    t0 = time.monotonic()
    pristine = tt.pristine_tree()
    TIMINGS["debootstrap (0 when cached)"] = time.monotonic() - t0
    work = tmp_path_factory.mktemp("trixie")
    t0 = time.monotonic()
    tree = tt.working_copy(pristine, work / "root")
    TIMINGS["copy of the cached tree"] = time.monotonic() - t0
    try:
        with tt.ansible_target(tree, work, "builder-test") as target:
            yield {"tree": tree, "work": work, "target": target}
    finally:
        left = tt.mounts_under(tree)
        assert not left, f"still mounted: {left}"
        if not os.environ.get("BUILDER_KEEP_TEST_CHROOT"):
            shutil.rmtree(tree, ignore_errors=True)
        print("\nTIMINGS " + json.dumps({k: round(v) for k, v in TIMINGS.items()}))


def chroot(tree: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(tree), *cmd], capture_output=True, text=True, timeout=300)


def installed_kernels(tree: Path) -> list[str]:
    return sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))


@pytest.mark.timeout(5400)
def test_cloud_gpu_worker_playbook(trixie):
    tree, target = trixie["tree"], trixie["target"]
    running = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    kernels = installed_kernels(tree)
    assert kernels and running not in kernels  # the role must not use the running kernel
    # an installer-style ifupdown stanza for its NIC must not survive
    (tree / "etc/network").mkdir(exist_ok=True)
    (tree / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\nallow-hotplug ens3\n"
                                                 "iface ens3 inet dhcp\n")

    t0 = time.monotonic()
    first = run_playbook(PLAYBOOK, target, roles_path=ROLES, extra_vars={}, workdir=trixie["work"] / "run1",
                         task_timeout=3600, timeout=5000)
    TIMINGS["first run (DKMS compile)"] = time.monotonic() - t0
    assert first.status == "successful" and first.changed > 0

    for k in installed_kernels(tree):
        # Debian's file name; "nvidia" itself is a modprobe.d install rule, which modinfo does not follow
        mi = chroot(tree, "modinfo", "-k", k, "-F", "filename", "nvidia-current")
        assert mi.returncode == 0 and f"/lib/modules/{k}/" in mi.stdout, mi
        assert chroot(tree, "modinfo", "-k", k, "-F", "name", "nvidia-current").stdout.strip() == "nvidia"
        assert "nvidia-current" in chroot(tree, "modprobe", "--set-version", k, "--show-depends", "nvidia").stdout
        st = chroot(tree, "dkms", "status", "-k", k)
        assert any(line.startswith("nvidia") and line.endswith(": installed") for line in st.stdout.splitlines()), st
        initrd = chroot(tree, "lsinitramfs", f"/boot/initrd.img-{k}")
        assert initrd.returncode == 0 and "kernel/" in initrd.stdout
        assert not [x for x in initrd.stdout.splitlines() if "nouveau" in x and ".ko" in x]
    # an alternatives symlink chain with absolute targets: check it inside the tree
    assert chroot(tree, "test", "-x", "/usr/bin/nvidia-smi").returncode == 0
    assert "blacklist nouveau" in (tree / "etc/modprobe.d/blacklist-nouveau.conf").read_text()
    pkgs = chroot(tree, "dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Status}\\n").stdout
    installed = {line.split()[0]: line.split()[1] for line in pkgs.splitlines() if line.endswith(" installed")}
    assert not [p for p in installed if p.startswith(("cuda", "nvidia-cuda", "libcudart"))]
    assert not [p for p in installed if p.startswith(("xserver-xorg", "nvidia-driver", "libgl1-nvidia"))]
    for p in ("nvidia-kernel-dkms", "nvidia-smi", "libcuda1", "nvidia-persistenced", "firmware-nvidia-gsp",
              "cloud-init", "network-manager", "qemu-guest-agent", "dkms", *(f"linux-headers-{k}" for k in kernels)):
        assert p in installed, p
    nvidia_set = sorted(f"{p}={v}" for p, v in installed.items() if "nvidia" in p or p.startswith("libcuda"))
    print("\nNVIDIA packages installed:", " ".join(nvidia_set))
    # base role results
    assert chroot(tree, "systemctl", "is-enabled", "nvidia-persistenced").stdout.strip() == "enabled"
    # a CPU-only boot has no failed unit: the daemon's condition is false without an NVIDIA PCI device (this
    # host has none; /sys in the chroot is the host's), and no display module is loaded at boot
    dropin = (tree / "etc/systemd/system/nvidia-persistenced.service.d/10-gpu-only.conf").read_text()
    cond = dropin.split("ExecCondition=", 1)[1].strip()
    assert cond.startswith("/bin/sh -c ")
    has_gpu = any(p.read_text().strip() == "0x10de" for p in Path("/sys/bus/pci/devices").glob("*/vendor"))
    rc = subprocess.run(["chroot", str(tree), "/bin/sh", "-c", cond[len("/bin/sh -c "):].strip("'")]).returncode
    assert rc == (0 if has_gpu else 1)
    # /etc/modules-load.d/nvidia.conf is an alternatives link with an absolute target: read it inside the tree
    loads = chroot(tree, "sh", "-c", "cat /etc/modules-load.d/*.conf 2>/dev/null").stdout
    assert not [ln for ln in loads.splitlines() if ln.strip().startswith(("nvidia-drm", "nvidia_drm"))], loads
    diverted = chroot(tree, "dpkg-divert", "--list").stdout
    assert "builder-disabled" in diverted, diverted
    assert chroot(tree, "systemctl", "is-enabled", "NetworkManager").stdout.strip() == "enabled"
    assert "ens3" not in (tree / "etc/network/interfaces").read_text()
    cloud = yaml.safe_load((tree / "etc/cloud/cloud.cfg.d/10-builder-cloud-image.cfg").read_text())
    assert cloud["manage_etc_hosts"] is True and cloud["datasource_list"][0] == "NoCloud"
    assert cloud["system_info"]["network"]["renderers"][0] == "network-manager"
    sshd = chroot(tree, "/usr/sbin/sshd", "-T", "-C", "user=root,host=x,addr=127.0.0.1").stdout.splitlines()
    assert "passwordauthentication no" in sshd and "permitrootlogin no" in sshd

    t0 = time.monotonic()
    second = run_playbook(PLAYBOOK, target, roles_path=ROLES, extra_vars={}, workdir=trixie["work"] / "run2",
                          task_timeout=3600, timeout=3600)
    TIMINGS["second run (idempotent)"] = time.monotonic() - t0
    changed = [e["event_data"]["task"] for e in map(json.loads, (second.events_log or Path()).read_text().splitlines())
               if e.get("event") == "runner_on_ok" and e["event_data"].get("res", {}).get("changed")]
    assert second.changed == 0, changed


@pytest.mark.timeout(600)
def test_guest_facts_describe_the_dkms_module(trixie):
    """What provision collects for the SBOM, on the tree the playbook provisioned: the NVIDIA module DKMS built
    for each installed kernel (modinfo, the file's sha256), DKMS's record and the package that ships the source;
    the SBOM made of it validates."""
    tree = trixie["tree"]
    if not list((tree / "var/lib/dkms").glob("nvidia*")):
        pytest.skip("needs the DKMS build of test_cloud_gpu_worker_playbook first")
    res = subprocess.run(["chroot", str(tree), "python3", "-"], input=Path(guestfacts.__file__).read_bytes(),
                         capture_output=True, timeout=300, check=True)
    facts = json.loads(res.stdout)
    kernels = installed_kernels(tree)
    main = [m for m in facts["modules"] if m["name"] == "nvidia"]
    assert sorted(m["kernel"] for m in main) == kernels
    for m in main:
        assert f"/lib/modules/{m['kernel']}/updates/dkms/" in m["path"] and m["license"] == "NVIDIA"
        assert m["vermagic"].startswith(m["kernel"]) and m["version"]
        assert m["sha256"] == hashlib.sha256((tree / m["path"].lstrip("/")).read_bytes()).hexdigest()
    recs = [r for r in facts["dkms"] if r["module"].startswith("nvidia")]
    assert {r["kernel"] for r in recs} >= set(kernels) and {r["version"] for r in recs} == {main[0]["version"]}
    assert {r.get("source_package") for r in recs} == {"nvidia-kernel-dkms"}
    pkgs = sbom.parse_packages_tsv(chroot(tree, "dpkg-query", "-W", "-f", sbom.DPKG_FORMAT).stdout)
    bom = sbom.cyclonedx(image_name="trixie", image_file="trixie.qcow2", image_sha256="00" * 32, packages=pkgs,
                         licenses=facts["licenses"], digests={}, modules=facts["modules"], dkms=facts["dkms"],
                         builder_version="test", timestamp="2026-12-02T00:00:00Z")
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom)) is None
    driver = next(c for c in bom["components"] if c["name"] == "nvidia-driver")
    assert driver["version"] == main[0]["version"] and "nvidia" in {c["name"] for c in driver["components"]}
    print("\nNVIDIA modules:", " ".join(sorted({f"{m['name']}@{m['kernel']}" for m in facts["modules"]})))


@pytest.mark.timeout(900)
def test_nvidia_repo_source_renders_in_check_mode(trixie):
    """NVIDIA's repository is not reachable from these machines: only check mode, rendering source and pin.

    The key URL points at a local file (get_url does a HEAD request even in check mode).
    """
    tree, target = trixie["tree"], trixie["target"]
    shutil.copyfile("/usr/share/keyrings/debian-archive-keyring.gpg", tree / "root/test-key.gpg")
    res = run_playbook(
        PLAYBOOK, target, roles_path=ROLES, workdir=trixie["work"] / "check", check=True, diff=True,
        tags=["nvidia_repo"], task_timeout=600, timeout=800,
        extra_vars={"nvidia_driver_source": "nvidia", "nvidia_driver_branch": "580",
                    "nvidia_kernel_modules": "open", "nvidia_repo_key_url": "file:///root/test-key.gpg"},
    )
    assert res.status == "successful"
    rendered = {}  # task name -> rendered file (diff mode reports the template's text as "after")
    for line in (trixie["work"] / "check" / "ansible-events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        data = ev.get("event_data", {})
        diff = data.get("res", {}).get("diff") if ev.get("event") == "runner_on_ok" else None
        for d in diff if isinstance(diff, list) else [diff] if diff else []:
            if "after" in d:
                rendered[data["task"]] = d["after"]
    src = rendered["Add NVIDIA's repository"]
    assert "URIs: https://developer.download.nvidia.com/compute/cuda/repos/debian13/x86_64/\n" in src
    assert "Suites: /\n" in src and "Signed-By: /usr/share/keyrings/nvidia-cuda-archive-keyring.asc" in src
    pin = rendered["Pin the driver to branch 580"]
    assert "Pin: version 580.*\nPin-Priority: 1001" in pin
    assert 'Pin: origin "developer.download.nvidia.com"' in pin
    # check mode wrote nothing
    assert not (tree / "etc/apt/sources.list.d/nvidia-cuda.sources").exists()
    assert not (tree / "etc/apt/preferences.d/nvidia-driver-branch.pref").exists()


@pytest.mark.timeout(600)
def test_missing_component_is_refused(trixie):
    """Without non-free the role stops with a clear message instead of an apt error."""
    tree, target = trixie["tree"], trixie["target"]
    src = tree / "etc/apt/sources.list.d/debian.sources"
    saved = src.read_text()
    src.write_text(saved.replace("main contrib non-free non-free-firmware", "main contrib"))
    try:
        with pytest.raises(ProvisionError, match="non-free") as ei:
            run_playbook(PLAYBOOK, target, roles_path=ROLES, extra_vars={"nvidia_apt_cache_valid_time": 0},
                         workdir=trixie["work"] / "nocomp", tags=["nvidia_packages"], task_timeout=600, timeout=800)
        assert "Require the Debian components" in (ei.value.task or "")
    finally:
        src.write_text(saved)
        chroot(tree, "apt-get", "update", "-qq")
