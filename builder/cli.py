"""Command line: ``python -m builder VERB IMAGE.yaml [options]``.

Exit codes (only here): 0 ok, 1 build failed, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import BuilderError, ConfigError

log = logging.getLogger("builder")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 2 with one clear line
        self.print_usage(sys.stderr)
        sys.stderr.write(f"builder: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="builder", description="Build a GPU-enabled Debian 13 worker qcow2 without Packer.")
    p.add_argument("--version", action="version", version=f"builder {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def image_cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("image", type=Path, help="image definition (YAML), e.g. images/cloud-gpu-worker.yaml")
        sp.add_argument("--var", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value (repeatable), e.g. --var disk.size=40G")
        return sp

    image_cmd("validate", "check an image definition and report every problem")
    image_cmd("show-config", "print the effective configuration (defaults and overrides applied)")
    sp = image_cmd("lock", "resolve and pin every installer input into IMAGE.lock.json")
    sp.add_argument("--check", action="store_true", help="only report whether the existing lock still resolves")
    sp = image_cmd("fetch", "download and verify every installer input into the cache")
    sp.add_argument("--all-udebs", action="store_true", help="also cache every udeb of the installer suite")
    sp = image_cmd("iso", "write only the installer ISO (preseed inside)")
    sp.add_argument("--output", "-o", type=Path, help="ISO path (default: OUTPUT_DIR/installer.iso)")
    sp = image_cmd("build", "build the image")
    sp.add_argument("--output", "-o", type=Path, help="output directory (default: output.dir of the config)")
    sp.add_argument("--force", action="store_true", help="replace existing artifacts in the output directory")
    sp.add_argument("--keep-workdir", action="store_true", help="keep the work directory (logs, disks) after the build")
    sp.add_argument("--no-cache", action="store_true", help="do not reuse a cached installed disk")
    sp = image_cmd("verify", "boot a built qcow2 with a NoCloud seed and check it (JUnit + text report)")
    sp.add_argument("--image-file", type=Path, help="qcow2 to check (default: the build output of IMAGE.yaml)")
    sp.add_argument("--report-dir", type=Path, help="where reports go (default: OUTPUT_DIR/verify)")
    sp = sub.add_parser("clean", help="remove cached downloads and installed-disk caches")
    sp.add_argument("--all", action="store_true", help="also the content cache of downloads")
    return p


def _setup_logging(debug: bool, quiet: bool) -> Any:
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=debug, markup=False,
                          show_time=True, omit_repeated_times=False, log_time_format="[%X]")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("builder").setLevel(level)
    logging.getLogger("paramiko").setLevel(logging.WARNING if debug else logging.CRITICAL)
    return console


class _Progress:
    """Renders build events: stage lines through logging, downloads and long steps as a rich progress bar."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: Any) -> None:
        if ev.kind != "progress" or ev.data.get("unit") != "bytes":
            return
        label = Path(ev.message).name or ev.message
        task = self.tasks.get(label)
        if task is None:
            task = self.tasks[label] = self.progress.add_task(label[:48], total=ev.total)
        self.progress.update(task, completed=ev.current, total=ev.total)
        if ev.total and ev.current is not None and ev.current >= ev.total:
            self.progress.remove_task(task)
            del self.tasks[label]


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds every context manager: VMs stopped, gateway closed, staging removed


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    console = _setup_logging(args.debug, args.quiet)
    try:
        return _dispatch(args, console)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return EXIT_INTERRUPTED
    except BuilderError as exc:
        if args.debug:
            console.print_exception()
        console.print(f"[bold red]error:[/bold red] {exc.describe()}", markup=True, highlight=False)
        return exc.exit_code
    except Exception:
        console.print_exception() if args.debug else console.print(
            "[bold red]internal error[/bold red] (run with --debug for the traceback)")
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace, console: Any) -> int:
    from .config import dump_config, load_config

    if args.verb == "clean":
        from .pipeline import clean

        for line in clean(all_downloads=args.all):
            console.print(line)
        return EXIT_OK
    cfg = load_config(args.image, args.var)
    if args.verb == "validate":
        console.print(f"{args.image}: ok ({cfg.name}, Debian {cfg.debian.release} {cfg.debian.suite}, "
                      f"disk {cfg.disk.size >> 30}G)")
        return EXIT_OK
    if args.verb == "show-config":
        sys.stdout.write(dump_config(cfg))
        return EXIT_OK
    from .archive import ContentCache, FetchStats
    from .events import Emitter

    stats = FetchStats()
    with _Progress(console) as progress:
        emitter = Emitter(progress)
        t0 = time.monotonic()
        if args.verb == "lock":
            from .inputs import make_archive
            from .lock import lock_summary, resolve_lock, write_lock

            lock = resolve_lock(cfg, make_archive(cfg, ContentCache(), stats, emitter), report=emitter.info)
            if args.check:
                from .lock import lock_differences, read_lock

                diffs = lock_differences(read_lock(cfg.lock_path), lock)
                for line in diffs:
                    console.print(f"  {line}", markup=False)
                console.print(f"{cfg.lock_path.name}: " + ("differs from the archive" if diffs else "up to date"))
                return EXIT_FAILED if diffs else EXIT_OK
            write_lock(lock, cfg.lock_path)
            console.print(f"wrote {cfg.lock_path}")
            console.print_json(json.dumps(lock_summary(lock)))
        elif args.verb == "fetch":
            from .inputs import fetch_inputs

            with emitter.stage("fetch"):
                inputs = fetch_inputs(cfg, ContentCache(), stats, emitter, all_udebs=args.all_udebs)
            console.print(f"verified and cached: netboot {inputs.lock.netboot.version} (kernel "
                          f"{inputs.kernel_abi}), {inputs.udebs_verified} of the {len(inputs.udeb_pins)} udebs "
                          "in the installer suite (the rest are checked when served); "
                          f"{stats.bytes_fetched} bytes fetched upstream in {time.monotonic() - t0:.1f} s")
        elif args.verb == "iso":
            from .pipeline import write_iso

            out = write_iso(cfg, args.output, emitter=emitter, stats=stats)
            console.print(f"wrote {out}")
        elif args.verb == "build":
            from .pipeline import build

            result = build(cfg, on_event=emitter, output=args.output, force=args.force,
                           keep_workdir=args.keep_workdir, use_cache=not args.no_cache)
            console.print(f"[green]built[/green] {result.image} ({result.size_bytes / 2**20:.0f} MiB) "
                          f"in {result.duration_s / 60:.1f} min", markup=True)
        elif args.verb == "verify":
            from .verify import verify_image

            qcow2 = args.image_file or cfg.output_dir / f"{cfg.name}.qcow2"
            report_dir = args.report_dir or cfg.output_dir / "verify"
            report = verify_image(cfg, qcow2, report_dir, emitter=emitter)
            console.print(report.text(), markup=False, highlight=False)
            console.print(f"reports: {report_dir}/verify-report.{{xml,txt,json}}")
            if not report.ok:
                return EXIT_FAILED
        else:  # pragma: no cover - argparse guards this
            raise ConfigError(f"unknown verb {args.verb}")
    return EXIT_OK
