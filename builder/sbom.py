"""The SBOM (CycloneDX 1.6 JSON) and the provenance (an in-toto Statement v1 with a SLSA provenance v1
predicate) of an image, as plain dicts. Pure functions: everything they say comes in as arguments
(:mod:`builder.attest` gathers it from the build).

What the guest said (``dpkg-query``, :mod:`builder.guestfacts`) is parsed here too, and so are the verified
Packages indexes the digests of the installed ``.deb`` files come from: dpkg's database has no hash of the
package file it installed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .archive.packages import iter_stanzas

SPEC_VERSION = "1.6"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:builder:build-type:debian-qcow2:v1"
BUILDER_ID = "urn:builder:local-qemu"
PROP = "builder"  # the namespace of this builder's CycloneDX properties ("builder:deb:source", …)
# dpkg-query's format for packages.tsv: one installed (or remembered) package per line
DPKG_FIELDS = ("Package", "Version", "Architecture", "source:Package", "source:Version", "db:Status-Abbrev",
               "Homepage")
DPKG_FORMAT = "\\t".join(f"${{{f}}}" for f in DPKG_FIELDS) + "\\n"
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]")
_HOMEPAGE_RE = re.compile(r"https?://[^\s<>\"{}|\\^`]+")

# Debian's short licence names (DEP-5, /usr/share/common-licenses) → SPDX identifiers, where the two name the
# same licence. Any other name is kept as a name: right, if less machine-friendly.
SPDX_IDS = {
    "0bsd": "0BSD", "agpl-3": "AGPL-3.0-only", "agpl-3+": "AGPL-3.0-or-later", "apache-1.1": "Apache-1.1",
    "apache-2": "Apache-2.0", "apache-2.0": "Apache-2.0", "artistic": "Artistic-1.0-Perl",
    "artistic-2.0": "Artistic-2.0", "beerware": "Beerware", "boost-1.0": "BSL-1.0", "bsl-1.0": "BSL-1.0",
    "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause", "bsd-4-clause": "BSD-4-Clause",
    "bzip2-1.0.6": "bzip2-1.0.6", "cc-by-3.0": "CC-BY-3.0", "cc-by-4.0": "CC-BY-4.0",
    "cc-by-sa-3.0": "CC-BY-SA-3.0", "cc-by-sa-4.0": "CC-BY-SA-4.0", "cc0-1.0": "CC0-1.0", "cddl-1.0": "CDDL-1.0",
    "curl": "curl", "epl-1.0": "EPL-1.0", "epl-2.0": "EPL-2.0", "expat": "MIT", "fsfap": "FSFAP",
    "fsful": "FSFUL", "fsfullr": "FSFULLR", "ftl": "FTL", "gfdl-1.2": "GFDL-1.2-only",
    "gfdl-1.2+": "GFDL-1.2-or-later", "gfdl-1.3": "GFDL-1.3-only", "gfdl-1.3+": "GFDL-1.3-or-later",
    "gfdl-niv-1.3": "GFDL-1.3-no-invariants-only", "gfdl-niv-1.3+": "GFDL-1.3-no-invariants-or-later",
    "gpl-1": "GPL-1.0-only", "gpl-1+": "GPL-1.0-or-later", "gpl-2": "GPL-2.0-only", "gpl-2+": "GPL-2.0-or-later",
    "gpl-2.0": "GPL-2.0-only", "gpl-2.0+": "GPL-2.0-or-later", "gpl-2.0-only": "GPL-2.0-only",
    "gpl-2.0-or-later": "GPL-2.0-or-later", "gpl-3": "GPL-3.0-only", "gpl-3+": "GPL-3.0-or-later",
    "gpl-3.0": "GPL-3.0-only", "gpl-3.0+": "GPL-3.0-or-later", "gpl-3.0-only": "GPL-3.0-only",
    "gpl-3.0-or-later": "GPL-3.0-or-later", "ijg": "IJG", "isc": "ISC", "latex2e": "Latex2e",
    "lgpl-2": "LGPL-2.0-only", "lgpl-2+": "LGPL-2.0-or-later", "lgpl-2.0": "LGPL-2.0-only",
    "lgpl-2.0+": "LGPL-2.0-or-later", "lgpl-2.1": "LGPL-2.1-only", "lgpl-2.1+": "LGPL-2.1-or-later",
    "lgpl-3": "LGPL-3.0-only", "lgpl-3+": "LGPL-3.0-or-later", "libpng": "Libpng", "libpng-2.0": "libpng-2.0",
    "lppl-1.3c": "LPPL-1.3c", "mit": "MIT", "mit-0": "MIT-0", "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0",
    "ntp": "NTP", "ofl-1.1": "OFL-1.1", "openssl": "OpenSSL", "postgresql": "PostgreSQL", "psf-2": "PSF-2.0",
    "python-2.0": "Python-2.0", "ruby": "Ruby", "sleepycat": "Sleepycat", "sunpro": "SunPro",
    "unicode-3.0": "Unicode-3.0", "unicode-dfs-2016": "Unicode-DFS-2016", "unlicense": "Unlicense",
    "vim": "Vim", "wtfpl": "WTFPL", "x11": "X11", "zlib": "Zlib", "zpl-2.1": "ZPL-2.1",
}


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class InstalledPackage:
    """One line of packages.tsv (dpkg-query with :data:`DPKG_FORMAT`)."""

    name: str
    version: str
    arch: str
    source: str = ""
    source_version: str = ""
    status: str = "ii "  # dpkg's db:Status-Abbrev: wanted, current state, error flag
    homepage: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.arch)

    @property
    def installed(self) -> bool:
        """Unpacked on the system (not merely remembered: ``rc`` = config files only, ``pn`` = purged)."""
        return len(self.status) > 1 and self.status[1] not in "nc"


def parse_packages_tsv(text: str) -> list[InstalledPackage]:
    """packages.tsv → packages; short lines (an older format) are padded, the source defaults to the name."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3:
            cols = line.split()  # "name version" of packages.txt
        cols += [""] * (len(DPKG_FIELDS) - len(cols))
        name, version, arch, source, source_version, status, homepage = cols[:len(DPKG_FIELDS)]
        source = source.split(" ", 1)[0] or name
        out.append(InstalledPackage(name, version, arch, source, source_version or version, status or "ii ",
                                    homepage.strip()))
    return out


