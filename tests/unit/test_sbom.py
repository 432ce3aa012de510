"""The SBOM and provenance documents (builder.sbom) and the guest-side collection (builder.guestfacts), pure:
realistic dpkg/modinfo/dkms output in, CycloneDX 1.6 out, checked with the CycloneDX library's JSON schema
validator, and an in-toto Statement v1 with a SLSA provenance v1 predicate."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import sbom_testdata as td
from cyclonedx.model.bom import Bom
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from builder import guestfacts, sbom

IMAGE_SHA = "f0" * 32


def validation_errors(doc: dict) -> list[str]:
    errs = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc), all_errors=True)
    return [str(e) for e in (errs or [])]


def spdx_ids() -> set[str]:
    text = resources.files("cyclonedx.schema._res").joinpath("spdx.SNAPSHOT.schema.json").read_text()
    return set(json.loads(text)["enum"])


def make_bom(**kw) -> dict:
    packages = sbom.parse_packages_tsv(td.PACKAGES_TSV)
    digests = sbom.index_digests(td.PACKAGES_INDEX, [p.key for p in packages],
                                 index_name="debian/dists/trixie/main/binary-amd64/Packages.xz")
    digests |= sbom.index_digests(td.NONFREE_INDEX, [p.key for p in packages],
                                  index_name="debian/dists/trixie/non-free/binary-amd64/Packages.xz")
    args = dict(image_name="cloud-gpu-worker", image_file="cloud-gpu-worker.qcow2", image_sha256=IMAGE_SHA,
                packages=packages, licenses=td.LICENSES, digests=digests, modules=td.MODULES, dkms=td.DKMS,
                builder_version="0.1.0", timestamp="2026-12-02T01:37:20Z", description="GPU worker",
                properties={"debian__suite": "trixie", "debian__release": 13})
    args.update(kw)
    return sbom.cyclonedx(**args)


def component(bom: dict, name: str) -> dict:
    return next(c for c in bom["components"] if c["name"] == name)


def prop(comp: dict, name: str) -> str | None:
    return next((p["value"] for p in comp.get("properties", []) if p["name"] == f"builder:{name}"), None)


# ------------------------------------------------------------------------------------------------ purl


@pytest.mark.parametrize(("name", "version", "arch", "expected"), [
    ("curl", "8.14.1-2", "amd64", "pkg:deb/debian/curl@8.14.1-2?arch=amd64&distro=debian-13"),
    ("openssh-server", "1:10.0p1-7", "amd64", "pkg:deb/debian/openssh-server@1%3A10.0p1-7?arch=amd64&distro=debian-13"),
    ("attr", "1:2.3", "amd64", "pkg:deb/debian/attr@1%3A2.3?arch=amd64&distro=debian-13"),
    ("bash", "5.2.37-2+b10", "amd64", "pkg:deb/debian/bash@5.2.37-2%2Bb10?arch=amd64&distro=debian-13"),
    ("libstdc++6", "14.2.0-19", "amd64", "pkg:deb/debian/libstdc%2B%2B6@14.2.0-19?arch=amd64&distro=debian-13"),
    ("adduser", "3.152", "all", "pkg:deb/debian/adduser@3.152?arch=all&distro=debian-13"),
    ("dash", "0.5.12-12~bpo13+1", "amd64", "pkg:deb/debian/dash@0.5.12-12~bpo13%2B1?arch=amd64&distro=debian-13"),
])
def test_purl_format_and_round_trip(name, version, arch, expected):
    got = sbom.purl(name, version, arch)
    assert got == expected
    back = PackageURL.from_string(got)  # the reference parser reads it back exactly
    assert (back.type, back.namespace, back.name, back.version) == ("deb", "debian", name, version)
    assert back.qualifiers == {"arch": arch, "distro": "debian-13"}


def test_purl_without_architecture():
    """packages.txt of an older build says no architecture: the purl then has none rather than an empty one."""
    assert sbom.purl("curl", "8.14.1-2", "") == "pkg:deb/debian/curl@8.14.1-2?distro=debian-13"


# ------------------------------------------------------------------------------------------------ guest data


def test_packages_tsv_parsed_and_packages_txt_unchanged():
    pkgs = sbom.parse_packages_tsv(td.PACKAGES_TSV)
    assert len(pkgs) == 9
    bash = next(p for p in pkgs if p.name == "bash")
    assert (bash.version, bash.arch, bash.source, bash.source_version) == ("5.2.37-2+b10", "amd64", "bash", "5.2.37-2")
    rc = next(p for p in pkgs if p.status.startswith("rc"))
    assert not rc.installed and bash.installed
    # packages.txt keeps its old "name version" lines, every package dpkg lists
    assert sbom.packages_txt(pkgs).splitlines()[4] == "openssh-server 1:10.0p1-7"
    assert len(sbom.packages_txt(pkgs).splitlines()) == 9
    # the old format still reads (no architecture: empty)
    old = sbom.parse_packages_tsv("openssh-server 1:10.0p1-7\n")
    assert old[0].key == ("openssh-server", "1:10.0p1-7", "") and old[0].source == "openssh-server"


def test_licenses_tsv_round_trip():
    text = sbom.licenses_tsv(td.LICENSES)
    assert "bash\tGPL-3+\tGPL-3+ with Bison exception\tGFDL-NIV-1.3\n" in text
    assert sbom.parse_licenses_tsv(text) == {k: tuple(v) for k, v in td.LICENSES.items()}


def test_dep5_licenses_header_and_files_paragraphs_only():
    assert guestfacts.dep5_licenses(td.DEP5) == ["GPL-3+", "LGPL-2.1+ or GPL-2+", "GPL-3+ with Bison exception"]
    assert guestfacts.dep5_licenses(td.OLD_STYLE_COPYRIGHT) is None  # not machine-readable: unknown
    draft = td.DEP5.replace("https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
                            "http://dep.debian.net/deps/dep5")
    assert guestfacts.dep5_licenses(draft) == ["GPL-3+", "LGPL-2.1+ or GPL-2+", "GPL-3+ with Bison exception"]
    # only standalone License paragraphs: those names
    only = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nLicense: Expat\n text\n"
    assert guestfacts.dep5_licenses(only) == ["Expat"]


def test_licenses_reads_doc_dirs_and_symlinks(tmp_path):
    (tmp_path / "bash").mkdir()
    (tmp_path / "bash" / "copyright").write_text(td.DEP5)
    (tmp_path / "foobar").mkdir()
    (tmp_path / "foobar" / "copyright").write_text(td.OLD_STYLE_COPYRIGHT)
    (tmp_path / "bash-builtins").symlink_to("bash")  # Debian links doc dirs within a source package
    (tmp_path / "empty").mkdir()
    got = guestfacts.licenses(str(tmp_path))
    assert set(got) == {"bash", "bash-builtins"} and got["bash"][0] == "GPL-3+"


def test_modinfo_and_dkms_status_parsed():
    info = guestfacts.parse_modinfo(td.MODINFO)
    assert info["name"] == "nvidia" and info["version"] == "550.163.01" and info["license"] == "NVIDIA"
    assert info["signer"] == "DKMS module signing key" and info["sig_hashalgo"] == "sha256"
    assert info["vermagic"].startswith(td.KERNEL) and info["depends"] == ""
    assert "alias" not in info and "signature" not in info and "parm" not in info
    recs = guestfacts.parse_dkms_status(td.DKMS_STATUS)
    assert [(r["module"], r["version"], r["kernel"], r["arch"]) for r in recs] == [
        ("nvidia-current", "550.163.01", td.KERNEL, "x86_64"),
        ("nvidia-current", "550.163.01", "6.12.90+deb13-amd64", "x86_64")]
    assert recs[0]["status"] == "installed" and recs[1]["status"].startswith("installed (WARNING")
    assert guestfacts.parse_dkms_status("nvidia-current, 535.54, 6.1.0-9-amd64, x86_64: installed\n")[0][
        "version"] == "535.54"  # dkms 2's comma form


def test_index_digests_match_name_version_and_arch():
    pkgs = sbom.parse_packages_tsv(td.PACKAGES_TSV)
    got = sbom.index_digests(td.PACKAGES_INDEX, [p.key for p in pkgs], index_name="main")
    assert got[("openssh-server", "1:10.0p1-7", "amd64")].sha256 == td.SHA["openssh-server"]
    assert got[("adduser", "3.152", "all")].filename == "pool/main/a/adduser/adduser_3.152_all.deb"
    assert got[("bash", "5.2.37-2+b10", "amd64")].size == 1503080
    assert ("libstdc++6", "14.2.0-19", "amd64") not in got  # the index has another version


# ------------------------------------------------------------------------------------------------ licences


def test_license_choices_spdx_where_known_names_otherwise():
    got = sbom.license_choices(["GPL-2+", "Expat", "BSD-3-clause", "BSD-3-Clause", "public-domain",
                                "GPL-1+ or Artistic", "GPL-2+"])
    assert [c["license"].get("id") or c["license"]["name"] for c in got] == [
        "GPL-2.0-or-later", "MIT", "BSD-3-Clause", "public-domain", "GPL-1+ or Artistic"]
    assert all(c["license"]["acknowledgement"] == "declared" for c in got)


def test_every_mapped_spdx_id_is_a_valid_spdx_id():
    known = spdx_ids()
    assert not {v for v in sbom.SPDX_IDS.values() if v not in known}
    assert all(k == k.lower() for k in sbom.SPDX_IDS)


# ------------------------------------------------------------------------------------------------ CycloneDX


def test_cyclonedx_document_validates_and_says_what_it_knows():
    bom = make_bom()
    assert validation_errors(bom) == []
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", bom["serialNumber"])
    assert bom["serialNumber"] == make_bom()["serialNumber"]  # follows from the image digest
    image = bom["metadata"]["component"]
    assert image["hashes"] == [{"alg": "SHA-256", "content": IMAGE_SHA}] and image["name"] == "cloud-gpu-worker"
    assert bom["metadata"]["tools"]["components"][0] == {"type": "application", "name": "builder", "version": "0.1.0"}
    names = [c["name"] for c in bom["components"]]
    assert "linux-image-6.12.90+deb13-amd64" not in names  # config files only: not installed
    ssh = component(bom, "openssh-server")
    assert ssh["purl"] == ssh["bom-ref"] == "pkg:deb/debian/openssh-server@1%3A10.0p1-7?arch=amd64&distro=debian-13"
    assert ssh["hashes"] == [{"alg": "SHA-256", "content": td.SHA["openssh-server"]}]
    assert prop(ssh, "deb:source") == "openssh" and prop(ssh, "deb:architecture") == "amd64"
    assert prop(ssh, "deb:filename") == "pool/main/o/openssh/openssh-server_10.0p1-7_amd64.deb"
    assert prop(ssh, "deb:sha256-from") == "debian/dists/trixie/main/binary-amd64/Packages.xz"
    assert {c["license"].get("id") or c["license"]["name"] for c in ssh["licenses"]} == {
        "OpenSSH", "BSD-3-Clause", "MIT"}
    bash = component(bom, "bash")
    assert prop(bash, "deb:source-version") == "5.2.37-2"
    assert bash["externalReferences"] == [{"type": "website", "url": "https://www.gnu.org/software/bash/"}]
    # what is not known is said, not guessed
    stdcxx = component(bom, "libstdc++6")
    assert "hashes" not in stdcxx and prop(stdcxx, "deb:sha256").startswith("unknown")
    assert "licenses" not in stdcxx and prop(stdcxx, "deb:license") == sbom.UNKNOWN_LICENSE  # no DEP-5 file
    assert prop(ssh, "deb:license") is None
    gsp = component(bom, "firmware-nvidia-gsp")
    assert "hashes" not in gsp and "licenses" not in gsp
    meta = {p["name"]: p["value"] for p in bom["metadata"]["properties"]}
    assert meta["builder:packages"] == "8" and meta["builder:packages-with-sha256"] == "5"
    assert meta["builder:debian:suite"] == "trixie"


def test_cyclonedx_nvidia_driver_and_modules():
    bom = make_bom()
    driver = component(bom, "nvidia-driver")
    assert driver["type"] == "device-driver" and driver["version"] == "550.163.01"
    assert prop(driver, "driver:dkms-module") == "nvidia-current"
    assert prop(driver, "driver:source-package") == "nvidia-kernel-dkms"
    assert prop(driver, "driver:source-purl") == sbom.purl("nvidia-kernel-dkms", "550.163.01-2", "amd64")
    mods = {m["name"]: m for m in driver["components"]}
    assert set(mods) == {"nvidia", "nvidia_uvm"}
    nv = mods["nvidia"]
    assert nv["type"] == "device-driver" and nv["hashes"][0]["content"] == "a1" * 32
    assert prop(nv, "module:kernel") == td.KERNEL and prop(nv, "module:built-by") == "dkms"
    assert prop(nv, "module:dkms-status") == "installed"
    assert prop(nv, "module:built-from") == "nvidia-kernel-dkms 550.163.01-2"
    assert prop(nv, "module:kernel-headers") == f"linux-headers-{td.KERNEL} 6.12.94-1"
    assert prop(nv, "module:signer") == "unsigned"
    assert nv["licenses"] == [{"license": {"name": "NVIDIA", "acknowledgement": "declared"}}]
    deps = {d["ref"]: d["dependsOn"] for d in bom["dependencies"]}
    assert driver["bom-ref"] in deps["image:cloud-gpu-worker.qcow2"]
    assert set(deps[driver["bom-ref"]]) == {nv["bom-ref"], mods["nvidia_uvm"]["bom-ref"],
                                            sbom.purl("nvidia-kernel-dkms", "550.163.01-2", "amd64")}
    refs = {c["bom-ref"] for c in bom["components"]} | {m["bom-ref"] for m in driver["components"]}
    refs.add(bom["metadata"]["component"]["bom-ref"])
    assert all(r in refs for d in bom["dependencies"] for r in [d["ref"], *d["dependsOn"]])


def test_cyclonedx_library_reads_the_document_back():
    bom = Bom.from_json(make_bom())  # the library's own model: refs, enums, purls all parse
    assert len(bom.components) == 9
    ssh = next(c for c in bom.components if c.name == "openssh-server")
    assert ssh.purl.version == "1:10.0p1-7"
    bom.validate()  # dependency refs all resolve


def test_cyclonedx_without_guest_facts():
    """An image without the guest's licences or NVIDIA modules (provisioning off, collection failed)."""
    bom = make_bom(licenses=None, modules=(), dkms=(), digests={})
    assert validation_errors(bom) == []
    ssh = component(bom, "openssh-server")
    assert prop(ssh, "deb:license") == sbom.NOT_COLLECTED_LICENSE and prop(ssh, "deb:sha256").startswith("unknown")
    assert not [c for c in bom["components"] if c["type"] == "device-driver"]


