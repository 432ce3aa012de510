"""The SBOM and provenance of a build, gathered and written (the I/O around :mod:`builder.sbom`).

Sources, all recorded by the stages before ``publish``:

* the work directory: ``packages.tsv`` (dpkg-query), ``licenses.tsv`` and ``kernel-modules.json``
  (:mod:`builder.guestfacts`), written by ``provision``;
* the package lock in force (``debian.package_lock``): each locked ``.deb``'s sha256, which ``fetch`` checked
  every locked file against, and the signed Release that listed it when it was locked. Under a lock the gateway
  answers the target's ``dists/`` from its own builder-signed view and verifies no upstream Release, so the
  lock is where the digests are;
* the gateway: the InRelease files it passed on and the Releases that verified, whose Packages indexes give
  each installed ``.deb``'s sha256 not locked (from the content cache, where the gateway stored them by that
  hash; an index apt did not fetch whole, e.g. one it patched with pdiffs, is fetched through the gateway and
  checked the same way);
* the installer inputs of ``fetch`` (the lock's pins: netboot, boot loaders, udeb index, overrides) and the
  image definition's files (definition, locks and the signed files stored with the installer lock, playbooks,
  roles, preseed templates, keyring), hashed here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import platform
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, sbom
from .archive.cache import ContentCache, sha256_file
from .archive.release import FileEntry
from .errors import BuilderError

if TYPE_CHECKING:
    from .config import ImageConfig
    from .context import BuildContext
    from .gateway.server import Gateway
    from .pkglock import PackageLock
    from .stages.fetch import InstallerInputs

log = logging.getLogger(__name__)

PACKAGES_TSV = "packages.tsv"
LICENSES_TSV = "licenses.tsv"
MODULES_JSON = "kernel-modules.json"
_INDEX_RE = re.compile(r"(?P<dir>(?P<comp>[^/]+)/binary-(?P<arch>[^/]+))/Packages(?P<ext>\.xz|\.gz|)")
_EXT_ORDER = {".xz": 0, ".gz": 1, "": 2}
_SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache"}


def sbom_name(image_name: str) -> str:
    return f"{image_name}.cdx.json"


def provenance_name(image_name: str) -> str:
    return f"{image_name}.provenance.json"


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ------------------------------------------------------------------------------------------------ the guest


def read_guest(workdir: Path) -> tuple[list[sbom.InstalledPackage], dict[str, tuple[str, ...]] | None,
                                       list[dict[str, str]], list[dict[str, str]]]:
    """packages, licences (None: not collected), NVIDIA modules and DKMS records from the work directory."""
    tsv, txt = workdir / PACKAGES_TSV, workdir / "packages.txt"
    text = tsv.read_text() if tsv.is_file() else txt.read_text() if txt.is_file() else ""
    packages = sbom.parse_packages_tsv(text)
    lic = workdir / LICENSES_TSV
    licenses = sbom.parse_licenses_tsv(lic.read_text()) if lic.is_file() else None
    modules: list[dict[str, str]] = []
    dkms: list[dict[str, str]] = []
    mod = workdir / MODULES_JSON
    if mod.is_file():
        try:
            data = json.loads(mod.read_text())
            modules, dkms = list(data.get("modules", [])), list(data.get("dkms", []))
        except (ValueError, AttributeError) as exc:
            log.warning("%s: unreadable (%s): no NVIDIA module in the SBOM", mod, exc)
    return packages, licenses, modules, dkms


# ------------------------------------------------------------------------------------------------ .deb digests


def _decompress(data: bytes, path: str) -> bytes:
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    return data


@dataclass
class Digests:
    """The .deb digests found, and the indexes (as provenance resources) they came from."""

    debs: dict[tuple[str, str, str], sbom.DebDigest] = field(default_factory=dict)
    indexes: list[dict[str, Any]] = field(default_factory=list)


def package_digests(gateway: Gateway | None, cache: ContentCache, wanted: Iterable[tuple[str, str, str]], *,
                    components: Sequence[str], arch: str, fetch: bool = True) -> Digests:
    """The sha256 of every wanted (name, version, arch) that a Packages index of a Release the gateway verified
    lists. Indexes come from the content cache (stored there by their hash); with ``fetch`` one not cached is
    fetched through the gateway, which checks it against its Release. An index that cannot be had is skipped."""
    out = Digests()
    todo = set(wanted)
    if gateway is None:
        return out
    for (prefix, suite), rel in sorted(gateway.verified_releases().items()):
        dirs: dict[str, list[tuple[int, FileEntry]]] = {}
        for path, ent in rel.files.items():
            m = _INDEX_RE.fullmatch(path)
            if m and m["comp"] in components and m["arch"] == arch:
                dirs.setdefault(m["dir"], []).append((_EXT_ORDER[m["ext"]], ent))
        for _, variants in sorted(dirs.items()):
            if not todo:
                return out
            ents = [e for _, e in sorted(variants, key=lambda v: v[0])]  # .xz, .gz, plain
            hit = next(((e, p) for e in ents if (p := cache.get(e.sha256, e.size)) is not None), None)
            if hit is None and fetch and not gateway.offline:
                ent = ents[0]
                try:
                    gateway.resolve(f"/{prefix}/dists/{suite}/{ent.path}")
                except BuilderError as exc:
                    log.warning("the SBOM's .deb digests: %s/dists/%s/%s not fetched: %s", prefix, suite, ent.path,
                                exc)
                blob = cache.get(ent.sha256, ent.size)
                hit = (ent, blob) if blob is not None else None
            if hit is None:
                continue
            ent, blob_path = hit
            name = f"{prefix}/dists/{suite}/{ent.path}"
            try:
                data = _decompress(blob_path.read_bytes(), ent.path)
            except (OSError, lzma.LZMAError, gzip.BadGzipFile, EOFError) as exc:
                log.warning("the SBOM's .deb digests: %s unreadable: %s", name, exc)
                continue
            found = sbom.index_digests(data, todo, index_name=name)
            out.debs.update(found)
            todo -= found.keys()
            out.indexes.append(sbom.resource(name, ent.sha256, uri=gateway.upstream_url(name), kind="packages-index",
                                             packages=len(found)))
    return out


def lock_digests(lock: PackageLock, wanted: Iterable[tuple[str, str, str]], *, lock_name: str,
                 mirrors: Mapping[str, str]) -> Digests:
    """The sha256 of every wanted (name, version, arch) the package lock pins: ``fetch`` checked each locked file
    against it before any VM started, and the target's view lists only those files, so it is the sha256 of the
    .deb installed. Each digest names the signed Release (InRelease) that listed the file when it was locked
    and that Release's date; the indexes are every signed Release the lock names, by its InRelease's sha256, with
    how many of the wanted packages it vouches for (pins of the same date: a pin kept from an older lock was
    listed by an earlier InRelease of its suite, which the lock no longer records)."""
    pins = {(p.name, p.version, p.architecture): p for p in lock.packages}
    out = Digests()
    for key in dict.fromkeys(wanted):
        pin = pins.get(key)
        if pin is not None:
            out.debs[key] = sbom.DebDigest(pin.sha256, pin.filename, pin.size,
                                           f"{pin.archive}/dists/{pin.suite}/InRelease", date=pin.date,
                                           pinned_by=lock_name)
    vouched = Counter((pins[k].archive, pins[k].suite, pins[k].date) for k in out.debs)
    for ix in lock.indexes:
        name = f"{ix.archive}/dists/{ix.suite}/InRelease"
        mirror = mirrors.get(ix.archive, "")
        out.indexes.append(sbom.resource(name, ix.inrelease_sha256, uri=f"{mirror}/dists/{ix.suite}/InRelease"
                                         if mirror else "", kind="inrelease", package_lock=lock_name,
                                         release_date=ix.date, packages=vouched[(ix.archive, ix.suite, ix.date)]))
    return out


def lock_in_force(ctx: BuildContext, inputs: InstallerInputs | None) -> PackageLock | None:
    """The package lock the build installed from: fetch's (``inputs``), else the one the services serve, else,
    when the manifest records one, the lock file, if its pins are still the ones the build used."""
    if inputs is not None:
        return inputs.target.lock if inputs.target is not None else None
    if ctx.services is not None and ctx.services.package_lock is not None:
        return ctx.services.package_lock
    recorded = ctx.manifest.get("package_lock")
    if not isinstance(recorded, Mapping) or not recorded.get("digest"):
        return None
    from .pkglock import read_package_lock

    path = ctx.config.package_lock_path
    try:
        lock = read_package_lock(path)
    except BuilderError as exc:
        log.warning("the SBOM's .deb digests: the build's package lock is unreadable now (%s): none from it", exc)
        return None
    if lock.digest() != recorded["digest"]:
        log.warning("the SBOM's .deb digests: %s pins other files than when the build used it: none from it",
                    path)
        return None
    return lock


# ------------------------------------------------------------------------------------------------ inputs


def _display(path: Path, bases: tuple[Path, ...]) -> str:
    """``path`` relative to the first of ``bases`` (resolved directories) that holds it, else as it is."""
    resolved = path.resolve()
    for base in bases:
        if resolved.is_relative_to(base):
            return str(resolved.relative_to(base))
    return str(path)


def _name_bases(root: Path) -> tuple[Path, ...]:
    """What the definition's files are named relative to: builder's own data root first (the source tree, or
    ``builder/data`` when installed as a package, so its files read ``playbooks/finalize.yml`` either way), then
    the definition's project root."""
    from .config import builtin_dir

    own = builtin_dir("roles")
    return tuple(dict.fromkeys(p.resolve() for p in ([own.parent] if own else []) + [root]))


