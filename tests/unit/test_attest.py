"""What the SBOM and provenance are made of (builder.attest): the .deb digests from the Packages indexes of a
Release the gateway verified (a fake signed archive on 127.0.0.1, real gpgv), the InRelease files it passed on,
the image definition's files by digest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sbom_testdata as td
from archive_testlib import SUITE, FakeArchive, GpgKey, serve

from builder import attest, sbom
from builder.archive.cache import ContentCache
from builder.gateway.server import Gateway

WANTED = [p.key for p in sbom.parse_packages_tsv(td.PACKAGES_TSV) if p.installed]
MAIN = "main/binary-amd64/Packages"


@pytest.fixture
def archive(tmp_path: Path, key: GpgKey) -> FakeArchive:
    arch = FakeArchive(tmp_path / "mirror", key, "", b"")
    arch.write_index(MAIN, td.PACKAGES_INDEX.encode())
    arch.write_index("non-free/binary-amd64/Packages", td.NONFREE_INDEX.encode())
    arch.write_index("main/debian-installer/binary-amd64/Packages", b"Package: anna\nVersion: 1\n", variants=(".xz",))
    arch.publish()
    return arch


@pytest.fixture
def gateway(archive: FakeArchive, key: GpgKey, tmp_path: Path) -> Iterator[tuple[Gateway, ContentCache]]:
    cache = ContentCache(tmp_path / "blobs")
    with serve(archive.root) as srv:
        gw = Gateway(upstreams={"debian": srv.url}, cache=cache, keyring=key.keyring, fingerprints=(key.fingerprint,),
                     state_dir=tmp_path / "gw", backoff=0.01)
        assert gw.resolve(f"/debian/dists/{SUITE}/InRelease") is not None  # as apt update asks first
        yield gw, cache


@pytest.mark.timeout(60)
def test_digests_from_the_index_the_gateway_served(gateway):
    gw, cache = gateway
    xz = gw.verified_releases()[("debian", SUITE)].files[f"{MAIN}.xz"]
    # what apt fetches
    assert gw.resolve(f"/debian/dists/{SUITE}/main/binary-amd64/by-hash/SHA256/{xz.sha256}") is not None
    got = attest.package_digests(gw, cache, WANTED, components=("main",), arch="amd64", fetch=False)
    assert got.debs[("openssh-server", "1:10.0p1-7", "amd64")].sha256 == td.SHA["openssh-server"]
    assert got.debs[("adduser", "3.152", "all")].index == f"debian/dists/{SUITE}/{MAIN}.xz"
    assert ("libstdc++6", "14.2.0-19", "amd64") not in got.debs
    assert ("nvidia-kernel-dkms", "550.163.01-2", "amd64") not in got.debs  # non-free not asked for
    assert got.indexes == [sbom.resource(f"debian/dists/{SUITE}/{MAIN}.xz", xz.sha256,
                                         uri=gw.upstream_url(f"debian/dists/{SUITE}/{MAIN}.xz"),
                                         kind="packages-index", packages=4)]


@pytest.mark.timeout(60)
def test_an_index_not_served_whole_is_fetched_and_checked(gateway):
    gw, cache = gateway
    assert attest.package_digests(gw, cache, WANTED, components=("main",), arch="amd64", fetch=False).debs == {}
    got = attest.package_digests(gw, cache, WANTED, components=("main", "non-free"), arch="amd64")
    assert got.debs[("nvidia-kernel-dkms", "550.163.01-2", "amd64")].sha256 == td.SHA["nvidia-kernel-dkms"]
    assert len(got.debs) == 5 and [r["name"].rsplit("/", 3)[1] for r in got.indexes] == ["main", "non-free"]


@pytest.mark.timeout(60)
def test_offline_gateway_without_the_index_gives_no_digest(gateway):
    gw, cache = gateway
    gw.offline = True
    assert attest.package_digests(gw, cache, WANTED, components=("main",), arch="amd64").debs == {}
    assert attest.package_digests(None, cache, WANTED, components=("main",), arch="amd64").debs == {}


@pytest.mark.timeout(60)
def test_an_index_that_does_not_match_its_release_is_not_used(gateway, archive):
    gw, cache = gateway
    ent = gw.verified_releases()[("debian", SUITE)].files[f"{MAIN}.xz"]
    for p in archive.dists.rglob("*"):  # the mirror now serves other bytes under every name of the index
        if p.is_file() and p.name in (ent.sha256, "Packages.xz", "Packages.gz"):
            p.write_bytes(b"tampered")
    assert attest.package_digests(gw, cache, WANTED, components=("main",), arch="amd64").debs == {}


@pytest.mark.timeout(60)
def test_inrelease_files_the_gateway_passed_on(gateway, archive):
    gw, _ = gateway
    res = attest.gateway_release_resources(gw)
    raw = (archive.dists / "InRelease").read_bytes()
    assert res == [sbom.resource(f"debian/dists/{SUITE}/InRelease", hashlib.sha256(raw).hexdigest(),
                                 uri=gw.upstream_url(f"debian/dists/{SUITE}/InRelease"), kind="inrelease",
                                 verified=True)]


def test_definition_resources_name_every_file_by_digest(default_config, repo):
    res = attest.definition_resources(default_config)
    by_kind: dict[str, list[dict]] = {}
    for r in res:
        by_kind.setdefault(r["annotations"]["kind"], []).append(r)
    assert [r["name"] for r in by_kind["image-definition"]] == ["images/cloud-gpu-worker.yaml"]
    assert [r["name"] for r in by_kind["lock"]] == ["images/cloud-gpu-worker.lock.json"]
    assert {r["name"] for r in by_kind["playbook"]} == {"playbooks/cloud-gpu-worker.yml", "playbooks/finalize.yml"}
    roles = {r["name"] for r in by_kind["role"]}
    assert {"roles/base/tasks/main.yml", "roles/nvidia-gpu-drivers/vars/main.yml",
            "roles/finalize/defaults/main.yml"} <= roles
    assert {r["annotations"]["role"] for r in by_kind["role"]} == {"base", "nvidia-gpu-drivers", "finalize"}
    assert "preseed/preseed.cfg.j2" in {r["name"] for r in by_kind["preseed-template"]}
    for r in res:
        path = Path(r["uri"].removeprefix("file://"))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["digest"]["sha256"], r["name"]
    assert len({r["name"] for r in res}) == len(res)


def test_a_role_shadowed_by_an_earlier_roles_dir_is_not_an_input(default_config, tmp_path: Path):
    """Ansible takes a role from the first roles directory that has it: the project's own copy of a role is the
    input, builder's copy of the same role is not (as under tox, where both are on the roles path)."""
    own = tmp_path / "roles" / "base" / "tasks"
    own.mkdir(parents=True)
    (own / "main.yml").write_text("- ansible.builtin.debug: {msg: shadow}\n")
    cfg = default_config.model_copy(update={"provision": default_config.provision.model_copy(
        update={"roles_path": [tmp_path / "roles"]})})
    roles = [r for r in attest.definition_resources(cfg) if r["annotations"]["kind"] == "role"]
    base = [r for r in roles if r["annotations"]["role"] == "base"]
    assert [Path(r["uri"].removeprefix("file://")) for r in base] == [(own / "main.yml").resolve()]
    assert {"nvidia-gpu-drivers", "finalize"} <= {r["annotations"]["role"] for r in roles}
