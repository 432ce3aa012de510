"""Image definitions: YAML → frozen, typed models.

``load_config(path, overrides)`` reads the YAML, applies ``--var key.path=value`` overrides, fills the
defaults that depend on the host (the Debian mirror from the host's apt sources), and validates everything at
once. Every problem is reported with its path in one :class:`ConfigError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import hostapt
from .errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

# What the preseed and the image take. Every check rendering needs is here, so `validate` and `build` accept
# exactly the same configurations.
KNOWN_COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
# Without these the build cannot reach or drive the VM (SSH, sudo, Ansible's python3), or the image has no
# network on another NIC.
REQUIRED_PACKAGES = ("openssh-server", "sudo", "python3", "network-manager")
_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{1,40}")
LOCALE_RE = re.compile(r"(?P<lang>[a-z]{2,3})_(?P<country>[A-Z]{2})(?:\.[A-Za-z0-9-]+)?(?:@[a-z]+)?")
_KEYMAP_RE = re.compile(r"[A-Za-z0-9_-]+(?:\([A-Za-z0-9_-]+\))?")
_TZ_RE = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*")
_DOMAIN_RE = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
PKG_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?")
KARG_RE = re.compile(r"[A-Za-z0-9_.,:=/+@%-]+")
_LOCALES_FILE = Path("/usr/share/i18n/SUPPORTED")


def builtin_dir(name: str) -> Path | None:
    """builder's own ``roles``/``playbooks``: beside the package in a source tree, package data when installed."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / name, here / "data" / name):
        if cand.is_dir():
            return cand
    return None


def _supported_locales() -> set[str]:
    """Locale names glibc supports (the host's list, which matches the installer's); empty if unknown."""
    try:
        text = _LOCALES_FILE.read_text(errors="replace")
    except OSError:
        return set()
    return {line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")}


def check_package_list(pkgs: Any, what: str) -> list[str]:
    """Problems with a list of Debian package names (optionally =version): bad names, duplicates."""
    if not isinstance(pkgs, list | tuple) or not all(isinstance(p, str) for p in pkgs):
        return [f"{what} must be a list of package names"]
    out, seen = [], set()
    for i, p in enumerate(pkgs):
        if not PKG_RE.fullmatch(p):
            out.append(f"{what}[{i}]: not a Debian package name (optionally =version): {p!r}")
        elif p.split("=", 1)[0] in seen:
            out.append(f"{what}[{i}]: listed twice: {p!r}")
        seen.add(p.split("=", 1)[0])
    return out


def parse_size(value: str | int) -> int:
    """'30G', '30GiB', '512M', 1073741824 → bytes (binary units, as qemu-img reads them)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '30G'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. '30G', '512M')")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError("a size must be positive")
    return n


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str | int) -> int:
    """'7d', '12h', '30m', '90s', '2w', 3600 → seconds (0 allowed)."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '7d'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration must not be negative")
        return value
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. '7d', '12h', '30m')")
    return int(float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()])


def format_duration(seconds: float) -> str:
    """3 d 4 h style, for messages."""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DebianConfig(_Model):
    suite: str = "trixie"
    release: Literal[13] = 13
    arch: Literal["amd64"] = "amd64"
    mirror: str = Field("", description="Debian archive URL; default: the host's apt sources")
    security_mirror: str = Field("", description="Debian security archive URL; default: the host's apt sources")
    components: tuple[str, ...] = ("main", "contrib", "non-free", "non-free-firmware")
    keyring: Path = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    # Primary-key fingerprints accepted on InRelease (trixie automatic key, trixie stable release key,
    # bookworm automatic key which co-signs).
    trusted_fingerprints: tuple[str, ...] = (
        "04B54C3CDCA79751B16BC6B5225629DF75B188BD",
        "41587F7DB8C774BCCF131416762F67A0B2C39DE4",
        "B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8",
    )

    @field_validator("suite")
    @classmethod
    def _suite(cls, v: str) -> str:
        if not _SUITE_RE.fullmatch(v):
            raise ValueError(f"not a suite name: {v!r}")
        return v

    @field_validator("components")
    @classmethod
    def _components(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in v if c not in KNOWN_COMPONENTS]
        if bad:
            raise ValueError(f"the installer can only enable {', '.join(KNOWN_COMPONENTS)}; not {', '.join(bad)}")
        if "main" not in v:
            raise ValueError("must include main")
        if len(set(v)) != len(v):
            raise ValueError("a component is listed twice")
        return v

    @field_validator("mirror", "security_mirror")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v.rstrip("/")

    @property
    def upstreams(self) -> dict[str, str]:
        """The mirror of each archive the gateway serves, by its path prefix (``debian``, ``debian-security``)."""
        return {"debian": self.mirror, "debian-security": self.security_mirror}

    # The package lock (images/NAME.packages.lock): auto uses it when it exists, required fails without it,
    # off builds from the archive as it is (the target then gets whatever is newest); `lock` writes the file anyway.
    package_lock: Literal["auto", "required", "off"] = "auto"

    # Primary-key fingerprints accepted on the security archive's InRelease (trixie and bookworm security
    # automatic keys).
    security_fingerprints: tuple[str, ...] = (
        "5E04A1E3223A19A20706E20F9904613D4CCE68C6",
        "05AB90340C0C5E797F44A8C8254CF3B5AEC0A8F0",
    )

    @field_validator("trusted_fingerprints", "security_fingerprints")
    @classmethod
    def _fprs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(f.replace(" ", "").upper() for f in v)
        for f in out:
            if not re.fullmatch(r"[0-9A-F]{40}", f):
                raise ValueError(f"not an OpenPGP v4 fingerprint: {f!r}")
        return out