def file_resource(path: Path, kind: str, bases: tuple[Path, ...], **annotations: Any) -> dict[str, Any]:
    return sbom.resource(_display(path, bases), sha256_file(path), uri=path.resolve().as_uri(), kind=kind,
                         **annotations)


def tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (no caches, no VCS), sorted."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def lock_files(cfg: ImageConfig) -> list[Path]:
    """The locks the build reads: the installer lock and, when there is one, every file stored beside it in
    ``IMAGE.lock.d`` (the signed InRelease files and small indexes ``fetch`` checks its pins against: all of them,
    also one only an older lock named, as the directory is what a checkout holds); the package lock unless
    ``debian.package_lock`` is off. Hidden files (a witness half-written by ``lock``) are none of them."""
    from .witness import lock_dir

    found = [cfg.lock_path]
    stored = lock_dir(cfg.lock_path)
    if cfg.lock_path.is_file() and stored.is_dir():
        found += [p for p in tree_files(stored) if not p.name.startswith(".")]
    if cfg.debian.package_lock != "off":
        found.append(cfg.package_lock_path)
    return [p for p in dict.fromkeys(p.resolve() for p in found) if p.is_file()]


def definition_resources(cfg: ImageConfig) -> list[dict[str, Any]]:
    """The image definition's own files: definition, locks (with the installer lock's stored signed files),
    playbooks, roles, preseed templates, keyring."""
    from .installer.preseed import default_template_dir

    bases = _name_bases(cfg.base_dir.parent)
    out = []
    if cfg.source is not None and cfg.source.is_file():
        out.append(file_resource(cfg.source, "image-definition", bases))
    out += [file_resource(p, "lock", bases) for p in lock_files(cfg)]
    playbooks = ([cfg.playbook] if cfg.provision.enabled else []) + [cfg.finalize_playbook]
    out += [file_resource(p, "playbook", bases) for p in playbooks if p.is_file()]
    # Ansible takes a role from the first roles directory that has it: a role that an earlier directory already
    # provides (the project's own roles/ shadowing builder's installed copy) is not an input.
    provided: set[str] = set()
    for rdir in cfg.roles_dirs:
        here = [(p, p.relative_to(rdir).parts[0]) for p in tree_files(rdir) if len(p.relative_to(rdir).parts) > 1]
        out += [file_resource(p, "role", bases, role=role) for p, role in here if role not in provided]
        provided |= {role for _, role in here}
    try:
        tdir = default_template_dir()
    except BuilderError:
        tdir = None
    if tdir is not None:
        out += [file_resource(p, "preseed-template", bases) for p in sorted(tdir.glob("*.j2"))]
    if cfg.debian.keyring.is_file():
        out.append(file_resource(cfg.debian.keyring, "keyring", bases))
    return out


