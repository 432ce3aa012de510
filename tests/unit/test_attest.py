"""What the SBOM and provenance are made of (builder.attest): the .deb digests from the Packages indexes of a
Release the gateway verified (a fake signed archive on 127.0.0.1, real gpgv), the InRelease files it passed on,
the image definition's files by digest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import sbom_testdata as td
from archive_testlib import SUITE, FakeArchive, GpgKey, serve
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder import attest, sbom
from builder.archive.cache import ContentCache
from builder.context import BuildContext, BuildOptions, Services
from builder.diagnostics import Diagnostics
from builder.events import Emitter
from builder.gateway.server import Gateway
from builder.pkglock import PackageLock, PackagePin, SignedIndex, write_package_lock

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
    stored = sorted(f"images/cloud-gpu-worker.lock.d/{p.name}"
                    for p in (repo / "images" / "cloud-gpu-worker.lock.d").iterdir())
    assert stored and [r["name"] for r in by_kind["lock"]] == ["images/cloud-gpu-worker.lock.json", *stored]
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


# ------------------------------------------------------------------------------------------------ a package lock

DIST = "trixie"  # the image's suite, as the lock and the installer lock name it
TRIXIE, UPDATES, SECURITY = "Sat, 21 Nov 2026 09:15:44 UTC", "Sun, 22 Nov 2026 08:10:01 UTC", \
    "Mon, 23 Nov 2026 19:44:12 UTC"
OLDER_SECURITY = "Thu, 12 Nov 2026 20:02:33 UTC"  # a pin kept from an older lock: an earlier InRelease listed it


def lock_pin(name: str, version: str, arch: str, archive: str = "debian", suite: str = DIST,
             date: str = TRIXIE) -> PackagePin:
    pool = "pool/updates/main" if archive == "debian-security" else "pool/main"
    return PackagePin(name, version, arch, f"{pool}/{name[0]}/{name}/{name}_{version.split(':')[-1]}_{arch}.deb",
                      1000 + len(name), hashlib.sha256(f"{name} {version} locked".encode()).hexdigest(), archive,
                      suite, date)


def package_lock(*, without: tuple[str, ...] = ()) -> PackageLock:
    """What the lock pins of sbom_testdata's guest: everything installed but firmware-nvidia-gsp, each at the
    version dpkg says (libstdc++6 at the version of -updates, which the fake main index does not list)."""
    pins = [lock_pin("adduser", "3.152", "all"), lock_pin("bash", "5.2.37-2+b10", "amd64"),
            lock_pin("libc6", "2.41-12", "amd64"),
            lock_pin("libstdc++6", "14.2.0-19", "amd64", suite=f"{DIST}-updates", date=UPDATES),
            lock_pin("openssh-server", "1:10.0p1-7", "amd64", "debian-security", f"{DIST}-security", OLDER_SECURITY),
            lock_pin("nvidia-kernel-dkms", "550.163.01-2", "amd64"),
            lock_pin(f"linux-headers-{td.KERNEL}", "6.12.94-1", "amd64", "debian-security", f"{DIST}-security",
                     SECURITY)]
    indexes = (SignedIndex("debian", DIST, DIST, TRIXIE, "1a" * 32),
               SignedIndex("debian", f"{DIST}-updates", DIST, UPDATES, "1b" * 32),
               SignedIndex("debian-security", f"{DIST}-security", DIST, SECURITY, "1c" * 32))
    return PackageLock(DIST, DIST, "amd64", "2026-11-23T20:00:00Z", "resolve", indexes,
                       tuple(p for p in pins if p.name not in without))


def build_context(cfg, tmp_path: Path, stack: ExitStack, *, gateway: Gateway | None, cache: ContentCache,
                  plock: PackageLock | None, manifest: dict | None = None) -> BuildContext:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "packages.tsv").write_text(td.PACKAGES_TSV)
    services = Services(gateway, None, None, None, plock) if gateway is not None else None  # type: ignore[arg-type]
    return BuildContext(cfg, BuildOptions(tmp_path / "out"), work, Emitter(), stack, Diagnostics(work), cache=cache,
                        services=services, manifest=manifest or {})


def documents(ctx: BuildContext, tmp_path: Path) -> tuple[dict, list[dict]]:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    bom_path, prov_path = attest.write_documents(ctx, staging, "cloud-gpu-worker.qcow2", "f0" * 32)
    bom_text = bom_path.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(bom_text) is None
    deps = json.loads(prov_path.read_text())["predicate"]["buildDefinition"]["resolvedDependencies"]
    return json.loads(bom_text), deps


def props(comp: dict) -> dict[str, str]:
    return {p["name"].removeprefix("builder:"): p["value"] for p in comp.get("properties", [])}


def test_under_a_package_lock_the_sbom_hashes_come_from_its_pins(default_config, tmp_path: Path):
    """Under a package lock the gateway answers dists/ from its own signed view and verifies no upstream Release:
    with no verified Release at all, every locked package still has the sha256 the lock pins (and fetch checked),
    named by the signed Release that listed it; the lock's Releases are in the provenance by their InRelease."""
    cache = ContentCache(tmp_path / "blobs")
    gw = Gateway(upstreams={"debian": "http://127.0.0.1:9/debian"}, cache=cache, keyring=tmp_path / "none.gpg",
                 fingerprints=(), state_dir=tmp_path / "gw", offline=True)
    plock = package_lock()
    with ExitStack() as stack:
        ctx = build_context(default_config, tmp_path, stack, gateway=gw, cache=cache, plock=plock,
                            manifest={"inrelease_sha256": "1a" * 32})  # fetch verified the very InRelease locked
        assert gw.verified_releases() == {}
        bom, deps = documents(ctx, tmp_path)
    comps = {c["name"]: c for c in bom["components"] if c["type"] == "library"}
    for pin in plock.packages:
        comp = comps[pin.name]
        assert comp["hashes"] == [{"alg": "SHA-256", "content": pin.sha256}], pin.name
        p = props(comp)
        assert p["deb:sha256-from"] == f"{pin.archive}/dists/{pin.suite}/InRelease"
        assert (p["deb:index-date"], p["deb:filename"], p["deb:size"]) == (pin.date, pin.filename, str(pin.size))
        assert p["deb:pinned-by"] == default_config.package_lock_path.name
    gsp = props(comps["firmware-nvidia-gsp"])  # not locked: unknown, and why
    assert "hashes" not in comps["firmware-nvidia-gsp"] and gsp["deb:sha256"] == sbom.UNKNOWN_SHA256_LOCKED
    meta = {p["name"]: p["value"] for p in bom["metadata"]["properties"]}
    assert meta["builder:packages-with-sha256"] == str(len(plock.packages))
    assert meta["builder:package-lock"] == default_config.package_lock_path.name

    mirror, security = default_config.debian.mirror, default_config.debian.security_mirror
    inrel = {d["name"]: d for d in deps if d["annotations"]["kind"] == "inrelease"}
    assert inrel[f"debian/dists/{DIST}-updates/InRelease"] == sbom.resource(
        f"debian/dists/{DIST}-updates/InRelease", "1b" * 32, uri=f"{mirror}/dists/{DIST}-updates/InRelease",
        kind="inrelease", package_lock=default_config.package_lock_path.name, release_date=UPDATES, packages=1)
    sec = inrel[f"debian-security/dists/{DIST}-security/InRelease"]
    assert sec["digest"]["sha256"] == "1c" * 32 and sec["uri"] == f"{security}/dists/{DIST}-security/InRelease"
    assert sec["annotations"]["packages"] == 1  # openssh-server was listed by an older InRelease of the suite
    # the suite's InRelease fetch verified is the one the lock names: one entry, both facts
    main = [d for d in deps if d["name"] == f"debian/dists/{DIST}/InRelease"]
    assert len(main) == 1 and main[0]["annotations"] == {
        "kind": "inrelease", "verified": True, "package_lock": default_config.package_lock_path.name,
        "release_date": TRIXIE, "packages": 4}
    assert not [d for d in deps if d["annotations"]["kind"] == "packages-index"]


