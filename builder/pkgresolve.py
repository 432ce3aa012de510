"""The package closure of an image, resolved from the verified indexes the way apt would.

The universe is the signed indexes of the suite, ``<codename>-updates`` and ``<codename>-security`` (every
configured component, the image's architecture and ``all``); each name's candidate is its highest version
in any of them (python-debian compares versions and parses relations); a dependency the candidate does not
satisfy takes the highest listed version that does, and a package whose highest version needs what cannot be
had beside the packages chosen already (a build's, at their own versions) takes the highest listed version
that fits (:meth:`_Resolver.fits`). The seeds are the base role's ``base_packages`` and
extras, ``installer.extra_packages``, the NVIDIA role's package set of every variant the image declares (each
may pick another driver flavour), what debian-installer itself adds (kernel, boot loader, …:
:data:`INSTALLER_PACKAGES`) and every package of priority required or important; the closure adds their
Pre-Depends and Depends (and Recommends where the target follows them: :func:`install_phases`, step by
step as the target installs, :func:`resolve_phases`): for an alternative already satisfied,
nothing; else the first alternative with a candidate that satisfies it, a real package before a virtual one, an
already chosen provider before others.

This is apt's choice for a fresh install in all but corner cases (Conflicts are not solved). The exact set is
what a finished build installed: ``lock --from-build OUTPUT_DIR`` (:func:`lock_from_build`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from debian.deb822 import PkgRelation
from debian.debian_support import version_compare

from .archive.cache import ContentCache
from .archive.client import Archive
from .archive.http import FetchStats
from .config import BASE_ROLE, ImageConfig, install_packages, seed_packages
from .errors import ConfigError, FetchError, LockError
from .pkglock import ForeignPackage, PackageLock, PackagePin, SignedIndex, pin_from_stanza

log = logging.getLogger(__name__)
Report = Callable[[str], None]

# What debian-installer installs on its own besides the seed list (seen in the installer's syslog of a trixie
# netboot install with this preseed): the kernel, initramfs tools, the boot loaders of every disk.boot, the
# network setup, hardware detection and the installer's own helpers. Names the indexes do not have are skipped.
INSTALLER_PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "busybox", "zstd", "locales", "ifupdown", "dhcpcd-base", "eject",
    "installation-report", "laptop-detect", "os-prober", "pciutils", "amd64-microcode", "intel-microcode",
    "popularity-contest", "gdisk", "fdisk", "dosfstools", "efibootmgr", "mokutil", "grub-pc",
    "grub-efi-amd64", "grub-efi-amd64-signed", "shim-signed", "grub-cloud-amd64", "console-setup",
    "keyboard-configuration",
)
PRIORITIES = ("required", "important")


def installer_installs(cfg: ImageConfig) -> tuple[str, ...]:
    """What debian-installer installs on every install of ``cfg`` besides the seeds, whatever the machine
    (each is in :data:`INSTALLER_PACKAGES`): base-installer's kernel (``base-installer/kernel/image``), pkgsel's
    ``popularity-contest`` (purged again: ``popularity-contest/participate`` is false), grub-installer's boot
    loader for the firmware the install VM boots (:attr:`~builder.config.ImageConfig.build_firmware`:
    ``grub-pc`` under BIOS, which the late_command of a hybrid disk purges again; ``grub-efi-amd64`` under UEFI),
    and what preseed/late.cfg.j2's late_command installs for ``disk.boot`` (a hybrid disk installed under BIOS
    gets grub-efi-amd64, gdisk and mokutil; a hybrid disk grub-cloud-amd64; a uefi disk shim-signed and
    grub-efi-amd64-signed; both dosfstools). Under a package lock without one of them the build fails inside the
    installer."""
    boot, firmware = cfg.disk.boot, cfg.build_firmware
    out = [f"linux-image-{cfg.debian.arch}", "popularity-contest",
           "grub-pc" if firmware == "bios" else "grub-efi-amd64"]
    if boot == "hybrid" and firmware == "bios":
        out += ["grub-efi-amd64", "gdisk", "mokutil"]
    if boot == "hybrid":
        out += ["grub-cloud-amd64", "dosfstools"]
    elif boot == "uefi":
        out += ["shim-signed", "grub-efi-amd64-signed", "dosfstools"]
    return tuple(dict.fromkeys(out))


_PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}
NVIDIA_ROLE = "nvidia-gpu-drivers"


@dataclass(frozen=True)
class Candidate:
    stanza: Mapping[str, str]
    archive: str
    suite: str
    date: str

    @property
    def version(self) -> str:
        return self.stanza["Version"]

    def pin(self) -> PackagePin:
        return pin_from_stanza(self.stanza, archive=self.archive, suite=self.suite, date=self.date)


@functools.lru_cache(maxsize=1 << 16)
def _cmp(a: str, b: str) -> int:
    return version_compare(a, b)


def _by_version(a: Candidate, b: Candidate) -> int:
    return _cmp(a.version, b.version)


def satisfies(version: str, rel: tuple[str, str] | None) -> bool:
    """Whether ``version`` satisfies a relation's (operator, version); None: any version."""
    if rel is None:
        return True
    op, want = rel
    c = _cmp(version, want)
    return {"<<": c < 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">>": c > 0, "<": c <= 0, ">": c >= 0}[op]


