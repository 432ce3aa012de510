"""The lock file: every file the installer reads, pinned by sha256, next to the image definition.

``resolve_lock()`` (the ``lock`` verb) works out, from the verified archive:

* which signed ``Release`` vouches for the debian-installer udeb index the mirror really serves (on a skewed
  mirror that may be the ``stable`` alias rather than the codename);
* a netboot installer (``debian-installer-<N>-netboot-<arch>``) whose kernel ABI has module udebs the mirror
  serves — the current one when it fits, else an earlier build still in the pool, pinned here by sha256
  because no signed index lists it any more;
* for each udeb the index lists but the mirror does not serve, the served build that replaces it (its
  sha256 taken when the lock was made, recorded with the reason) or its removal;
* the boot loader packages (isolinux, syslinux-common; shim-signed, grub-efi-amd64-signed for UEFI) from the
  verified index.

``build``/``fetch`` read the lock and refuse any file whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .archive.cache import PathMap, cache_base, sha256_file
from .archive.client import Archive
from .archive.deb import deb_control, deb_extract
from .archive.packages import parse_packages
from .config import ImageConfig
from .errors import BuilderError, FetchError, InstallerError, LockError, MalformedLockError, VerificationError
from .installer import netboot

log = logging.getLogger(__name__)

LOCK_VERSION = 1
UDEB_INDEX = "main/debian-installer/binary-{arch}/Packages"
BOOT_PACKAGES = ("isolinux", "syslinux-common", "shim-signed", "grub-efi-amd64-signed")


@dataclass(frozen=True)
class Witness:
    """The signed index that listed a pinned file when the lock was made: ``dists/<suite>/InRelease`` (stored
    next to the lock as ``NAME.lock.d/<inrelease_sha256>.InRelease``) and the index it signs (``index``, stored
    there too when small, else in the content cache by its sha256). ``fetch`` checks the pin against them with
    gpgv (builder/witness.py)."""

    suite: str
    release_date: str
    inrelease_sha256: str
    index: str  # path under dists/<suite>/, as that Release lists it (e.g. main/binary-amd64/Packages.xz)
    index_sha256: str
    index_size: int
    index_stored: str  # "lock.d" or "cache"


@dataclass(frozen=True)
class FilePin:
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    trust: str = "index"  # "index:<suite>" = listed in a verified Release chain; "lock" = pinned here
    witness: Witness | None = None  # the signed index that listed it (None: none the lock found, or it predates them)

    @classmethod
    def from_stanza(cls, stanza: Mapping[str, str], trust: str) -> FilePin:
        return cls(stanza["Package"], stanza["Version"], stanza["Filename"], stanza["SHA256"], int(stanza["Size"]),
                   trust)


@dataclass(frozen=True)
class IndexPin:
    release_suite: str
    release_date: str
    path: str
    sha256: str
    size: int
    inrelease_sha256: str = ""  # the InRelease that listed it, stored in NAME.lock.d ("": not stored)


@dataclass(frozen=True)
class UdebOverride:
    package: str
    index_version: str
    version: str
    filename: str
    sha256: str
    size: int
    md5sum: str
    depends: str
    reason: str
    witness: Witness | None = None


@dataclass(frozen=True)
class UdebRemoval:
    package: str
    index_version: str
    reason: str


@dataclass(frozen=True)
class Lock:
    suite: str
    codename: str
    arch: str
    created: str
    netboot: FilePin
    kernel_abi: str
    udeb_index: IndexPin
    overrides: tuple[UdebOverride, ...] = ()
    removed: tuple[UdebRemoval, ...] = ()
    boot: tuple[FilePin, ...] = ()
    notes: tuple[str, ...] = field(default=())
    witnessed: bool = False  # the lock looked for a signed index of every pin (a pin's witness None: none listed it)

    def pins(self) -> list[tuple[str, FilePin | UdebOverride]]:
        """Every pinned file with its field name (netboot, boot[i], overrides[i])."""
        return ([("netboot", self.netboot)] + [(f"boot[{i}]", b) for i, b in enumerate(self.boot)]
                + [(f"overrides[{i}]", o) for i, o in enumerate(self.overrides)])

    def to_json(self) -> str:
        data = asdict(self)
        data = {"lock_version": LOCK_VERSION, **data}
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "lock") -> Lock:
        """Parse and schema-check a lock; MalformedLockError (exit 2) names every bad field."""
        hint = "regenerate it with: python -m builder lock IMAGE.yaml"
        data = json_document(text, source=source, what="lock", version_field="lock_version", version=LOCK_VERSION)
        problems: list[tuple[str, str]] = []
        top = _check_object(data, _LOCK_SCHEMA, "", problems)
        if problems:
            raise MalformedLockError(f"{source}: malformed lock file", problems=problems, hint=hint)
        return cls(
            suite=top["suite"], codename=top["codename"], arch=top["arch"], created=top["created"],
            netboot=FilePin(**_witnessed(top["netboot"])), kernel_abi=top["kernel_abi"],
            udeb_index=IndexPin(**top["udeb_index"]),
            overrides=tuple(UdebOverride(**_witnessed(o)) for o in top.get("overrides", ())),
            removed=tuple(UdebRemoval(**r) for r in top.get("removed", ())),
            boot=tuple(FilePin(**_witnessed(b)) for b in top.get("boot", ())),
            notes=tuple(top.get("notes", ())), witnessed=bool(top.get("witnessed", False)),
        )

    def override_fields(self) -> dict[str, dict[str, str]]:
        """Per package, the index fields the overrides replace (for gateway.udeb.rewrite_index)."""
        out = {}
        for o in self.overrides:
            f = {"Version": o.version, "Filename": o.filename, "Size": str(o.size), "SHA256": o.sha256,
                 "MD5sum": o.md5sum}
            if o.depends:
                f["Depends"] = o.depends
            out[o.package] = f
        return out


def _witnessed(d: dict[str, Any]) -> dict[str, Any]:
    w = d.get("witness")
    return {**d, "witness": Witness(**w) if isinstance(w, dict) else None}


def json_document(text: str | bytes, *, source: str, what: str, version_field: str, version: int) -> dict[str, Any]:
    """A lock file's JSON object, of the version this builder writes; MalformedLockError (exit 2) otherwise."""
    hint = "regenerate it with: python -m builder lock IMAGE.yaml"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise MalformedLockError(f"{source}: malformed {what} file: not JSON: {exc}", hint=hint) from exc
    if not isinstance(data, dict):
        raise MalformedLockError(f"{source}: malformed {what} file: expected a JSON object, got {_show(data)}",
                                 hint=hint)
    if data.get(version_field) != version:
        raise MalformedLockError(f"{source}: unsupported {what} version {_show(data.get(version_field))} "
                                 f"(expected {version})", hint=hint)
    return data


