"""The package lock: every package the image ends up with, pinned, in ``images/NAME.packages.lock``.

Each package is pinned by name, version, architecture, pool file (size, sha256) and the signed index that
listed it when the lock was made (archive, suite and that suite's Release date). The lock is JSON written one
package per line, so a review sees a version change as a one-line diff.

Where it comes from (``lock``): :mod:`builder.pkgresolve` resolves the closure apt would install from the
verified indexes of the suite, its -updates and -security (``method: resolve``), or reads a finished build's
``packages.txt`` (``method: build``, exact). What uses it: the build's gateway serves the target a view of the
archive that lists only these stanzas (:mod:`builder.gateway.target`), so the installer and apt in the build VM
install exactly these versions; ``fetch`` fetches and checks every pinned file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import LockError, MalformedLockError
from .lock import _SHA256, Schema, _check_object, _pool, _show, _size, _text, _token, json_document

PACKAGES_LOCK_VERSION = 1
ARCHIVES = ("debian", "debian-security")  # the gateway's upstream prefixes


@dataclass(frozen=True)
class PackagePin:
    """One package of the image, as the signed index ``suite`` (Release ``date``) of ``archive`` listed it."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    archive: str  # "debian" or "debian-security": which mirror serves filename
    suite: str  # the suite whose signed index listed it (e.g. trixie-security)
    date: str  # that suite's Release date when the lock was made
    priority: str = ""  # from the index (the archive's override), for the target's view
    section: str = ""

    @property
    def component(self) -> str:
        """``main``, ``contrib``, … from the pool path (``pool/<c>/…``; the security archive's
        ``pool/updates/<c>/…``)."""
        parts = self.filename.split("/")
        return parts[2] if parts[1] == "updates" and len(parts) > 2 else parts[1]

    @property
    def key(self) -> str:
        return f"{self.name} {self.version} {self.architecture}"


@dataclass(frozen=True)
class SignedIndex:
    """A signed Release the lock's pins come from."""

    archive: str
    suite: str
    codename: str
    date: str
    inrelease_sha256: str  # of the InRelease as the mirror served it (the content cache keeps it)
    origin: str = ""  # the Release's identity, which the target's view keeps (apt refuses a changed one)
    label: str = ""
    release_suite: str = ""  # its Suite field (e.g. stable)
    version: str = ""


@dataclass(frozen=True)
class ForeignPackage:
    """Installed in the build, but no Debian index of the image's suites lists it (e.g. NVIDIA's repository)."""

    name: str
    version: str


@dataclass(frozen=True)
class PackageLock:
    suite: str
    codename: str
    arch: str
    created: str
    method: str  # "resolve" (closure from the indexes) or "build" (a finished build's packages.txt)
    indexes: tuple[SignedIndex, ...]
    packages: tuple[PackagePin, ...]
    seeds: tuple[str, ...] = ()
    foreign: tuple[ForeignPackage, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def by_name(self) -> dict[str, PackagePin]:
        return {p.name: p for p in self.packages}

    def digest(self) -> str:
        """What the lock pins (not when it was made or why): the installed-disk cache key includes it."""
        data = [asdict(p) for p in sorted(self.packages, key=lambda p: p.name)]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def index(self, archive: str, suite: str) -> SignedIndex | None:
        return next((i for i in self.indexes if i.archive == archive and i.suite == suite), None)

    def to_json(self) -> str:
        """JSON with one object per line in the lists: a version change is a one-line diff."""
        head = {"packages_lock_version": PACKAGES_LOCK_VERSION, "suite": self.suite, "codename": self.codename,
                "arch": self.arch, "created": self.created, "method": self.method}
        out = ["{"]
        out += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        out.append(f'  "seeds": {json.dumps(list(self.seeds))},')
        out.append(f'  "notes": {json.dumps(list(self.notes))},')
        for name, items, last in (("indexes", self.indexes, False), ("foreign", self.foreign, False),
                                  ("packages", sorted(self.packages, key=lambda p: (p.name, p.architecture)), True)):
            rows = [json.dumps(asdict(i), ensure_ascii=True) for i in items]  # type: ignore[call-overload]
            body = ",\n".join(f"    {r}" for r in rows)
            out.append(f'  "{name}": [' + (f"\n{body}\n  ]" if rows else "]") + ("" if last else ","))
        out.append("}")
        return "\n".join(out) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "package lock") -> PackageLock:
        """Parse and schema-check; MalformedLockError (exit 2) names every bad field."""
        hint = "regenerate it with: python -m builder lock IMAGE.yaml"
        data = json_document(text, source=source, what="package lock", version_field="packages_lock_version",
                             version=PACKAGES_LOCK_VERSION)
        problems: list[tuple[str, str]] = []
        top = _check_object(data, _SCHEMA, "", problems, optional=_OPTIONAL)
        names: dict[str, int] = {}
        for i, p in enumerate(top.get("packages", ())):
            key = f"{p.get('name')}:{p.get('architecture')}"
            if key in names:
                problems.append((f"packages[{i}]", f"{key} is pinned twice (also packages[{names[key]}])"))
            names[key] = i
        if problems:
            raise MalformedLockError(f"{source}: malformed package lock", problems=problems, hint=hint)
        return cls(
            suite=top["suite"], codename=top["codename"], arch=top["arch"], created=top["created"],
            method=top["method"], indexes=tuple(SignedIndex(**i) for i in top["indexes"]),
            packages=tuple(PackagePin(**p) for p in top["packages"]),
            seeds=tuple(top.get("seeds", ())), foreign=tuple(ForeignPackage(**f) for f in top.get("foreign", ())),
            notes=tuple(top.get("notes", ())),
        )