def _parse(text: str) -> list[list[dict[str, Any]]]:
    return PkgRelation.parse_relations(text.replace("\n", " ")) if text.strip() else []  # type: ignore[return-value]


@dataclass
class Universe:
    """Every candidate of the signed indexes, and who provides what."""

    arch: str
    candidates: dict[str, Candidate] = field(default_factory=dict)  # name -> highest version
    versions: dict[str, list[Candidate]] = field(default_factory=dict)  # name -> every listed version
    provides: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # virtual -> (provider, ver)
    indexes: list[SignedIndex] = field(default_factory=list)

    def add(self, stanza: Mapping[str, str], archive: str, suite: str, date: str) -> None:
        if stanza.get("Architecture") not in (self.arch, "all"):
            return
        name = stanza["Package"]
        cand = Candidate(stanza, archive, suite, date)
        self.versions.setdefault(name, []).append(cand)
        old = self.candidates.get(name)
        if old is None or _cmp(cand.version, old.version) > 0:
            if old is not None:
                self._drop_provides(old)
            self.candidates[name] = cand
            for group in _parse(stanza.get("Provides", "")):
                for alt in group:
                    rel = alt.get("version")
                    ver = rel[1] if rel else None
                    self.provides.setdefault(alt["name"], []).append((name, ver))

    def _drop_provides(self, old: Candidate) -> None:
        for group in _parse(old.stanza.get("Provides", "")):
            for alt in group:
                lst = self.provides.get(alt["name"], [])
                self.provides[alt["name"]] = [p for p in lst if p[0] != old.stanza["Package"]]

    def find(self, name: str, version: str) -> Candidate | None:
        return next((c for c in self.versions.get(name, ()) if c.version == version), None)


def load_universe(cfg: ImageConfig, cache: ContentCache, stats: FetchStats, *, report: Report | None = None,
                  offline: bool = False) -> Universe:
    """The verified indexes of ``<suite>``, ``<codename>-updates`` (Debian mirror) and ``<codename>-security``
    (security mirror), every configured component."""
    say = report or (lambda m: log.info("%s", m))
    deb = cfg.debian
    uni = Universe(deb.arch)
    main = Archive(deb.mirror, deb.suite, keyring=deb.keyring, fingerprints=deb.trusted_fingerprints, cache=cache,
                   stats=stats, offline=offline)
    codename = main.release().codename
    sources = [("debian", main),
               ("debian", Archive(deb.mirror, f"{codename}-updates", keyring=deb.keyring,
                                  fingerprints=deb.trusted_fingerprints, cache=cache, stats=stats, offline=offline)),
               ("debian-security", Archive(deb.security_mirror, f"{codename}-security", keyring=deb.keyring,
                                           fingerprints=deb.security_fingerprints, cache=cache, stats=stats,
                                           offline=offline))]
    for archive_name, arch in sources:
        t0 = time.monotonic()
        rel = arch.release()
        uni.indexes.append(SignedIndex(archive_name, arch.suite, rel.codename, rel.date, arch.inrelease_sha256,
                                       rel.origin, rel.label, rel.suite, rel.version))
        n = 0
        for comp in deb.components:
            try:
                pkgs = arch.packages(comp, arch=deb.arch)
            except FetchError as exc:
                if "is not listed in the" in str(exc):
                    continue  # e.g. a component the -updates suite has no index for
                raise
            for stanza in pkgs.values():
                uni.add(stanza, archive_name, arch.suite, rel.date)
            n += len(pkgs)
        say(f"{archive_name} dists/{arch.suite} ({rel.date}): {n} packages, {time.monotonic() - t0:.1f} s")
    return uni