BootMode = Literal["hybrid", "uefi", "bios"]
# what a variant may override: nothing that shapes the installed disk they share
VARIANT_KEYS = frozenset({"provision", "disk", "secure_boot", "description", "vm"})
# of ``vm``, what concerns only the variant's own VMs (provision, verify): where they run and their vCPUs
VARIANT_VM_KEYS = frozenset({"libvirt_uri", "libvirt_pool", "libvirt_pool_dir", "cpus"})
_VARIANT_VM_WHY = {
    "backend": "every VM of a build runs on one backend",
    "accel": "it is chosen for each libvirt host (auto asks the host a variant runs on)",
    "memory": "it is the installer's RAM and the variants share one install (provision.memory is the RAM of "
              "a variant's VMs)",
    "firmware": "the install's firmware shapes the installed disk the variants share",
}


class DiskConfig(_Model):
    size: Annotated[int, Field(description="virtual size, e.g. '30G'")] = 30 << 30
    compression: Literal["zlib", "zstd", "none"] = "zlib"
    # hybrid: GPT with a BIOS boot partition, an EFI system partition and the root last; GRUB for both
    # (the layout of Debian's cloud images). uefi: the same without the BIOS stage. bios: msdos label, GRUB in
    # the MBR (no UEFI boot).
    boot: BootMode = "hybrid"

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        n = parse_size(v)
        if n < 4 << 30:
            raise ValueError("the disk must be at least 4G for a Debian install")
        return n