def _archive(v: object) -> str | None:
    return None if v in ARCHIVES else f"expected one of {', '.join(ARCHIVES)}, got {_show(v)}"


def _method(v: object) -> str | None:
    return None if v in ("resolve", "build") else f"expected 'resolve' or 'build', got {_show(v)}"


_PKG_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def _name(v: object) -> str | None:
    if isinstance(v, str) and _PKG_NAME.fullmatch(v):
        return None
    return f"expected a Debian package name, got {_show(v)}"


def _optional_token(v: object) -> str | None:
    return None if v == "" else _token(v)


_PIN: Schema = {"name": _name, "version": _token, "architecture": _token, "filename": _pool, "size": _size,
                "sha256": _SHA256, "archive": _archive, "suite": _token, "date": _text,
                "priority": _optional_token, "section": _optional_token}
_INDEX: Schema = {"archive": _archive, "suite": _token, "codename": _token, "date": _text,
                  "inrelease_sha256": _SHA256, "origin": _text, "label": _text, "release_suite": _text,
                  "version": _text}
_FOREIGN: Schema = {"name": _name, "version": _token}
_SCHEMA: Schema = {"packages_lock_version": lambda v: None, "suite": _token, "codename": _token, "arch": _token,
                   "created": _text, "method": _method, "seeds": [_text], "notes": [_text], "indexes": [_INDEX],
                   "foreign": [_FOREIGN], "packages": [_PIN]}
_OPTIONAL = {"seeds", "notes", "foreign", "priority", "section", "origin", "label", "release_suite", "version"}


def read_package_lock(path: Path) -> PackageLock:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise LockError(f"no package lock at {path}", hint="create it with: python -m builder lock IMAGE.yaml") from exc
    except OSError as exc:
        raise LockError(f"cannot read the package lock {path}: {exc.strerror or exc}") from exc
    return PackageLock.from_json(raw, source=str(path))


def write_package_lock(lock: PackageLock, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(lock.to_json())
    tmp.replace(path)


def pin_from_stanza(stanza: Mapping[str, str], *, archive: str, suite: str, date: str) -> PackagePin:
    return PackagePin(stanza["Package"], stanza["Version"], stanza.get("Architecture", ""), stanza["Filename"],
                      int(stanza["Size"]), stanza["SHA256"].lower(), archive, suite, date,
                      stanza.get("Priority", ""), stanza.get("Section", ""))


def differences(old: PackageLock, new: PackageLock) -> list[str]:
    """Per package, what changed between two package locks (one line each)."""
    a, b = old.by_name(), new.by_name()
    out = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None:
            assert y is not None
            out.append(f"added {name} {y.version} ({y.suite})")
        elif y is None:
            out.append(f"dropped {name} {x.version}")
        elif (x.version, x.sha256) != (y.version, y.sha256):
            out.append(f"{name}: {x.version} -> {y.version} ({y.suite})")
    return out


def keep_unchanged(old: PackageLock, new: PackageLock) -> PackageLock:
    """``new`` with every pin that ``old`` has unchanged (same version and file) taken from ``old``: a pin
    records the signed index that listed the file when it was first locked, so re-locking changes only the lines
    of packages that really moved. When nothing moved, ``old`` itself."""
    before = {p.key: p for p in old.packages}
    pins = tuple(before[p.key] if p.key in before and before[p.key].sha256 == p.sha256 else p for p in new.packages)
    if sorted(pins, key=lambda p: p.key) == sorted(old.packages, key=lambda p: p.key) and old.foreign == new.foreign:
        return old
    return replace(new, packages=pins)


def pin_fields() -> Iterable[str]:
    return (f.name for f in fields(PackagePin))


def summary(lock: PackageLock) -> dict[str, Any]:
    per_suite: dict[str, int] = {}
    for p in lock.packages:
        per_suite[p.suite] = per_suite.get(p.suite, 0) + 1
    return {"packages": len(lock.packages), "method": lock.method, "per_suite": per_suite,
            "foreign": len(lock.foreign), "bytes": sum(p.size for p in lock.packages)}


__all__ = ["PackageLock", "PackagePin", "SignedIndex", "differences", "read_package_lock", "write_package_lock"]