def packages_txt(packages: Iterable[InstalledPackage]) -> str:
    """packages.txt as it always was: ``name version`` per line."""
    return "".join(f"{p.name} {p.version}\n" for p in packages)


def parse_licenses_tsv(text: str) -> dict[str, tuple[str, ...]]:
    """licenses.tsv (``package<TAB>licence<TAB>licence…``) → package → licences."""
    out: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        name, *lics = line.split("\t")
        lics = [x for x in lics if x.strip()]
        if name.strip() and lics:
            out[name.strip()] = tuple(lics)
    return out


def licenses_tsv(licenses: Mapping[str, Sequence[str]]) -> str:
    return "".join("\t".join([name, *lics]) + "\n" for name, lics in sorted(licenses.items()) if lics)


@dataclass(frozen=True)
class DebDigest:
    """A package file as a verified Packages index lists it, or as the package lock in force pins it."""

    sha256: str
    filename: str
    size: int
    index: str  # the index that vouches for it, e.g. debian/dists/trixie/main/binary-amd64/Packages.xz
    # from a package lock: the Release date of ``index`` (its signed InRelease) when the lock pinned the file, and
    # the lock's file name; the lock records which signed Release listed the file, not which Packages file
    date: str = ""
    pinned_by: str = ""


def index_digests(index: bytes | str, wanted: Iterable[tuple[str, str, str]], *,
                  index_name: str) -> dict[tuple[str, str, str], DebDigest]:
    """The (name, version, arch) of ``wanted`` that the Packages index lists, with the file's digest."""
    want = set(wanted)
    out: dict[tuple[str, str, str], DebDigest] = {}
    for st in iter_stanzas(index, source=index_name):
        key = (st.get("Package", ""), st.get("Version", ""), st.get("Architecture", ""))
        if key in want and "SHA256" in st and key not in out:
            try:
                size = int(st.get("Size", "0"))
            except ValueError:
                size = 0
            out[key] = DebDigest(st["SHA256"].lower(), st.get("Filename", ""), size, index_name)
    return out


# ------------------------------------------------------------------------------------------------ helpers


def pct(value: str) -> str:
    """Percent-encode everything but RFC 3986's unreserved characters (``1:2.3+b1`` → ``1%3A2.3%2Bb1``)."""
    return "".join(c if _UNRESERVED.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in value)


