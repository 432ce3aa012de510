"""``docs/configuration.md``, generated from the config models: every key of an image definition with its type,
default and meaning. ``python -m builder.configdoc > docs/configuration.md`` rewrites it; a test keeps it true
(every field has a meaning here, and the committed file is what this prints)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import ImageConfig, format_size

SIZES = {"disk.size", "vm.memory", "provision.memory"}
DURATIONS = {"installer.max_base_age"}

MEANING: dict[str, str] = {
    "name": "Image name: the qcow2 is `NAME.qcow2`; letters, digits, `.`, `_`, `-`.",
    "description": "Free text, recorded in the manifest.",
    "debian.suite": "Debian suite the image is built from.",
    "debian.release": "Debian release number (13 only).",
    "debian.arch": "Architecture (amd64 only).",
    "debian.mirror": "Debian archive URL. Default: the Debian mirror of this host's apt sources.",
    "debian.security_mirror": "Debian security archive URL. Default: from this host's apt sources.",
    "debian.components": "Archive components the image's apt uses (main required; the NVIDIA driver needs "
                         "contrib, non-free and non-free-firmware).",
    "debian.keyring": "OpenPGP keyring that `InRelease` files are verified against.",
    "debian.trusted_fingerprints": "Primary-key fingerprints accepted on the archive's `InRelease`.",
    "debian.security_fingerprints": "Primary-key fingerprints accepted on the security archive's `InRelease`.",
    "debian.package_lock": "The package lock `NAME.packages.lock` next to the image file (every package of the "
                           "image, pinned; `python -m builder lock` writes it): `auto` uses it when it exists, "
                           "`required` fails the build without it, `off` ignores it (the target installs the newest "
                           "packages; `lock` still writes the file). With a lock the target sees only the locked "
                           "versions (docs/package-lock.md).",
    "disk.size": "Virtual size of the image's disk (cloud-init grows the root file system to the real disk).",
    "disk.compression": "qcow2 compression of the published image: zlib (portable), zstd (QEMU >= 5.1), none.",
    "vm.backend": "How build VMs run: `qemu` (a child process) or `libvirt` (transient domains).",
    "vm.libvirt_uri": "libvirt connection URI for `vm.backend: libvirt`, or a list of them: a build takes one by a "
                      "stable hash of its image name (with `variants:` that is the install's; the variants are "
                      "spread over the list in sorted order, or pinned by their own `vm.libvirt_uri`). A remote "
                      "host is `qemu+ssh://USER@HOST/system` (docs/remote-libvirt.md).",
    "vm.libvirt_pool": "Storage pool on a remote libvirt host that the build VMs' files are uploaded to (a "
                       "`dir`, `fs` or `netfs` pool that exists and is active).",
    "vm.libvirt_pool_dir": "Instead of `vm.libvirt_pool`: a directory on the remote host under which builder "
                           "creates a transient pool per VM (removed with it).",
    "vm.accel": "`auto` probes KVM with a real boot and falls back to TCG; `kvm` or `tcg` force one.",
    "vm.cpus": "vCPUs of the build VMs.",
    "vm.memory": "RAM of the installer VM.",
    "vm.firmware": "Firmware of the build VMs: bios (SeaBIOS), uefi (OVMF from the host's ovmf package, a per-VM "
                   "copy of its variable store), auto (uefi unless disk.boot is bios).",
    "disk.boot": "How the image boots: hybrid (GPT with a BIOS boot partition, an EFI system partition and the root "
                 "last; GRUB for BIOS and shim + signed GRUB for UEFI, also at the removable path "
                 "EFI/BOOT/BOOTX64.EFI), uefi (the same without the BIOS stage), bios (msdos label, GRUB in the "
                 "MBR).",
    "installer.locale": "Locale of the installed system (one glibc supports).",
    "installer.keymap": "XKB keymap.",
    "installer.timezone": "Time zone.",
    "installer.hostname": "Host name during the build (cloud-init sets the real one at first boot).",
    "installer.domain": "DNS domain during the build.",
    "installer.build_user": "The build's SSH user (key-only, passwordless sudo); removed by the finalize role.",
    "installer.extra_packages": "Packages the installer adds to the base role's seed list (`base_packages`).",
    "installer.install_recommends": "Install Recommends during the install.",
    "installer.kernel_cmdline": "Kernel command line of the image (and what follows `---` for the installer).",
    "installer.timeout": "Seconds the whole unattended install may take: a backstop, a stuck install is stopped by "
                         "`installer.stall_timeout`.",
    "installer.stall_timeout": "Seconds without installer log progress before the install counts as stuck.",
    "variants": "Named variants built by one `build` from the same installed disk, each into OUTPUT/NAME/ as "
                "IMAGE-NAME.qcow2: a mapping of overrides merged over the image definition, limited to what does "
                "not change the install (`provision`, `disk.compression`, `secure_boot`, `description`, and "
                "of `vm` where its VMs run and their vCPUs: `libvirt_uri`, `libvirt_pool`, `libvirt_pool_dir`, "
                "`cpus`). "
                "`--only`/`--except` pick some, `--parallel N` provisions N at once.",
    "installer.max_base_age": "A cached installed disk older than this (seconds, or `7d`, `12h`, …) is not reused: "
                              "the build installs afresh into a new cache entry; `0` never reuses one.",
    "provision.enabled": "Run `provision.playbook` (the finalize role runs either way).",
    "provision.playbook": "The image's playbook. Default: builder's `playbooks/cloud-gpu-worker.yml`.",
    "provision.finalize_playbook": "Run after the playbook: makes the machine an image. Default: builder's "
                                   "`playbooks/finalize.yml`.",
    "provision.roles_path": "Role directories searched before builder's own roles.",
    "provision.extra_vars": "Variables for the roles (each role's README lists them).",
    "provision.task_timeout": "Seconds one Ansible task may take.",
    "provision.timeout": "Seconds the whole playbook may take.",
    "provision.memory": "RAM of the provisioning VM.",
    "provision.host_module": "`auto`: when the NVIDIA driver comes from Debian (`nvidia_driver_source: debian`), "
                             "compile its DKMS module on the build host (an mmdebstrap build root of the same "
                             "suite, through the build's gateway, while the installer runs; cached) and load it "
                             "in the guest, instead of compiling it there under emulation; a build without "
                             "mmdebstrap warns and compiles in the guest. `off`: DKMS compiles in the guest. "
                             "The role's DKMS source patches (`nvidia_dkms_patches`, default: the flavour's) are "
                             "given to both sides alike and are part of the module cache key.",
    "output.dir": "Output directory; `{name}` is the image name. Relative paths are relative to the image file.",
    "secure_boot.signing_key": "Private key (unencrypted PEM, RSA >= 2048) DKMS signs the NVIDIA module with "
                               "during the build; it never enters the image. With `signing_cert`, or neither: "
                               "then DKMS's own throw-away key signs and the module does not load under Secure "
                               "Boot. `python -m builder keygen` makes a pair; see `docs/secure-boot.md`. "
                               "Relative to the image file.",
    "secure_boot.signing_cert": "The key's X.509 certificate (PEM or DER): kept in the image and published as "
                                "`NAME.mok.der` / `NAME.mok.pem` to enroll with `mokutil --import`. Relative to "
                                "the image file.",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return {str: "string", int: "integer", bool: "boolean", Path: "path"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(path: str, value: Any) -> str:
    if path in SIZES:
        return f"`{format_size(value)}`"
    if path in DURATIONS and isinstance(value, int) and value % 86400 == 0 and value:
        return f"`{value // 86400}d`"
    if value is None:
        return "(see meaning)"
    if value == "" or value == () or value == {}:
        return "empty"
    if isinstance(value, tuple):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def rows(model: type[BaseModel] = ImageConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, f"{path}.")
            continue
        default = field.get_default(call_default_factory=True)
        out.append((path, _type_name(ann), _default(path, default), MEANING.get(path, "")))
    return out


def render() -> str:
    lines = [
        "# Image definition reference",
        "",
        "Every key of an image definition (`images/*.yaml`), generated from builder's config models",
        "(`python -m builder.configdoc > docs/configuration.md`). Every key is optional; `python -m builder",
        "show-config IMAGE.yaml` prints the effective values, `--var KEY.PATH=VALUE` overrides one, and `python -m",
        "builder validate IMAGE.yaml` checks everything a build would (exit 2, every problem with its path).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{p}` | {t} | {d} | {m} |" for p, t, d, m in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