# ---------------------------------------------------------------------------------------------- seeds


def _role_vars(cfg: ImageConfig, role: str) -> dict[str, Any]:
    """The role's defaults and vars (vars win, as in Ansible) with ``provision.extra_vars`` over both."""
    merged: dict[str, Any] = {}
    for rp in cfg.roles_dirs:
        base = rp / role
        if not base.is_dir():
            continue
        for sub in ("defaults", "vars"):
            f = base / sub / "main.yml"
            if f.is_file():
                try:
                    merged.update(yaml.safe_load(f.read_text()) or {})
                except yaml.YAMLError as exc:
                    raise ConfigError(f"cannot read {f}: {exc}") from exc
        break
    return {**merged, **cfg.provision.extra_vars}


def nvidia_packages(cfg: ImageConfig) -> tuple[str, ...]:
    """What the NVIDIA role installs from Debian for the configured source and flavour. ``nvidia_driver_source:
    debian``: ``roles/nvidia-gpu-drivers/tasks/install.yml``'s ``_nvidia_packages`` (dkms, the flavour's DKMS
    package and user space, ``nvidia_extra_packages``) and CUDA when asked. ``nvidia``: the driver comes from
    NVIDIA's repository (not a Debian archive, not locked), but ``nvidia_repo.yml`` installs ca-certificates and
    gpg from Debian to fetch and check its key, and ``_nvidia_packages`` names dkms. Either way the headers
    metapackage (``prerequisites.yml``) and openssl when ``secure_boot`` gives a signing key
    (``signing.yml``)."""
    v = _role_vars(cfg, NVIDIA_ROLE)
    source = v.get("nvidia_driver_source", "debian") if v else None
    if source == "debian":
        flavor = (v.get("nvidia_debian_flavors") or {}).get(v.get("nvidia_driver_flavor", "current"))
        if not isinstance(flavor, dict):
            return ()
        out = ["dkms", flavor.get("dkms_package", ""), *flavor.get("packages", []),
               *v.get("nvidia_extra_packages", [])]
        if v.get("nvidia_install_cuda"):
            out += list(v.get("nvidia_debian_cuda_packages", []))
    elif source == "nvidia":
        out = ["ca-certificates", "gpg", "dkms"]
    else:
        return ()
    if v.get("nvidia_install_headers_metapackage", True):
        out.append("linux-headers-amd64")
    if cfg.signing_paths is not None:
        out.append("openssl")
    return tuple(dict.fromkeys(p for p in out if isinstance(p, str) and p))


def provisioned(cfg: ImageConfig) -> dict[str, ImageConfig]:
    """Every configuration a build of the image provisions, by variant name: each variant's (``provision.*``
    may pick another driver flavour), or the image's own under "" when it declares none (an image with
    variants is built as its variants)."""
    return {name: cfg.variant(name) for name in cfg.variants} or {"": cfg}


def image_packages(cfg: ImageConfig) -> tuple[str, ...]:
    """What one configuration installs from Debian by name: the installer's packages and, when it provisions,
    the NVIDIA role's."""
    return tuple(dict.fromkeys([*install_packages(cfg), *(nvidia_packages(cfg) if cfg.provision.enabled else ())]))


def required_seeds(cfg: ImageConfig) -> tuple[str, ...]:
    """The seeds that must resolve: :func:`image_packages` of every variant, in order (duplicates dropped)."""
    return tuple(dict.fromkeys(p for c in provisioned(cfg).values() for p in image_packages(c)))


def seeds(cfg: ImageConfig) -> tuple[str, ...]:
    """The seed list of the closure, in order (duplicates dropped)."""
    return tuple(dict.fromkeys([*required_seeds(cfg), *INSTALLER_PACKAGES]))


def seed_spec(spec: str) -> tuple[str, str]:
    """The name and version of a seed, ``name`` (version "": any) or ``name=version`` (that one)."""
    name, _, version = spec.partition("=")
    return name, version


