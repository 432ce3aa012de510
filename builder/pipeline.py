"""The build, top to bottom. Each stage is a module of :mod:`builder.stages`; this one only calls them in
order and owns what spans them: the work directory, the ExitStack every resource lives on, and what happens
when a stage fails (a diagnostics bundle, ``--on-error``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from . import preflight, services
from .archive.cache import cache_base
from .config import ImageConfig, format_duration
from .context import BuildContext, BuildOptions, OnError
from .diagnostics import Diagnostics, bundle_path
from .errors import BuilderError
from .events import Emitter, Event
from .gateway.signing import sweep_stale_homes
from .installcache import InstalledDiskCache, bases_in_use
from .run import pid_alive
from .stages import fetch, finalize, install, media, module, provision, publish
from .stages import verify as verify_stage
from .stages.media import write_iso
from .stages.publish import BuildResult

log = logging.getLogger(__name__)

__all__ = ["BuildResult", "VariantsResult", "build", "build_variants", "clean", "write_iso"]

PID_RE = re.compile(r"-pid(\d+)-")


def build(cfg: ImageConfig, *, on_event: Callable[[Event], None] | Emitter | None = None, output: Path | None = None,
          force: bool = False, keep_workdir: bool = False, use_cache: bool = True,
          on_error: OnError = "cleanup", verify: bool = True, offline: bool = False) -> BuildResult:
    """Build the image described by ``cfg`` (its variants aside: :func:`build_variants`); return where it is.
    Raises BuilderError subclasses.

    ``on_error="abort"`` keeps the work directory (disks, logs) of a failed build and says how to boot its
    disk by hand; ``"cleanup"`` (the default) removes it. Either way a failure after a VM started leaves a
    diagnostics bundle beside the output directory, and the error names it. ``verify`` boots the finished
    image under every firmware its disk promises and checks it before anything is published. ``offline`` never
    contacts the mirrors: what the caches lack is named in one error before any VM starts.
    """
    emitter = on_event if isinstance(on_event, Emitter) else Emitter(on_event)
    options = BuildOptions((output or cfg.output_dir).resolve(), force, keep_workdir, use_cache, on_error, verify,
                           offline)
    preflight.check(cfg, options)
    with ExitStack() as stack:
        ctx, _workdir, base, jobs, inputs = _base(cfg, options, emitter, stack, {"": cfg})
        return _image(ctx, base, jobs[""], inputs)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class VariantsResult:
    """What :func:`build_variants` made: a result per variant that was published, an error per one that
    failed (the others are unaffected by it)."""

    results: dict[str, BuildResult] = field(default_factory=dict)
    failed: dict[str, BuilderError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def default_parallel(cfg: ImageConfig) -> int:
    """How many variants provision at once: as many VMs as the host has cores and memory for."""
    cores = os.cpu_count() or 1
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = cfg.provision.memory
    return max(1, min(cores // max(cfg.vm.cpus, 1), avail // (cfg.provision.memory + (1 << 30))))


def build_variants(cfg: ImageConfig, *, names: list[str], on_event: Callable[[Event], None] | Emitter | None = None,
                   output: Path | None = None, force: bool = False, keep_workdir: bool = False,
                   use_cache: bool = True, on_error: OnError = "cleanup", verify: bool = True,
                   offline: bool = False, parallel: int | None = None) -> VariantsResult:
    """Build the variants ``names`` of ``cfg`` from one installed disk: fetch, media and install once, then
    provision, finalize, verify and publish per variant (``parallel`` at once), each into ``OUTPUT/NAME/``.
    A variant that fails leaves a diagnostics bundle and its error in the result; the others go on."""
    emitter = on_event if isinstance(on_event, Emitter) else Emitter(on_event)
    root = (output or cfg.output_dir).resolve()
    options = BuildOptions(root, force, keep_workdir, use_cache, on_error, verify, offline)
    variants = {n: cfg.variant(n) for n in names}
    for n, vcfg in variants.items():
        preflight.check(vcfg, replace(options, output=root / n))
    if cfg.vm.backend == "libvirt":
        emitter.info(f"libvirt hosts: the install on {cfg.vm.host_record(cfg.name)['libvirt_uri']}; "
                     + ", ".join(f"{n} on {v.vm.host_record(v.name)['libvirt_uri']}" for n, v in variants.items()))
    result = VariantsResult()
    with ExitStack() as stack:
        ctx, workdir, base, jobs, inputs = _base(cfg, options, emitter, stack, variants)
        lock = threading.Lock()

        def one(name: str) -> None:
            vwd = ctx.workdir / name
            vwd.mkdir()
            vemit = Emitter(emitter.emit, prefix=name)
            try:
                # the failure handler sees the error first (the variant's bundle, named in its hint)
                with ExitStack() as vstack:
                    diagnostics = vstack.enter_context(Diagnostics(vwd))
                    vcfg = variants[name]
                    # its VMs run on the variant's libvirt host, which may not be the install's
                    accel = services.variant_accel(ctx, vcfg, inputs, vemit)
                    vctx = ctx.with_(config=vcfg, options=replace(options, output=root / name),
                                     workdir=vwd, emitter=vemit, stack=vstack, diagnostics=diagnostics, accel=accel,
                                     manifest={**ctx.manifest, "variant": name, "accel": accel,
                                               "vm": vcfg.vm.host_record(vcfg.name)})
                    vstack.push(_FailureHandler(vctx, workdir))
                    res = _image(vctx, base, jobs[name], inputs)
            except BuilderError as exc:
                with lock:
                    result.failed[name] = exc
                return
            with lock:
                result.results[name] = res

        at_once = max(1, parallel or default_parallel(cfg))
        emitter.info(f"building {len(names)} variant(s) from one installed disk, {at_once} at a time: "
                     + ", ".join(names))
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="variant") as pool:
            for fut in [pool.submit(one, name) for name in names]:
                fut.result()  # an unexpected exception (a bug) still ends the build
    return result


def _base(cfg: ImageConfig, options: BuildOptions, emitter: Emitter, stack: ExitStack,
          images: dict[str, ImageConfig],
          ) -> tuple[BuildContext, _WorkDir, install.InstalledBase, dict[str, module.ModuleJob | None],
                     fetch.InstallerInputs]:
    """The shared part of every build: work directory, inputs, services, media and the installed disk; and
    for each of ``images`` (a variant's name → its config; "" for a build without variants) the NVIDIA module
    built on this host while the installer runs."""
    workdir = stack.enter_context(_WorkDir(cfg, options, emitter))
    diagnostics = stack.enter_context(Diagnostics(workdir.path))
    ctx = BuildContext(cfg, options, workdir.path, emitter, stack, diagnostics)
    stack.push(_FailureHandler(ctx, workdir))  # runs once VMs and services are stopped, before the work dir goes
    with emitter.stage("fetch"):
        inputs = fetch.run(ctx, images)
    with emitter.stage("prepare"):
        ctx = services.start(ctx, inputs)
        # the NVIDIA module, compiled on this host while the installer runs (one build root at a time)
        jobs = {name: module.start(ctx.with_(config=vcfg, manifest={}) if name else ctx, label=name)
                for name, vcfg in images.items()}
        # on the way out every job is told to stop at once (then each is joined), not one after the other
        stack.callback(module.cancel_all, [job for job in jobs.values() if job is not None])
    with emitter.stage("media"):
        installer = media.run(ctx, inputs)
    with emitter.stage("install"):
        base = install.run(ctx, installer, inputs)
    workdir.record_base(base.disk)
    return ctx, workdir, base, jobs, inputs


def _image(ctx: BuildContext, base: install.InstalledBase, job: module.ModuleJob | None,
           inputs: fetch.InstallerInputs) -> BuildResult:
    """One image from the installed disk: provision (with the module built on the host), finalize, verify,
    publish."""
    emitter = ctx.emitter
    with emitter.stage("provision"):
        guest = provision.run(ctx, base, prebuilt=module.finish(ctx, job))
    with emitter.stage("finalize"):
        final = finalize.run(ctx, guest)
    if ctx.options.verify:
        with emitter.stage("verify"):
            verify_stage.run(ctx, final)
    with emitter.stage("publish"):
        return publish.run(ctx, final, inputs)


class _WorkDir:
    """The build's work directory under the cache, named with the builder's PID so that ``clean`` and the next
    build know whether its owner still runs. Removed at the end unless kept (``--keep-workdir``, or
    ``--on-error=abort`` after a failure), which leaves a KEEP file in it."""

    def __init__(self, cfg: ImageConfig, options: BuildOptions, emitter: Emitter) -> None:
        self.base = cache_base() / "work"
        self.base.mkdir(parents=True, exist_ok=True)
        sweep_stale_homes()  # signing-key homes (and their gpg-agents) of builds that were killed outright
        sweep_stale_workdirs(self.base)
        self.path = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-pid{os.getpid()}-", dir=self.base))
        self.keep = options.keep_workdir
        self.emitter = emitter

    def record_base(self, disk: Path) -> None:
        """Name the cached installed disk this build uses (``clean`` leaves it alone while the build runs)."""
        (self.path / "BASE").write_text(f"{disk}\n")

    def __enter__(self) -> _WorkDir:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keep:
            (self.path / "KEEP").touch()
            self.emitter.info(f"work directory kept: {self.path}")
        else:
            shutil.rmtree(self.path, ignore_errors=True)


class _FailureHandler:
    """On a failure after a VM started: the diagnostics bundle, named in the error; with ``--on-error=abort``
    the work directory is kept and the error says how to boot the disk."""

    def __init__(self, ctx: BuildContext, workdir: _WorkDir) -> None:
        self.ctx = ctx
        self.workdir = workdir

    def __call__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            return False
        ctx = self.ctx
        notes: list[str] = []
        if ctx.diagnostics.vm_started:
            try:
                bundle = ctx.diagnostics.write(bundle_path(ctx.options.output, ctx.name), exc, ctx.manifest)
                notes.append(f"diagnostics: {bundle}")
            except OSError as oserr:
                log.warning("could not write the diagnostics bundle: %s", oserr)
        if ctx.options.on_error == "abort":
            self.workdir.keep = True
            notes.append(boot_by_hand(self.workdir.path, ctx.config.installer.build_user))
        if notes and isinstance(exc, BuilderError):
            exc.hint = "; ".join([exc.hint, *notes] if exc.hint else notes)
        return False


def boot_by_hand(workdir: Path, user: str) -> str:
    """How to boot a kept work directory's disk and log in (``--on-error=abort``)."""
    disk = next((d for d in (workdir / "disk.qcow2", workdir / "installed.qcow2") if d.exists()), None)
    if disk is None:
        return f"work directory kept: {workdir} (no disk was made yet)"
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "4G",
            "-display", "none", "-serial", "mon:stdio", "-drive", f"file={disk},if=virtio",
            "-nic", "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22"]
    key = workdir / "build_key"
    ssh = f"; then: ssh -i {key} -p 2222 {user}@127.0.0.1" if key.exists() else ""
    return f"work directory kept: {workdir}; boot its disk with: {shlex.join(argv)}{ssh}"


