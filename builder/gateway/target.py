"""The target's view of the archive when a package lock is in force (pure functions).

The gateway serves the installed system (debootstrap, base-installer, pkgsel, apt in the build VM) not the
mirror's ``dists/`` but suites that list exactly the locked packages: ``dists/<suite>`` lists every one (the
base system and all its updates come from there, so debootstrap already installs the locked versions), and
``<codename>-updates`` and ``<codename>-security`` are empty, so nothing newer appears; each component has its
``binary-<arch>/Release`` too (choose-mirror checks it). Each stanza is the locked .deb's own control file (its
sha256 is the lock's pin) with the index's Priority and Section recorded in the lock and the pinned Filename,
Size and SHA256. The Release keeps the upstream suite's Origin, Label, Suite,
Codename, Version and Date as the lock recorded them (apt refuses a Release whose identity changes), so the
view is a function of the lock alone; it is signed by the build's ephemeral key, which the target trusts for
the build only (see docs/package-lock.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import VerificationError
from ..pkglock import PackageLock, PackagePin
from .udeb import format_stanza, index_variants, release_file

KEY_FILE = "/etc/apt/trusted.gpg.d/builder-build.gpg"  # where the target trusts the build's key
CONTROL_DROP = ("Original-Maintainer",)


@dataclass(frozen=True)
class ReleaseFields:
    """The identity of an upstream suite, as its Release states it."""

    origin: str
    label: str
    suite: str
    codename: str
    version: str = ""


@dataclass(frozen=True)
class SuiteView:
    prefix: str  # the gateway's upstream prefix: debian or debian-security
    suite: str  # dists/<suite>
    files: dict[str, bytes]  # path under dists/<suite>/ -> content (Release unsigned)


def view_stanza(control: Mapping[str, str], pin: PackagePin) -> str:
    """The index stanza of a locked .deb: its control fields, the index's Priority/Section, the pinned file."""
    for fname, want in (("Package", pin.name), ("Version", pin.version), ("Architecture", pin.architecture)):
        if control.get(fname) != want:
            raise VerificationError(f"{pin.filename}: its control file says {fname} {control.get(fname)!r}, "
                                    f"the package lock {want!r}")
    fields = {k: v for k, v in control.items() if k not in CONTROL_DROP}
    if pin.priority:
        fields["Priority"] = pin.priority
    if pin.section:
        fields["Section"] = pin.section
    fields.update({"Filename": pin.filename, "Size": str(pin.size), "SHA256": pin.sha256})
    return format_stanza(fields)


def component_release(release: ReleaseFields, component: str, arch: str) -> bytes:
    """``dists/<suite>/<component>/binary-<arch>/Release``, as Debian's archive has it (without Acquire-By-Hash:
    the view serves no by-hash paths). debian-installer's choose-mirror reads its Architecture to accept the
    mirror for the installer's architecture; without it, it falls through to another mirror (offline: none)."""
    lines = [("Archive", release.suite), ("Origin", release.origin), ("Label", release.label),
             *((("Version", release.version),) if release.version else ()), ("Component", component),
             ("Architecture", arch)]
    return "".join(f"{k}: {v}\n" for k, v in lines).encode()


def suite_view(stanzas: Iterable[tuple[PackagePin, str]], *, release: ReleaseFields, date: str,
               components: Sequence[str], arch: str, prefix: str, suite: str) -> SuiteView:
    """One suite: a Packages index per component (arch-all packages in binary-<arch>, as Debian does) and its
    per-component Release (:func:`component_release`), all listed with size and SHA256 in the suite's
    Release."""
    per: dict[str, list[str]] = {c: [] for c in components}
    for pin, text in sorted(stanzas, key=lambda ps: (ps[0].name, ps[0].architecture)):
        if pin.component not in per:
            raise VerificationError(f"{pin.name} {pin.version} is in component {pin.component}, which the image "
                                    f"does not enable (debian.components: {' '.join(components)})")
        per[pin.component].append(text)
    files: dict[str, bytes] = {}
    for comp in components:
        body = ("\n\n".join(per[comp]) + "\n").encode() if per[comp] else b""
        files.update(index_variants(f"{comp}/binary-{arch}/Packages", body))
        files[f"{comp}/binary-{arch}/Release"] = component_release(release, comp, arch)
    header = [("Origin", release.origin), ("Label", release.label), ("Suite", release.suite),
              ("Codename", release.codename)]
    if release.version:
        header.append(("Version", release.version))
    header += [("Date", date), ("Architectures", arch), ("Components", " ".join(components)),
               ("No-Support-for-Architecture-all", "Packages"),
               ("Description", "the archive restricted to the packages of the image's package lock (builder)")]
    files["Release"] = release_file(header, files)
    return SuiteView(prefix, suite, files)


def target_views(lock: PackageLock, stanzas: Mapping[str, str], *, components: Sequence[str]) -> list[SuiteView]:
    """The suites the target sees: ``dists/<suite>`` with every locked package, ``-updates`` and ``-security``
    empty, each with the identity and date of the upstream Release the lock recorded. ``stanzas``: pin key →
    stanza text (:func:`view_stanza`)."""
    codename = lock.codename
    suites = [("debian", lock.suite, True), ("debian", f"{codename}-updates", False),
              ("debian-security", f"{codename}-security", False)]
    out = []
    for prefix, suite, full in suites:
        idx = lock.index(prefix, suite)
        rel = (ReleaseFields(idx.origin or "Debian", idx.label or "Debian", idx.release_suite or suite, idx.codename,
                             idx.version) if idx else ReleaseFields("Debian", "Debian", suite, codename))
        date = idx.date if idx else lock.indexes[0].date if lock.indexes else ""
        pairs = [(p, stanzas[p.key]) for p in lock.packages] if full else []
        out.append(suite_view(pairs, release=rel, date=date, components=components, arch=lock.arch, prefix=prefix,
                              suite=suite))
    return out


def view_pins(lock: PackageLock) -> dict[str, tuple[str, int, str]]:
    """Gateway path → (sha256, size, upstream path) of every locked file, as the main suite's view names it
    (under ``debian/``; a security package keeps its ``pool/updates/…`` Filename and comes from the security
    mirror)."""
    return {f"debian/{p.filename}": (p.sha256, p.size, f"{p.archive}/{p.filename}") for p in lock.packages}


__all__ = ["KEY_FILE", "ReleaseFields", "SuiteView", "component_release", "suite_view", "target_views", "view_pins",
           "view_stanza"]