def read_lock(path: Path) -> Lock:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise LockError(f"no lock file at {path}", hint=f"create it with: python -m builder lock {path}") from exc
    except OSError as exc:
        raise LockError(f"cannot read the lock file {path}: {exc.strerror or exc}") from exc
    return Lock.from_json(raw, source=str(path))


# ---------------------------------------------------------------------------------------------- schema

Check = Callable[[object], "str | None"]
_SAFE_TEXT = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: names, versions, paths
_MAX_SIZE = 1 << 40


def _show(value: object) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _text(v: object) -> str | None:
    return None if isinstance(v, str) else f"expected a string, got {_show(v)}"


def _token(v: object) -> str | None:
    if not isinstance(v, str) or not _SAFE_TEXT.fullmatch(v):
        return f"expected a non-empty string of printable ASCII without spaces, got {_show(v)}"
    return None


def _hex(n: int) -> Check:
    pattern = re.compile(f"[0-9a-f]{{{n}}}")

    def check(v: object) -> str | None:
        if isinstance(v, str) and pattern.fullmatch(v):
            return None
        return f"expected {n} lowercase hex digits, got {_show(v)}"

    return check


def _size(v: object) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_SIZE:
        return None
    return f"expected a size in bytes (an integer from 0 to {_MAX_SIZE}), got {_show(v)}"


