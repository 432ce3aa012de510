"""The ``inspect`` verb: what a build of an image definition would do, without doing any of it (no network).

Variables with the layer each value comes from (builder's default, the image file, a ``--var-file``, a
``--var``, or the host's apt sources), the stages in order, the roles and where they are found, the installer
inputs the lock pins, and what a build would reuse from the caches: the installed disk (by the same key the
install stage computes) and the pinned files already in the content cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hostapt
from .archive.cache import ContentCache
from .config import ImageConfig, format_duration, format_size, load_config, parse_overrides, read_yaml_mapping
from .errors import BuilderError
from .installcache import InstalledDiskCache
from .installer.preseed import render_preseed
from .lock import read_lock
from .ssh import generate_keypair

BASE_STAGES = ("fetch", "prepare", "media", "install")
IMAGE_STAGES = ("provision", "finalize", "verify", "publish")  # once per variant when the image has variants
STAGES = BASE_STAGES + IMAGE_STAGES
SIZES = {"disk.size", "vm.memory", "provision.memory"}


@dataclass
class Inspection:
    image: Path
    variables: list[tuple[str, str, str]] = field(default_factory=list)  # key, value, source
    roles: list[tuple[str, str]] = field(default_factory=list)
    playbooks: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    reuse: list[str] = field(default_factory=list)
    variants: bool = False

    def text(self) -> str:
        width = max((len(k) for k, _, _ in self.variables), default=10)
        out = [f"image definition: {self.image}", "", "variables (value  ← where it comes from):"]
        out += [f"  {k:<{width}}  {v}  ← {s}" for k, v, s in self.variables]
        stages = (" → ".join(BASE_STAGES) + " → for each variant: " + " → ".join(IMAGE_STAGES) if self.variants
                  else " → ".join(STAGES))
        out += ["", "stages: " + stages, "", "playbooks:"]
        out += [f"  {name}: {path}" for name, path in self.playbooks]
        out += ["roles:"] + [f"  {name}: {path}" for name, path in self.roles]
        out += ["", "installer inputs (the lock):"] + [f"  {line}" for line in self.inputs]
        out += ["", "a build now would:"] + [f"  {line}" for line in self.reuse]
        return "\n".join(out) + "\n"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys → values; ``provision.extra_vars`` one level deep (role variables are values, not config)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not prefix.endswith("extra_vars."):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _layers(path: Path, var_files: list[Path], overrides: list[str]) -> list[tuple[str, dict[str, Any]]]:
    layers = [(f"image file {path.name}", _flatten(read_yaml_mapping(path, "image definition")))]
    layers += [(f"--var-file {vf}", _flatten(read_yaml_mapping(Path(vf), "var file"))) for vf in var_files]
    layers.append(("--var", dict(parse_overrides(overrides))))
    return layers


def _source(key: str, layers: list[tuple[str, dict[str, Any]]]) -> str:
    for name, flat in reversed(layers):
        if any(k == key or key.startswith(k + ".") for k in flat):
            return name
    if key in ("debian.mirror", "debian.security_mirror"):
        return "this host's apt sources"
    return "builder's default"


def _show(key: str, value: Any) -> str:
    if key in SIZES and isinstance(value, int):
        return format_size(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value) if value not in ("", None) else "(empty)"


def inspect(path: Path, overrides: list[str] | tuple[str, ...] = (), *,
            var_files: list[Path] | tuple[Path, ...] = ()) -> Inspection:
    cfg = load_config(path, overrides, var_files=var_files)
    layers = _layers(Path(path), list(var_files), list(overrides))
    result = Inspection(Path(path).resolve())
    effective = _flatten(cfg.model_dump(mode="json"))
    for key in sorted(k for k, v in effective.items() if not isinstance(v, dict)):
        result.variables.append((key, _show(key, effective[key]), _source(key, layers)))
    result.playbooks = [("provision", str(cfg.playbook) + ("" if cfg.provision.enabled else " (off)")),
                        ("finalize", str(cfg.finalize_playbook))]
    for d in cfg.roles_dirs:
        for role in sorted(p.name for p in d.iterdir() if (p / "tasks").is_dir()):
            if role not in dict(result.roles):
                result.roles.append((role, str(d / role)))
    _inputs_and_reuse(cfg, result)
    from .verify import default_firmwares

    fws = list(default_firmwares(cfg)) + (["uefi-secure"] if cfg.secure_boot.signing_cert and
                                          cfg.disk.boot != "bios" else [])
    result.reuse.append(f"install a disk.boot {cfg.disk.boot} disk with {cfg.build_firmware} build VMs and verify "
                        f"the image under {', '.join(fws)} before publishing")
    base_vars = cfg.provision.extra_vars
    result.variants = bool(cfg.variants)
    if not cfg.variants:
        result.reuse.append(_module_plan(cfg))
    for name in cfg.variants:
        v = cfg.variant(name)
        diff = {k: val for k, val in v.provision.extra_vars.items() if base_vars.get(k) != val}
        result.reuse.append(f"variant {name}: {v.name}.qcow2 from the same installed disk"
                            + (", " + ", ".join(f"{k}={val}" for k, val in diff.items()) if diff else "")
                            + "; " + _module_plan(v))
    return result


def _module_plan(cfg: ImageConfig) -> str:
    from .stages.module import dkms_package, dkms_patches

    package, why = dkms_package(cfg)
    patches = dkms_patches(cfg)
    with_patches = ("; DKMS source patches (PATCH[] in dkms.conf, host and guest alike): "
                    + ", ".join(f"{p.name} (sha256 {p.sha256[:12]}, "
                                + (f"kernels matching {p.match}" if p.match else "every kernel") + ")"
                                for p in patches)) if patches else ""
    return (f"compile {package} on this host while the installer runs ({why}; provision.host_module), "
            "or take it from the module cache" if package else
            f"leave the NVIDIA module to DKMS in the guest ({why})") + with_patches


def _inputs_and_reuse(cfg: ImageConfig, result: Inspection) -> None:
    try:
        lock = read_lock(cfg.lock_path)
    except BuilderError as exc:
        result.inputs.append(f"no usable lock ({exc.message}): a build resolves the installer from the live archive")
        result.reuse.append("fetch the installer inputs and run the install (no lock, so no cache key yet)")
        return
    result.inputs += [
        f"{cfg.lock_path.name}, made {lock.created}",
        f"netboot {lock.netboot.version} (kernel {lock.kernel_abi}) sha256 {lock.netboot.sha256} "
        f"[trust: {lock.netboot.trust}]",
        f"udeb index sha256 {lock.udeb_index.sha256}",
        f"{len(lock.overrides)} overridden udebs, {len(lock.removed)} removed, boot loaders: "
        + ", ".join(f"{b.package} {b.version}" for b in lock.boot),
    ]
    from .pkgfetch import package_lock_in_force
    from .stages.media import disk_key, preseed_context

    try:
        plock = package_lock_in_force(cfg)
    except BuilderError as exc:
        result.inputs.append(f"no usable package lock: {exc.message}")
        plock = None
    if plock is not None:
        result.inputs.append(f"{cfg.package_lock_path.name} ({plock.method}, made {plock.created}): "
                             f"{len(plock.packages)} packages; the target sees only these")
    elif cfg.debian.package_lock != "required":
        result.inputs.append("no package lock in force: the target installs the newest packages of the archive")
    client, host = generate_keypair("inspect"), generate_keypair("inspect-host")
    key = disk_key(cfg, lock, render_preseed(preseed_context(cfg, client, host)), client, host, package_lock=plock)
    disks = InstalledDiskCache()
    cached = disks.lookup(key, max_age=cfg.installer.max_base_age)
    stale = disks.stale(key, max_age=cfg.installer.max_base_age)
    if cached is not None:
        result.reuse.append(f"reuse the installed disk made {cached.created}, {format_duration(cached.age())} old "
                            f"(key {key}): no install")
    elif stale is not None:
        result.reuse.append(f"run the install: the installed disk for key {key} is {format_duration(stale.age())} "
                            f"old, more than installer.max_base_age")
    else:
        result.reuse.append(f"run the install (no installed disk for key {key} yet)")
    cache = ContentCache()
    pins = [lock.netboot, *lock.boot]
    have = sum(1 for p in pins if cache.path(p.sha256).is_file())
    result.reuse.append(f"find {have} of {len(pins)} pinned installer packages in the download cache "
                        f"({cache.root}); udebs and target packages are fetched through the gateway as needed")
    mirror, _ = hostapt.debian_mirrors()
    if mirror and cfg.debian.mirror == mirror.rstrip("/"):
        result.reuse.append("use the Debian mirror of this host's apt sources")
