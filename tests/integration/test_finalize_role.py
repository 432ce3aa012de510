"""roles/finalize against a real Debian 13 tree (debootstrap, cached per day; sshd in a chroot on 127.0.0.1):
the build's traces are planted the way an install and a provisioning leave them, the role runs, and every
file is checked one by one. Check mode first: it must change nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.config import load_config
from builder.errors import ProvisionError
from builder.provision import run_playbook
from builder.stages.finalize import finalize_vars

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "finalize.yml"
ROLES = [ROOT / "roles"]

pytestmark = [pytest.mark.integration]


def chroot(tree: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(tree), *cmd], capture_output=True, text=True, timeout=300)


def plant_build_traces(tree: Path) -> None:
    """What the install and the provisioning leave behind that the image must not carry."""
    assert chroot(tree, "useradd", "--create-home", "--shell", "/bin/bash", "builder").returncode == 0
    (tree / "home/builder/.ssh").mkdir(parents=True)
    (tree / "home/builder/.ssh/authorized_keys").write_text("ssh-ed25519 AAAA build-key\n")
    (tree / "etc/sudoers.d/90-builder").write_text("builder ALL=(ALL:ALL) NOPASSWD: ALL\n")
    (tree / "etc/sudoers.d/90-builder").chmod(0o440)
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tree / "var/lib/dbus").mkdir(parents=True, exist_ok=True)
    (tree / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key"):
        (tree / "etc/ssh" / name).write_text("pinned build host key\n")
    (tree / "etc/cloud").mkdir(parents=True, exist_ok=True)
    (tree / "etc/cloud/cloud-init.disabled").touch()
    (tree / "var/lib/dkms").mkdir(parents=True, exist_ok=True)
    (tree / "var/lib/dkms/mok.key").write_text("private\n")
    (tree / "var/lib/dkms/mok.pub").write_text("public\n")
    # the image's module-signing certificate (the nvidia role leaves it; its private key it has removed)
    (tree / "var/lib/dkms/builder-mok.der").write_bytes(b"0\x82certificate")
    # apt as the install left it: the gateway in the one-line sources, a proxy file, a proxy line
    (tree / "etc/apt/sources.list").write_text("deb http://10.0.2.100/debian trixie main\n")
    (tree / "etc/apt/apt.conf.d/99proxy-marker").write_text("// a file a proxy setup would leave\n")
    (tree / "etc/apt/apt.conf").write_text('Acquire::http::Proxy "http://10.0.2.2:3142";\nAPT::Foo "1";\n')
    (tree / "var/lib/apt/lists/some_Packages").write_text("Package: x\n")
    (tree / "var/cache/apt/archives/x_1_all.deb").write_bytes(b"deb")
    (tree / "var/log/installer").mkdir(parents=True, exist_ok=True)
    (tree / "var/log/installer/syslog").write_text("d-i log with a key\n")
    (tree / "var/log/dpkg.log").write_text("install x\n")
    (tree / "var/log/old.log.1").write_text("rotated\n")
    (tree / "var/log/journal/abc").mkdir(parents=True, exist_ok=True)
    (tree / "var/log/journal/abc/system.journal").write_bytes(b"journal")
    (tree / "var/tmp/leftover").write_text("x\n")
    (tree / "root/.bash_history").write_text("history\n")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    work = tmp_path_factory.mktemp("finalize")
    tree = tt.working_copy(tt.pristine_tree(), work / "root")
    # the mirror the image's apt must point at afterwards, and the build-time sources
    (tree / "etc/apt/sources.list.d/debian.sources").unlink()
    plant_build_traces(tree)
    try:
        with tt.ansible_target(tree, work, "finalize-test") as target:
            yield {"tree": tree, "work": work, "target": target}
    finally:
        assert not tt.mounts_under(tree)
        shutil.rmtree(tree, ignore_errors=True)


@pytest.mark.timeout(900)
def test_finalize_role_file_by_file(target, default_config):
    tree = target["tree"]
    cfg = load_config(ROOT / "images/cloud-gpu-worker.yaml")
    extra = finalize_vars(cfg) | {"finalize_trim": False}  # fstrim in a chroot would trim the host's disks
    # the sshd the test talks through keeps its own host key in etc/ssh/builder-test: not an image host key
    check = run_playbook(PLAYBOOK, target["target"], roles_path=ROLES, extra_vars=extra, workdir=target["work"] / "c",
                         check=True, task_timeout=300, timeout=600)
    assert check.status == "successful"
    assert (tree / "etc/sudoers.d/90-builder").exists() and (tree / "etc/apt/sources.list").exists()
    assert (tree / "etc/ssh/ssh_host_ed25519_key").exists(), "check mode removed a file"

    res = run_playbook(PLAYBOOK, target["target"], roles_path=ROLES, extra_vars=extra, workdir=target["work"] / "r",
                       task_timeout=300, timeout=600)
    assert res.status == "successful" and res.changed > 0
    # apt: the configured mirrors, deb822, no proxy, no lists, no gateway anywhere
    assert not (tree / "etc/apt/sources.list").exists()
    sources = (tree / "etc/apt/sources.list.d/debian.sources").read_text()
    assert f"URIs: {cfg.debian.mirror}\n" in sources and f"URIs: {cfg.debian.security_mirror}\n" in sources
    assert "Suites: trixie trixie-updates\n" in sources and "Suites: trixie-security\n" in sources
    assert "Components: main contrib non-free non-free-firmware\n" in sources
    assert not (tree / "etc/apt/apt.conf.d/99proxy-marker").exists()
    assert (tree / "etc/apt/apt.conf").read_text() == 'APT::Foo "1";\n'
    assert "Proxy" not in chroot(tree, "apt-config", "dump").stdout
    assert subprocess.run(["grep", "-rsF", "-e", "10.0.2.100", "-e", "10.0.2.2", str(tree / "etc/apt")]).returncode == 1
    assert not (tree / "var/lib/apt/lists/some_Packages").exists()
    assert not list((tree / "var/cache/apt/archives").glob("*.deb"))
    # identity
    assert (tree / "etc/machine-id").read_text() == ""
    assert not (tree / "var/lib/dbus/machine-id").exists()
    assert not list((tree / "etc/ssh").glob("ssh_host_*"))
    dropin = (tree / "etc/systemd/system/ssh.service.d/10-hostkeys.conf").read_text()
    assert "ExecStartPre=/usr/bin/ssh-keygen -A" in dropin
    assert not (tree / "etc/cloud/cloud-init.disabled").exists()
    assert not (tree / "var/lib/dkms/mok.key").exists() and not (tree / "var/lib/dkms/mok.pub").exists()
    assert (tree / "var/lib/dkms/builder-mok.der").read_bytes() == b"0\x82certificate"
    # logs and leftovers
    assert not (tree / "var/log/installer").exists()
    assert (tree / "var/log/dpkg.log").stat().st_size == 0
    assert not (tree / "var/log/old.log.1").exists()
    assert not list((tree / "var/log/journal").iterdir())
    assert not list((tree / "var/tmp").iterdir())
    assert not (tree / "root/.bash_history").exists()
    # the build user, its home and its sudo rule
    assert chroot(tree, "getent", "passwd", "builder").returncode == 2
    assert not (tree / "home/builder").exists()
    assert not (tree / "etc/sudoers.d/90-builder").exists()


@pytest.mark.timeout(600)
def test_finalize_fails_while_the_module_signing_key_is_there(target):
    """A private signing key in the image is an error to see, not something to tidy away silently."""
    tree = target["tree"]
    key = tree / "var/lib/dkms/builder-mok.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    try:
        with pytest.raises(ProvisionError, match="must not ship") as ei:
            run_playbook(PLAYBOOK, target["target"], roles_path=ROLES, workdir=target["work"] / "key",
                         extra_vars={"finalize_trim": False, "finalize_remove_build_user": False},
                         tags=["finalize_identity"], task_timeout=300, timeout=600)
        assert "Require the module-signing private key to be absent" in (ei.value.task or "")
        assert key.exists()
    finally:
        key.unlink()