@pytest.mark.timeout(60)
def test_what_the_lock_does_not_pin_comes_from_the_verified_releases(default_config, gateway, tmp_path: Path):
    gw, cache = gateway
    plock = package_lock(without=("libc6",))
    with ExitStack() as stack:
        bom, deps = documents(build_context(default_config, tmp_path, stack, gateway=gw, cache=cache, plock=plock),
                              tmp_path)
    comps = {c["name"]: c for c in bom["components"] if c["type"] == "library"}
    assert comps["libc6"]["hashes"][0]["content"] == td.SHA["libc6"]
    assert props(comps["libc6"])["deb:sha256-from"].endswith(f"{MAIN}.xz")
    # a package both list: the lock's pin is what the target installed
    assert comps["adduser"]["hashes"][0]["content"] == package_lock().by_name()["adduser"].sha256
    assert {d["annotations"]["kind"] for d in deps} >= {"inrelease", "packages-index"}


def test_the_lock_in_force_without_the_inputs_is_the_file_the_manifest_recorded(default_config, tmp_path: Path,
                                                                                 caplog):
    src = tmp_path / "images" / "cloud-gpu-worker.yaml"
    src.parent.mkdir()
    cfg = default_config.model_copy(update={"source": src})
    plock = package_lock()
    write_package_lock(plock, cfg.package_lock_path)
    with ExitStack() as stack:
        ctx = build_context(cfg, tmp_path, stack, gateway=None, cache=ContentCache(tmp_path / "blobs"), plock=None,
                            manifest={"package_lock": {"digest": plock.digest()}})
        found = attest.lock_in_force(ctx, None)
        assert found is not None and found.digest() == plock.digest()
        assert attest.lock_in_force(ctx.with_(manifest={}), None) is None
        write_package_lock(package_lock(without=("bash",)), cfg.package_lock_path)
        assert attest.lock_in_force(ctx, None) is None
    assert "pins other files than when the build used it" in caplog.text