def _lacks(lock: PackageLock, specs: Iterable[str]) -> list[str]:
    """The seeds of ``specs`` that ``lock`` does not hold (a ``name=version`` seed: not at that version)."""
    held = {p.name: p.version for p in lock.packages}
    out = []
    for spec in specs:
        name, version = seed_spec(spec)
        if name not in held or (version and held[name] != version):
            out.append(spec)
    return out


def lock_gaps(lock: PackageLock, images: Mapping[str, ImageConfig]) -> dict[str, list[str]]:
    """Per configuration of ``images`` (variant name → its config), the packages it installs that ``lock`` does
    not hold (a ``name=version`` seed: not at that version); only those with gaps."""
    out: dict[str, list[str]] = {}
    for name, icfg in images.items():
        gaps = _lacks(lock, image_packages(icfg))
        if gaps:
            out[name] = gaps
    return out


def installer_gaps(lock: PackageLock, cfg: ImageConfig) -> list[str]:
    """What debian-installer installs on every install of ``cfg`` (:func:`installer_installs`) that ``lock`` does
    not hold: a lock made from a build before completion existed lacks popularity-contest and, for a hybrid disk
    installed under BIOS, grub-pc (both installed and removed again during the install)."""
    return _lacks(lock, installer_installs(cfg))


def coverage_gaps(lock: PackageLock, cfg: ImageConfig, images: Mapping[str, ImageConfig]) -> list[str]:
    """What a build of ``cfg`` provisioning ``images`` (variant name → config; "" the image itself) installs that
    ``lock`` does not hold, one line per configuration: what debian-installer installs on the one shared
    install, then each configuration's packages. Empty: the lock covers the build."""
    out = []
    installer = installer_gaps(lock, cfg)
    if installer:
        firmware = "BIOS" if cfg.build_firmware == "bios" else "UEFI"
        out.append(f"debian-installer installs {', '.join(installer)} (disk.boot {cfg.disk.boot}, installed under "
                   f"{firmware})")
    out += [f"{f'variant {name}' if name else cfg.name} installs {', '.join(pkgs)}"
            for name, pkgs in lock_gaps(lock, images).items()]
    return out


# ---------------------------------------------------------------------------------------------- resolution


@dataclass
class Resolution:
    selected: dict[str, Candidate] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)  # name -> what pulled it in
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # optional seeds the indexes do not have
    # what no listed package gives, one each problem: a hard relation ("cpp-14 (= 14.2.0-19)") or a seed
    unmet: list[str] = field(default_factory=list)


def _relations(stanza: Mapping[str, str], recommends: bool) -> list[tuple[list[dict[str, Any]], bool]]:
    """Each relation group to satisfy, and whether it is hard (Pre-Depends, Depends) rather than a Recommends."""
    out: list[tuple[list[dict[str, Any]], bool]] = []
    for fname in ("Pre-Depends", "Depends", *(("Recommends",) if recommends else ())):
        out += [(group, fname != "Recommends") for group in _parse(stanza.get(fname, ""))]
    return out


@dataclass(frozen=True)
class Phase:
    """One step of a build that installs packages with apt: what it names (``optional``: skipped when no index
    lists them) and whether apt follows Recommends there. As in apt, Recommends count for what the step newly
    installs only (a package installed before keeps its missing Recommends missing), and one nothing satisfies
    is left out, not an error."""

    what: str
    seeds: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    recommends: bool = False


