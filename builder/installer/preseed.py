"""Stage 2: the debian-installer preseed, rendered from the Jinja2 templates in ``preseed/``.

:func:`render_preseed` is pure: it validates every value that goes into the file (a bad value is a
:class:`ConfigError` naming its config path) and returns the text. :func:`check_preseed_syntax` checks a
rendered file twice: with rules for the installer's own parser (``/bin/debconf-set-selections`` in d-i is a
shell script that differs from the host's: only lines *starting* with ``#`` are comments, blank and comment
lines are dropped *before* continuation lines are joined) and with the host's ``debconf-set-selections -c``.
:func:`installer_cmdline` is the kernel command line for the installer.

Contracts with the other stages (see the constants below): the installed system has ``/etc/cloud/
cloud-init.disabled`` so that cloud-init stays out of the provisioning boot (it would replace the pinned SSH
host key); the finalize stage removes it together with the build user's sudoers file. Milestones are
written as ``<log_marker> <text>`` to ttyS0 and to syslog (so they arrive in the UDP log stream);
``<log_marker> late_command done`` is the last thing the preseed does before d-i powers off.
"""

from __future__ import annotations

import base64
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ..config import KARG_RE, LOCALE_RE, ImageConfig, install_packages
from ..errors import ConfigError, MediaError, ToolError
from ..image import ESP_TYPE
from ..run import run, which
from ..vm.guestnet import HOST as GUEST_HOST

TEMPLATE = "preseed.cfg.j2"
INSTALL_DISK = "/dev/vda"  # the install VM's disk is virtio-blk

# What the preseed writes into the installed system: only what the build needs to reach it over SSH (the
# pinned host key, the build user's sudo rule, cloud-init kept off during the build, the serial console).
# Everything that shapes the image is written by the roles (roles/base, roles/finalize).
SSH_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
SUDOERS_FILE = "/etc/sudoers.d/90-builder"
CLOUD_INIT_DISABLED = "/etc/cloud/cloud-init.disabled"
GRUB_DROPIN = "/etc/default/grub.d/50-builder.cfg"

MILESTONE_LOADED = "preseed loaded"
MILESTONE_PARTITIONING = "partitioning"
MILESTONE_LATE_START = "late_command started"
MILESTONE_DONE = "late_command done"


DEBCONF_TYPES = ("select", "boolean", "string", "multiselect", "note", "password", "text", "title", "error")
DEBCONF_FLAGS = ("seen",)
FORBIDDEN = ("allow_unauthenticated", "--no-check-gpg", "--allow-unauthenticated")