def test_modules_without_dkms_record_still_listed():
    bom = make_bom(dkms=())
    assert validation_errors(bom) == []
    driver = component(bom, "nvidia-driver")
    assert driver["version"] == "550.163.01" and len(driver["components"]) == 2
    assert prop(driver["components"][0], "module:built-by").startswith("unknown")


def test_validator_rejects_a_broken_document():
    """The check the tests rely on does check: a made-up SPDX id and a bad hash are refused."""
    bom = make_bom()
    component(bom, "adduser")["licenses"] = [{"license": {"id": "GPL-2+"}}]
    component(bom, "bash")["hashes"] = [{"alg": "SHA-256", "content": "not-hex"}]
    assert len(validation_errors(bom)) >= 2


# ------------------------------------------------------------------------------------------------ provenance


def test_provenance_statement_structure():
    deps = [sbom.resource("images/cloud-gpu-worker.yaml", "11" * 32, uri="file:///src/images/cloud-gpu-worker.yaml",
                          kind="image-definition"),
            sbom.resource("debian/dists/trixie/InRelease", "22" * 32, uri="http://127.0.0.1:9/debian/dists/trixie/"
                          "InRelease", kind="inrelease", verified=True)]
    st = sbom.provenance(subject_name="cloud-gpu-worker.qcow2", subject_sha256=IMAGE_SHA, dependencies=deps,
                         external_parameters={"config": {"name": "cloud-gpu-worker"}},
                         internal_parameters={"accel": "tcg"}, builder_version={"builder": "0.1.0"},
                         started="2026-12-02T00:30:00Z", finished="2026-12-02T01:37:20Z", invocation_id="w1",
                         byproducts=[sbom.resource("cloud-gpu-worker.cdx.json", "33" * 32,
                                                   media_type="application/vnd.cyclonedx+json")])
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    assert st["subject"] == [{"name": "cloud-gpu-worker.qcow2", "digest": {"sha256": IMAGE_SHA}}]
    bd, rd = st["predicate"]["buildDefinition"], st["predicate"]["runDetails"]
    assert bd["buildType"].startswith("urn:") and bd["externalParameters"]["config"]["name"] == "cloud-gpu-worker"
    assert bd["resolvedDependencies"][1] == {
        "name": "debian/dists/trixie/InRelease", "digest": {"sha256": "22" * 32},
        "uri": "http://127.0.0.1:9/debian/dists/trixie/InRelease", "annotations": {"kind": "inrelease",
                                                                                     "verified": True}}
    assert rd["builder"] == {"id": sbom.BUILDER_ID, "version": {"builder": "0.1.0"}}
    assert rd["metadata"] == {"startedOn": "2026-12-02T00:30:00Z", "finishedOn": "2026-12-02T01:37:20Z",
                              "invocationId": "w1"}
    assert rd["byproducts"][0]["mediaType"] == "application/vnd.cyclonedx+json"
    json.dumps(st)  # plain JSON


def test_resource_leaves_out_empty_annotations():
    assert sbom.resource("x", "00" * 32, kind="role", role="") == {
        "name": "x", "digest": {"sha256": "00" * 32}, "annotations": {"kind": "role"}}
