"""A DKMS kernel module compiled once on the build host instead of in the emulated guest.

Under TCG the NVIDIA module's DKMS compile takes ~45 minutes in the guest; natively it takes minutes. This
module makes a throw-away build root of the image's own suite with mmdebstrap (apt through the build's archive
gateway, verified with the configured Debian keyring), holding exactly what the guest would compile with: the
DKMS source package, ``linux-headers-<kver>`` of the image's kernel and the compiler those headers name, each at
the version apt in the target will pick (resolved up front from the verified Packages indexes: the highest
across the suite, ``-updates`` and ``-security``). Without a package lock the root is ``--variant=buildd``;
under one the gateway serves the lock's view, signed by the build's key, and the root is ``--variant=apt`` with
only packages the lock holds (:meth:`Sources.locked_view`, :func:`mmdebstrap_argv`), their closure checked
against the view before mmdebstrap runs (:func:`build_root_closure`). Inside it, the
package is installed with DKMS's autoinstall suppressed, then built explicitly (``dkms build -m -v -k``) and
packed as a binaries-only DKMS tarball (``dkms mktarball --binaries-only``), which the role
``nvidia-gpu-drivers`` loads into the guest (``nvidia_dkms_tarball``) with ``dkms ldtarball``.

Trixie's dkms (3.2) skips both ``dkms add`` and the build in a package's postinst when
``/etc/dkms/no-autoinstall`` exists (``/usr/lib/dkms/common.postinst``), and ``dkms autoinstall`` (its kernel
hooks) does nothing then either. The build root creates that file before any package is installed and removes
it before it runs ``dkms add`` and ``dkms build`` itself, so exactly one build for exactly the kernel asked for
happens.

Source patches (:mod:`builder.dkmspatches`): given patches, the role's own script (``dkms-patches.sh``) and the
patch files are uploaded into the build root, and the script gives the package's ``/usr/src/<module>-<version>``
the patches (``patches/``, ``PATCH[]`` in ``dkms.conf``) before ``dkms add``, exactly as the role does on the
target; ``dkms build`` applies them. The patches' names, matches and bytes are part of the cache key.

Signing: with a key and certificate (``signing_key``, ``signing_cert``) they are uploaded into the build root
and named in ``/etc/dkms/framework.conf.d/builder-signing.conf`` (``mok_signing_key``, ``mok_certificate``)
before the build, so dkms signs the module; the key never reaches the tarball (checked). Without them the
module is unsigned (the build root has no openssl, so dkms cannot make a throw-away key either).

The result is cached (:class:`ModuleCache`, ``<cache>/modules/<key>/``) by what decides the module's bytes
(:meth:`ModulePlan.cache_key`); a hit makes no build root at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from debian.debian_support import Version

from .archive.cache import ContentCache, cache_base, sha256_file
from .archive.client import Archive
from .archive.http import FetchStats
from .archive.packages import iter_stanzas
from .config import DebianConfig
from .dkmspatches import DkmsPatch, script_args
from .errors import BuilderError, HostModuleError
from .pkgresolve import Phase, Resolution, Universe, resolve_phases
from .run import run, spawn, tail

log = logging.getLogger(__name__)

Origin = Literal["host-built", "cache"]
Index = Mapping[str, Mapping[str, str]]  # package name -> its highest stanza in one index
LabelledIndex = tuple[str, Index]  # ("trixie-security/main", index)

KEY_FORMAT = 1  # bump when what the cache key covers changes meaning
BUILD_TIMEOUT = 3600
DKMS_ARCH = {"amd64": "x86_64"}  # Debian architecture -> the machine name dkms files modules under
OUT_INSIDE = "/tmp/builder-out"  # where the build script leaves its results inside the build root
SCRIPT_INSIDE = "/tmp/builder-build-module"
SIGNING_INSIDE = "/etc/dkms/builder-signing"
PATCHES_INSIDE = "/tmp/builder-dkms-patches"  # the patch files, by name
PATCH_SCRIPT_INSIDE = "/tmp/builder-dkms-patches.sh"
_DEP_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9+.-]+)")
_KVER_RE = re.compile(r"[0-9][A-Za-z0-9.+~_-]*")
# What the build root runs besides dkms and the compiler: modinfo (kmod) and find (findutils) in BUILD_SCRIPT, and
# what dkms compresses a module with (xz-utils, zstd: the kernel's CONFIG_MODULE_COMPRESS_*). A buildd root has
# them anyway; a package lock's --variant=apt root gets each one the lock holds (mmdebstrap_argv).
BUILD_ROOT_TOOLS = ("kmod", "findutils", "xz-utils", "zstd")

# Runs inside the build root (mmdebstrap --customize-hook, chroot): PACKAGE KVER OUTDIR KEY CERT [PATCH MATCH]...
# (KEY and CERT '' when unsigned; each PATCH a file, for dkms-patches.sh). It always exits 0 so that the results
# (or the error and make.log) are still copied out; OUTDIR/status says "ok".
BUILD_SCRIPT = r"""#!/bin/bash
set -u
pkg=$1 kver=$2 out=$3 key=${4:-} cert=${5:-}
shift $(($# < 5 ? $# : 5))
mkdir -p "$out"
fail() { printf '%s\n' "$*" > "$out/error"; exit 0; }
conf=$(dpkg-query -L "$pkg" 2>/dev/null | grep -E '^/usr/src/[^/]+/dkms\.conf$' | head -n 1)
[ -n "$conf" ] || fail "$pkg ships no /usr/src/*/dkms.conf: it is not a DKMS source package"
{ read -r module; read -r version; } < <(kernelver=$kver bash -c \
    '. "$1" >/dev/null 2>&1; printf "%s\n%s\n" "${PACKAGE_NAME:-}" "${PACKAGE_VERSION:-}"' _ "$conf")
[ -n "$module" ] && [ -n "$version" ] || fail "$conf sets no PACKAGE_NAME or PACKAGE_VERSION"
printf 'module=%s\nversion=%s\n' "$module" "$version" > "$out/info"
if [ $# -gt 0 ]; then
    # the same patches, by the same script, as the role gives the target's source tree
    bash PATCH_SCRIPT "${conf%/dkms.conf}" "$@" > "$out/patches.log" 2>&1 \
        || fail "the DKMS patches were not given to ${conf%/dkms.conf}: $(tail -n 1 "$out/patches.log")"
fi
# The package's postinst added and built nothing (no-autoinstall); from here on dkms does what it is told.
rm -f /etc/dkms/no-autoinstall
if [ -n "$key" ]; then
    chmod 0600 "$key"
    mkdir -p /etc/dkms/framework.conf.d
    printf 'mok_signing_key=%s\nmok_certificate=%s\n' "$key" "$cert" > /etc/dkms/framework.conf.d/builder-signing.conf
fi
dkms add -m "$module" -v "$version" || fail "dkms add -m $module -v $version failed"
rc=0
dkms build -m "$module" -v "$version" -k "$kver" || rc=$?
for log in "/var/lib/dkms/$module/$version/build/make.log" "/var/lib/dkms/$module/$version/$kver"/*/log/make.log; do
    [ -f "$log" ] && cp "$log" "$out/make.log"
done
[ -n "$key" ] && rm -f "$key" /etc/dkms/framework.conf.d/builder-signing.conf
case $rc in
    0) ;;
    77) fail "dkms build skipped $module $version for $kver: dkms.conf excludes this kernel (BUILD_EXCLUSIVE_*)" ;;
    5|6) fail "dkms build -m $module -v $version -k $kver: a patch of dkms.conf's PATCH[] is missing or does" \
              "not apply (exit code $rc; see make.log)" ;;
    *) fail "dkms build -m $module -v $version -k $kver exited with $rc" ;;
esac
ko=$(find "/var/lib/dkms/$module/$version/$kver" -path '*/module/*.ko*' | sort | head -n 1)
[ -n "$ko" ] || fail "dkms build left no module under /var/lib/dkms/$module/$version/$kver"
printf 'signer=%s\n' "$(modinfo -F signer "$ko" 2>/dev/null)" >> "$out/info"
dkms mktarball -m "$module" -v "$version" -k "$kver" --binaries-only --archive "$out/module.tar.gz" \
    || fail "dkms mktarball failed"
echo ok > "$out/status"
""".replace("PATCH_SCRIPT", PATCH_SCRIPT_INSIDE)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class HostModule:
    """A binaries-only DKMS tarball of ``module`` ``version`` for kernel ``kver``, from a build on this host
    (``origin`` ``host-built``) or the module cache (``cache``); ``seconds`` is what getting it took."""

    tarball: Path
    module: str
    version: str
    kver: str
    origin: Origin
    seconds: float
    package: str = ""
    package_version: str = ""
    key: str = ""
    signer: str = ""
    patches: tuple[DkmsPatch, ...] = ()

    def manifest(self) -> dict[str, Any]:
        return {"origin": self.origin, "module": self.module, "version": self.version, "kver": self.kver,
                "seconds": round(self.seconds, 1), "package": f"{self.package}={self.package_version}",
                "cache_key": self.key, "signer": self.signer or None,
                "dkms_patches": [p.manifest() for p in self.patches]}


@dataclass(frozen=True)
class Resolved:
    """A package at the version apt would install, and the index that has it."""

    name: str
    version: str
    sha256: str
    where: str  # suite/component
    fields: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def pin(self) -> str:
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class ModulePlan:
    """What the build root holds (each at its resolved version) and for which kernel the module is built."""

    dkms_package: Resolved  # the module's DKMS source package (e.g. nvidia-kernel-dkms)
    kver: str  # the kernel release the module is built for (e.g. 6.12.118+deb13-amd64)
    headers: Resolved  # linux-headers-<kver>
    compiler: Resolved  # the gcc-N the headers depend on
    dkms: Resolved  # the dkms tool itself
    signing: str = "unsigned"  # the signing certificate's sha256, or "unsigned"
    patches: tuple[DkmsPatch, ...] = ()  # source patches DKMS applies (PATCH[] in dkms.conf)
    # BUILD_ROOT_TOOLS the indexes list: not in the cache key (they decide no byte of the module)
    tools: tuple[Resolved, ...] = ()

    def cache_key(self) -> str:
        """What decides the module's bytes: the DKMS source package and version, the kernel and its headers,
        the compiler, dkms, the signing certificate, and the source patches (each one's name, match and sha256,
        in order). The source ``.deb``'s sha256 (from the signed index) stands in for a digest of its
        ``dkms.conf``: it covers that file and every source file besides, and is known without downloading the
        package. Without patches the key is what it was before patches existed (no ``dkms_patches`` entry), so
        an unpatched module keeps its cache entry, and a patched one never shares it."""
        data: dict[str, Any] = {
            "format": KEY_FORMAT,
            "dkms_package": self.dkms_package.pin, "dkms_package_sha256": self.dkms_package.sha256,
            "kver": self.kver, "headers": self.headers.pin, "compiler": self.compiler.pin, "dkms": self.dkms.pin,
            "signing": self.signing,
        }
        if self.patches:
            data["dkms_patches"] = [p.key() for p in self.patches]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]

    def includes(self, *, tools: bool = False) -> tuple[str, ...]:
        """mmdebstrap's ``--include``: every package pinned to its resolved version (``tools``: and the
        :data:`BUILD_ROOT_TOOLS` the indexes list)."""
        return tuple(p.pin for p in (self.dkms, self.compiler, self.headers, self.dkms_package,
                                     *(self.tools if tools else ())))


# ---------------------------------------------------------------------------------------------- resolution (pure)


def highest(indexes: Iterable[LabelledIndex], name: str) -> Resolved | None:
    """``name`` at the highest version any of the indexes has (apt's choice among sources of equal priority,
    as the suite, -updates and -security are), or None."""
    best: tuple[Version, str, Mapping[str, str]] | None = None
    for label, index in indexes:
        st = index.get(name)
        if st is None:
            continue
        v = Version(st.get("Version", "0"))
        if best is None or v > best[0]:
            best = (v, label, st)
    if best is None:
        return None
    st = best[2]
    return Resolved(name, st.get("Version", ""), st.get("SHA256", "").lower(), best[1], st)


def resolve(indexes: Sequence[LabelledIndex], name: str, why: str) -> Resolved:
    found = highest(indexes, name)
    if found is None:
        where = ", ".join(label for label, _ in indexes) or "no index"
        raise HostModuleError(f"{name} ({why}) is in none of the package indexes ({where})",
                              hint="check debian.components and the suite; or set provision.host_module: off")
    return found


def depends_names(stanza: Mapping[str, str], field_name: str = "Depends") -> list[str]:
    """The first alternative of each dependency of a stanza, names only (no version, no architecture)."""
    out = []
    for group in stanza.get(field_name, "").replace("\n", " ").split(","):
        m = _DEP_NAME.match(group.split("|", 1)[0])
        if m:
            out.append(m.group(1).split(":", 1)[0])
    return out


def image_kernel(indexes: Sequence[LabelledIndex], flavour: str = "amd64") -> str:
    """The kernel release the image boots: what ``linux-image-<flavour>`` depends on at the version the target
    installs (the installer upgrades to it, and drops the older kernel)."""
    meta = resolve(indexes, f"linux-image-{flavour}", "the kernel metapackage")
    prefix = "linux-image-"
    for dep in depends_names(meta.fields):
        if dep.startswith(prefix) and dep != meta.name:
            kver = dep[len(prefix):].removesuffix("-unsigned")
            if _KVER_RE.fullmatch(kver):
                return kver
    raise HostModuleError(f"{meta.pin} ({meta.where}) depends on no versioned linux-image package: "
                          f"{meta.fields.get('Depends', '')!r}")


def compiler_of(headers: Resolved) -> str:
    """The compiler package the kernel headers name (``gcc-14`` for trixie's kernels); ``gcc`` if none."""
    return next((d for d in depends_names(headers.fields) if re.fullmatch(r"gcc-\d+", d)), "gcc")


def plan_module(indexes: Sequence[LabelledIndex], dkms_package: str, *, kver: str | None = None,
                flavour: str = "amd64", signing_cert: Path | None = None,
                patches: Sequence[DkmsPatch] = ()) -> ModulePlan:
    """Which packages, at which versions, build ``dkms_package``'s module for ``kver`` (default: the image's
    kernel, :func:`image_kernel`), with which source patches."""
    source = resolve(indexes, dkms_package, "the DKMS source package")
    kver = kver or image_kernel(indexes, flavour)
    if not _KVER_RE.fullmatch(kver):
        raise HostModuleError(f"not a kernel release: {kver!r}")
    headers = resolve(indexes, f"linux-headers-{kver}", f"the headers of kernel {kver}")
    compiler = resolve(indexes, compiler_of(headers), f"the compiler of the {kver} headers")
    dkms = resolve(indexes, "dkms", "the DKMS framework")
    signing = sha256_file(signing_cert) if signing_cert is not None else "unsigned"
    tools = tuple(t for t in (highest(indexes, name) for name in BUILD_ROOT_TOOLS) if t is not None)
    return ModulePlan(source, kver, headers, compiler, dkms, signing, patches=tuple(patches), tools=tools)


# ---------------------------------------------------------------------------------------------- the archives


@dataclass(frozen=True)
class Sources:
    """The archives the build root's apt uses, and the versions are resolved from: the suite, ``-updates`` on
    ``mirror`` and ``-security`` on ``security_mirror`` (in a build: the build's gateway)."""

    mirror: str
    security_mirror: str
    suite: str
    components: tuple[str, ...]
    keyring: Path
    fingerprints: tuple[str, ...]
    security_fingerprints: tuple[str, ...]
    arch: str = "amd64"
    locked: bool = False  # the package lock's view (locked_view): the build root holds only what the lock holds
    codename: str = ""  # what -updates and -security are named after ("": the suite, as a mirror's aliases allow)

    @classmethod
    def of(cls, debian: DebianConfig, *, mirror: str = "", security_mirror: str = "") -> Sources:
        """The image's archives (``debian``), reached at ``mirror`` and ``security_mirror`` when given."""
        return cls(mirror or debian.mirror, security_mirror or debian.security_mirror, debian.suite,
                   debian.components, debian.keyring, debian.trusted_fingerprints, debian.security_fingerprints,
                   debian.arch)

    def locked_view(self, keyring: Path, fingerprint: str, *, suite: str, codename: str) -> Sources:
        """These archives as the build's gateway serves them under a package lock: all three suites are the lock's
        view (builder/gateway/target.py), named as the lock names them — ``dists/<suite>`` (the lock's
        ``suite``), ``<codename>-updates`` and ``<codename>-security`` (its ``codename``; the view has no
        ``stable-updates`` alias) — and signed by the build's key alone. Verified the way apt in the target
        verifies them then: ``keyring`` is Debian's archive keyring plus that key (the target trusts it as
        ``KEY_FILE``), and only a signature by ``fingerprint`` (the build's key) counts, so an index the lock did
        not make is refused rather than built against. The build root's apt gets ``keyring`` as each source's
        ``signed-by`` (:meth:`apt_lines`), so it trusts that file for these sources and nothing else."""
        if not keyring.is_absolute() or re.search(r"[\s\]]", str(keyring)):
            raise HostModuleError(f"the target's keyring {keyring} cannot be an apt source's signed-by: it must be "
                                  "an absolute path without blanks or ']'", hint="use another work directory")
        return replace(self, suite=suite, codename=codename, keyring=keyring, fingerprints=(fingerprint,),
                       security_fingerprints=(fingerprint,), locked=True)

    def archives(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(URL, suite, accepted signers) of each archive, in apt's order: the suite, then ``-updates`` and
        ``-security`` of the codename (under a lock: the lock's) or else of the suite."""
        base = self.codename or self.suite
        return [(self.mirror, self.suite, self.fingerprints),
                (self.mirror, f"{base}-updates", self.fingerprints),
                (self.security_mirror, f"{base}-security", self.security_fingerprints)]

    def apt_lines(self) -> list[str]:
        """One-line apt sources for mmdebstrap: given a mirror, it adds no -updates or -security itself. Under a
        lock each names the target's keyring as its ``signed-by``: apt then checks these sources with that file
        alone (mmdebstrap's ``--keyring=FILE`` would make it apt's legacy ``trusted.gpg``, which apt warns about
        and deprecates, and leave the host's ``trusted.gpg.d`` trusted besides)."""
        comps = " ".join(self.components)
        opts = f"[signed-by={self.keyring}] " if self.locked else ""
        return [f"deb {opts}{url} {suite} {comps}" for url, suite, _ in self.archives()]

    def hosts(self) -> list[str]:
        return list(dict.fromkeys(urllib.parse.urlsplit(url).hostname or "" for url, _, _ in self.archives()))


def build_root_closure(indexes: Sequence[LabelledIndex], plan: ModulePlan, *, arch: str = "amd64") -> Resolution:
    """Under a package lock: what the ``--variant=apt`` build root installs, resolved from ``indexes`` (the view's,
    read whole) as the lock's own resolution does (:func:`builder.pkgresolve.resolve_phases`; no Recommends:
    mmdebstrap installs none): its Essential packages, apt, the plan's packages and tools
    (``includes(tools=True)``) and their Pre-Depends and Depends. Its ``unmet`` is what the view cannot give (one
    relation or package each), its ``problems`` name who needs each."""
    uni = Universe(arch)
    for label, index in indexes:
        for st in index.values():
            uni.add(st, "debian", label.split("/", 1)[0], "")
    essential = sorted(n for n, c in uni.candidates.items() if c.stanza.get("Essential") == "yes")
    return resolve_phases(uni, [Phase("build root", (*essential, "apt", *plan.includes(tools=True)))], priorities=())


def everything(name: str) -> bool:
    """Every package of an index: a package lock's view is small (only what the lock holds), and the build root's
    closure is checked against all of it (:func:`build_root_closure`)."""
    return True


def wanted(name: str) -> bool:
    """Whether a package can take part in a plan (the rest of an index is not kept: ~65k stanzas)."""
    return (name.startswith(("linux-image-", "linux-headers-", "gcc-")) or name.endswith("-dkms") or name == "dkms"
            or name in BUILD_ROOT_TOOLS)


def load_indexes(sources: Sources, cache: ContentCache, *, stats: FetchStats | None = None,
                 keep: Callable[[str], bool] = wanted) -> list[LabelledIndex]:
    """The verified Packages index of every archive and component (only the packages ``keep`` wants)."""
    out: list[LabelledIndex] = []
    try:
        for url, suite, fprs in sources.archives():
            archive = Archive(url, suite, keyring=sources.keyring, fingerprints=fprs, cache=cache, stats=stats)
            release = archive.release()
            for comp in sources.components:
                path = f"{comp}/binary-{sources.arch}/Packages"
                # (the security archive's Components say updates/main, its files are listed as main/… too)
                if not any(f == path or f.startswith(path + ".") for f in release.files):
                    continue
                index: dict[str, dict[str, str]] = {}
                for st in iter_stanzas(archive.index(path), source=f"{suite}/{path}"):
                    name = st.get("Package", "")
                    if keep(name):
                        old = index.get(name)
                        if old is None or Version(st.get("Version", "0")) > Version(old.get("Version", "0")):
                            index[name] = st
                out.append((f"{suite}/{comp}", index))
    except HostModuleError:
        raise
    except BuilderError as exc:
        raise HostModuleError(f"cannot read the package indexes for the host-side module build: {exc}",
                              hint=exc.hint) from exc
    return out


# ---------------------------------------------------------------------------------------------- the cache


class ModuleCache:
    """Built modules by :meth:`ModulePlan.cache_key`: ``<root>/<key>/module.tar.gz`` and ``meta.json``. An
    entry appears whole (a directory renamed into place) or not at all."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_base() / "modules"

    def lookup(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        d = self.root / key
        try:
            meta = json.loads((d / "meta.json").read_text())
            tarball = d / "module.tar.gz"
            if not isinstance(meta, dict) or sha256_file(tarball) != meta.get("tarball_sha256"):
                raise ValueError("tarball does not match its meta.json")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("module cache entry %s is broken (%s); removing it", d, exc)
            shutil.rmtree(d, ignore_errors=True)
            return None
        return tarball, meta

    def store(self, key: str, tarball: Path, meta: Mapping[str, Any]) -> Path:
        """Copy ``tarball`` in under ``key`` with ``meta``; return the cached tarball. A concurrent build that
        stored the same key first wins (both built the same thing)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            shutil.copyfile(tarball, tmp / "module.tar.gz")
            full = {**meta, "key": key, "tarball_sha256": sha256_file(tmp / "module.tar.gz"),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / "meta.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
            for f in (tmp / "module.tar.gz", tmp / "meta.json"):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(tmp, self.root / key)
            except OSError:
                if self.lookup(key) is None:
                    raise
                log.info("module cache entry %s was stored meanwhile; keeping that one", key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.root / key / "module.tar.gz"


# ---------------------------------------------------------------------------------------------- the build root


def mmdebstrap_mode() -> Literal["unshare", "root"]:
    """``unshare`` where the host allows it (as root: a private mount namespace, so nothing stays mounted if
    the build is killed; otherwise: user namespaces with subordinate ids), else ``root``."""
    if os.geteuid() == 0:
        probe = run(["unshare", "--mount", "--propagation", "unchanged", "--", "true"], check=False)
        return "unshare" if probe.returncode == 0 else "root"
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        raise HostModuleError("mmdebstrap needs newuidmap and newgidmap to make a build root without root",
                              missing_tool="newuidmap", hint="apt-get install uidmap, or run the build as root")
    user = _user_name()
    for idfile in ("/etc/subuid", "/etc/subgid"):
        try:
            listed = any(line.split(":", 1)[0] in (user, str(os.getuid())) for line in Path(idfile).read_text().split())
        except OSError:
            listed = False
        if not listed:
            raise HostModuleError(f"{idfile} has no range for {user}: mmdebstrap cannot make a build root without "
                                  "root", hint="add one (usermod --add-subuids/--add-subgids), or run as root")
    return "unshare"


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def mmdebstrap_argv(plan: ModulePlan, sources: Sources, *, mode: str, script: Path, outdir: Path,
                    signing: tuple[Path, Path] | None = None, patch_script: Path | None = None) -> list[str]:
    """The mmdebstrap command line: a build root holding the plan's packages, in which ``script`` builds the
    module and whose results land in ``outdir/builder-out``; the root itself is thrown away.

    Without a package lock it is a buildd root (Essential, priority required, build-essential), as a Debian
    build chroot is. Under a lock (``sources.locked``) the gateway serves only the locked packages, and buildd's
    build-essential, g++, libc6-dev and fakeroot are not among them (the image does not install them): the root
    is ``--variant=apt`` (Essential and apt, which every lock holds: debian-installer installs them) with the
    plan's packages and the :data:`BUILD_ROOT_TOOLS` the lock holds, each pinned, and their hard dependencies —
    what the guest itself compiles with — and the view's keyring is each source's ``signed-by``, not
    ``--keyring``. (Seeding the lock with buildd's set instead would pin packages the
    image never installs, and break again with a ``lock --from-build`` lock, which holds only what a build
    installed.) mmdebstrap installs no Recommends, as the NVIDIA role does not. With the plan's patches,
    ``patch_script`` (dkms-patches.sh) and the patch files are uploaded too."""
    q = shlex.quote
    hooks = [
        # before any --include package is installed: the DKMS package's postinst must add and build nothing
        "--essential-hook=mkdir -p \"$1/etc/dkms\" && : > \"$1/etc/dkms/no-autoinstall\"",
        f"--customize-hook=upload {q(str(script))} {SCRIPT_INSIDE}",
    ]
    args = [q(plan.dkms_package.name), q(plan.kver), OUT_INSIDE]
    if signing is not None:
        key, cert = signing
        hooks += [
            f"--customize-hook=mkdir -m 0700 -p \"$1{SIGNING_INSIDE}\"",
            f"--customize-hook=upload {q(str(key))} {SIGNING_INSIDE}/signing.key",
            f"--customize-hook=upload {q(str(cert))} {SIGNING_INSIDE}/signing.crt",
        ]
        args += [f"{SIGNING_INSIDE}/signing.key", f"{SIGNING_INSIDE}/signing.crt"]
    if plan.patches:
        if patch_script is None:
            raise HostModuleError("the module has source patches but no dkms-patches.sh to give them to DKMS")
        if signing is None:
            args += ["''", "''"]
        hooks += [f"--customize-hook=mkdir -p \"$1{PATCHES_INSIDE}\"",
                  f"--customize-hook=upload {q(str(patch_script))} {PATCH_SCRIPT_INSIDE}"]
        hooks += [f"--customize-hook=upload {q(str(p.path))} {PATCHES_INSIDE}/{p.name}" for p in plan.patches]
        # the source directory is the build script's to fill in: it finds the package's dkms.conf
        args += [q(a) for a in script_args("", plan.patches, where=PATCHES_INSIDE)[1:]]
    hooks += [
        f"--customize-hook=chroot \"$1\" /bin/bash {SCRIPT_INSIDE} {' '.join(args)}",
        f"--customize-hook=copy-out {OUT_INSIDE} {q(str(outdir))}",
    ]
    aptopts = ['--aptopt=Acquire::Retries "3"']
    # the build's gateway listens on the loopback: never through a proxy the environment names
    aptopts += [f'--aptopt=Acquire::http::Proxy::{h} "DIRECT"' for h in sources.hosts()
                if h in ("localhost", "::1") or h.startswith("127.")]
    return [
        "mmdebstrap", f"--mode={mode}", f"--variant={'apt' if sources.locked else 'buildd'}",
        f"--architectures={sources.arch}",
        # under a lock the keyring is each source's signed-by (Sources.apt_lines)
        *([] if sources.locked else [f"--keyring={sources.keyring}"]),
        f"--include={','.join(plan.includes(tools=sources.locked))}",
        *aptopts,
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        *hooks,
        sources.suite, "/dev/null", *sources.apt_lines(),
    ]


def read_kv(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def check_tarball(tarball: Path, module: str, version: str, kver: str, arch: str,
                  secret: bytes | None = None) -> list[str]:
    """Problems with a binaries-only DKMS tarball: not one of ``module`` ``version``, no built module for
    ``kver``, or a private key inside (``secret``: the signing key's bytes)."""
    problems = []
    ko = re.compile(rf"(\./)?dkms_main_tree/{re.escape(kver)}/{re.escape(arch)}/module/[^/]+\.ko(\.[a-z]+)?")
    found: dict[str, bytes] = {}
    has_module = False
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for member in tf:
                name = member.name.removeprefix("./")
                if ko.fullmatch(member.name):
                    has_module = True
                if not member.isfile():
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if name in ("dkms_binaries_only/PACKAGE_NAME", "dkms_binaries_only/PACKAGE_VERSION"):
                    found[name] = data
                if b"PRIVATE KEY" in data or (secret and secret.strip() and secret.strip() in data):
                    problems.append(f"{name} holds a private key")
    except (OSError, tarfile.TarError, EOFError) as exc:
        return [f"not a readable tar.gz: {exc}"]
    if found.get("dkms_binaries_only/PACKAGE_NAME", b"").strip() != module.encode():
        problems.append(f"not a binaries-only tarball of {module}")
    if found.get("dkms_binaries_only/PACKAGE_VERSION", b"").strip() != version.encode():
        problems.append(f"not of version {version}")
    if not has_module:
        problems.append(f"no built module for {kver} ({arch})")
    return problems


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (a build root in root mode that was not cleaned up)."""
    root = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        return [m for m in (line.split()[1] for line in f) if m == root or m.startswith(root + "/")]
    return []


def _remove(path: Path) -> None:
    """Remove a work directory, unless something is still mounted in it (a root-mode build root killed before
    it unmounted /dev: removing that would remove the host's device nodes)."""
    busy = mounts_under(path) if path.exists() else []
    if busy:
        log.warning("not removing %s: still mounted there: %s", path, ", ".join(busy))
        return
    shutil.rmtree(path, ignore_errors=True)


def _run_build(argv: list[str], log_path: Path, env: Mapping[str, str], *, timeout: float,
               cancel: threading.Event | None) -> int:
    """Run the build root's mmdebstrap (its output to ``log_path``); its exit code. Its whole process group
    is stopped when this returns early (cancelled, timed out, interrupted) — and by the kernel if builder dies."""
    deadline = time.monotonic() + timeout
    with log_path.open("ab") as logf, spawn(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, grace=15,
                                            group=True, stage="host-module") as child:
        while (rc := child.wait(1.0)) is None:
            if cancel is not None and cancel.is_set():
                raise HostModuleError("the host-side module build was cancelled")
            if time.monotonic() > deadline:
                raise HostModuleError(f"the host-side module build took longer than {timeout:.0f} s",
                                      log_tail=tail(log_path.read_bytes()))
        return rc


def first_compile_error(make_log: bytes) -> str:
    """The first compiler or linker error of a DKMS make.log (``file:line:col: error: …``), without the build
    root's paths before the module's own directory; "" when there is none."""
    for raw in make_log.decode(errors="replace").splitlines():
        line = raw.strip()
        if ": error: " in line or line.startswith(("ERROR: ", "error: ")):
            return re.sub(r"^/var/lib/dkms/[^/]+/[^/]+/build/", "", line)[:400]
    return ""


def build_module(
    sources: Sources,
    dkms_package: str,
    *,
    workdir: Path,
    cache: ContentCache,
    modules: ModuleCache | None = None,
    kver: str | None = None,
    signing_key: Path | None = None,
    signing_cert: Path | None = None,
    niceness: int | None = 10,
    timeout: float = BUILD_TIMEOUT,
    cancel: threading.Event | None = None,
    stats: FetchStats | None = None,
    report: Callable[[str], None] | None = None,
    patches: Sequence[DkmsPatch] = (),
    patch_script: Path | None = None,
) -> HostModule:
    """``dkms_package``'s module for ``kver`` (default: the image's kernel) as a binaries-only DKMS tarball:
    from ``modules`` (the module cache) when it has it, else built in an mmdebstrap build root in ``workdir``
    and stored there. ``signing_key`` and ``signing_cert`` (paths, both or neither) sign the module.
    ``patches`` are given to the source tree by ``patch_script`` (dkms-patches.sh) before DKMS builds it.
    ``niceness`` runs the build root under ``nice -n N ionice -c3`` (None: as is). Every failure is a
    :class:`HostModuleError` (``missing_tool`` set when a host program is missing)."""
    t0 = time.monotonic()
    say = report or (lambda msg: log.info("%s", msg))
    modules = modules if modules is not None else ModuleCache()
    if (signing_key is None) != (signing_cert is None):
        raise HostModuleError("signing a module needs both a key and a certificate (signing_key, signing_cert)")
    if patches and (patch_script is None or not Path(patch_script).is_file()):
        raise HostModuleError(f"DKMS source patches need dkms-patches.sh, and {patch_script} is not a file")
    signing = None
    if signing_key is not None and signing_cert is not None:
        for p in (signing_key, signing_cert):
            if not Path(p).is_file():
                raise HostModuleError(f"module signing: {p} is not a file")
        signing = (Path(signing_key).resolve(), Path(signing_cert).resolve())
    indexes = load_indexes(sources, cache, stats=stats, keep=everything if sources.locked else wanted)
    plan = plan_module(indexes, dkms_package, kver=kver, flavour=sources.arch,
                       signing_cert=signing[1] if signing else None, patches=patches)
    key = plan.cache_key()
    hit = modules.lookup(key)
    if hit is not None:
        tarball, meta = hit
        say(f"host module: {meta.get('module')} {meta.get('version')} for {plan.kver} from the module cache")
        return HostModule(tarball, str(meta.get("module")), str(meta.get("version")), plan.kver, "cache",
                          time.monotonic() - t0, plan.dkms_package.name, plan.dkms_package.version, key,
                          str(meta.get("signer") or ""), plan.patches)
    if shutil.which("mmdebstrap") is None:
        raise HostModuleError("mmdebstrap is not installed: cannot make the build root for the host-side module "
                              "build", missing_tool="mmdebstrap",
                              hint="apt-get install mmdebstrap (or set provision.host_module: off)")
    if cancel is not None and cancel.is_set():  # the build ended while the indexes were read
        raise HostModuleError("the host-side module build was cancelled")
    mode = mmdebstrap_mode()
    if sources.locked:  # the view holds only what the lock holds: what the build root lacks fails here, not in apt
        root = build_root_closure(indexes, plan, arch=sources.arch)
        if root.unmet:
            raise HostModuleError(
                f"the package lock's view cannot make the build root of {plan.dkms_package.pin} for {plan.kver}: it "
                f"lacks {', '.join(dict.fromkeys(root.unmet))}", log_tail=root.problems,
                hint="the build root installs Essential, apt, dkms, the compiler, the headers and the DKMS package, "
                     "with their dependencies, from the lock: refresh it (python -m builder lock IMAGE.yaml "
                     "--update), or compile in the guest (provision.host_module: off)")
    workdir = Path(workdir)
    _remove(workdir)
    (workdir / "tmp").mkdir(parents=True, mode=0o700)
    script = workdir / "build-module.sh"
    script.write_text(BUILD_SCRIPT)
    outdir = workdir / "out"
    outdir.mkdir()
    argv = mmdebstrap_argv(plan, sources, mode=mode, script=script, outdir=outdir, signing=signing,
                           patch_script=Path(patch_script).resolve() if patch_script is not None else None)
    if niceness is not None:
        argv = ["nice", "-n", str(niceness), "ionice", "-c3", *argv]
    log_path = workdir / "mmdebstrap.log"
    say(f"host module: building {plan.dkms_package.pin} for {plan.kver} in an mmdebstrap build root "
        f"({mode} mode; {plan.headers.pin}, {plan.compiler.pin})"
        + (f"; DKMS patches: {', '.join(p.name for p in plan.patches)}" if plan.patches else ""))
    rc = _run_build(argv, log_path, {"TMPDIR": str(workdir / "tmp"), "LC_ALL": "C.UTF-8"},
                    timeout=timeout, cancel=cancel)
    res = outdir / Path(OUT_INSIDE).name
    info = read_kv(res / "info")
    module, version = info.get("module", "?"), info.get("version", "?")
    make_bytes = (res / "make.log").read_bytes() if (res / "make.log").is_file() else b""
    make_log = tail(make_bytes, 25) if make_bytes else []
    if (res / "error").is_file():
        first = first_compile_error(make_bytes)
        raise HostModuleError(
            f"the host-side DKMS build of {plan.dkms_package.pin} for kernel {plan.kver} failed: "
            f"{(res / 'error').read_text(errors='replace').strip()}" + (f"; first error: {first}" if first else ""),
            log_tail=make_log or tail(log_path.read_bytes()),
            hint=f"build log: {log_path}; DKMS's make.log: {res / 'make.log'} (the guest's DKMS would fail the same "
                 "way: the driver's source does not build for this kernel"
                 + (f" with the DKMS patches {', '.join(p.name for p in plan.patches)}" if plan.patches else "")
                 + ")")
    if rc != 0 or not (res / "status").is_file():
        raise HostModuleError(
            f"mmdebstrap could not make the build root for {plan.dkms_package.pin} (kernel {plan.kver}; exit code "
            f"{rc})", log_tail=tail(log_path.read_bytes()), hint=f"build log: {log_path}")
    tarball = res / "module.tar.gz"
    secret = signing[0].read_bytes() if signing else None
    problems = check_tarball(tarball, module, version, plan.kver, DKMS_ARCH.get(sources.arch, sources.arch), secret)
    signer = info.get("signer", "")
    if signing and not signer:
        problems.append("the module is not signed although a signing key was given")
    if problems:
        raise HostModuleError(f"the DKMS tarball of {module} {version} is not usable: " + "; ".join(problems),
                              log_tail=make_log)
    seconds = time.monotonic() - t0
    cached = modules.store(key, tarball, {
        "module": module, "version": version, "kver": plan.kver, "package": plan.dkms_package.pin,
        "package_sha256": plan.dkms_package.sha256, "headers": plan.headers.pin, "compiler": plan.compiler.pin,
        "dkms": plan.dkms.pin, "signing": plan.signing, "signer": signer, "build_seconds": round(seconds, 1),
        "dkms_patches": [p.manifest() for p in plan.patches],
    })
    say(f"host module: {module} {version} for {plan.kver} built in {seconds:.0f} s")
    _remove(workdir / "tmp")
    return HostModule(cached, module, version, plan.kver, "host-built", seconds, plan.dkms_package.name,
                      plan.dkms_package.version, key, signer, plan.patches)


__all__ = ["BUILD_SCRIPT", "HostModule", "ModuleCache", "ModulePlan", "Resolved", "Sources", "build_module",
           "build_root_closure", "check_tarball", "compiler_of", "highest", "image_kernel", "load_indexes",
           "mmdebstrap_argv", "mmdebstrap_mode", "plan_module"]