def purl(name: str, version: str, arch: str, *, distro: str = "debian-13") -> str:
    """The package URL of a Debian binary package: ``pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=DISTRO``
    (an unknown architecture: no ``arch``)."""
    quals = "&".join(f"{k}={pct(v)}" for k, v in (("arch", arch), ("distro", distro)) if v)
    return f"pkg:deb/debian/{pct(name)}@{pct(version)}" + (f"?{quals}" if quals else "")


def spdx_id(name: str) -> str | None:
    """The SPDX identifier of a Debian licence short name, when there is one."""
    return SPDX_IDS.get(name.strip().lower())


def license_choices(names: Iterable[str]) -> list[dict[str, Any]]:
    """CycloneDX ``licenses`` for DEP-5 short names: an SPDX ``id`` where one matches, else the ``name`` as
    Debian wrote it (expressions like ``GPL-1+ or Artistic`` too: a licence array may not mix in an
    ``expression``). Each once."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name in names:
        ident = spdx_id(name)
        lic = {"id": ident} if ident else {"name": name}
        key = ident or name
        if key not in seen:
            seen.add(key)
            out.append({"license": {**lic, "acknowledgement": "declared"}})
    return out


def _props(**kv: Any) -> list[dict[str, str]]:
    """CycloneDX properties named ``builder:<key>`` (``_`` → ``-``, ``__`` → ``:``), empty values left out."""
    return [{"name": f"{PROP}:{k.replace('__', ':').replace('_', '-')}", "value": str(v)}
            for k, v in kv.items() if v not in (None, "")]


def sha256_hashes(sha256: str | None) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": sha256}] if sha256 else []


# ------------------------------------------------------------------------------------------------ CycloneDX


UNKNOWN_SHA256 = ("unknown: this version is in none of the verified Packages indexes the build's gateway knows "
                  "(installed from an older index, or from a repository the gateway does not serve)")
UNKNOWN_SHA256_LOCKED = ("unknown: the package lock does not pin this version and no verified Packages index the "
                         "build's gateway knows lists it (a package from outside the Debian archive, such as "
                         "NVIDIA's repository)")
UNKNOWN_LICENSE = ("unknown: /usr/share/doc/<package>/copyright is missing or not in the machine-readable (DEP-5) "
                   "format")
NOT_COLLECTED_LICENSE = "unknown: the licences were not collected in the guest"


def package_component(pkg: InstalledPackage, *, distro: str, licenses: Sequence[str] | None,
                      digest: DebDigest | None, license_note: str = UNKNOWN_LICENSE,
                      sha256_note: str = UNKNOWN_SHA256) -> dict[str, Any]:
    """One Debian package as a CycloneDX component (``bom-ref`` = its purl); ``licenses`` None: unknown, and
    ``license_note`` says why; ``digest`` None: the .deb's sha256 is unknown, and ``sha256_note`` says why."""
    ref = purl(pkg.name, pkg.version, pkg.arch, distro=distro)
    comp: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": pkg.name, "version": pkg.version,
                            "purl": ref}
    if digest is not None:
        comp["hashes"] = sha256_hashes(digest.sha256)
    if licenses:
        comp["licenses"] = license_choices(licenses)
    if pkg.homepage and _HOMEPAGE_RE.fullmatch(pkg.homepage):
        comp["externalReferences"] = [{"type": "website", "url": pkg.homepage}]
    props = _props(deb__architecture=pkg.arch, deb__source=pkg.source,
                   deb__source_version=pkg.source_version if pkg.source_version != pkg.version else "",
                   deb__status=pkg.status.strip() if not pkg.status.startswith("ii") else "")
    if digest is not None:
        props += _props(deb__filename=digest.filename, deb__size=digest.size or "", deb__sha256_from=digest.index,
                        deb__index_date=digest.date, deb__pinned_by=digest.pinned_by)
    else:
        props += _props(deb__sha256=sha256_note)
    if not licenses:
        props += _props(deb__license=license_note)
    comp["properties"] = props
    return comp