def test_provenance_names_every_file_stored_with_the_lock(default_config, tmp_path: Path):
    """fetch checks the installer pins against the signed InRelease files (and small indexes) in IMAGE.lock.d:
    each is an input, by digest; the package lock is one unless debian.package_lock is off."""
    src = tmp_path / "images" / "gpu.yaml"
    stored = tmp_path / "images" / "gpu.lock.d"
    stored.mkdir(parents=True)
    src.write_text("name: gpu\n")
    (tmp_path / "images" / "gpu.lock.json").write_text("{}\n")
    (tmp_path / "images" / "gpu.packages.lock").write_text("{}\n")
    names = [f"{'ab' * 32}.InRelease", f"{'cd' * 32}.Packages.xz"]
    for i, name in enumerate(names):
        (stored / name).write_bytes(b"stored %d" % i)
    (stored / f".{names[0]}.tmp").write_bytes(b"half-written")
    cfg = default_config.model_copy(update={"source": src, "debian": default_config.debian.model_copy(
        update={"package_lock": "auto"})})
    locks = [r for r in attest.definition_resources(cfg) if r["annotations"]["kind"] == "lock"]
    assert [r["name"] for r in locks] == ["images/gpu.lock.json", *(f"images/gpu.lock.d/{n}" for n in names),
                                          "images/gpu.packages.lock"]
    for r in locks:
        path = Path(r["uri"].removeprefix("file://"))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["digest"]["sha256"], r["name"]
    off = cfg.model_copy(update={"debian": cfg.debian.model_copy(update={"package_lock": "off"})})
    assert [p.name for p in attest.lock_files(off)] == ["gpu.lock.json", *names]
    (tmp_path / "images" / "gpu.lock.json").unlink()  # no lock: fetch resolves live and reads none of them
    assert [p.name for p in attest.lock_files(off)] == []


def test_each_signed_release_the_package_lock_names_is_an_input():
    got = attest.lock_digests(package_lock(), WANTED, lock_name="x.packages.lock",
                              mirrors={"debian": "http://127.0.0.1:9/debian"})
    assert [(r["name"], r["digest"]["sha256"], r.get("uri", "")) for r in got.indexes] == [
        (f"debian/dists/{DIST}/InRelease", "1a" * 32, f"http://127.0.0.1:9/debian/dists/{DIST}/InRelease"),
        (f"debian/dists/{DIST}-updates/InRelease", "1b" * 32,
         f"http://127.0.0.1:9/debian/dists/{DIST}-updates/InRelease"),
        (f"debian-security/dists/{DIST}-security/InRelease", "1c" * 32, "")]  # a mirror not known: no uri
    assert [r["annotations"]["packages"] for r in got.indexes] == [4, 1, 1]
    assert set(got.debs) == {p.key for p in sbom.parse_packages_tsv(td.PACKAGES_TSV)
                             if p.installed and p.name != "firmware-nvidia-gsp"}