# ---------------------------------------------------------------------------------------------- housekeeping


def _owner_alive(d: Path) -> bool | None:
    m = PID_RE.search(d.name)
    return None if m is None else pid_alive(int(m.group(1)))


def sweep_stale_workdirs(base: Path) -> None:
    """Remove work directories of builds that were killed outright (SIGKILL, power loss): their owner PID is
    gone and they were not kept on purpose (a KEEP file)."""
    for d in base.glob("*-pid*-*"):
        if _owner_alive(d) is False and not (d / "KEEP").exists():
            shutil.rmtree(d, ignore_errors=True)


def live_builds(base: Path | None = None) -> list[Path]:
    """Work directories whose builder process still runs."""
    base = base or cache_base() / "work"
    return [d for d in base.glob("*-pid*-*") if d.is_dir() and _owner_alive(d)] if base.is_dir() else []


def clean(*, all_downloads: bool = False, image: str | None = None, older_than: int | None = None) -> list[str]:
    """Remove work directories and cached installed disks (and with ``all_downloads`` the content cache and the
    host-built modules), but nothing a live build uses; with ``image`` only that image's. With ``older_than``
    (seconds) only the installed disks made longer ago than that. Returns what was done, one line each."""
    if older_than is not None:
        return expire_bases(older_than, image=image)
    base = cache_base()
    live = live_builds(base / "work")
    if image is not None:
        live = [d for d in live if d.name.startswith(f"{image}-pid")]
    in_use: set[Path] = set()
    for d in live:
        with contextlib.suppress(OSError):
            in_use.add(Path((d / "BASE").read_text().strip()).parent)
    lines = [f"skipped {d} (build PID {PID_RE.search(d.name).group(1)} is running)"  # type: ignore[union-attr]
             for d in live]
    work = base / "work"
    if work.is_dir():
        for d in work.iterdir():
            if image is not None and not d.name.startswith(f"{image}-pid"):
                continue
            if d not in live:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                lines.append(f"removed {d}")
    installed = base / "installed"
    if installed.is_dir():
        for d in installed.iterdir():
            if image is not None and InstalledDiskCache.image_of(d) != image:
                continue
            if d in in_use:
                lines.append(f"skipped {d} (the base disk of a running build)")
            else:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                lines.append(f"removed {d}")
    if all_downloads:
        if live:
            lines.append("skipped the download cache (a build is running)")
        else:
            for sub in ("blobs", "gateway", "modules"):
                if (base / sub).exists():
                    shutil.rmtree(base / sub, ignore_errors=True)
                    lines.append(f"removed {base / sub}")
    return lines or ["nothing to clean"]


def expire_bases(older_than: int, *, image: str | None = None) -> list[str]:
    """Remove the cached installed disks made more than ``older_than`` seconds ago that no live build uses."""
    root = cache_base() / "installed"
    in_use = bases_in_use(cache_base() / "work")
    lines = []
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if image is not None and InstalledDiskCache.image_of(d) != image:
            continue
        disk = InstalledDiskCache.read(d)
        age = disk.age() if disk is not None else float("inf")
        if age <= older_than:
            continue
        shown = "unreadable" if disk is None else f"{format_duration(age)} old"
        if d in in_use:
            lines.append(f"skipped {d} ({shown}: the base disk of a running build)")
        else:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            lines.append(f"removed {d} ({shown})")
    return lines or [f"no installed disk older than {format_duration(older_than)}"]