class VmConfig(_Model):
    backend: Literal["qemu", "libvirt"] = "qemu"
    # one URI, or a list of hosts: a build takes one by a stable hash of its image name; with variants that is
    # the install's, and the variants spread over the list (ImageConfig.variant_hosts; docs/remote-libvirt.md)
    libvirt_uri: str | tuple[str, ...] = "qemu:///system"
    libvirt_pool: str = "default"
    libvirt_pool_dir: str | None = None
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    cpus: Annotated[int, Field(ge=1, le=64)] = 2
    memory: Annotated[int, Field(description="guest RAM, e.g. '3G'")] = 3 << 30
    # How the build VMs boot. auto: uefi when the disk boots UEFI (hybrid, uefi), else bios.
    firmware: Literal["auto", "bios", "uefi"] = "auto"

    @field_validator("memory", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> int:
        n = parse_size(v)
        if n < 1 << 30:
            raise ValueError("the installer needs at least 1G of memory")
        return n

    @field_validator("libvirt_uri")
    @classmethod
    def _uris(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        from .errors import VmError
        from .vm.remote import parse_remote_uri

        uris = (v,) if isinstance(v, str) else v
        if not uris:
            raise ValueError("at least one libvirt URI")
        for uri in uris:
            if "://" not in uri:
                raise ValueError(f"not a libvirt URI: {uri!r}")
            try:
                parse_remote_uri(uri)
            except VmError as exc:
                raise ValueError(exc.message) from None
        return v

    @field_validator("libvirt_pool_dir")
    @classmethod
    def _pool_dir(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"an absolute directory on the libvirt host, not {v!r}")
        return v

    @property
    def libvirt_uris(self) -> tuple[str, ...]:
        return (self.libvirt_uri,) if isinstance(self.libvirt_uri, str) else tuple(self.libvirt_uri)

    def libvirt_host(self, image_name: str) -> str:
        """The libvirt URI a build of ``image_name`` uses (one of several by a stable hash of the name)."""
        from .vm.remote import pick_uri

        return pick_uri(self.libvirt_uris, image_name)

    def machine_options(self, image_name: str) -> dict[str, Any]:
        """:func:`~builder.vm.open_machine`'s backend arguments for a build of ``image_name``."""
        return {"backend": self.backend, "libvirt_uri": self.libvirt_host(image_name),
                "libvirt_pool": self.libvirt_pool, "libvirt_pool_dir": self.libvirt_pool_dir}

    def host_record(self, image_name: str) -> dict[str, Any]:
        """Where the VMs of a build of ``image_name`` run, for the manifest (the URI without its query)."""
        from .vm.remote import public_uri

        if self.backend != "libvirt":
            return {"backend": self.backend}
        return {"backend": self.backend, "libvirt_uri": public_uri(self.libvirt_host(image_name))}


class InstallerConfig(_Model):
    locale: str = "en_US.UTF-8"
    keymap: str = "us"
    timezone: str = "UTC"
    hostname: str = "debian"
    domain: str = ""
    build_user: str = "builder"
    # The image's contents are the base role's seed list (roles/base/defaults/main.yml: base_packages, which
    # the installer already installs so the cached installed disk holds them); these come in addition.
    extra_packages: tuple[str, ...] = ()
    install_recommends: bool = False
    kernel_cmdline: tuple[str, ...] = ("console=tty0", "console=ttyS0,115200")
    # a backstop only: a stuck install is stopped by stall_timeout. 3 h: a TCG install beside the host-side module
    # builds on 2 cores took over 90 min (it was stopped at its last step by the former 5400 s)
    timeout: Annotated[int, Field(ge=60, description="seconds for the whole install")] = 10800
    stall_timeout: Annotated[int, Field(ge=30, description="seconds without d-i log progress")] = 900
    # A cached installed disk older than this is not reused (a fresh install replaces it): '7d', '12h', 0 = never
    # reuse one.
    max_base_age: Annotated[int, Field(description="seconds, or a duration like '7d'")] = 7 * 86400

    @field_validator("max_base_age", mode="before")
    @classmethod
    def _age(cls, v: Any) -> int:
        return parse_duration(v)

    @field_validator("hostname")
    @classmethod
    def _host(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", v):
            raise ValueError(f"not a valid hostname: {v!r}")
        return v

    @field_validator("build_user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v) or v == "root":
            raise ValueError(f"not a valid unprivileged user name: {v!r}")
        return v

    @field_validator("locale")
    @classmethod
    def _locale(cls, v: str) -> str:
        if not LOCALE_RE.fullmatch(v):
            raise ValueError(f"expected a locale like en_US.UTF-8, not {v!r}")
        known = _supported_locales()
        if known and v not in known:
            raise ValueError(f"not a locale glibc supports (see {_LOCALES_FILE}): {v!r}")
        return v

    @field_validator("keymap")
    @classmethod
    def _keymap(cls, v: str) -> str:
        if not _KEYMAP_RE.fullmatch(v):
            raise ValueError(f"not an XKB keymap name: {v!r}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if not _TZ_RE.fullmatch(v) or ".." in v:
            raise ValueError(f"not a time zone name: {v!r}")
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if v and not _DOMAIN_RE.fullmatch(v):
            raise ValueError(f"not a DNS domain: {v!r}")
        return v

    @field_validator("extra_packages")
    @classmethod
    def _pkgs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        problems = check_package_list(v, "extra_packages")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @field_validator("kernel_cmdline")
    @classmethod
    def _kargs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if not KARG_RE.fullmatch(a) or a.startswith("-")]
        if bad:
            raise ValueError(f"not a plain kernel argument (no spaces or quotes): {bad[0]!r}")
        return v


class ProvisionConfig(_Model):
    enabled: bool = True
    # Default: builder's own playbooks/cloud-gpu-worker.yml (the roles base and nvidia-gpu-drivers).
    playbook: Path | None = None
    # Run after the playbook, also when provisioning is off: makes the machine an image (roles/finalize).
    # Default: builder's own playbooks/finalize.yml.
    finalize_playbook: Path | None = None
    # Searched before builder's own roles (base, nvidia-gpu-drivers, finalize), which are always on the path.
    roles_path: tuple[Path, ...] = ()
    extra_vars: dict[str, Any] = Field(default_factory=dict)
    task_timeout: Annotated[int, Field(ge=30)] = 3600
    timeout: Annotated[int, Field(ge=60)] = 7200
    memory: Annotated[int, Field(description="guest RAM while provisioning")] = 4 << 30
    # auto: compile the NVIDIA DKMS module on the build host (builder.hostmodule) while the installer runs,
    # when the driver comes from Debian; off: DKMS compiles it in the (emulated) guest.
    host_module: Literal["auto", "off"] = "auto"

    @field_validator("memory", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("host_module", mode="before")
    @classmethod
    def _host_module(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (and `on`/`yes` as true)
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class OutputConfig(_Model):
    dir: Path = Path("../build/{name}")  # {name} is the image name; no other placeholder

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, v: Path) -> Path:
        try:
            str(v).format(name="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the placeholder {{name}} is known (write {{{{ and }}}} for braces): {v}") from exc
        return v


class SecureBootConfig(_Model):
    """The key pair DKMS signs the NVIDIA module with (both or neither; checked in :func:`from_dict`)."""

    signing_key: Path | None = None
    signing_cert: Path | None = None

    @model_validator(mode="after")
    def _both(self) -> SecureBootConfig:
        if (self.signing_key is None) != (self.signing_cert is None):
            given, missing = ("signing_key", "signing_cert") if self.signing_cert is None else (
                "signing_cert", "signing_key")
            raise ValueError(f"{given} is given without {missing}: give both (python -m builder keygen makes a "
                             "pair) or neither")
        return self


# Role variables the secure_boot section sets; provision.extra_vars may not (the publish stage ships the
# certificate the module is signed with, so it must know it).
SIGNING_VARS = ("nvidia_module_signing_key", "nvidia_module_signing_cert")


class ImageConfig(_Model):
    """One image definition (``images/*.yaml``)."""

    name: str = "cloud-gpu-worker"
    description: str = ""
    debian: DebianConfig = DebianConfig()
    disk: DiskConfig = DiskConfig()
    vm: VmConfig = VmConfig()
    installer: InstallerConfig = InstallerConfig()
    provision: ProvisionConfig = ProvisionConfig()
    output: OutputConfig = OutputConfig()
    secure_boot: SecureBootConfig = SecureBootConfig()
    # Named variants built from the same installed disk: each overrides what does not change the install
    # (provision.*, disk.compression, secure_boot, description, and of vm where its VMs run and their vCPUs),
    # e.g. {"open": {"provision": {"extra_vars": …}}}.
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Where the config was read from; relative paths in it are resolved against its folder.
    source: Path | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError(f"not a valid image name: {v!r}")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, over in v.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,31}", name):
                raise ValueError(f"variant name {name!r}: use 1-32 of a-z 0-9 . _ - (it names a directory)")
            if not isinstance(over, dict):
                raise ValueError(f"variant {name}: must be a mapping of overrides")
            for key, val in over.items():
                if key not in VARIANT_KEYS:
                    raise ValueError(f"variant {name}: {key} cannot differ between variants (they share one "
                                     f"installed disk); a variant may set {', '.join(sorted(VARIANT_KEYS))}")
                if key == "disk" and (not isinstance(val, dict) or set(val) - {"compression"}):
                    raise ValueError(f"variant {name}: of disk only compression may differ between variants")
                if key == "provision" and isinstance(val, dict):
                    seed = set(val.get("extra_vars") or {}) & {"base_packages", "base_extra_packages"}
                    if seed:
                        raise ValueError(f"variant {name}: {', '.join(sorted(seed))} is the installed disk's "
                                         "package list and cannot differ between variants")
        return v

    def variant(self, name: str) -> ImageConfig:
        """The configuration of variant ``name``: its overrides merged over this one, named ``NAME-VARIANT``,
        with the one libvirt URI its VMs use (:meth:`variant_hosts`)."""
        if name not in self.variants:
            raise ConfigError(f"no variant {name!r} in {self.source or 'the image definition'}",
                              hint="variants: " + (", ".join(self.variants) or "none"))
        over = self.variants[name]
        vm_over = over.get("vm")
        if isinstance(vm_over, dict):
            problems = [(f"variants.{name}.vm.{k}", f"cannot differ between variants: {why}; of vm a variant may "
                         f"set {', '.join(sorted(VARIANT_VM_KEYS))}")
                        for k, why in _VARIANT_VM_WHY.items() if k in vm_over]
            if problems:
                raise ConfigError(f"variant {name}: invalid", problems=problems)
        data = self.model_dump(mode="python", exclude={"variants", "source"})
        merged = _deep_merge(data, over)
        merged["name"] = f"{self.name}-{name}"
        try:
            cfg = ImageConfig.model_validate({**merged, "source": self.source})
        except ValidationError as exc:
            problems = [(f"variants.{name}." + _loc(e["loc"]), e["msg"]) for e in exc.errors()]
            raise ConfigError(f"variant {name}: invalid", problems=problems) from exc
        host = self.variant_hosts()[name]
        return cfg.model_copy(update={"vm": cfg.vm.model_copy(update={"libvirt_uri": host})})

    def variant_hosts(self) -> dict[str, str]:
        """The libvirt URI of each variant's provision and verify VMs: its own ``vm.libvirt_uri`` (one URI pins
        it, a list is its choice), else one of this image's, spread over them in sorted name order
        (:func:`~builder.vm.remote.assign_uris`; the shared install runs on :meth:`VmConfig.libvirt_host` of
        the image's name)."""
        from .vm.remote import assign_uris

        own: dict[str, tuple[str, ...] | None] = {}
        for name, over in self.variants.items():
            vm = over.get("vm") if isinstance(over, dict) else None
            raw = vm.get("libvirt_uri") if isinstance(vm, dict) else None
            if isinstance(raw, str):
                own[name] = (raw,)
            elif isinstance(raw, list | tuple) and raw and all(isinstance(u, str) for u in raw):
                own[name] = tuple(raw)
            else:
                own[name] = None
        return assign_uris(self.vm.libvirt_uris, own)

    def select_variants(self, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> list[str]:
        """The variants a build makes (``--only``, ``--except``), in definition order; unknown names are errors."""
        unknown = [n for n in (*only, *skip) if n not in self.variants]
        if unknown:
            raise ConfigError(f"unknown variant {', '.join(unknown)}",
                              hint="variants: " + (", ".join(self.variants) or "none (the image has no variants)"))
        return [n for n in self.variants if (not only or n in only) and n not in skip]

    @model_validator(mode="after")
    def _firmware_fits_disk(self) -> ImageConfig:
        if self.disk.boot == "uefi" and self.vm.firmware == "bios":
            raise ValueError(
                "vm.firmware: bios cannot install a disk.boot: uefi disk: under BIOS debian-installer installs GRUB "
                "into a BIOS boot partition, which a uefi disk does not have (use vm.firmware: uefi or auto, or "
                "disk.boot: hybrid)")
        if self.disk.boot == "bios" and self.vm.firmware == "uefi":
            raise ValueError("vm.firmware: uefi cannot install a disk.boot: bios disk: under UEFI debian-installer "
                             "installs GRUB for UEFI, not into the MBR (use vm.firmware: bios or auto)")
        return self

    @property
    def build_firmware(self) -> Literal["bios", "uefi"]:
        """The firmware the build VMs boot with (``vm.firmware`` with ``auto`` resolved)."""
        if self.vm.firmware != "auto":
            return self.vm.firmware
        return "bios" if self.disk.boot == "bios" else "uefi"

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, p: Path) -> Path:
        p = Path(str(p).format(name=self.name))
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def roles_dirs(self) -> list[Path]:
        """The roles path Ansible gets: ``provision.roles_path``, then builder's own roles."""
        dirs = [self.resolve(p) for p in self.provision.roles_path]
        own = builtin_dir("roles")
        return list(dict.fromkeys([*dirs, *([own] if own else [])]))

    @property
    def playbook(self) -> Path:
        if self.provision.playbook is not None:
            return self.resolve(self.provision.playbook)
        own = builtin_dir("playbooks")
        return (own or self.base_dir) / "cloud-gpu-worker.yml"

    @property
    def finalize_playbook(self) -> Path:
        if self.provision.finalize_playbook is not None:
            return self.resolve(self.provision.finalize_playbook)
        own = builtin_dir("playbooks")
        return (own or self.base_dir) / "finalize.yml"

    @property
    def lock_path(self) -> Path:
        if self.source is None:
            return Path.cwd() / f"{self.name}.lock.json"
        return self.source.with_suffix(".lock.json")

    @property
    def package_lock_path(self) -> Path:
        """``images/NAME.packages.lock``: every package the image ends up with (builder/pkglock.py)."""
        if self.source is None:
            return Path.cwd() / f"{self.name}.packages.lock"
        return self.source.with_suffix(".packages.lock")

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.dir)

    @property
    def signing_paths(self) -> tuple[Path, Path] | None:
        """(key, certificate) of ``secure_boot``, resolved; None when the section names none."""
        sb = self.secure_boot
        if sb.signing_key is None or sb.signing_cert is None:
            return None
        return self.resolve(sb.signing_key), self.resolve(sb.signing_cert)


# ---------------------------------------------------------------------------------------------- seed list

BASE_ROLE = "base"
SEED_VAR = "base_packages"
SEED_EXTRA_VAR = "base_extra_packages"


def role_file(cfg: ImageConfig, role: str, relpath: str) -> Path | None:
    """``relpath`` (e.g. ``defaults/main.yml``) of ``role`` as Ansible finds it on the provisioning roles path."""
    for rp in cfg.roles_dirs:
        cand = rp / role / relpath
        if cand.is_file():
            return cand
    return None


def read_role_yaml(path: Path, what: str) -> dict[str, Any]:
    """A role's variables file (defaults/main.yml, vars/main.yml) as a mapping; ConfigError if unreadable."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} from {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def base_role_defaults(cfg: ImageConfig) -> Path:
    """``defaults/main.yml`` of the base role on the provisioning roles path (the seed list's one home)."""
    found = role_file(cfg, BASE_ROLE, "defaults/main.yml")
    if found is not None:
        return found
    raise ConfigError("the base role (its defaults/main.yml) is not on provision.roles_path",
                      problems=[("provision.roles_path", f"no {BASE_ROLE}/defaults/main.yml in any of "
                                 + ", ".join(str(p) for p in cfg.roles_dirs))])


def seed_packages(cfg: ImageConfig) -> tuple[str, ...]:
    """The image's seed packages: the base role's ``base_packages`` (+ ``base_extra_packages``), as
    ``provision.extra_vars`` may override them. Defined once, in the role; the preseed installs them, the role
    keeps them, ``verify`` checks them."""
    path = base_role_defaults(cfg)
    merged = {**read_role_yaml(path, "the seed package list"), **cfg.provision.extra_vars}
    pkgs = merged.get(SEED_VAR, [])
    extra = merged.get(SEED_EXTRA_VAR) or []
    problems = check_package_list(pkgs, SEED_VAR) + check_package_list(extra, SEED_EXTRA_VAR)
    if not problems:
        names = [p.split("=", 1)[0] for p in [*pkgs, *extra]]
        problems += [f"{SEED_VAR} must include {req} (the build and the image depend on it)"
                     for req in REQUIRED_PACKAGES if req not in names]
    if problems:
        where = "provision.extra_vars" if SEED_VAR in cfg.provision.extra_vars else str(path)
        raise ConfigError("bad seed package list", problems=[(where, m) for m in problems])
    return tuple(dict.fromkeys([*pkgs, *extra]))


def install_packages(cfg: ImageConfig) -> tuple[str, ...]:
    """What the installer installs: the seed list and ``installer.extra_packages``, each once."""
    seed = seed_packages(cfg)
    names = {p.split("=", 1)[0] for p in seed}
    return seed + tuple(p for p in cfg.installer.extra_packages if p.split("=", 1)[0] not in names)


# ---------------------------------------------------------------------------------------------- loading


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError("bad --var", problems=[(dotted, f"{k} is not a mapping")])
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """['vm.cpus=4', 'disk.size=40G'] → {'vm.cpus': 4, 'disk.size': '40G'} (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append((item, "expected KEY.PATH=VALUE"))
            continue
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append((key, f"value is not valid YAML: {exc}"))
    if problems:
        raise ConfigError("bad --var override", problems=problems)
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def from_dict(data: dict[str, Any], *, source: Path | None = None, host_defaults: bool = True) -> ImageConfig:
    """Validate a mapping into an ImageConfig; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: top level must be a mapping")
    data = dict(data)
    if host_defaults:
        # every key is optional, the whole debian section too: the host's mirrors fill what is not given
        raw = data.get("debian")
        deb = dict(raw) if isinstance(raw, dict) else {} if raw is None else raw
        if isinstance(deb, dict):
            mirror, security = hostapt.debian_mirrors()
            if not deb.get("mirror") and mirror:
                deb["mirror"] = mirror
            if not deb.get("security_mirror") and security:
                deb["security_mirror"] = security
            data["debian"] = deb
    try:
        cfg = ImageConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = [(_loc(e["loc"]), e["msg"]) for e in exc.errors()]
        raise ConfigError(f"{source or 'config'}: invalid image definition", problems=problems) from exc
    problems = []
    if not cfg.debian.mirror:
        problems.append(("debian.mirror", "no Debian mirror in the host's apt sources; set debian.mirror"))
    if not cfg.debian.security_mirror:
        problems.append(("debian.security_mirror", "no security mirror found; set debian.security_mirror"))
    if cfg.provision.enabled:
        pb = cfg.playbook
        if not pb.is_file():
            problems.append(("provision.playbook", f"file not found: {pb}"))
    fpb = cfg.finalize_playbook
    if not fpb.is_file():
        problems.append(("provision.finalize_playbook", f"file not found: {fpb}"))
    for i, rp in enumerate(cfg.provision.roles_path):
        if not cfg.resolve(rp).is_dir():
            problems.append((f"provision.roles_path.{i}", f"directory not found: {cfg.resolve(rp)}"))
    problems += _signing_problems(cfg)
    if not problems:
        try:
            install_packages(cfg)
        except ConfigError as exc:
            problems.extend(exc.problems or [("", exc.message)])
    for name in cfg.variants:
        try:
            cfg.variant(name)
        except ConfigError as exc:
            problems.extend(exc.problems or [(f"variants.{name}", exc.message)])
    if problems:
        raise ConfigError(f"{source or 'config'}: invalid image definition", problems=problems)
    return cfg


def _signing_problems(cfg: ImageConfig) -> list[tuple[str, str]]:
    """The secure_boot pair must be usable (readable, the key's own certificate); its role variables are
    the section's alone."""
    from .secureboot import SigningError, load_pair

    out = [("provision.extra_vars", f"{v} is set by secure_boot.signing_key/signing_cert; set those instead")
           for v in SIGNING_VARS if v in cfg.provision.extra_vars]
    paths = cfg.signing_paths
    if paths is not None:
        try:
            load_pair(*paths)
        except SigningError as exc:
            out.append((f"secure_boot.signing_{exc.part}", str(exc)))
    return out


MAX_CONFIG_BYTES = 1 << 20  # an image definition is a few KiB; anything near this is not one
MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded (an alias bomb stops here)


def _check_expanded_size(data: Any, where: str) -> None:
    """ConfigError when ``data`` (aliases expanded, as a consumer sees it) has more than MAX_CONFIG_NODES
    values. Counting stops at the limit, so a billion-laughs document costs no more than that."""
    count = 0
    stack = [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values once YAML aliases are expanded "
                              "(an alias bomb?)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path} is a directory, not {what}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nested too deeply") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, not {type(data).__name__}")
    _check_expanded_size(data, str(path))
    return data


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, host_defaults: bool = True,
    var_files: list[Path] | tuple[Path, ...] = (),
) -> ImageConfig:
    """Read an image definition from YAML, merge ``var_files`` over it (YAML of the same shape, in order), apply
    ``KEY.PATH=VALUE`` overrides (last), validate."""
    path = Path(path)
    data = read_yaml_mapping(path, "image definition")
    for vf in var_files:
        data = _deep_merge(data, read_yaml_mapping(Path(vf), "var file"))
    for key, value in parse_overrides(overrides).items():
        _set_path(data, key, value)
    _check_expanded_size(data, str(path))
    return from_dict(data, source=path.resolve(), host_defaults=host_defaults)


def dump_config(cfg: ImageConfig) -> str:
    """The effective configuration as YAML (for ``show-config``)."""
    data = cfg.model_dump(mode="json")
    data["disk"]["size"] = format_size(cfg.disk.size)
    data["vm"]["memory"] = format_size(cfg.vm.memory)
    data["provision"]["memory"] = format_size(cfg.provision.memory)
    return yaml.safe_dump(data, sort_keys=False)