_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{1,40}")
_HOSTPORT_RE = re.compile(r"(?:[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_DIR_RE = re.compile(r"(/[A-Za-z0-9_.~+-]+)+")
_MARKER_RE = re.compile(r"[A-Za-z0-9_-]{2,32}")
_KEYTYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_COMMENT_RE = re.compile(r"[A-Za-z0-9@._+:=,/()-]+(?: [A-Za-z0-9@._+:=,/()-]+)*")
_PEM_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_PEM_END = "-----END OPENSSH PRIVATE KEY-----"


@dataclass(frozen=True)
class PreseedContext:
    """Everything the preseed needs besides the image config: where the gateway is, and the build's keys."""

    config: ImageConfig
    mirror_host: str  # the archive gateway as the guest sees it (builder.vm.guestnet.GATEWAY)
    mirror_dir: str = "/debian"
    security_host: str = ""  # "" = the same host as mirror_host
    security_dir: str = "/debian-security"  # trixie's apt-setup hard-codes /debian-security
    udeb_suite: str = ""  # the gateway's builder-signed installer suite; "" = same as the suite
    authorized_key: str = ""  # OpenSSH public key line of the build's client key (build user only)
    host_key_private: str = ""  # OpenSSH ed25519 private host key (PEM)
    host_key_public: str = ""
    log_marker: str = "BUILDER"
    # how the install ends: power off (a build: QEMU exits, and the builder knows the install has ended), or
    # reboot into the installed system (the ``iso`` verb's --reboot: for a tool that waits for SSH in the same VM)
    poweroff: bool = True


# ---------------------------------------------------------------------------------------------- helpers


def default_template_dir() -> Path:
    """``<repo>/preseed`` in a source tree; ``builder/data/preseed`` when installed as package data."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "preseed", here.parents[1] / "data" / "preseed"):
        if (cand / TEMPLATE).is_file():
            return cand
    raise ConfigError(f"preseed templates not found (looked for {TEMPLATE} in {here.parents[2] / 'preseed'})")


def shq(value: object) -> str:
    """Quote for sh without any backslash (d-i's preseed parser and its shell both keep them, but why risk)."""
    s = str(value)
    if any(c in s for c in "\n\r\0"):
        raise ConfigError(f"a value for the preseed contains a line break: {s!r}")
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _ssh_string(blob: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(blob):
        raise ValueError("truncated")
    (n,) = struct.unpack(">I", blob[pos:pos + 4])
    if pos + 4 + n > len(blob):
        raise ValueError("truncated")
    return blob[pos + 4:pos + 4 + n], pos + 4 + n


def _public_key_blob(line: str, allowed: Sequence[str]) -> tuple[str, bytes, str]:
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError("expected '<type> <base64> [comment]'")
    ktype, b64 = parts[0], parts[1]
    comment = parts[2] if len(parts) > 2 else ""
    if ktype not in allowed:
        raise ValueError(f"key type {ktype!r} is not one of {', '.join(allowed)}")
    try:
        blob = base64.b64decode(b64, validate=True)
        inner, _ = _ssh_string(blob, 0)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError(f"the key data is not valid base64 SSH key data ({exc})") from exc
    if inner.decode("ascii", "replace") != ktype:
        raise ValueError(f"the key data is a {inner.decode('ascii', 'replace')!r} key, not {ktype!r}")
    if comment and not _COMMENT_RE.fullmatch(comment):
        raise ValueError(f"the key comment has characters the preseed does not take: {comment!r}")
    return ktype, blob, comment


def _private_key_lines(pem: str) -> tuple[list[str], bytes]:
    """PEM lines of an unencrypted OpenSSH ed25519 private key, and the public key blob inside it."""
    lines = [ln.strip() for ln in pem.strip().splitlines() if ln.strip()]
    if len(lines) < 3 or lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
        raise ValueError(f"expected an OpenSSH private key ({_PEM_BEGIN} … {_PEM_END})")
    body = lines[1:-1]
    if any(not re.fullmatch(r"[A-Za-z0-9+/=]{1,80}", ln) for ln in body):
        raise ValueError("the key body is not base64")
    try:
        raw = base64.b64decode("".join(body), validate=True)
    except ValueError as exc:
        raise ValueError("the key body is not base64") from exc
    magic = b"openssh-key-v1\0"
    if not raw.startswith(magic):
        raise ValueError("not an openssh-key-v1 private key")
    try:
        cipher, pos = _ssh_string(raw, len(magic))
        _kdf, pos = _ssh_string(raw, pos)
        _kdfopts, pos = _ssh_string(raw, pos)
        (nkeys,) = struct.unpack(">I", raw[pos:pos + 4])
        pub, _ = _ssh_string(raw, pos + 4)
        ktype, _ = _ssh_string(pub, 0)
    except (ValueError, struct.error) as exc:
        raise ValueError("truncated openssh-key-v1 private key") from exc
    if cipher != b"none":
        raise ValueError("the host key must not be passphrase-protected")
    if nkeys != 1 or ktype != b"ssh-ed25519":
        raise ValueError(f"expected one ssh-ed25519 key, found {nkeys} {ktype.decode('ascii', 'replace')}")
    return lines, pub


def _serial_console(kargs: Sequence[str]) -> tuple[int, int] | None:
    """(unit, speed) of the last console=ttyS<n>[,speed] argument, the one the kernel uses for /dev/console."""
    found = None
    for a in kargs:
        m = re.fullmatch(r"console=ttyS(\d+)(?:,(\d+)\S*)?", a)
        if m:
            found = (int(m.group(1)), int(m.group(2) or 9600))
    return found


# ---------------------------------------------------------------------------------------------- values


# The EFI system partition: Debian's cloud images give it 124 MiB; shim, GRUB and MokManager take ~6 MB.
ESP_MB = 128
# the GPT name partman-efi gives the ESP; a BIOS install names it the same (late_command)
ESP_NAME = "EFI System Partition"


def preseed_values(ctx: PreseedContext) -> dict[str, Any]:
    """The validated values the templates see. ConfigError lists every bad one with its path."""
    cfg = ctx.config
    inst = cfg.installer
    problems: list[tuple[str, str]] = []

    def bad(path: str, msg: str) -> None:
        problems.append((path, msg))

    # The config's own values were checked when it was loaded (config.py's validators): only what the build
    # adds at run time (gateway address, keys) is checked here.
    packages = install_packages(cfg)
    m = LOCALE_RE.fullmatch(inst.locale)
    if m is None:
        bad("installer.locale", f"expected a locale like en_US.UTF-8, not {inst.locale!r}")
    if not _HOSTPORT_RE.fullmatch(ctx.mirror_host):
        bad("preseed.mirror_host", f"expected HOST[:PORT], not {ctx.mirror_host!r}")
    security_host = ctx.security_host or ctx.mirror_host
    if not _HOSTPORT_RE.fullmatch(security_host):
        bad("preseed.security_host", f"expected HOST[:PORT], not {security_host!r}")
    if not _DIR_RE.fullmatch(ctx.mirror_dir.rstrip("/") or "/"):
        bad("preseed.mirror_dir", f"expected an absolute URL path, not {ctx.mirror_dir!r}")
    if ctx.security_dir.rstrip("/") != "/debian-security":
        bad("preseed.security_dir", "d-i's apt-setup always uses /debian-security on the security host")
    if ctx.udeb_suite and not _SUITE_RE.fullmatch(ctx.udeb_suite):
        bad("preseed.udeb_suite", f"not a suite name: {ctx.udeb_suite!r}")
    if not _MARKER_RE.fullmatch(ctx.log_marker):
        bad("preseed.log_marker", f"use 2-32 letters, digits, _ or -; not {ctx.log_marker!r}")

    authorized_key = ""
    if ctx.authorized_key:
        try:
            _public_key_blob(ctx.authorized_key, _KEYTYPES)
            authorized_key = " ".join(ctx.authorized_key.split())
        except ValueError as exc:
            bad("preseed.authorized_key", str(exc))
    host_key_lines: list[str] = []
    host_key_public = ""
    if bool(ctx.host_key_private) != bool(ctx.host_key_public):
        bad("preseed.host_key", "give both the private and the public host key, or neither")
    elif ctx.host_key_private:
        try:
            host_key_lines, pub_blob = _private_key_lines(ctx.host_key_private)
            _t, blob, _c = _public_key_blob(ctx.host_key_public, ("ssh-ed25519",))
            if blob != pub_blob:
                bad("preseed.host_key_public", "does not belong to the private host key")
            host_key_public = " ".join(ctx.host_key_public.split())
        except ValueError as exc:
            bad("preseed.host_key", str(exc))

    if problems:
        raise ConfigError("cannot render the preseed", problems=problems, stage="preseed")

    assert m is not None
    kargs = list(inst.kernel_cmdline)
    return {
        "name": cfg.name,
        "suite": cfg.debian.suite,
        "release": cfg.debian.release,
        "arch": cfg.debian.arch,
        "components": list(cfg.debian.components),
        "locale": inst.locale,
        "language": m.group("lang"),
        "country": m.group("country"),
        "keymap": inst.keymap,
        "timezone": inst.timezone,
        "hostname": inst.hostname,
        "domain": inst.domain,
        "user": inst.build_user,
        "packages": list(packages),
        "install_recommends": inst.install_recommends,
        "kernel_image": f"linux-image-{cfg.debian.arch}",
        "check_headers": any(p.startswith("linux-headers-") for p in packages),
        "kernel_cmdline": " ".join(kargs),
        "serial": _serial_console(kargs),
        "disk": INSTALL_DISK,
        "boot": cfg.disk.boot,
        # how the install VM boots: under BIOS, partman makes no EFI system partition and grub-installer installs
        # grub-pc, so a hybrid disk gets its ESP as a plain FAT partition and the UEFI boot loader in late_command
        "installer_firmware": cfg.build_firmware,
        "esp_mb": ESP_MB,
        "esp_type": ESP_TYPE,
        "esp_name": ESP_NAME,
        "mirror_host": ctx.mirror_host,
        "mirror_dir": "/" + ctx.mirror_dir.strip("/"),
        "security_host": security_host,
        "udeb_suite": ctx.udeb_suite,
        "authorized_key": authorized_key,
        "host_key_lines": host_key_lines,
        "host_key_public": host_key_public,
        "marker": ctx.log_marker,
        "poweroff": ctx.poweroff,
        # The marker split by an empty quote: d-i logs the text of every preseeded command before running
        # it, and that log line must not look like a milestone.
        "marker_sh": f"{ctx.log_marker[0]}''{ctx.log_marker[1:]}",
        "paths": {
            "host_key": SSH_HOST_KEY, "sudoers": SUDOERS_FILE, "cloud_init_disabled": CLOUD_INIT_DISABLED,
            "grub": GRUB_DROPIN,
        },
        "milestones": {
            "loaded": MILESTONE_LOADED, "partitioning": MILESTONE_PARTITIONING,
            "late_start": MILESTONE_LATE_START,
        },
    }


def _environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["shq"] = shq
    env.filters["bool"] = lambda v: "true" if v else "false"
    return env


def render_preseed(ctx: PreseedContext, template_dir: Path | None = None) -> str:
    """The preseed text for ``ctx``. Pure: reads only the templates. ConfigError on a bad value."""
    values = preseed_values(ctx)
    tdir = Path(template_dir) if template_dir is not None else default_template_dir()
    try:
        text = _environment(tdir).get_template(TEMPLATE).render(**values)
    except jinja2.TemplateNotFound as exc:
        raise ConfigError(f"preseed template not found: {exc.name} (in {tdir})", stage="preseed") from exc
    except jinja2.TemplateError as exc:
        where = f"{getattr(exc, 'filename', None) or TEMPLATE}:{getattr(exc, 'lineno', '?')}"
        raise ConfigError(f"preseed template error at {where}: {exc}", stage="preseed") from exc
    # Collapse runs of blank lines the includes leave behind; d-i ignores blank lines anyway.
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).lstrip("\n")


# ---------------------------------------------------------------------------------------------- checking


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined text) the way d-i's parser reads the file."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for no, raw in enumerate(text.split("\n"), 1):
        if raw.startswith("#") or not raw.strip():
            continue
        line = raw.lstrip()
        if line.endswith("\\"):
            if not pending:
                start = no
            pending.append(line[:-1].rstrip())
            continue
        if pending:
            out.append((start, " ".join([*pending, line])))
            pending = []
        else:
            out.append((no, line))
    if pending:
        out.append((start, " ".join(pending)))
    return out


def lint_preseed(text: str) -> list[tuple[int, str]]:
    """Problems d-i's own parser would have (or that the host's parser would read differently): (line, why)."""
    problems: list[tuple[int, str]] = []
    lines = text.split("\n")
    if "\r" in text:
        problems.append((text[: text.index("\r")].count("\n") + 1, "carriage return (d-i strips them everywhere)"))
    for no, raw in enumerate(lines, 1):
        stripped = raw.lstrip()
        if stripped.startswith("#") and stripped != raw:
            problems.append((no, "indented comment: d-i only skips lines that start with '#'"))
        if raw.rstrip().endswith("\\") and not raw.endswith("\\") and raw.rstrip() != raw:
            problems.append((no, "whitespace after the continuation backslash"))
        if raw.endswith("\\"):
            nxt = lines[no] if no < len(lines) else ""
            if not nxt.strip() or nxt.lstrip().startswith("#"):
                problems.append((no, "a continued line is followed by a blank or comment line (the parsers differ)"))
    seen: dict[str, int] = {}
    for no, line in _logical_lines(text):
        for bad in FORBIDDEN:
            if bad in line:
                problems.append((no, f"{bad} is never allowed in a builder preseed"))
        parts = line.split(None, 3)
        if len(parts) < 3:
            problems.append((no, f"expected '<owner> <question> <type> [value]': {line[:80]!r}"))
            continue
        owner, question, qtype = parts[:3]
        value = parts[3] if len(parts) > 3 else ""
        if qtype not in DEBCONF_TYPES + DEBCONF_FLAGS:
            problems.append((no, f"unknown type {qtype!r} for {question} (the line would be skipped)"))
        if qtype == "boolean" and value not in ("true", "false"):
            problems.append((no, f"{question}: boolean value must be true or false, not {value!r}"))
        key = f"{owner} {question}"
        if qtype not in DEBCONF_FLAGS:
            if key in seen:
                problems.append((no, f"{question} is set twice (first on line {seen[key]})"))
            seen.setdefault(key, no)
    return problems


_DSS_ERROR_RE = re.compile(r"parse error on line (\d+)")
_DSS_WARN_RE = re.compile(r"warning: (.*?)(?:, skipping line (\d+))?$")


def check_preseed_syntax(text: str) -> None:
    """MediaError naming the line if the preseed would not load; ToolError if debconf is not installed."""
    problems = lint_preseed(text)
    lines = text.split("\n")

    def show(no: int) -> str:
        return lines[no - 1].strip()[:120] if 0 < no <= len(lines) else ""

    if problems:
        no, why = problems[0]
        raise MediaError(
            f"preseed line {no}: {why}: {show(no)!r}", stage="preseed",
            log_tail=[f"line {n}: {w}" for n, w in problems],
        )
    tool = which("debconf-set-selections", package="debconf")
    with tempfile.NamedTemporaryFile("w", prefix="preseed-", suffix=".cfg") as f:
        f.write(text)
        f.flush()
        proc = run([tool, "-c", f.name], check=False, stage="preseed", timeout=60)
    err = (proc.stderr or b"").decode("utf-8", "replace")
    messages = [ln for ln in err.splitlines() if ln.strip()]
    m = _DSS_ERROR_RE.search(err)
    if m:
        no = int(m.group(1))
        raise MediaError(f"preseed line {no}: debconf-set-selections: parse error: {show(no)!r}",
                         stage="preseed", log_tail=messages)
    warnings = [ln for ln in messages if ln.startswith("warning:")]
    if warnings:
        w = _DSS_WARN_RE.search(warnings[0])
        no = int(w.group(2)) if w and w.group(2) else 0
        raise MediaError(f"preseed line {no}: debconf-set-selections: {warnings[0]}", stage="preseed",
                         log_tail=messages)
    if proc.returncode != 0:
        raise ToolError(f"debconf-set-selections -c failed with exit code {proc.returncode}",
                        command=[tool, "-c", f.name], returncode=proc.returncode, stderr_tail=messages)


# ---------------------------------------------------------------------------------------------- cmdline


def installer_cmdline(
    ctx_or_config: PreseedContext | ImageConfig,
    *,
    log_port: int,
    extra: Sequence[str] = (),
    log_host: str = GUEST_HOST,
) -> str:
    """The installer's kernel command line; what follows ``---`` is copied to the installed system.

    No ``preseed/file=``: d-i's initrd-preseed loads ``/preseed.cfg`` from the initrd by itself at startup
    (and runs preseed/early_command right after). The netboot initrd also carries file-preseed, which
    ``preseed/file`` would make load the same file a second time and run early_command again.
    ``DEBIAN_FRONTEND=text`` makes any unanswered question a plain-text block on the serial console.
    """
    cfg = ctx_or_config.config if isinstance(ctx_or_config, PreseedContext) else ctx_or_config
    if not isinstance(log_port, int) or isinstance(log_port, bool) or not 0 < log_port < 65536:
        raise ConfigError(f"not a UDP port: {log_port!r}")
    if not _HOSTPORT_RE.fullmatch(log_host) or ":" in log_host:
        raise ConfigError(f"not a log host: {log_host!r}")
    for a in [*extra, *cfg.installer.kernel_cmdline]:
        if not KARG_RE.fullmatch(a) or a.startswith("-"):
            raise ConfigError(f"not a plain kernel argument: {a!r}")
    args = [
        "auto=true", "priority=critical", "DEBIAN_FRONTEND=text",
        "console=ttyS0,115200n8", f"log_host={log_host}", f"log_port={log_port}", *extra,
        "---", *cfg.installer.kernel_cmdline,
    ]
    return " ".join(args)