def _relpath(v: object) -> str | None:
    bad = _token(v)
    if bad is not None:
        return bad
    assert isinstance(v, str)
    parts = v.split("/")
    if v.startswith("/") or "" in parts or any(p in (".", "..") for p in parts):
        return f"expected a relative path without empty, '.' or '..' segments, got {_show(v)}"
    return None


def _pool(v: object) -> str | None:
    bad = _relpath(v)
    if bad is None and not str(v).startswith("pool/"):
        bad = f"expected a path under pool/, got {_show(v)}"
    return bad


def _trust(v: object) -> str | None:
    if isinstance(v, str) and re.fullmatch(r"lock|index(:[\x21-\x7e]+)?", v):
        return None
    return f"expected 'lock', 'index' or 'index:<suite>', got {_show(v)}"


_SHA256, _MD5 = _hex(64), _hex(32)
Schema = dict[str, Any]  # field -> Check | Schema (an object) | [Check | Schema] (a list of those)


def _witness(v: object) -> str | None:
    """null, or a Witness object (every field checked; the first problem reported)."""
    if v is None:
        return None
    problems: list[tuple[str, str]] = []
    _check_object(v, _WITNESS, "", problems, optional=set())
    if isinstance(v, dict) and v.get("index_stored") not in ("lock.d", "cache"):
        problems.append(("index_stored", f"expected 'lock.d' or 'cache', got {_show(v.get('index_stored'))}"))
    return None if not problems else "; ".join(f"{f}: {m}" for f, m in problems)


def _bool(v: object) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {_show(v)}"


def _sha_or_empty(v: object) -> str | None:
    return None if v == "" else _SHA256(v)


_WITNESS: Schema = {"suite": _token, "release_date": _text, "inrelease_sha256": _SHA256, "index": _relpath,
                    "index_sha256": _SHA256, "index_size": _size, "index_stored": _token}
_FILE_PIN: Schema = {"package": _token, "version": _token, "filename": _pool, "sha256": _SHA256, "size": _size,
                     "trust": _trust, "witness": _witness}
_INDEX_PIN: Schema = {"release_suite": _token, "release_date": _text, "path": _relpath, "sha256": _SHA256,
                      "size": _size, "inrelease_sha256": _sha_or_empty}
_OVERRIDE: Schema = {"package": _token, "index_version": _token, "version": _token, "filename": _pool,
                     "sha256": _SHA256, "size": _size, "md5sum": _MD5, "depends": _text, "reason": _text,
                     "witness": _witness}
_REMOVAL: Schema = {"package": _token, "index_version": _token, "reason": _text}
_LOCK_SCHEMA: Schema = {"lock_version": lambda v: None, "suite": _token, "codename": _token, "arch": _token,
                        "created": _text, "netboot": _FILE_PIN, "kernel_abi": _token, "udeb_index": _INDEX_PIN,
                        "overrides": [_OVERRIDE], "removed": [_REMOVAL], "boot": [_FILE_PIN], "notes": [_text],
                        "witnessed": _bool}
# the fields with defaults
_OPTIONAL = {"trust", "overrides", "removed", "boot", "notes", "witness", "witnessed", "inrelease_sha256"}


def _check_object(data: object, schema: Schema, where: str, problems: list[tuple[str, str]], *,
                  optional: set[str] = _OPTIONAL) -> dict[str, Any]:
    """``data`` checked against ``schema``; every problem is appended as (field path, message). Fields named in
    ``optional`` may be left out."""
    if not isinstance(data, dict):
        problems.append((where or "(top)", f"expected an object, got {_show(data)}"))
        return {}
    for key in data:
        if key not in schema:
            problems.append((f"{where}.{key}".lstrip("."), "unknown field"))
    out: dict[str, Any] = {}
    for key, rule in schema.items():
        name = f"{where}.{key}".lstrip(".")
        if key not in data:
            if key not in optional:
                problems.append((name, "missing"))
            continue
        out[key] = _check_value(data[key], rule, name, problems, optional)
    return out


