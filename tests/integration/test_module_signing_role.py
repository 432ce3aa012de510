"""The nvidia role's module-signing tasks against a real Debian 13 tree (debootstrap, cached per day; sshd in a
chroot on 127.0.0.1), with a tiny DKMS module instead of the NVIDIA driver (whose compile takes minutes to
hours): the role's own task files (signing.yml, signing_verify.yml, signing_cleanup.yml) in a small playbook
of main.yml's shape (block/always), DKMS 3.2 and sign-file from trixie, the module really built and signed.

Measured: DKMS sees builder-signing.conf and the key *while it builds*; the installed module's sig_key and
signer are the certificate's; afterwards the private key is gone and the certificate and the configuration
stay; a rebuild without the key is signed by DKMS's own key and leaves the image's certificate alone, and with
the key placed back by an operator is signed by the image's key again; a module signed by another key fails
the role's check; a build that fails still removes the key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from builder.errors import ProvisionError
from builder.provision import run_playbook
from builder.secureboot import der_bytes, serial_hex, write_pair

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

ROOT = Path(__file__).resolve().parents[2]
ROLES = [ROOT / "roles"]
KEY = "/var/lib/dkms/builder-mok.key"
CERT = "/var/lib/dkms/builder-mok.der"
CONF = "/etc/dkms/framework.conf.d/builder-signing.conf"
MODULE = "builder_hello"
TIMINGS: dict[str, float] = {}

pytestmark = [pytest.mark.integration]

PLAYBOOK = """\
- name: The nvidia role's module signing around a tiny DKMS module (main.yml's block/always)
  hosts: all
  gather_facts: false
  vars:
    _nvidia_set: {kernel_module: builder_hello}
    build_module: builder_hello
  tasks:
    - name: Find the installed kernels
      ansible.builtin.include_role: {name: nvidia-gpu-drivers, tasks_from: kernels.yml}
    - name: Sign with the image's key
      block:
        - name: Give DKMS the key pair
          ansible.builtin.include_role: {name: nvidia-gpu-drivers, tasks_from: signing.yml}
        - name: Install DKMS (after the signing setup, as install.yml does)
          ansible.builtin.apt: {name: dkms, state: present, install_recommends: false}
        - name: Build and install the test module
          ansible.builtin.command: dkms install --force {{ build_module }}/1.0 -k {{ item }}
          loop: "{{ nvidia_kernels }}"
          when: build_module | length > 0
        - name: Check the signatures
          ansible.builtin.include_role: {name: nvidia-gpu-drivers, tasks_from: signing_verify.yml}
      always:
        - name: Remove the private key
          ansible.builtin.include_role: {name: nvidia-gpu-drivers, tasks_from: signing_cleanup.yml}