class _Resolver:
    def __init__(self, uni: Universe, recommends: bool) -> None:
        self.uni = uni
        self.recommends = recommends  # of the phase being closed
        self.res = Resolution()
        self.queue: list[str] = []

    def satisfied(self, alt: Mapping[str, Any]) -> bool:
        name, rel = alt["name"], alt.get("version")
        sel = self.res.selected.get(name)
        if sel is not None and satisfies(sel.version, rel):
            return True
        for provider, pver in self.uni.provides.get(name, ()):
            if provider in self.res.selected and (rel is None or (pver is not None and satisfies(pver, rel))):
                return True
        return False

    def _providers(self, alt: Mapping[str, Any]) -> list[tuple[str, str | None]]:
        rel = alt.get("version")
        return [(p, v) for p, v in self.uni.provides.get(alt["name"], ())
                if rel is None or (v is not None and satisfies(v, rel))]

    def _versions(self, alt: Mapping[str, Any]) -> list[Candidate]:
        """Every listed version of the alternative's package that satisfies it, highest first; none when the
        package is selected already (at a version that does not: one name, one version)."""
        name, rel = alt["name"], alt.get("version")
        if name in self.res.selected:
            return []
        return sorted((c for c in self.uni.versions.get(name, ()) if satisfies(c.version, rel)),
                      key=functools.cmp_to_key(_by_version), reverse=True)

    def _blocked(self, group: list[dict[str, Any]]) -> bool:
        """Whether nothing can satisfy a relation group beside what is selected: no alternative is satisfied,
        and none names a package that could still come in at a version it takes (or a provider)."""
        return not any(self.satisfied(alt) or self._versions(alt)
                       or any(p not in self.res.selected for p, _ in self._providers(alt)) for alt in group)

    def fits(self, cand: Candidate) -> bool:
        """Whether ``cand``'s hard dependencies (Pre-Depends, Depends) can all hold beside what is selected (a
        build's packages, at their own versions)."""
        return not any(self._blocked(group) for group, _ in _relations(cand.stanza, False))

    def choose(self, alt: Mapping[str, Any]) -> Candidate | None:
        """The candidate that satisfies one alternative: the highest listed version that satisfies it and whose
        hard dependencies fit what is selected (:meth:`fits`; none fits: the highest, whose closure then names
        what stands in its way), else a provider (one already chosen first)."""
        versions = self._versions(alt)
        if versions:  # e.g. an "=" dependency of a package locked below its candidate takes an older one
            return next((c for c in versions if self.fits(c)), versions[0])
        providers = self._providers(alt)
        if not providers:
            return None
        chosen = [p for p, _ in providers if p in self.res.selected]
        if chosen:
            return self.res.selected[chosen[0]]
        providers.sort(key=lambda pv: (_PRIORITY_RANK.get(self.uni.candidates[pv[0]].stanza.get("Priority", ""), 9),
                                       pv[0]))
        return self.uni.candidates[providers[0][0]]

    def select(self, cand: Candidate, why: str) -> None:
        name = cand.stanza["Package"]
        if name not in self.res.selected:
            self.res.selected[name] = cand
            self.res.why[name] = why
            self.queue.append(name)

    def seed(self, spec: str, *, required: bool) -> None:
        name, version = seed_spec(spec)
        sel = self.res.selected.get(name)
        if version:
            cand = self.uni.find(name, version)
            if cand is None:
                self.res.problems.append(f"seed {spec}: no signed index lists {name} {version}")
                self.res.unmet.append(spec)
            elif sel is not None and sel.version != version:
                self.res.problems.append(f"seed {spec}: {self._held([name])}")
            else:
                self.select(cand, "seed")
            return
        if sel is not None:
            return
        found = self.choose({"name": name, "version": None})
        if found is None:
            if required:
                self.res.problems.append(f"seed {name}: no signed index lists it")
                self.res.unmet.append(name)
            else:
                self.res.skipped.append(name)
            return
        self.select(found, "seed")

    def _held(self, names: Iterable[str]) -> str:
        """What is selected of ``names`` already: "the build has a 1, b 2" (a build's), "the lock takes c 3"."""
        whose: dict[str, list[str]] = {}
        for n in names:
            who = "the build has" if self.res.why.get(n) == "build" else "the lock takes"
            whose.setdefault(who, []).append(f"{n} {self.res.selected[n].version}")
        return " and ".join(f"{who} {', '.join(held)}" for who, held in whose.items())

    def close(self) -> None:
        """Add the dependencies of everything queued, and theirs; a hard one nothing can satisfy is a problem,
        named with what stands in its way (the version selected already), once."""
        while self.queue:
            name = self.queue.pop(0)
            stanza = self.res.selected[name].stanza
            for group, hard in _relations(stanza, self.recommends):
                if any(self.satisfied(alt) for alt in group):
                    continue
                cand = next((c for c in map(self.choose, group) if c is not None), None)
                if cand is not None:
                    self.select(cand, name)
                elif hard:  # a Recommends nothing satisfies: apt leaves it out
                    held = [alt["name"] for alt in group if alt["name"] in self.res.selected]
                    self.res.unmet.append(_group_text(group))
                    self.res.problems.append(f"{name} {stanza['Version']} depends on {_group_text(group)}"
                                             + (f", but {self._held(held)}" if held else ": nothing satisfies it"))