def _check_value(value: object, rule: Any, name: str, problems: list[tuple[str, str]],
                 optional: set[str] = _OPTIONAL) -> Any:
    if isinstance(rule, dict):
        return _check_object(value, rule, name, problems, optional=optional)
    if isinstance(rule, list):
        if not isinstance(value, list):
            problems.append((name, f"expected a list, got {_show(value)}"))
            return []
        return [_check_value(item, rule[0], f"{name}[{i}]", problems, optional) for i, item in enumerate(value)]
    bad = rule(value)
    if bad is not None:
        problems.append((name, bad))
    return value


def write_lock(lock: Lock, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(lock.to_json())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- resolution

Report = Callable[[str], None]


def _archive(cfg: ImageConfig, suite: str, base: Archive) -> Archive:
    return Archive(cfg.debian.mirror, suite, keyring=cfg.debian.keyring, fingerprints=cfg.debian.trusted_fingerprints,
                   cache=base.cache, stats=base.stats, on_progress=base.on_progress)


def find_udeb_index(cfg: ImageConfig, main: Archive, report: Report) -> tuple[Archive, IndexPin]:
    """The first signed Release (codename, then its suite alias) whose udeb index the mirror serves intact."""
    rel = main.release()
    path = UDEB_INDEX.format(arch=cfg.debian.arch)
    errors = []
    for alias in dict.fromkeys([cfg.debian.suite, rel.codename, rel.suite]):
        arch = main if alias == main.suite else _archive(cfg, alias, main)
        try:
            r = arch.release()
            if r.codename != rel.codename:
                errors.append(f"{alias}: codename {r.codename}, not {rel.codename}")
                continue
            ent = arch.index_file(path).entry
        except (FetchError, VerificationError) as exc:
            errors.append(f"{alias}: {exc}")
            report(f"udeb index of dists/{alias} is not served intact: {exc}")
            continue
        report(f"udeb index: dists/{alias} ({r.date}) {ent.path} sha256 {ent.sha256[:16]}…")
        return arch, IndexPin(alias, r.date, ent.path, ent.sha256, ent.size)
    raise InstallerError(
        "the mirror serves no debian-installer index that a signed Release vouches for",
        log_tail=errors, hint="use another mirror (debian.mirror)",
    )


def find_netboot(cfg: ImageConfig, main: Archive, index: Mapping[str, Mapping[str, str]],
                 report: Report) -> tuple[FilePin, str, Path]:
    """The newest netboot package (index version first, then earlier builds in the pool) whose kernel ABI has
    served module udebs. Returns the pin, the ABI and the cached .deb."""
    name = netboot.netboot_package(cfg.debian.release, cfg.debian.arch)
    pkgs = main.packages("main", arch=cfg.debian.arch)
    if name not in pkgs:
        raise InstallerError(f"{name} is not in the {cfg.debian.suite} main index")
    stanza = pkgs[name]
    abis = netboot.module_abis(index)
    report(f"udeb index has module udebs for kernel ABIs: {', '.join(sorted(abis)) or 'none'}")
    served: dict[str, bool] = {}
    members = netboot.image_members(cfg.debian.release, cfg.debian.arch)
    tried = []
    for version in [stanza["Version"], *netboot.candidate_versions(stanza["Version"])]:
        if "+b" in version.rsplit("+deb", 1)[-1] and version != stanza["Version"]:
            continue  # arch-all packages have no binNMUs
        if version == stanza["Version"]:
            linux = netboot.parse_built_using(stanza.get("Built-Using", "")).get("linux", "")
            upstream = linux.split("-", 1)[0]
            if upstream and not any(a.startswith(upstream + "+") or a.startswith(upstream + "-") for a in abis):
                tried.append(f"{version}: built with linux {linux}: no module udebs for it in the index")
                report(f"netboot {version}: built with linux {linux}, no module udebs for it (not downloaded)")
                continue
            pin = FilePin.from_stanza(stanza, f"index:{main.suite}")
            path = main.fetch_package(stanza)
        else:
            filename = netboot.pool_filename(stanza, version)
            if not main.exists(filename):
                continue
            path = _fetch_unpinned(main, filename)
            ctl = deb_control(path)
            if ctl.get("Package") != name or ctl.get("Version") != version:
                raise VerificationError(f"{filename} is not {name} {version} (control says {ctl.get('Package')} "
                                        f"{ctl.get('Version')})")
            pin = FilePin(name, version, filename, sha256_file(path), path.stat().st_size, "lock")
        kernel = deb_extract(path, [members["kernel"]])[members["kernel"]]
        abi = netboot.kernel_release(kernel)
        if abi not in served and abi in abis:
            served[abi] = all(main.exists(index[n]["Filename"]) for n in abis[abi])
        ok = served.get(abi, False)
        tried.append(f"{version}: kernel {abi}: " + ("module udebs served" if ok else
                     "module udebs listed but not served" if abi in abis else "no module udebs in the index"))
        report(f"netboot {version}: kernel {abi}, " + ("usable" if ok else "not usable"))
        if ok:
            return pin, abi, path
    raise InstallerError(
        f"no {name} build in the pool has a kernel whose module udebs the mirror serves",
        log_tail=tried, hint="the mirror is inconsistent; try another mirror (debian.mirror)",
    )


def _fetch_unpinned(arch: Archive, filename: str) -> Path:
    """Fetch a pool file no signed index lists (lock time only): it is pinned by the sha256 recorded now.
    Pool files are immutable, so one fetched before from the same mirror (by the lock or the gateway) is taken
    from the cache; the path map is keyed by the full URL, so another mirror's copy is never reused."""
    paths = PathMap(cache_base() / "gateway" / "paths")
    key = arch.url(filename)
    known = paths.get(key)
    hit = arch.cache.get(known) if known else None
    if hit is not None:
        return hit
    stored = arch.fetch_unpinned(filename)
    paths.put(key, stored.name)
    return stored


def resolve_udebs(main: Archive, index: Mapping[str, Mapping[str, str]], abi: str, initrd_status: Mapping[str, str],
                  built_using: Mapping[str, str], report: Report) -> tuple[list[UdebOverride], list[UdebRemoval]]:
    overrides, removed = [], []
    for name, st in sorted(index.items()):
        mod_abi = netboot.abi_of_module_udeb(name)
        if mod_abi is not None and mod_abi != abi:
            if not main.exists(st["Filename"]):
                removed.append(UdebRemoval(name, st["Version"], f"kernel ABI {mod_abi} is not the installer's "
                                           f"({abi}) and the mirror does not serve it"))
            continue
        if main.exists(st["Filename"]):
            continue
        hints = tuple(v for v in (initrd_status.get(name), built_using.get(netboot.source_name(st))) if v)
        for version in netboot.candidate_versions(st["Version"], hints=hints):
            filename = netboot.pool_filename(st, version)
            if not main.exists(filename):
                continue
            path = _fetch_unpinned(main, filename)
            ctl = deb_control(path)
            if ctl.get("Package") != name or ctl.get("Version") != version:
                continue
            data = path.read_bytes()
            why = (f"index lists {st['Version']}, which the mirror does not serve; {version} is served"
                   + (" (the version inside the netboot initrd)" if initrd_status.get(name) == version else ""))
            overrides.append(UdebOverride(name, st["Version"], version, filename, hashlib.sha256(data).hexdigest(),
                                          len(data), hashlib.md5(data).hexdigest(), ctl.get("Depends", ""), why))
            report(f"udeb {name}: {st['Version']} not served → {version}")
            break
        else:
            why = (f"index lists {st['Version']}, no build of it is served"
                   + (f"; the netboot initrd has {initrd_status[name]}" if name in initrd_status else ""))
            removed.append(UdebRemoval(name, st["Version"], why))
            report(f"udeb {name}: {st['Version']} not served, no replacement → removed")
    return overrides, removed


def resolve_lock(cfg: ImageConfig, main: Archive, *, report: Report | None = None) -> Lock:
    """Work out a complete lock from the live (verified) archive."""
    say = report or (lambda msg: log.info("%s", msg))
    rel = main.release()
    udeb_arch, index_pin = find_udeb_index(cfg, main, say)
    index = parse_packages(udeb_arch.index(UDEB_INDEX.format(arch=cfg.debian.arch)))
    pin, abi, deb = find_netboot(cfg, main, index, say)
    members = netboot.image_members(cfg.debian.release, cfg.debian.arch)
    initrd = deb_extract(deb, [members["initrd"]])[members["initrd"]]
    from .installer.cpio import read_cpio

    files = read_cpio(initrd)
    status_text = files.get("var/lib/dpkg/status", b"").decode(errors="replace")
    initrd_status = netboot.parse_status(status_text)
    built_using = netboot.parse_built_using(deb_control(deb).get("Built-Using", ""))
    overrides, removed = resolve_udebs(main, index, abi, initrd_status, built_using, say)
    pkgs = main.packages("main", arch=cfg.debian.arch)
    boot = []
    for name in BOOT_PACKAGES:
        if name not in pkgs:
            raise InstallerError(f"{name} is not in the {cfg.debian.suite} main index")
        boot.append(FilePin.from_stanza(pkgs[name], f"index:{main.suite}"))
    notes = []
    if pin.trust == "lock":
        notes.append(f"netboot {pin.version} is no longer listed in a signed index; its sha256 was pinned when this "
                     f"lock was made")
    if overrides:
        notes.append(f"{len(overrides)} udebs are replaced by the served build (sha256 pinned when this lock was made)")
    return Lock(
        suite=cfg.debian.suite, codename=rel.codename, arch=cfg.debian.arch,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        netboot=pin, kernel_abi=abi, udeb_index=index_pin, overrides=tuple(overrides), removed=tuple(removed),
        boot=tuple(boot), notes=tuple(notes),
    )


def lock_summary(lock: Lock) -> dict[str, Any]:
    return {
        "netboot": f"{lock.netboot.version} (kernel {lock.kernel_abi}, trust {lock.netboot.trust})",
        "udeb_index": f"dists/{lock.udeb_index.release_suite} {lock.udeb_index.path}",
        "overrides": len(lock.overrides),
        "removed": len(lock.removed),
    }


def without_witnesses(lock: Lock) -> Lock:
    """The lock's pins without the signed indexes that listed them (what the installer is fed)."""
    def bare(p: Any) -> Any:
        return replace(p, witness=None)

    return replace(lock, netboot=bare(lock.netboot), boot=tuple(bare(b) for b in lock.boot),
                   overrides=tuple(bare(o) for o in lock.overrides),
                   udeb_index=replace(lock.udeb_index, inrelease_sha256=""), witnessed=False)


def lock_differences(old: Lock, new: Lock) -> list[str]:
    """What changed between two locks (ignoring when they were made and the signed indexes that listed a pin)."""
    old, new = without_witnesses(old), without_witnesses(new)
    out = []
    for name in ("suite", "codename", "arch", "netboot", "kernel_abi", "udeb_index", "boot"):
        if getattr(old, name) != getattr(new, name):
            out.append(f"{name}: {getattr(old, name)} -> {getattr(new, name)}")
    o_over = {o.package: o for o in old.overrides}
    n_over = {o.package: o for o in new.overrides}
    for pkg in sorted(set(o_over) | set(n_over)):
        if o_over.get(pkg) != n_over.get(pkg):
            a, b = o_over.get(pkg), n_over.get(pkg)
            out.append(f"override {pkg}: {a.version if a else 'none'} -> {b.version if b else 'none'}")
    o_rem = {r.package for r in old.removed}
    n_rem = {r.package for r in new.removed}
    out += [f"removed now: {p}" for p in sorted(n_rem - o_rem)]
    out += [f"no longer removed: {p}" for p in sorted(o_rem - n_rem)]
    return out


__all__ = ["BuilderError", "Lock", "read_lock", "resolve_lock", "write_lock"]