"""

HELLO_C = """\
#include <linux/init.h>
#include <linux/module.h>
static int __init hello_init(void) { return 0; }
static void __exit hello_exit(void) {}
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("builder module-signing test");
"""

# DKMS runs POST_BUILD right after the compile: what it saw of the signing setup while building
SNAPSHOT = f"""#!/bin/sh
{{ cat {CONF}; stat -c '%a %U %n' {KEY} {CERT}; }} > /root/during-build.txt 2>&1
exit 0
"""


def chroot(tree: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(tree), *cmd], capture_output=True, text=True, timeout=600)


def add_module(tree: Path, name: str, source: str) -> None:
    src = tree / "usr/src" / f"{name}-1.0"
    src.mkdir(parents=True)
    (src / f"{name}.c").write_text(source)
    (src / "Makefile").write_text(f"obj-m := {name}.o\n")
    (src / "snapshot.sh").write_text(SNAPSHOT)
    (src / "snapshot.sh").chmod(0o755)
    (src / "dkms.conf").write_text(f'PACKAGE_NAME="{name}"\nPACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="{name}"\n'
                                   'DEST_MODULE_LOCATION[0]="/updates/dkms"\n'
                                   'AUTOINSTALL="yes"\nPOST_BUILD="snapshot.sh"\n')


def rebuild(tree: Path, k: str) -> None:
    """What DKMS does on the node for a new kernel: build (again) and install."""
    for verb in ("build", "install"):
        r = chroot(tree, "dkms", verb, "--force", f"{MODULE}/1.0", "-k", k)
        assert r.returncode == 0, r.stdout + r.stderr


def kernel(tree: Path) -> str:
    (k,) = [p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*")]
    return k


def module_signature(tree: Path, k: str, name: str = MODULE) -> tuple[str, str]:
    path = chroot(tree, "modinfo", "-k", k, "-F", "filename", name).stdout.strip()
    assert path.startswith(f"/lib/modules/{k}/updates/dkms/"), path
    key = chroot(tree, "modinfo", "-F", "sig_key", path).stdout.strip().replace(":", "").lstrip("0")
    return key, chroot(tree, "modinfo", "-F", "signer", path).stdout.strip()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    work = tmp_path_factory.mktemp("signing")
    t0 = time.monotonic()
    tree = tt.working_copy(tt.pristine_tree(), work / "root")
    TIMINGS["tree"] = time.monotonic() - t0
    add_module(tree, MODULE, HELLO_C)
    add_module(tree, "builder_broken", HELLO_C.replace("return 0;", "return not_declared;"))
    (work / "play.yml").write_text(PLAYBOOK)
    try:
        with tt.ansible_target(tree, work, "signing-test") as target:
            # what the nvidia role's prerequisites.yml installs before it: the headers (with sign-file and gcc)
            t0 = time.monotonic()
            k = kernel(tree)
            r = chroot(tree, "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                       f"-qq --no-install-recommends linux-headers-{k} gcc make >/dev/null")
            assert r.returncode == 0, r.stderr[-3000:]
            TIMINGS["headers"] = time.monotonic() - t0
            yield {"tree": tree, "work": work, "target": target, "kernel": k}
    finally:
        assert not tt.mounts_under(tree)
        shutil.rmtree(tree, ignore_errors=True)
        print("\nTIMINGS " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def play(target, run: str, extra: dict) -> object:
    t0 = time.monotonic()
    try:
        return run_playbook(target["work"] / "play.yml", target["target"], roles_path=ROLES, extra_vars=extra,
                            workdir=target["work"] / run, task_timeout=900, timeout=1500)
    finally:
        TIMINGS[run] = time.monotonic() - t0


def pair_vars(keys: Path) -> dict[str, str]:
    # the certificate as PEM here: the role stores it as DER
    return {"nvidia_module_signing_key": str(keys / "mok.key"), "nvidia_module_signing_cert": str(keys / "mok.pem")}


@pytest.mark.timeout(1800)
def test_modules_signed_with_the_image_key_and_the_key_removed(target, tmp_path):
    tree, k = target["tree"], target["kernel"]
    pair = write_pair(tmp_path / "a", "builder test")
    res = play(target, "signed", pair_vars(tmp_path / "a"))
    assert res.status == "successful"

    # while DKMS built: the configuration named our key and certificate, and the key was there (root, 0600)
    during = (tree / "root/during-build.txt").read_text()
    assert f"mok_signing_key={KEY}\n" in during and f"mok_certificate={CERT}\n" in during, during
    assert f"600 root {KEY}\n" in during and f"644 root {CERT}\n" in during, during
    # what DKMS says it signed with (its own log, in the task's output)
    events = [json.loads(line) for line in (res.events_log or Path()).read_text().splitlines()]
    dkms_out = "".join(e["event_data"]["res"].get("stdout", "") for e in events
                       if e.get("event") == "runner_item_on_ok" and "dkms install" in str(e["event_data"]["res"]))
    assert f"Signing key: {KEY}" in dkms_out and f"Public certificate (MOK): {CERT}" in dkms_out, dkms_out
    # the installed module carries our signature
    assert module_signature(tree, k) == (serial_hex(pair.cert), "builder test module signing")
    # afterwards: no private key; the certificate (DER) and the configuration stay; DKMS made no key of its own
    assert not (tree / KEY.lstrip("/")).exists()
    assert (tree / CERT.lstrip("/")).read_bytes() == der_bytes(pair.cert)
    assert (tree / CONF.lstrip("/")).is_file()
    assert not (tree / "var/lib/dkms/mok.key").exists()
    assert not list((tree / "var/lib/dkms").glob("*.upload")) and not list((tree / "var/lib/dkms").glob("*.tmp"))

    # a rebuild on the node without the key (option a): DKMS's own per-machine key signs, our cert is untouched
    rebuild(tree, k)
    key, signer = module_signature(tree, k)
    assert signer == "DKMS module signing key" and key != serial_hex(pair.cert)
    assert (tree / CERT.lstrip("/")).read_bytes() == der_bytes(pair.cert)
    assert (tree / "var/lib/dkms/mok.key").is_file()
    # the operator places the key (option c): the rebuild is signed by the image's key again
    shutil.copy2(pair.key_path, tree / KEY.lstrip("/"))
    rebuild(tree, k)
    assert module_signature(tree, k) == (serial_hex(pair.cert), "builder test module signing")
    (tree / KEY.lstrip("/")).unlink()

    # a second run with the same pair: only the key comes and goes (the certificate and configuration stay)
    again = play(target, "again", pair_vars(tmp_path / "a") | {"build_module": ""})
    events = [json.loads(line) for line in (again.events_log or Path()).read_text().splitlines()]
    changed = {e["event_data"]["task"] for e in events if e.get("event") in ("runner_on_ok", "runner_item_on_ok")
               and e["event_data"].get("res", {}).get("changed")}
    assert again.status == "successful"
    assert changed == {"Copy the module-signing private key (for the build only)",
                       "Remove the module-signing private key"}, changed
    assert not (tree / KEY.lstrip("/")).exists()


@pytest.mark.timeout(900)
def test_a_module_signed_by_another_key_fails_the_check(target, tmp_path):
    tree = target["tree"]
    write_pair(tmp_path / "b", "other")
    with pytest.raises(ProvisionError, match=r"not signed|sig_key") as ei:
        play(target, "otherkey", pair_vars(tmp_path / "b") | {"build_module": ""})
    assert "Require every module to be signed" in (ei.value.task or ""), ei.value
    assert not (tree / KEY.lstrip("/")).exists()


@pytest.mark.timeout(900)
def test_a_failed_build_still_removes_the_key(target, tmp_path):
    tree = target["tree"]
    write_pair(tmp_path / "c", "failing")
    with pytest.raises(ProvisionError) as ei:
        play(target, "broken", pair_vars(tmp_path / "c") | {"build_module": "builder_broken"})
    assert "Build and install the test module" in (ei.value.task or ""), ei.value
    assert not (tree / KEY.lstrip("/")).exists()
    assert (tree / CERT.lstrip("/")).is_file()

