"""Command line: ``python -m builder VERB IMAGE.yaml [options]``.

Exit codes (only here): 0 ok, 1 build failed, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
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
from .redact import redact_private_keys

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
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line on stderr, every build event included (docs/log-format.md)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def image_cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("image", type=Path, help="image definition (YAML), e.g. images/cloud-gpu-worker.yaml")
        sp.add_argument("--var-file", action="append", default=[], type=Path, metavar="FILE.yaml",
                        help="YAML of the image definition's shape merged over it (repeatable, in order; "
                             "before every --var)")
        sp.add_argument("--var", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value (repeatable), e.g. --var disk.size=40G")
        return sp

    image_cmd("validate", "check an image definition and report every problem")
    image_cmd("show-config", "print the effective configuration (defaults and overrides applied)")
    image_cmd("inspect", "what a build would do: variables and their sources, stages, roles, pinned inputs, and "
                         "what it would reuse from the caches (no network)")
    sp = image_cmd("lock", "resolve and pin every installer input into IMAGE.lock.json and every package of the "
                           "image into IMAGE.packages.lock")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--check", action="store_true",
                     help="report what upstream has moved since the locks were made (security updates by package); "
                          "exit 1 if anything did")
    how.add_argument("--update", action="store_true",
                     help="refresh both locks: the package lock keeps its package set, at the current versions")
    how.add_argument("--from-build", type=Path, metavar="OUTPUT_DIR",
                     help="pin exactly the packages a finished build installed (its packages.txt; every "
                          "variant's in a build of variants), plus what the variants it did not make and "
                          "debian-installer install besides, resolved")
    sp = image_cmd("fetch", "download and verify every installer input into the cache")
    sp.add_argument("--all-udebs", action="store_true", help="also cache every udeb of the installer suite")
    sp.add_argument("--all", action="store_true",
                    help="everything an offline build needs: the installer inputs, every udeb of the installer suite "
                         "and every file of the package lock")
    sp.add_argument("--offline", action="store_true",
                    help="do not contact the mirror: check that the cache holds everything an offline build needs "
                         "(named in one error otherwise); 0 bytes fetched")
    sp = image_cmd("iso", "write only the installer ISO (preseed inside)")
    sp.add_argument("--output", "-o", type=Path, help="ISO path (default: OUTPUT_DIR/installer.iso)")
    sp.add_argument("--suite-key", type=Path, metavar="FILE",
                    help="the public key (binary OpenPGP) of a running gateway verb's installer suite "
                         "(URL/dists/builder-installer/signing-key.gpg), for the installer to trust (default: a "
                         "throw-away key, whose suite no gateway serves)")
    sp.add_argument("--ssh-key-out", type=Path, metavar="DIR",
                    help="write the SSH keys the preseed installs into DIR: build_key (the build user's private "
                         "key, 0600), build_key.pub, host_key.pub (the installed system's host key)")
    sp.add_argument("--reboot", action="store_true",
                    help="end the install with a reboot into the installed system instead of a power-off (for a "
                         "tool that waits for SSH in the same VM, e.g. Packer's QEMU builder)")
    sp = image_cmd("build", "build the image")
    sp.add_argument("--output", "-o", type=Path, help="output directory (default: output.dir of the config)")
    sp.add_argument("--force", action="store_true", help="replace existing artifacts in the output directory")
    sp.add_argument("--keep-workdir", action="store_true", help="keep the work directory (logs, disks) after the build")
    sp.add_argument("--no-cache", action="store_true", help="do not reuse a cached installed disk")
    sp.add_argument("--only", action="append", metavar="VARIANT",
                    help="build only this variant (repeatable; default: every variant the image declares)")
    sp.add_argument("--except", dest="skip", action="append", metavar="VARIANT",
                    help="do not build this variant (repeatable)")
    sp.add_argument("--parallel", type=int, metavar="N",
                    help="variants provisioned at once (default: as many VMs as the host's cores and memory hold)")
    sp.add_argument("--no-verify", action="store_true",
                    help="publish without booting the image under each firmware its disk promises (BIOS and UEFI "
                         "for disk.boot hybrid) and checking it first")
    sp.add_argument("--offline", action="store_true",
                    help="never contact the mirrors: every input from the caches (fill them with fetch --all); what "
                         "is missing is named in one error before any VM starts. Needs a package lock")
    sp.add_argument("--on-error", choices=("cleanup", "abort"), default="cleanup",
                    help="after a failure: remove the work directory (cleanup, the default) or keep it with its "
                         "disks and say how to boot them (abort); a diagnostics bundle is left either way")
    sp = image_cmd("verify", "boot a built qcow2 with a NoCloud seed and check it (JUnit + text report)")
    sp.add_argument("--image-file", type=Path, help="qcow2 to check (default: the build output of IMAGE.yaml)")
    sp.add_argument("--report-dir", type=Path, help="where reports go (default: OUTPUT_DIR/verify)")
    sp.add_argument("--firmware", action="append", choices=("bios", "uefi", "uefi-secure"),
                    help="boot under this firmware (repeatable; default: every firmware disk.boot promises: "
                         "bios and uefi for hybrid). uefi-secure: OVMF with Secure Boot and Microsoft's keys, the "
                         "image's module-signing certificate added to the MOK list")
    sp.add_argument("--variant", help="which variant's image (OUTPUT_DIR/VARIANT/NAME-VARIANT.qcow2) and settings")
    sp.add_argument("--mok-cert", type=Path, help="module-signing certificate (PEM) to enroll and check against "
                                                  "(default: NAME.mok.pem next to the image)")
    sp = image_cmd("gateway", "serve the verified, caching archive gateway (with the signed installer suite) until "
                              "interrupted; prints its URLs")
    sp.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="IPv4 address and port (default 127.0.0.1, any free port)")
    sp.add_argument("--allow-remote", action="store_true",
                    help="allow a --listen address other than loopback (the gateway has no authentication)")
    sp = sub.add_parser("keygen", help="make a module-signing key pair (MOK) for secure_boot: DIR/mok.key, "
                                       "DIR/mok.pem, DIR/mok.der",
                        description="make a module-signing key pair (MOK) for secure_boot: DIR/mok.key, "
                                    "DIR/mok.pem, DIR/mok.der")
    sp.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write the pair into")
    sp.add_argument("--name", default="builder", metavar="CN",
                    help="the certificate's common name is 'CN module signing' (default: builder; "
                         "a name ending in 'module signing' is kept as is)")
    sp.add_argument("--days", type=int, default=3650, metavar="N", help="days the certificate is valid (3650)")
    sp.add_argument("--force", action="store_true", help="replace an existing DIR/mok.key")
    sp = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    sp.add_argument("shell", choices=("bash", "zsh"))
    sp = sub.add_parser("clean", help="remove work directories and cached installed disks (never a live build's)")
    sp.add_argument("image", nargs="?", type=Path,
                    help="only this image definition's work directories and installed disks")
    sp.add_argument("--all", action="store_true",
                    help="also the content cache of downloads and the host-built kernel modules (not with IMAGE)")
    sp.add_argument("--older-than", metavar="AGE", help="only the cached installed disks made longer ago than AGE "
                                                        "(e.g. 7d, 12h), none that a running build uses")
    return p


_JSON: Any = None  # the JsonLines writer with --log-format json


def _setup_logging(debug: bool, quiet: bool, log_format: str = "text") -> Any:
    """The stderr console, and logging through it. Nothing printed is ever read as Rich markup or emoji codes,
    and nothing is wrapped: messages, hints, log tails, paths and URLs come out as they were written."""
    global _JSON
    from rich.console import Console

    console = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler: logging.Handler
    _JSON = None
    if log_format == "json":
        from .logformat import JsonLines, JsonLogHandler

        _JSON = JsonLines()
        handler = JsonLogHandler(_JSON)
    elif console.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, rich_tracebacks=debug, markup=False,
                              show_time=True, omit_repeated_times=False, log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(message)s"))
        if not debug:
            handler.addFilter(_LiveFilter())
    else:  # a pipe or a file (CI): plain lines, never folded to 80 columns, each with its time
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    handler.addFilter(_RedactKeys())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("builder").setLevel(level)
    logging.getLogger("paramiko").setLevel(logging.WARNING if debug else logging.CRITICAL)
    return console


class _PlainFormatter(logging.Formatter):
    """``[HH:MM:SS] LEVEL   message``; a message of several lines becomes several such lines (no line of the log
    is a bare continuation, so every line can be grepped and has its time)."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, _, rest = text.partition("\n")
        if not rest:
            return head
        stamp = f"[{self.formatTime(record, self.datefmt)}] {record.levelname:<7} "
        return "\n".join([head, *(stamp + ln for ln in rest.split("\n"))])