def module_component(mod: Mapping[str, str], dkms_rec: Mapping[str, str] | None, *, built_from: str,
                     headers: InstalledPackage | None) -> dict[str, Any]:
    """One kernel module file (of one kernel) as a CycloneDX device-driver component."""
    kernel = mod.get("kernel", "")
    comp: dict[str, Any] = {
        "type": "device-driver", "bom-ref": f"kernel-module:{kernel}:{mod.get('name', '')}",
        "name": mod.get("name", ""), "version": mod.get("version", ""),
        "description": mod.get("description", "") or "NVIDIA kernel module",
    }
    if mod.get("sha256"):
        comp["hashes"] = sha256_hashes(mod["sha256"])
    if mod.get("license"):
        comp["licenses"] = [{"license": {"name": mod["license"], "acknowledgement": "declared"}}]
    comp["properties"] = _props(
        module__kernel=kernel, module__file=mod.get("path", ""), module__vermagic=mod.get("vermagic", ""),
        module__srcversion=mod.get("srcversion", ""), module__signer=mod.get("signer", "") or "unsigned",
        module__sig_hashalgo=mod.get("sig_hashalgo", ""), module__sig_key=mod.get("sig_key", ""),
        module__built_by="dkms" if dkms_rec else "unknown (no DKMS record for this kernel)",
        module__dkms_status=dkms_rec.get("status", "") if dkms_rec else "",
        module__built_from=built_from,
        module__kernel_headers=f"{headers.name} {headers.version}" if headers else "",
    )
    return comp


def nvidia_components(modules: Sequence[Mapping[str, str]], dkms: Sequence[Mapping[str, str]],
                      packages: Sequence[InstalledPackage], *, distro: str) -> list[dict[str, Any]]:
    """The NVIDIA driver, one component per DKMS module version (or per module version when DKMS kept no
    record), with its kernel modules (one per module file and kernel) nested inside; from
    :mod:`builder.guestfacts`."""
    installed = {p.name: p for p in packages if p.installed}
    recs: dict[tuple[str, str], list[Mapping[str, str]]] = {}
    for rec in dkms:
        if rec.get("module", "").startswith("nvidia") and rec.get("version"):
            recs.setdefault((rec["module"], rec["version"]), []).append(rec)
    mods: dict[tuple[str, str], list[Mapping[str, str]]] = {key: [] for key in recs}
    for mod in modules:
        ver = mod.get("version", "")
        key = next((k for k in recs if k[1] == ver), ("", ver))
        mods.setdefault(key, []).append(mod)
    out = []
    for (dkms_name, ver), files in mods.items():
        records = recs.get((dkms_name, ver), [])
        src_name = next((r["source_package"] for r in records if r.get("source_package")), "")
        src = installed.get(src_name)
        built_from = f"{src.name} {src.version}" if src else src_name
        nested = [module_component(m, next((r for r in records if r.get("kernel") == m.get("kernel")), None),
                                   built_from=built_from, headers=installed.get(f"linux-headers-{m.get('kernel')}"))
                  for m in files]
        driver: dict[str, Any] = {
            "type": "device-driver", "bom-ref": f"nvidia-driver:{dkms_name or 'nvidia'}@{ver}",
            "name": "nvidia-driver", "version": ver, "supplier": {"name": "NVIDIA Corporation"},
            "description": "NVIDIA GPU driver: kernel modules built in the build VM from the DKMS source package",
            "properties": _props(
                driver__dkms_module=dkms_name, driver__source_package=src_name,
                driver__source_package_version=src.version if src else "",
                driver__source_purl=purl(src.name, src.version, src.arch, distro=distro) if src else "",
                driver__kernels=" ".join(sorted({m.get("kernel", "") for m in files}))),
        }
        if nested:
            driver["components"] = nested
        out.append(driver)
    return out