def installer_resources(cfg: ImageConfig, inputs: InstallerInputs | None,
                        manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What ``fetch`` pinned and verified: netboot (.deb, kernel, initrd), boot loader packages, the udeb index,
    the overriding udebs, the suite's InRelease. Without ``inputs``, what the manifest recorded of them."""
    mirror = cfg.debian.mirror
    if inputs is None:
        inst = manifest.get("installer", {})
        out = []
        if inst.get("netboot_sha256"):
            out.append(sbom.resource(f"netboot {inst.get('netboot', '')}".strip(), inst["netboot_sha256"],
                                     kind="netboot"))
        if inst.get("udeb_index_sha256"):
            out.append(sbom.resource("udeb index", inst["udeb_index_sha256"], kind="udeb-index"))
        if manifest.get("inrelease_sha256"):
            out.append(sbom.resource(f"debian/dists/{cfg.debian.suite}/InRelease", manifest["inrelease_sha256"],
                                     kind="inrelease", verified=True))
        return out
    lock = inputs.lock
    nb = lock.netboot
    out = [sbom.resource(f"{nb.package}_{nb.version}", nb.sha256, uri=f"{mirror}/{nb.filename}", kind="netboot",
                         trust=nb.trust)]
    out += [sbom.resource(f"netboot {nb.version}: {role}", sha256_file(p), kind=f"netboot-{role}",
                          kernel_abi=lock.kernel_abi if role == "kernel" else "")
            for role, p in (("kernel", inputs.kernel), ("initrd", inputs.initrd))]
    out += [sbom.resource(f"{b.package}_{b.version}", b.sha256, uri=f"{mirror}/{b.filename}",
                          kind="boot-loader-package", trust=b.trust) for b in lock.boot]
    ix = lock.udeb_index
    out.append(sbom.resource(f"debian/dists/{ix.release_suite}/{ix.path}", ix.sha256,
                             uri=f"{mirror}/dists/{ix.release_suite}/{ix.path}", kind="udeb-index",
                             release_date=ix.release_date))
    out += [sbom.resource(f"{o.package}_{o.version}", o.sha256, uri=f"{mirror}/{o.filename}", kind="udeb-override",
                          replaces=o.index_version) for o in lock.overrides]
    out.append(sbom.resource(f"debian/dists/{cfg.debian.suite}/InRelease", hashlib.sha256(inputs.inrelease).hexdigest(),
                             uri=f"{mirror}/dists/{cfg.debian.suite}/InRelease", kind="inrelease", verified=True))
    return out


def gateway_release_resources(gateway: Gateway | None) -> list[dict[str, Any]]:
    """Every InRelease the gateway passed on to the build VMs, and whether it verified."""
    if gateway is None:
        return []
    verified = gateway.verified_releases()
    out = []
    for path, data in sorted(gateway.release_files().items()):
        parts = path.split("/")
        if parts[-1] != "InRelease" or len(parts) < 4:
            continue
        ok = (parts[0], parts[2]) in verified
        out.append(sbom.resource(path, hashlib.sha256(data).hexdigest(), uri=gateway.upstream_url(path),
                                 kind="inrelease", verified=ok))
    return out


def _dedupe(resources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (name, digest) once, with the annotations of every mention (the first's win): the suite's InRelease
    that ``fetch`` verified may be the very one the package lock names, and both facts are worth keeping."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    out = []
    for r in resources:
        key = (r["name"], r["digest"]["sha256"])
        first = seen.get(key)
        if first is None:
            seen[key] = r
            out.append(r)
        elif r.get("annotations"):
            first["annotations"] = {**r["annotations"], **first.get("annotations", {})}
    return out


# ------------------------------------------------------------------------------------------------ documents


def write_documents(ctx: BuildContext, staging: Path, image_file: str, image_sha256: str,
                    inputs: InstallerInputs | None = None, *, finished: float | None = None) -> tuple[Path, Path]:
    """``<name>.cdx.json`` and ``<name>.provenance.json`` in ``staging``; returns their paths."""
    cfg = ctx.config
    finished = time.time() if finished is None else finished
    started = finished - (time.monotonic() - ctx.started)
    gateway = ctx.services.gateway if ctx.services is not None else None
    packages, licenses, modules, dkms = read_guest(ctx.workdir)
    wanted = [p.key for p in packages if p.installed]
    plock = lock_in_force(ctx, inputs)
    digests = (lock_digests(plock, wanted, lock_name=cfg.package_lock_path.name, mirrors=cfg.debian.upstreams)
               if plock is not None else Digests())
    # what the lock does not pin, from the Releases the gateway verified (all of it, without a lock)
    rest = package_digests(gateway, ctx.cache, [k for k in wanted if k not in digests.debs],
                           components=cfg.debian.components, arch=cfg.debian.arch)
    digests.debs.update(rest.debs)
    digests.indexes += rest.indexes
    facts = ctx.manifest.get("provision", {}).get("facts", [])
    bom = sbom.cyclonedx(
        image_name=cfg.name, image_file=image_file, image_sha256=image_sha256, packages=packages,
        licenses=licenses, digests=digests.debs, modules=modules, dkms=dkms, builder_version=__version__,
        timestamp=rfc3339(finished), description=cfg.description, distro=f"debian-{cfg.debian.release}",
        properties={"debian__suite": cfg.debian.suite, "debian__release": cfg.debian.release,
                    "debian__version": facts[0] if facts else "",
                    "installer__kernel_abi": inputs.lock.kernel_abi if inputs is not None else "",
                    "package_lock": cfg.package_lock_path.name if plock is not None else ""},
        sha256_note=sbom.UNKNOWN_SHA256_LOCKED if plock is not None else sbom.UNKNOWN_SHA256)
    sbom_path = staging / sbom_name(cfg.name)
    sbom_path.write_text(json.dumps(bom, indent=2) + "\n")
    deps = _dedupe([*definition_resources(cfg), *installer_resources(cfg, inputs, ctx.manifest),
                    *gateway_release_resources(gateway), *digests.indexes])
    opts = ctx.options
    byproducts = [sbom.resource(sbom_path.name, sha256_file(sbom_path), media_type="application/vnd.cyclonedx+json")]
    if (ctx.workdir / "packages.txt").is_file():
        byproducts.append(sbom.resource("packages.txt", sha256_file(ctx.workdir / "packages.txt")))
    statement = sbom.provenance(
        subject_name=image_file, subject_sha256=image_sha256, dependencies=deps,
        external_parameters={"imageDefinition": str(cfg.source) if cfg.source else "",
                             "config": cfg.model_dump(mode="json"), "output": str(opts.output)},
        internal_parameters={"options": {"force": opts.force, "useCache": opts.use_cache, "verify": opts.verify,
                                         "keepWorkdir": opts.keep_workdir, "onError": opts.on_error},
                             "accel": ctx.accel, "buildFirmware": cfg.build_firmware,
                             "buildHost": {"machine": platform.machine(), "system": platform.system()}},
        builder_version={"builder": __version__, "python": platform.python_version()},
        started=rfc3339(started), finished=rfc3339(finished), invocation_id=ctx.workdir.name,
        byproducts=byproducts)
    prov_path = staging / provenance_name(cfg.name)
    prov_path.write_text(json.dumps(statement, indent=2) + "\n")
    return sbom_path, prov_path