class _RedactKeys(logging.Filter):
    """No log record shows a private key (a d-i or Ansible line quoting the build's host key)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "PRIVATE KEY" in message:
            record.msg, record.args = redact_private_keys(message), ()
        return True


def _say(console: Any, text: str, style: str | None = None, *, prefix: str = "") -> None:
    """Print ``text`` verbatim (``prefix`` in ``style``), private keys removed."""
    from rich.text import Text

    text = redact_private_keys(text)
    if _JSON is None and not console.is_terminal:  # plain log lines, each with its time
        level = logging.ERROR if style and "red" in style else logging.INFO
        for line in (prefix + text).split("\n"):
            logging.getLogger("builder.cli").log(level, line)
        return
    if _JSON is not None:
        _JSON.write({"type": "log", "level": "ERROR" if style and "red" in style else "INFO",
                     "logger": "builder.cli", "message": prefix + text})
        return
    console.print(Text.assemble((prefix, style or ""), text) if prefix else Text(text, style=style or ""))


_LIVE: Any = None  # the running LiveDisplay: its events' own log records are not printed (_LiveFilter)


class _Progress:
    """Renders build events: with --log-format json one line each; on a terminal (text, not --quiet) the live
    display (builder/progress_display.py); elsewhere nothing here, the log lines of the events say it all."""

    def __init__(self, console: Any, *, live: bool = True) -> None:
        self.console = console
        self.display: Any = None
        if live and _JSON is None and console.is_terminal:  # elsewhere a live display only leaves empty lines
            from .progress_display import LiveDisplay

            self.display = LiveDisplay(console)

    def __enter__(self) -> _Progress:
        global _LIVE
        if self.display is not None:
            self.display.start()
            _LIVE = self.display
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """The live rows erased (before an error is printed, or while the gateway serves); idempotent."""
        global _LIVE
        if self.display is not None:
            _LIVE = None
            self.display.stop()

    def __call__(self, ev: Any) -> None:
        if _JSON is not None:
            _JSON.event(ev)
        elif self.display is not None and _LIVE is self.display:
            self.display(ev)


class _LiveFilter(logging.Filter):
    """On a terminal, the records of the events the live display draws itself (stage start and end: a summary
    line instead; each Ansible task: the stage's row) are not printed twice. --debug prints them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        ev = getattr(record, "builder_event", None)
        return ev is None or _LIVE is None or not _LIVE.replaces(ev)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds every context manager: VMs stopped, gateway closed, staging removed


def main(argv: Sequence[str] | None = None) -> int:
    console: Any = None
    previous_sigterm = None
    try:
        args = _parser().parse_args(argv)
        if threading.current_thread() is threading.main_thread():
            previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        console = _setup_logging(args.debug, args.quiet, args.log_format)
        return _result(_dispatch(args, console))
    except KeyboardInterrupt:
        _interrupted(console)
        return _result(EXIT_INTERRUPTED, {"type": "interrupted", "message": "interrupted"})
    except BuilderError as exc:
        if args.debug and _JSON is None:
            console.print_exception()
        if _JSON is None:
            _say(console, exc.describe(), "bold red", prefix="error: ")
        return _result(exc.exit_code, {
            "type": type(exc).__name__, "message": redact_private_keys(exc.message), "stage": exc.stage,
            "hint": exc.hint, "log_tail": [redact_private_keys(ln) for ln in exc.log_tail]})
    except Exception as exc:
        if console is None or args.debug:
            raise
        _say(console, " (run with --debug for the traceback)", "bold red", prefix="internal error")
        return _result(EXIT_FAILED, {"type": "internal", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _result(code: int, error: dict[str, Any] | None = None) -> int:
    """With --log-format json: the last line, the exit code and the error (if any)."""
    if _JSON is not None:
        _JSON.result(code, error)
    return code


def _interrupted(console: Any) -> None:
    if console is None:
        sys.stderr.write("interrupted\n")
    else:
        _say(console, "interrupted", "red")


def _dispatch(args: argparse.Namespace, console: Any) -> int:
    from .config import dump_config, load_config, parse_duration

    if args.verb == "completion":
        from .completion import bash_script, zsh_script

        sys.stdout.write((bash_script if args.shell == "bash" else zsh_script)(_parser()))
        return EXIT_OK
    if args.verb == "keygen":
        return _keygen(args, console)
    if args.verb == "clean":
        from .pipeline import clean

        name = load_config(args.image).name if args.image else None
        if name and args.all:
            raise ConfigError("clean IMAGE --all: the download cache is shared by every image; drop IMAGE or --all")
        extra: dict[str, Any] = {}
        if args.older_than is not None:
            if args.all:
                raise ConfigError("clean --older-than expires installed disks only; drop --all or --older-than")
            try:
                extra["older_than"] = parse_duration(args.older_than)
            except ValueError as exc:
                raise ConfigError(f"clean --older-than: {exc}") from exc
        for line in clean(all_downloads=args.all, image=name, **extra):
            _say(console, line)
        return EXIT_OK
    cfg = load_config(args.image, args.var, var_files=args.var_file)
    if args.verb == "validate":
        _say(console, f"{args.image}: ok ({cfg.name}, Debian {cfg.debian.release} {cfg.debian.suite}, "
                      f"disk {cfg.disk.size >> 30}G)")
        return EXIT_OK
    if args.verb == "inspect":
        from .inspect import inspect

        sys.stdout.write(inspect(args.image, args.var, var_files=args.var_file).text())
        return EXIT_OK
    if args.verb == "show-config":
        sys.stdout.write(dump_config(cfg))
        return EXIT_OK
    if args.verb == "gateway":
        return _gateway(args, cfg, console)
    from .archive import ContentCache, FetchStats
    from .events import Emitter

    stats = FetchStats()
    with _Progress(console, live=not args.quiet) as progress:
        emitter = Emitter(progress)
        t0 = time.monotonic()
        if args.verb == "lock":
            from .locking import check_locks, write_locks

            if args.check:
                locks = check_locks(cfg, cache=ContentCache(), stats=stats, emitter=emitter)
            else:
                locks = write_locks(cfg, cache=ContentCache(), stats=stats, emitter=emitter,
                                    from_build=args.from_build, update=args.update)
            for line in locks.lines:
                _say(console, line)
            if locks.changed:
                return EXIT_FAILED
        elif args.verb == "fetch":
            from .stages.fetch import fetch_inputs

            everything = args.all or args.offline
            with emitter.stage("fetch"):
                inputs = fetch_inputs(cfg, ContentCache(), stats, emitter, all_udebs=args.all_udebs or everything,
                                      packages=everything, offline=args.offline)
            target = inputs.target
            _say(console, f"verified {'in the cache' if args.offline else 'and cached'}: netboot "
                          f"{inputs.lock.netboot.version} (kernel {inputs.kernel_abi}), {inputs.udebs_verified} of "
                          f"the {len(inputs.udeb_pins)} udebs in the installer suite"
                          + ("" if everything else " (the rest are checked when served)")
                          + (f", the {len(target.lock.packages)} packages of {cfg.package_lock_path.name}"
                             if target else "")
                          + f"; {stats.bytes_fetched} bytes fetched upstream in {time.monotonic() - t0:.1f} s")
            if everything and target is None and cfg.package_lock_path.is_file():
                emitter.warning(f"{cfg.package_lock_path.name} is not in force (debian.package_lock is off): the "
                                "target's packages were left out, and build --offline will refuse to start; add "
                                "--var debian.package_lock=auto to fetch and build")
        elif args.verb == "iso":
            from .pipeline import write_iso

            suite_key = _suite_key(args.suite_key) if args.suite_key is not None else None
            out = write_iso(cfg, args.output, emitter=emitter, stats=stats, suite_key=suite_key,
                            ssh_key_out=args.ssh_key_out, reboot=args.reboot)
            keys = f", SSH keys in {args.ssh_key_out}" if args.ssh_key_out is not None else ""
            _say(console, f"wrote {out}{keys} ({stats.bytes_fetched} bytes fetched upstream)")
        elif args.verb == "build":
            from .pipeline import build, build_variants

            common = {"on_event": emitter, "output": args.output, "force": args.force,
                      "keep_workdir": args.keep_workdir, "use_cache": not args.no_cache, "on_error": args.on_error,
                      "verify": not args.no_verify, "offline": args.offline}
            names = cfg.select_variants(tuple(args.only or ()), tuple(args.skip or ()))
            if not cfg.variants:
                result = build(cfg, **common)  # type: ignore[arg-type]
                _say(console, f" {result.image} ({result.size_bytes / 2**20:.0f} MiB) in "
                              f"{result.duration_s / 60:.1f} min", "green", prefix="built")
                return EXIT_OK
            if not names:
                raise ConfigError("--only/--except leave no variant to build", hint="variants: "
                                  + ", ".join(cfg.variants))
            multi = build_variants(cfg, names=names, parallel=args.parallel, **common)  # type: ignore[arg-type]
            for name in names:
                if name in multi.results:
                    r = multi.results[name]
                    _say(console, f" {name}: {r.image} ({r.size_bytes / 2**20:.0f} MiB) in "
                                  f"{r.duration_s / 60:.1f} min", "green", prefix="built")
                else:
                    _say(console, f" {name}: {multi.failed[name].describe()}", "bold red", prefix="failed")
            return EXIT_OK if multi.ok else EXIT_FAILED
        elif args.verb == "verify":
            from .verify import verify_all

            out_dir = cfg.output_dir
            if args.variant:
                out_dir, cfg = out_dir / args.variant, cfg.variant(args.variant)
            elif cfg.variants and not args.image_file:
                raise ConfigError("this image has variants: name one with --variant (or give --image-file)",
                                  hint="variants: " + ", ".join(cfg.variants))
            qcow2 = args.image_file or out_dir / f"{cfg.name}.qcow2"
            report_dir = args.report_dir or out_dir / "verify"
            reports = verify_all(cfg, qcow2, report_dir, firmwares=tuple(dict.fromkeys(args.firmware or ())),
                                 mok_cert=args.mok_cert, emitter=emitter)
            for report in reports:
                _say(console, report.text())
            _say(console, f"reports: {report_dir}/<firmware>/verify-report.{{xml,txt,json}}, "
                          f"{report_dir}/verify-summary.json")
            if not all(r.ok for r in reports):
                return EXIT_FAILED
        else:  # pragma: no cover - argparse guards this
            raise ConfigError(f"unknown verb {args.verb}")
    return EXIT_OK


def _suite_key(path: Path) -> bytes:
    """The ``iso --suite-key`` file: a binary OpenPGP public key (as the gateway serves it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--suite-key {path}: cannot read it: {exc.strerror or exc}") from exc
    # a binary OpenPGP packet stream starts with a tag byte (high bit set) of a public-key packet (tag 6)
    tag = data[0] if data else 0
    old_format = tag & 0xC0 == 0x80 and (tag >> 2) & 0x0F == 6
    new_format = tag & 0xC0 == 0xC0 and tag & 0x3F == 6
    if not (old_format or new_format):
        raise ConfigError(f"--suite-key {path}: not a binary OpenPGP public key",
                          hint="give the gateway's URL/dists/builder-installer/signing-key.gpg as served")
    return data


def _keygen(args: argparse.Namespace, console: Any) -> int:
    from .secureboot import SigningError, write_pair

    try:
        pair = write_pair(args.out, args.name, args.days, force=args.force)
    except SigningError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot write the key pair into {args.out}: {exc.strerror or exc}") from exc
    out = args.out
    _say(console, f"wrote {out / 'mok.key'} (private, mode 0600: keep it out of images and repositories), "
                  f"{out / 'mok.pem'}, {out / 'mok.der'}")
    _say(console, f"certificate: {pair.subject}, SHA-256 fingerprint {pair.fingerprint}")
    sys.stdout.write("# add to the image definition (a relative path there is relative to the image file):\n"
                     f"secure_boot:\n  signing_key: {out.resolve() / 'mok.key'}\n"
                     f"  signing_cert: {out.resolve() / 'mok.der'}\n"
                     f"# enroll on each node (then reboot and confirm in MokManager): mokutil --import mok.der\n")
    return EXIT_OK


def _gateway(args: argparse.Namespace, cfg: Any, console: Any) -> int:
    """Serve until SIGINT (exit 130) or SIGTERM (exit 0; while still starting, 130 like every verb)."""
    from .archive import FetchStats
    from .events import Emitter
    from .gateway.standalone import check_listen, parse_listen, serve

    listen = parse_listen(args.listen)
    check_listen(listen, allow_remote=args.allow_remote)  # serve() checks too; this fails before any output
    stop = threading.Event()
    inputs_stats = FetchStats()
    serving = False

    def on_sigterm(signum: int, frame: object) -> None:
        if not serving:
            raise KeyboardInterrupt
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        with _Progress(console, live=not args.quiet) as progress:
            def ready(urls: list[str]) -> None:
                nonlocal serving
                progress.stop()  # the gateway's inputs are ready: no live display while serving
                sys.stdout.write("".join(f"{url}\n" for url in urls))
                sys.stdout.flush()
                serving = True

            stats = serve(cfg, listen, allow_remote=args.allow_remote, emitter=Emitter(progress), ready=ready,
                          stop=stop, fetch_stats=inputs_stats)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # upstream: the installer inputs fetched before serving and what the gateway fetched for its clients
    upstream = inputs_stats.bytes_fetched + stats.upstream_bytes
    _say(console, f"gateway stopped ({stats.requests} request{'' if stats.requests == 1 else 's'} served, "
                  f"{upstream} bytes fetched upstream)")
    return EXIT_OK
