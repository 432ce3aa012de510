"""Before a build fetches anything: is everything it will need on this host, and may it write its output?

One error names every missing tool with the Debian packages to install, so a new host learns all of it at
once instead of stage by stage.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from .config import ImageConfig
from .context import BuildOptions
from .errors import ConfigError, MissingToolError, OutputError
from .run import package_of
from .vm import firmware

# every host program a build runs, in the order it first needs them
BUILD_TOOLS = ("gpgv", "gpg", "gpgconf", "debconf-set-selections", "qemu-system-x86_64", "qemu-img", "socat",
               "ssh")


# the installer ISO's EFI boot image (a FAT file system made without mounting)
EFI_TOOLS = ("mkfs.fat", "mmd", "mcopy")


def required_tools(cfg: ImageConfig) -> tuple[str, ...]:
    return BUILD_TOOLS + EFI_TOOLS


def check(cfg: ImageConfig, options: BuildOptions) -> None:
    """MissingToolError naming every missing tool, OutputError for an output that must not be replaced,
    ConfigError for a missing keyring or backend binding."""
    final = options.output / f"{cfg.name}.qcow2"
    if final.exists() and not options.force:
        raise OutputError(f"{final} exists", hint="pass --force to replace it")
    missing = [t for t in required_tools(cfg) if shutil.which(t) is None]
    if cfg.build_firmware == "uefi" and firmware.check_available(["uefi"]):
        missing.append("OVMF_CODE_4M.fd")
    if missing:
        packages = sorted({package_of(t) or t for t in missing})
        raise MissingToolError(", ".join(missing), package=" ".join(packages),
                               why="the build needs them before it starts")
    if not Path(cfg.debian.keyring).is_file():
        raise ConfigError(f"the Debian archive keyring {cfg.debian.keyring} does not exist",
                          hint="apt-get install debian-archive-keyring")
    if cfg.vm.backend == "libvirt" and importlib.util.find_spec("libvirt") is None:
        raise ConfigError("vm.backend is libvirt but the libvirt Python binding is not installed",
                          hint="pip install 'builder[libvirt]' (needs libvirt-dev and pkg-config to build)")