def cyclonedx(*, image_name: str, image_file: str, image_sha256: str, packages: Sequence[InstalledPackage],
              licenses: Mapping[str, Sequence[str]] | None, digests: Mapping[tuple[str, str, str], DebDigest],
              modules: Sequence[Mapping[str, str]] = (), dkms: Sequence[Mapping[str, str]] = (),
              builder_version: str, timestamp: str, description: str = "", distro: str = "debian-13",
              properties: Mapping[str, Any] | None = None, sha256_note: str = UNKNOWN_SHA256) -> dict[str, Any]:
    """The image's CycloneDX 1.6 BOM: the qcow2 as the described component, every installed Debian package
    (purl, version, sha256 of its .deb when a verified index lists it or the package lock pins it, declared
    licences), the NVIDIA driver and its modules. ``licenses`` None: not collected at all (each package then
    says so); ``sha256_note``: what a package without a digest says of its sha256."""
    image_ref = f"image:{image_file}"
    comps: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in packages:
        if not p.installed:
            continue
        comp = package_component(p, distro=distro, licenses=licenses.get(p.name) if licenses is not None else None,
                                 digest=digests.get(p.key), sha256_note=sha256_note,
                                 license_note=UNKNOWN_LICENSE if licenses is not None else NOT_COLLECTED_LICENSE)
        if comp["bom-ref"] not in seen:  # dpkg lists a package once per architecture: never twice the same
            seen.add(comp["bom-ref"])
            comps.append(comp)
    nvidia = nvidia_components(modules, dkms, packages, distro=distro)
    with_hash = sum(1 for c in comps if c.get("hashes"))
    with_lic = sum(1 for c in comps if c.get("licenses"))
    meta_props = _props(**{k: v for k, v in (properties or {}).items()},
                        packages=len(comps), packages_with_sha256=with_hash, packages_with_license=with_lic)
    bom: dict[str, Any] = {
        "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION,
        # one BOM per image: the serial follows from the image's digest
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'urn:builder:sbom:sha256:{image_sha256}')}",
        "version": 1,
        "metadata": {
            "timestamp": timestamp,
            "tools": {"components": [{"type": "application", "name": "builder", "version": builder_version}]},
            "component": {"type": "operating-system", "bom-ref": image_ref, "name": image_name,
                          "description": description or f"{image_name} disk image ({image_file})",
                          "hashes": sha256_hashes(image_sha256),
                          "properties": _props(image__file=image_file, image__format="qcow2")},
            "properties": meta_props,
        },
        "components": comps + nvidia,
        "dependencies": [{"ref": image_ref, "dependsOn": [c["bom-ref"] for c in comps + nvidia]}],
    }
    for drv in nvidia:
        deps = [m["bom-ref"] for m in drv.get("components", [])]
        src = next((p["value"] for p in drv["properties"] if p["name"] == f"{PROP}:driver:source-purl"), None)
        if src in seen:
            deps.append(src)
        bom["dependencies"].append({"ref": drv["bom-ref"], "dependsOn": deps})
    return bom


# ------------------------------------------------------------------------------------------------ provenance


def resource(name: str, sha256: str, *, uri: str = "", media_type: str = "", **annotations: Any) -> dict[str, Any]:
    """An in-toto ResourceDescriptor with a sha256 digest (annotations with an empty value left out)."""
    desc: dict[str, Any] = {"name": name, "digest": {"sha256": sha256}}
    if uri:
        desc["uri"] = uri
    if media_type:
        desc["mediaType"] = media_type
    ann = {k: v for k, v in annotations.items() if v not in (None, "")}
    if ann:
        desc["annotations"] = ann
    return desc


def provenance(*, subject_name: str, subject_sha256: str, dependencies: Sequence[Mapping[str, Any]],
               external_parameters: Mapping[str, Any], internal_parameters: Mapping[str, Any],
               builder_version: Mapping[str, str], started: str, finished: str, invocation_id: str = "",
               byproducts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The in-toto Statement v1 whose SLSA provenance v1 predicate says how ``subject_name`` was made: from
    ``dependencies`` (each with its sha256), with ``external_parameters`` (the effective image definition),
    by this builder, between ``started`` and ``finished``."""
    meta: dict[str, Any] = {"startedOn": started, "finishedOn": finished}
    if invocation_id:
        meta["invocationId"] = invocation_id
    run: dict[str, Any] = {"builder": {"id": BUILDER_ID, "version": dict(builder_version)}, "metadata": meta}
    if byproducts:
        run["byproducts"] = [dict(b) for b in byproducts]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": subject_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": dict(external_parameters),
                "internalParameters": dict(internal_parameters),
                "resolvedDependencies": [dict(d) for d in dependencies],
            },
            "runDetails": run,
        },
    }


__all__ = ["DPKG_FORMAT", "DebDigest", "InstalledPackage", "cyclonedx", "index_digests", "license_choices",
           "packages_txt", "parse_licenses_tsv", "parse_packages_tsv", "provenance", "purl", "resource"]
