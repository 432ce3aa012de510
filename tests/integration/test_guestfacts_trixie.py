"""provision's guest-side collection for the SBOM (the dpkg-query of packages.tsv, builder.guestfacts through
``python3 -``) over real SSH against a debootstrapped Debian 13 tree in a chroot (not a VM), and the SBOM those
real facts make, checked with the CycloneDX validator."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder import guestfacts, sbom
from builder.events import Emitter
from builder.ssh import generate_keypair, run_command, wait_for_ssh
from builder.stages import provision

try:
    import trixie_target as tt
except ImportError:  # tests/ made a package
    from . import trixie_target as tt

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed")
    work = tmp_path_factory.mktemp("guestfacts")
    tree = tt.working_copy(tt.pristine_tree(), work / "root")
    client_key, host_key = generate_keypair("facts-client"), generate_keypair("facts-host")
    try:
        with tt.chroot_mounts(tree), tt.local_sshd(work, host_key.private_openssh, client_key.public_openssh,
                                                  root=tree) as port:
            client = wait_for_ssh("127.0.0.1", port, "root", client_key, host_key.public_openssh, timeout=30)
            try:
                yield {"tree": tree, "work": work, "client": client}
            finally:
                client.close()
    finally:
        assert not tt.mounts_under(tree)
        if not os.environ.get("BUILDER_KEEP_TEST_CHROOT"):
            shutil.rmtree(tree, ignore_errors=True)


def chroot(tree: Path, *cmd: str) -> str:
    return subprocess.run(["chroot", str(tree), *cmd], capture_output=True, text=True, check=True).stdout


@pytest.mark.timeout(1800)
def test_package_query(guest):
    tree = guest["tree"]
    _, out, _ = run_command(guest["client"], provision.PACKAGES)
    assert all(line.count("\t") == len(sbom.DPKG_FIELDS) - 1 for line in out.splitlines())
    pkgs = {p.name: p for p in sbom.parse_packages_tsv(out)}
    assert (pkgs["bash"].arch, pkgs["adduser"].arch, pkgs["libc6"].source) == ("amd64", "all", "glibc")
    assert pkgs["bash"].installed and pkgs["bash"].status.startswith("ii")
    binnmu = [p for p in pkgs.values() if "+b" in p.version and p.source_version != p.version]
    assert binnmu, "a binNMU's source version differs from its own (trixie has plenty)"
    # packages.txt is made from it, and is what the old query printed
    old = chroot(tree, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n")
    assert sbom.packages_txt(sbom.parse_packages_tsv(out)) == old


@pytest.mark.timeout(600)
def test_guest_facts_collected_as_provision_does(guest):
    tree, work = guest["tree"], guest["work"]
    wd = work / "wd"
    wd.mkdir()
    t0 = time.monotonic()
    provision.collect_guest_facts(guest["client"], wd, Emitter())
    took = time.monotonic() - t0
    lic = sbom.parse_licenses_tsv((wd / "licenses.tsv").read_text())
    assert "GPL-3+" in lic["bash"] and "LGPL-2.1+" in lic["libc6"]
    docs = sorted(p.name for p in (tree / "usr/share/doc").iterdir() if (p / "copyright").is_file())
    free_form = [d for d in docs if "copyright-format/1.0" not in (tree / "usr/share/doc" / d / "copyright")
                 .read_text(errors="replace").split("\n", 1)[0]]
    assert free_form and not set(free_form) & set(lic)  # not machine-readable: left out, not guessed
    assert len(lic) > len(docs) // 2
    assert all(guestfacts._SYNOPSIS_RE.fullmatch(x) for names in lic.values() for x in names)
    facts = json.loads((wd / "kernel-modules.json").read_text())
    assert facts == {"modules": [], "dkms": []}  # no NVIDIA driver in this tree
    print(f"\nguest facts: {len(lic)} of {len(docs)} packages with DEP-5 licences, {took:.1f} s")


@pytest.mark.timeout(600)
def test_module_description_from_modinfo(guest):
    """The module part of the collection, on the in-tree modules the tree's (not the host's) kernel has."""
    tree = guest["tree"]
    script = Path(guestfacts.__file__).read_bytes()
    _, out, _ = run_command(guest["client"], "python3 - --modules 'vsock*' --in-tree", input=script)
    mods = {m["name"]: m for m in json.loads(out)["modules"]}
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    vsock = mods["vsock"]
    assert vsock["kernel"] == kernels[-1] and vsock["vermagic"].startswith(vsock["kernel"])
    assert vsock["intree"] == "Y" and vsock["license"] and vsock["signer"]
    assert vsock["sha256"] == hashlib.sha256((tree / vsock["path"].lstrip("/")).read_bytes()).hexdigest()


@pytest.mark.timeout(600)
def test_sbom_of_the_real_tree_validates(guest):
    client = guest["client"]
    _, out, _ = run_command(client, provision.PACKAGES)
    _, facts, _ = run_command(client, provision.GUEST_FACTS, input=Path(guestfacts.__file__).read_bytes())
    data = json.loads(facts)
    pkgs = sbom.parse_packages_tsv(out)
    bom = sbom.cyclonedx(image_name="trixie-chroot", image_file="trixie.qcow2", image_sha256="00" * 32,
                         packages=pkgs, licenses=data["licenses"], digests={}, builder_version="0.1.0",
                         timestamp="2026-12-02T00:00:00Z")
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom), all_errors=True)
    assert not list(errors or []), list(errors or [])[:3]
    assert len(bom["components"]) == len([p for p in pkgs if p.installed])
