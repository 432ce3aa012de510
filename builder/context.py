"""What every stage of a build gets: the frozen config plus the build's runtime state.

A :class:`BuildContext` replaces long argument lists: the stages take ``ctx`` and what the previous stage
returned, nothing else. The config stays user settings only; everything that exists only while a build runs
(the work directory, caches, the event emitter, the gateway and the signing key, the accelerator, the VM
backend, the ExitStack that owns every resource) lives here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .archive.cache import ContentCache
from .archive.http import FetchStats
from .config import ImageConfig
from .events import Emitter
from .installcache import InstalledDiskCache

if TYPE_CHECKING:
    from .diagnostics import Diagnostics
    from .gateway.server import Gateway
    from .gateway.signing import EphemeralKey
    from .installer.progress import InstallTracker, SyslogListener
    from .pkglock import PackageLock
    from .vm import Machine
    from .vm.firmware import Firmware
    from .vm.spec import VmSpec

OnError = Literal["cleanup", "abort"]


@dataclass(frozen=True)
class BuildOptions:
    """How to build (the command line's flags), as opposed to what to build (the config)."""

    output: Path
    force: bool = False
    keep_workdir: bool = False
    use_cache: bool = True
    on_error: OnError = "cleanup"
    verify: bool = True
    offline: bool = False  # never contact the mirrors: everything comes from the caches (named when missing)


@dataclass(frozen=True)
class Services:
    """The host services the build VMs use, started once per build: the archive gateway (with the installer
    suite signed by ``signing_key``) and the installer's syslog listener feeding ``tracker``."""

    gateway: Gateway
    signing_key: EphemeralKey
    syslog: SyslogListener
    tracker: InstallTracker
    package_lock: PackageLock | None = None  # in force: the target sees only its packages, signed by signing_key


@dataclass(frozen=True)
class BuildContext:
    config: ImageConfig
    options: BuildOptions
    workdir: Path
    emitter: Emitter
    stack: ExitStack
    diagnostics: Diagnostics
    cache: ContentCache = field(default_factory=ContentCache)
    disks: InstalledDiskCache = field(default_factory=InstalledDiskCache)
    stats: FetchStats = field(default_factory=FetchStats)
    started: float = field(default_factory=time.monotonic)
    # the manifest so far: each stage adds its facts (the diagnostics bundle holds it when a build fails)
    manifest: dict[str, Any] = field(default_factory=dict)
    accel: str = ""
    services: Services | None = None

    def with_(self, **changes: Any) -> BuildContext:
        return replace(self, **changes)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def gateway(self) -> Gateway:
        if self.services is None:
            raise RuntimeError("the build's services are not started")
        return self.services.gateway

    def firmware(self, vm_name: str) -> Firmware:
        """The firmware of the build VM ``vm_name`` (``vm.firmware``; UEFI with its own variable store)."""
        from .vm.firmware import prepare

        return prepare(self.config.build_firmware, self.workdir / f"{vm_name}.vars.fd")

    @contextlib.contextmanager
    def machine(self, spec: VmSpec) -> Iterator[Machine]:
        """A started VM on the configured backend, watched by the diagnostics: a failure inside the ``with``
        takes a screendump before the VM is stopped. Leaving the block always leaves no VM running."""
        from .vm import open_machine

        vm = open_machine(spec, self.workdir, **self.config.vm.machine_options(self.name))
        self.diagnostics.machines.append(vm)
        with vm:
            try:
                yield vm
            except BaseException:
                self.diagnostics.capture(vm)
                raise