def _group_text(group: list[dict[str, Any]]) -> str:
    return " | ".join(alt["name"] + (f" ({alt['version'][0]} {alt['version'][1]})" if alt.get("version") else "")
                      for alt in group)


def resolve(uni: Universe, seed_list: Iterable[str], *, optional: Iterable[str] = (), recommends: bool = False,
            priorities: Iterable[str] = PRIORITIES) -> Resolution:
    """The closure of every candidate of the given priorities (as debootstrap installs them: no Recommends),
    then of ``seed_list`` (each must exist) and ``optional`` seeds (skipped when absent), in one step."""
    return resolve_phases(uni, [Phase("seeds", tuple(seed_list), tuple(optional), recommends)], priorities=priorities)


def resolve_phases(uni: Universe, phases: Iterable[Phase], *, priorities: Iterable[str] = PRIORITIES,
                   kept: Iterable[Candidate] = ()) -> Resolution:
    """What the target has after ``phases``, one after the other: first every candidate of the given priorities
    (debootstrap: without Recommends), then each phase's seeds with its own closure. ``kept``: packages taken as
    installed before any of it (a build's: they satisfy what they can at their own version)."""
    r = _Resolver(uni, False)
    for cand in kept:
        r.res.selected[cand.stanza["Package"]] = cand
        r.res.why[cand.stanza["Package"]] = "build"
    prio = set(priorities)
    for name in sorted(uni.candidates):
        if uni.candidates[name].stanza.get("Priority") in prio and name not in r.res.selected:
            found = r.choose({"name": name, "version": None})
            if found is not None:
                r.select(found, "priority")
    r.close()
    for phase in phases:
        r.recommends = phase.recommends
        for spec in phase.seeds:
            r.seed(spec, required=True)
        for spec in phase.optional:
            r.seed(spec, required=False)
        r.close()
    return r.res


def install_phases(cfg: ImageConfig, *, extra: Iterable[str] = (), have: Iterable[str] = ()) -> list[Phase]:
    """The steps of a build that install from the archive after debootstrap, as the target runs them, with
    their Recommends: debian-installer (base-installer's kernel, pkgsel's seeds, the boot loaders:
    ``installer.install_recommends``, which the preseed gives base-installer/install-recommends and apt-install
    follows), then the base role of each variant whose own base role (a ``provision.roles_path`` of its own)
    names packages the installer did not install (``base_packages + base_extra_packages``, with that variant's
    ``base_install_recommends``, as the role's apt task passes it), then the NVIDIA role of every variant
    (``install_recommends: false`` on each of its apt tasks). The image's own base role installs nothing new: its
    packages are the installer's seeds, installed already, and Ansible's apt module runs apt only for what is
    not installed, so its ``base_install_recommends`` adds nothing. ``extra``: more optional seeds, in a last step
    without Recommends (a refreshed lock's names). ``have``: names installed already (a build's), left out of the
    seeds."""
    skip = set(have)
    seeded = install_packages(cfg)
    installed = {seed_spec(p)[0] for p in seeded}
    phases = [Phase("debian-installer", tuple(p for p in seeded if seed_spec(p)[0] not in skip),
                    tuple(p for p in INSTALLER_PACKAGES if p not in skip), cfg.installer.install_recommends)]
    by_base: set[str] = set()
    for name, vcfg in provisioned(cfg).items():
        own = tuple(p for p in seed_packages(vcfg) if seed_spec(p)[0] not in installed | skip)
        if own:
            phases.append(Phase(f"{BASE_ROLE} ({name})" if name else BASE_ROLE, own,
                                recommends=_role_vars(vcfg, BASE_ROLE).get("base_install_recommends") is True))
            by_base.update(own)
    nvidia = tuple(p for p in required_seeds(cfg)
                   if p not in seeded and p not in by_base and seed_spec(p)[0] not in skip)
    return [*phases, Phase(NVIDIA_ROLE, nvidia),
            *([Phase("the lock's own", (), tuple(p for p in extra if p not in skip))] if extra else [])]


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _lock_of(uni: Universe, pins: list[PackagePin], *, codename: str, cfg: ImageConfig, method: str,
             seed_list: tuple[str, ...], foreign: tuple[ForeignPackage, ...] = (),
             notes: tuple[str, ...] = ()) -> PackageLock:
    return PackageLock(suite=cfg.debian.suite, codename=codename, arch=cfg.debian.arch, created=now_utc(),
                       method=method, indexes=tuple(uni.indexes), packages=tuple(sorted(pins, key=lambda p: p.name)),
                       seeds=seed_list, foreign=foreign, notes=notes)


def resolve_package_lock(cfg: ImageConfig, uni: Universe, *, extra_seeds: Iterable[str] = (),
                         report: Report | None = None) -> PackageLock:
    """The package lock of ``cfg`` from the verified indexes: the closure of the seeds (and ``extra_seeds``,
    e.g. the names of the lock being refreshed)."""
    say = report or (lambda m: log.info("%s", m))
    must = list(required_seeds(cfg))
    optional = [*INSTALLER_PACKAGES, *extra_seeds]
    t0 = time.monotonic()
    res = resolve_phases(uni, install_phases(cfg, extra=extra_seeds))
    if res.problems:
        raise LockError(f"cannot resolve the image's packages from the signed indexes ({len(res.problems)} "
                        "problems)", log_tail=res.problems, hint="check the seed lists (base_packages, "
                        "installer.extra_packages, the NVIDIA role's flavour of each variant) and the mirror")
    say(f"resolved {len(res.selected)} packages in {time.monotonic() - t0:.1f} s"
        + (f"; not in the indexes (skipped): {', '.join(res.skipped)}" if res.skipped else ""))
    codename = uni.indexes[0].codename if uni.indexes else cfg.debian.suite
    notes = ("resolved from the signed indexes like apt would; `lock --from-build OUTPUT_DIR` pins exactly what a "
             "build installed",)
    return _lock_of(uni, [c.pin() for c in res.selected.values()], codename=codename, cfg=cfg, method="resolve",
                    seed_list=tuple(dict.fromkeys([*must, *optional])), notes=notes)


def read_packages_txt(path: Path) -> list[tuple[str, str]]:
    """(name, version) of each line of a build's packages.txt (``name version`` or ``name:arch version``)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise LockError(f"cannot read {path}: {exc.strerror or exc}",
                        hint="give the output directory of a finished build (it has packages.txt)") from exc
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise LockError(f"{path}:{no}: expected 'PACKAGE VERSION', got {line!r}")
        out.append((parts[0].split(":", 1)[0], parts[1]))
    return out


def build_packages(output_dir: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    """(name, version) of what the build in ``output_dir`` installed, and the files read: its packages.txt, or,
    for the output directory of a build of variants (one directory per variant), every variant's, merged (they
    share one installed disk and one archive; a package at two versions is an error)."""
    own = output_dir / "packages.txt"
    files = [own] if own.is_file() else sorted(output_dir.glob("*/packages.txt"))
    if not files:
        return read_packages_txt(own), [own]  # the error that names it
    merged: dict[str, str] = {}
    clash = []
    for f in files:
        for name, version in read_packages_txt(f):
            if merged.setdefault(name, version) != version:
                clash.append(f"{name}: {merged[name]} and {version} ({f.parent.name})")
    if clash:
        raise LockError(f"the builds in {output_dir} installed {len(clash)} packages at different versions: they are "
                        "not one build", log_tail=clash, hint="lock from one build's output directory")
    return list(merged.items()), files


def lock_from_build(cfg: ImageConfig, uni: Universe, output_dir: Path, *,
                    report: Report | None = None) -> PackageLock:
    """The package lock of exactly what the build in ``output_dir`` installed (its packages.txt, or every
    variant's: :func:`build_packages`), completed with what a build of the image installs besides: the packages
    of the variants that build did not make (a build of ``--only current`` has no other flavour's driver) and what
    debian-installer installs and removes again before the end (``popularity-contest``, which pkgsel installs and
    purges; ``grub-pc`` of a BIOS install of a hybrid disk), resolved from the signed indexes on top of the
    build's packages (:data:`INSTALLER_PACKAGES`, :func:`required_seeds`). Without them the target's view would
    lack what a build asks for, and that build would fail."""
    say = report or (lambda m: log.info("%s", m))
    output_dir = Path(output_dir)
    installed, files = build_packages(output_dir)
    kept: list[Candidate] = []
    foreign, gone = [], []
    for name, version in installed:
        cand = uni.find(name, version)
        if cand is not None:
            kept.append(cand)
        elif name in uni.versions:
            now = ", ".join(sorted({c.version for c in uni.versions[name]}))
            gone.append(f"{name} {version} (the indexes list {now})")
        else:
            foreign.append(ForeignPackage(name, version))
    if gone:
        raise LockError(f"{len(gone)} packages of that build are no longer listed at that version in a signed index "
                        "of the suite, its -updates or -security", log_tail=gone,
                        hint="the archive moved on since that build: lock from the archive (python -m builder lock "
                             "IMAGE.yaml) or rebuild first")
    if foreign:
        say(f"not from the Debian archive (not locked): {', '.join(f.name for f in foreign)}")
    added = complete(uni, kept, install_phases(cfg, have=[name for name, _ in installed]))
    where = ", ".join(str(f) for f in files)
    say(f"pinned the {len(kept)} packages of {where}"
        + (f"; added {len(added)} that a build installs besides (other variants, debian-installer's own): "
           f"{', '.join(sorted(added))}" if added else ""))
    notes = (f"resolved from the signed indexes besides what the build kept ({len(added)}): other variants' packages "
             "and what debian-installer (debootstrap too) installs and removes during a build: "
             f"{' '.join(sorted(added))}",) if added else ()
    codename = uni.indexes[0].codename if uni.indexes else cfg.debian.suite
    return _lock_of(uni, [c.pin() for c in [*kept, *added.values()]], codename=codename, cfg=cfg, method="build",
                    seed_list=(f"packages.txt of a build ({len(installed)} packages)", *sorted(added)),
                    foreign=tuple(foreign), notes=notes)


def complete(uni: Universe, kept: Iterable[Candidate], phases: Iterable[Phase]) -> dict[str, Candidate]:
    """What a build's ``phases`` (and debootstrap's priority packages) add to ``kept`` (the build's packages,
    taken as installed: they satisfy what they can at their own version). Each added package takes the highest
    listed version whose hard dependencies fit beside the kept ones (the archive may have moved on since the
    build: its newest grub-pc may need a newer grub-common than the build has, an older listed one not). When
    no listed version fits, each dependency in the way is an error, as it would be for apt in the target."""
    kept = list(kept)
    before = {c.stanza["Package"] for c in kept}
    res = resolve_phases(uni, phases, kept=kept)
    added = {n: c for n, c in res.selected.items() if n not in before}
    problems = res.problems
    if problems:
        raise LockError(f"cannot add what the other variants and debian-installer need to that build's packages "
                        f"({len(problems)} problems)", log_tail=problems,
                        hint="the archive moved on since that build: rebuild every variant, or lock from the "
                             "archive (python -m builder lock IMAGE.yaml)")
    return added


# ---------------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class Moved:
    name: str
    locked: str
    now: str  # "" when no index lists the package any more
    suite: str
    security: bool
    same_version_other_file: bool = False

    def line(self) -> str:
        if not self.now:
            return f"{self.name} {self.locked}: no longer listed in any signed index"
        if self.same_version_other_file:
            return f"{self.name} {self.locked}: the index lists the same version with another sha256 (!)"
        tag = "security update" if self.security else "update"
        return f"{self.name}: {self.locked} -> {self.now} ({tag}, {self.suite})"


def moved(lock: PackageLock, uni: Universe) -> list[Moved]:
    """What upstream has moved since ``lock``: per package, a newer candidate (a security update when it comes
    from the -security suite), the same version with another file, or none listed at all."""
    out = []
    for p in lock.packages:
        cand = uni.candidates.get(p.name)
        if cand is None:
            out.append(Moved(p.name, p.version, "", "", False))
            continue
        c = _cmp(cand.version, p.version)
        if c > 0:
            out.append(Moved(p.name, p.version, cand.version, cand.suite, cand.suite.endswith("-security")))
        elif c == 0 and cand.stanza.get("SHA256", "").lower() != p.sha256:
            out.append(Moved(p.name, p.version, cand.version, cand.suite, False, same_version_other_file=True))
    return out


__all__ = ["INSTALLER_PACKAGES", "Moved", "Phase", "Universe", "build_packages", "complete", "coverage_gaps",
           "image_packages", "install_phases", "installer_gaps", "installer_installs", "load_universe",
           "lock_from_build", "lock_gaps", "moved", "provisioned", "required_seeds", "resolve", "resolve_package_lock",
           "resolve_phases", "seed_spec", "seeds"]
