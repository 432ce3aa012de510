#!/usr/bin/env python3
"""Side-by-side build benchmark on one machine: Packer 1.6.6 against builder (docs/benchmark.md). It prints
figures; nothing asserts a time.

    .venv/bin/python scripts/benchmark.py                      # all four runs (more than 3 hours under TCG)
    .venv/bin/python scripts/benchmark.py --runs b,c,d         # builder's runs; add Packer's later: --runs a
    .venv/bin/python scripts/benchmark.py --report [--json]    # the table from the results file, nothing run
    .venv/bin/python scripts/benchmark.py --dry-run            # the commands and the Packer template, nothing run

(a) Packer 1.6.6 (Debian's ``packer``: its QEMU builder and ansible provisioner), cold: the same preseed, served
    by ``builder gateway``, on an ISO from ``builder iso``; the same playbooks and roles (DKMS compiles in the
    guest, as a Packer user's build does).
(b) builder, cold: ``build --only current --no-verify`` with an empty cache.
(c) builder after a role change: (b)'s cache and a copy of the roles with one harmless task added: the installed
    disk and the host-built module are reused, provisioning onward runs again.
(d) builder, another variant on the same base: ``--only open`` with (b)'s cache.

Every finished run is merged at once into the results file (``--results``), with its date and host facts, so the
runs can be recorded in parts; the ratios (b)/(a), (c)/(b), (d)/(b) are reported next to their targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's builder, whatever the venv's install points at

SCHEMA = 1
RUNS: dict[str, str] = {
    "a": "Packer 1.6.6, cold",
    "b": "builder, cold",
    "c": "builder, after a role change",
    "d": "builder, another variant",
}
RUN_ORDER = ("b", "c", "d", "a")
COLUMNS: dict[str, str] = {"a": "(a) Packer cold", "b": "(b) ours cold", "c": "(c) role change", "d": "(d) variant"}
# (numerator, denominator, target): the targets on wall time; reported, never asserted
TARGETS: tuple[tuple[str, str, float], ...] = (("b", "a", 0.5), ("c", "b", 0.1), ("d", "b", 0.15))
# the stages of either tool, in the order a build goes through them (Packer's: see packer_stages)
STAGE_ORDER = ("gateway", "fetch", "prepare", "media", "boot", "install", "provision", "finalize", "shutdown",
               "compress", "verify", "publish")
DEFAULT_IMAGE = Path("images/cloud-gpu-worker.yaml")
DEFAULT_RESULTS = Path("build/benchmark/results.json")
PACKER_VERSION = "1.6.6"
PACKER_MISSING = "packer not installed (apt-get install packer)"
ROLE_CHANGE_ROLE = "nvidia-gpu-drivers"
ROLE_CHANGE_MARKER = "/run/builder-benchmark-role-change"  # a tmpfs: the image does not change
ROLE_CHANGE_TASK = f"""
# Added by scripts/benchmark.py for run (c), "after a role change": one harmless task. Its file is in /run (a
# tmpfs), so the image is the same; the role's defaults and vars are untouched (the host-built module is reused).
- name: Benchmark role change (a marker in /run, not in the image)
  ansible.builtin.copy:
    content: "builder benchmark: role changed\\n"
    dest: {ROLE_CHANGE_MARKER}
    owner: root
    group: root
    mode: "0644"
"""
GUEST_PYTHON = "/usr/bin/python3"
SFTP_SERVER = "/usr/lib/openssh/sftp-server -e"  # Debian's path (Packer's default is another distribution's)
# Packer 1.6.6's SSH proxy for Ansible offers only ssh-rsa (SHA-1), which OpenSSH 8.8 and later refuse by default
PROXY_SSH_ARGS = "-o IdentitiesOnly=yes -o HostKeyAlgorithms=+ssh-rsa -o PubkeyAcceptedAlgorithms=+ssh-rsa"
PACKER_SSH_TIMEOUT = "180m"  # the unattended install alone takes 30-70 min under TCG


class BenchError(Exception):
    """One line for the user, and the exit code (2: bad input)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Skipped(Exception):
    """A run that cannot start on this machine (a tool is missing): said clearly, nothing recorded."""


def say(text: str) -> None:
    sys.stderr.write(f"benchmark: {text}\n")
    sys.stderr.flush()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------- host facts


def git_commit(repo: Path = REPO) -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files), or ``unknown``."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_facts() -> dict[str, Any]:
    return {"host": platform.node(), "nproc": os.cpu_count(), "memory_bytes": memory_bytes(),
            "kernel": platform.release(), "machine": platform.machine(), "python": platform.python_version(),
            "commit": git_commit()}


# ---------------------------------------------------------------------------------------------- results file


def load_results(path: Path) -> dict[str, Any]:
    """The results file (an empty one when absent); BenchError when it cannot be read as ours."""
    if not path.exists():
        return {"schema": SCHEMA, "runs": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"results file {path} cannot be read as JSON ({exc}); move it away or pick another "
                         "--results") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs", {}), dict):
        raise BenchError(f"results file {path} is not a benchmark results file; move it away or pick another "
                         "--results")
    data.setdefault("runs", {})
    return data


def merge_record(results: dict[str, Any], key: str, record: dict[str, Any]) -> dict[str, Any]:
    """``results`` with ``record`` as run ``key``. A failed attempt does not replace figures recorded before:
    the earlier record stays, with the failure as its ``last_failure``."""
    runs = dict(results.get("runs") or {})
    old = runs.get(key)
    if record.get("status") != "ok" and isinstance(old, dict) and old.get("status") == "ok":
        record = {**old, "last_failure": {k: record.get(k) for k in ("started", "finished", "error", "host")}}
    runs[key] = record
    return {**results, "schema": SCHEMA, "runs": runs}


def save_record(path: Path, key: str, record: dict[str, Any]) -> None:
    """Merge ``record`` into the results file now (re-read first: another invocation may have added runs)."""
    merged = merge_record(load_results(path), key, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part-{os.getpid()}")
    part.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    os.replace(part, path)


# ---------------------------------------------------------------------------------------------- children


_CHILDREN: list[tuple[subprocess.Popen[str], int]] = []  # running children and the signal that stops each


def spawn(argv: Sequence[str], *, env: Mapping[str, str], stop_signal: int, **kw: Any) -> subprocess.Popen[str]:
    """A child in its own session (a terminal's Ctrl-C reaches only this script, which stops each child once,
    with the signal that child cleans up on)."""
    p = subprocess.Popen(list(argv), env=dict(env), cwd=REPO, text=True, start_new_session=True, **kw)
    _CHILDREN.append((p, stop_signal))
    return p


def stop_child(p: subprocess.Popen[str], sig: int, grace: float) -> None:
    """Signal ``p`` (by its PID) unless it has ended, give it ``grace`` seconds to clean up, then kill it."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            say(f"PID {p.pid} did not stop in {grace:.0f} s: killing it")
            p.kill()
            p.wait()
    for i, (child, _sig) in enumerate(_CHILDREN):
        if child is p:
            del _CHILDREN[i]
            break


def stop_all(grace: float = 300) -> None:
    for p, sig in list(reversed(_CHILDREN)):
        stop_child(p, sig, grace)


def run_logged(argv: Sequence[str], *, env: Mapping[str, str], log: Path, prefix: str,
               stop_signal: int = signal.SIGTERM, echo: Callable[[str], str | None] | None = None,
               ) -> tuple[int, list[str]]:
    """Run ``argv`` with its output (stdout and stderr) written to ``log`` and echoed to stderr behind
    ``prefix`` (``echo`` may rewrite or drop a line); the exit code and the output's lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with log.open("w") as out:
        p = spawn(argv, env=env, stop_signal=stop_signal, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert p.stdout is not None
            for line in p.stdout:
                out.write(line)
                out.flush()
                lines.append(line.rstrip("\n"))
                shown = echo(line.rstrip("\n")) if echo is not None else line.rstrip("\n")
                if shown is not None:
                    sys.stderr.write(f"{prefix}{shown}\n")
            rc = p.wait()
        finally:
            stop_child(p, stop_signal, 300)
    return rc, lines


def child_env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if cache is not None:
        env["BUILDER_CACHE_DIR"] = str(cache)
    env.update(extra)
    return env


def last_error(lines: Iterable[str]) -> str:
    """The child's last error line (builder's ``error: …``, Packer's ``ui,error``), else its last line."""
    lines = [ln for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if "error: " in ln or ",ui,error," in ln:
            return ln.split("error: ", 1)[-1] if "error: " in ln else ln.split(",ui,error,", 1)[1]
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------------------------------------- run context


@dataclass
class Bench:
    """What every run needs: the options, where its files go, the image definition."""

    image: Path  # as given (relative to the checkout when it is inside it)
    results: Path
    dir: Path  # the results file's directory: outputs, caches, logs, the Packer files
    variant: str
    variant_d: str
    accel: str
    cache_dir: Path | None
    with_verify: bool
    python: str = sys.executable

    @property
    def image_path(self) -> Path:
        return self.image if self.image.is_absolute() else REPO / self.image

    def config(self) -> Any:
        from builder.config import load_config

        return load_config(self.image_path)

    def builder_argv(self, verb: str, *args: str) -> list[str]:
        return [self.python, "-m", "builder", verb, str(self.image_path), *args]


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def fresh_dir(path: Path, what: str) -> Path:
    """``path`` created empty (it must not hold anything: a cold run starts from nothing)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BenchError(f"{what} {path} is not empty: a cold run needs an empty cache (give a new --cache-dir)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_record(key: str, bench: Bench, started: str) -> dict[str, Any]:
    return {"run": key, "label": RUNS[key], "schema": SCHEMA, "image_definition": str(bench.image),
            "started": started, "host": host_facts()}


# ---------------------------------------------------------------------------------------------- ours: b, c, d


def copy_roles_with_change(src: Path, dst: Path) -> Path:
    """A copy of the roles tree ``src`` at ``dst`` (replaced) with :data:`ROLE_CHANGE_TASK` appended to the
    tasks of :data:`ROLE_CHANGE_ROLE`; returns ``dst``."""
    tasks = src / ROLE_CHANGE_ROLE / "tasks" / "main.yml"
    if not tasks.is_file():
        raise BenchError(f"no {tasks}: the role change of run (c) needs the {ROLE_CHANGE_ROLE} role")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    changed = dst / ROLE_CHANGE_ROLE / "tasks" / "main.yml"
    text = changed.read_text()
    changed.write_text(text + ("" if text.endswith("\n") else "\n") + ROLE_CHANGE_TASK)
    return dst


def roles_source(cfg: Any) -> Path:
    """The roles tree the image provisions with (the one holding the nvidia role)."""
    for d in cfg.roles_dirs:
        if (Path(d) / ROLE_CHANGE_ROLE).is_dir():
            return Path(d)
    raise BenchError(f"no {ROLE_CHANGE_ROLE} role on the image's provision.roles_path")


def manifest_figures(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a run records from builder's published manifest.json (stages/publish.py writes these keys)."""
    install = manifest.get("install") or {}
    nvidia = manifest.get("nvidia_module") or {}
    return {"stages": dict(manifest.get("stages") or {}), "duration_s": manifest.get("duration_s"),
            "bytes_upstream": manifest.get("bytes_fetched_upstream"), "accel": manifest.get("accel"),
            "install_cached": install.get("cached"), "nvidia_module_origin": nvidia.get("origin"),
            "manifest_size_bytes": manifest.get("size_bytes")}


def ours_argv(bench: Bench, variant: str, out: Path, roles: Path | None) -> list[str]:
    args = ["--only", variant, "--no-verify", "--force", "--output", str(out)]
    if roles is not None:
        args += ["--var", f"provision.roles_path={json.dumps([str(roles)])}"]
    if bench.accel != "auto":
        args += ["--var", f"vm.accel={bench.accel}"]
    return bench.builder_argv("build", *args)


def cache_for(bench: Bench, key: str, fresh: bool) -> Path:
    if fresh:
        return fresh_dir(bench.cache_dir or bench.dir / f"cache-{stamp()}", "--cache-dir")
    if bench.cache_dir is not None:
        return bench.cache_dir
    b = load_results(bench.results)["runs"].get("b") or {}
    cache = b.get("cache_dir")
    if b.get("status") != "ok" or not cache or not Path(cache).is_dir():
        raise Skipped(f"({key}) reuses the cache of (b): run b first (--runs b,{key}) or give --cache-dir")
    return Path(cache)


def run_ours(bench: Bench, key: str) -> dict[str, Any]:
    """Run (b), (c) or (d): one ``builder build`` timed from outside, its figures from its manifest."""
    cfg = bench.config()
    variant = bench.variant_d if key == "d" else bench.variant
    cache = cache_for(bench, key, fresh=key == "b")
    if key != "b" and not any((cache / "installed").glob("*")):
        say(f"warning: {cache} holds no installed disk: ({key}) will be a cold build, not one on (b)'s base")
    roles = copy_roles_with_change(roles_source(cfg), bench.dir / "roles-changed") if key == "c" else None
    out = bench.dir / "out" / key
    argv = ours_argv(bench, variant, out, roles)
    record = base_record(key, bench, utc_now())
    record.update({"tool": "builder", "variant": variant, "cache_dir": str(cache), "command": argv,
                   "roles_path": str(roles) if roles else None, "log": str(bench.dir / "logs" / f"{key}.log")})
    say(f"({key}) {RUNS[key]}: {shlex.join(argv)}  [BUILDER_CACHE_DIR={cache}]")
    t0 = time.monotonic()
    rc, lines = run_logged(argv, env=child_env(cache), log=bench.dir / "logs" / f"{key}.log", prefix=f"({key}) ")
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["finished"] = utc_now()
    vout = out / variant
    manifest_path = vout / "manifest.json"
    if rc != 0 or not manifest_path.is_file():
        record.update(status="failed", error=f"builder build exited {rc}: {last_error(lines)}")
        return record
    manifest = json.loads(manifest_path.read_text())
    qcow2 = vout / str(manifest.get("image") or f"{cfg.name}-{variant}.qcow2")
    record.update(manifest_figures(manifest), status="ok", manifest=str(manifest_path), image=str(qcow2),
                  image_bytes=qcow2.stat().st_size if qcow2.is_file() else None)
    if bench.with_verify:
        record.update(verify_separately(bench, key, variant, qcow2, cache))
    return record


def verify_separately(bench: Bench, key: str, variant: str, qcow2: Path, cache: Path) -> dict[str, Any]:
    """``--with-verify``: the verify verb on the run's image, timed apart from the build (Packer verifies
    nothing, so the build ran with --no-verify)."""
    argv = bench.builder_argv("verify", "--variant", variant, "--image-file", str(qcow2),
                              "--report-dir", str(qcow2.parent / "verify"))
    if bench.accel != "auto":
        argv += ["--var", f"vm.accel={bench.accel}"]
    t0 = time.monotonic()
    rc, _ = run_logged(argv, env=child_env(cache), log=bench.dir / "logs" / f"{key}-verify.log",
                       prefix=f"({key}) verify: ")
    return {"verify_s": round(time.monotonic() - t0, 1), "verify_ok": rc == 0}


# ---------------------------------------------------------------------------------------------- Packer: a


@dataclass(frozen=True)
class PackerInputs:
    """Everything the Packer template names; :func:`packer_template` turns it into the template."""

    iso: Path
    iso_sha256: str
    output_dir: Path
    vm_name: str
    disk_size_mib: int
    memory_mib: int
    cpus: int
    accel: str  # kvm or tcg
    ssh_user: str
    ssh_key: Path
    gateway_port: int
    serial_log: Path
    firmware: tuple[Path, Path] | None  # OVMF code and this run's copy of the variable store; None: BIOS
    playbook: Path
    finalize_playbook: Path
    roles_path: tuple[Path, ...]
    provision_vars: Path
    finalize_vars: Path
    ansible_playbook: str
    sudoers: str

    @property
    def cpu_model(self) -> str:
        return "host" if self.accel == "kvm" else "max"  # as builder's VMs (builder.vm.spec)


def qemu_path(p: Path) -> str:
    return str(p).replace(",", ",,")  # QEMU's option syntax: a comma in a value is doubled


def packer_template(p: PackerInputs) -> dict[str, Any]:
    """The Packer 1.6.6 JSON template of run (a): the builtin ``qemu`` builder and two ``ansible`` provisioners
    (the image's playbook, then the finalize playbook), run by Packer's SSH proxy.

    The VM is builder's: q35, the same firmware (OVMF for a hybrid or UEFI disk), CPU model, virtio disk and
    NIC, a virtio RNG, and the archive gateway at the address the preseed names (user networking's guestfwd to
    the ``gateway`` verb on 127.0.0.1). ``qemuargs`` replaces Packer's ``-drive``, ``-device``, ``-netdev`` and
    ``-boot`` defaults for that: boot indexes put the disk before the CD-ROM, so once the install reboots
    (``iso --reboot``) the VM boots the installed system, whose SSH Packer waits for. The accelerator is
    Packer's own ``accelerator`` option (an ``-accel`` argument conflicts with the ``-machine accel=`` it sets).
    The finalize role keeps the build user, which ``shutdown_command`` removes as the finalize role would (its
    sudo rule last) before powering off.
    """
    from builder.vm.guestnet import gateway_service

    drives = ["file={{ .OutputDir }}/{{ .Name }},if=none,id=disk0,format=qcow2,cache=writeback,"
              "discard=unmap",
              f"file={qemu_path(p.iso)},if=none,id=cd0,media=cdrom,readonly=on,format=raw"]
    if p.firmware is not None:
        code, nvram = p.firmware
        drives = [f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_path(code)}",
                  f"if=pflash,format=raw,unit=1,file={qemu_path(nvram)}", *drives]
    netdev = ("user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22,"
              + gateway_service(p.gateway_port).netdev_option())
    qemuargs: list[list[str]] = [
        ["-cpu", p.cpu_model],
        *(["-drive", d] for d in drives),
        ["-device", "virtio-blk-pci,drive=disk0,bootindex=0"],
        ["-device", "ide-cd,drive=cd0,bus=ide.0,bootindex=1"],
        ["-device", "virtio-net,netdev=user.0,romfile="],
        ["-device", "virtio-rng-pci,rng=rng0"],
        ["-object", "rng-random,id=rng0,filename=/dev/urandom"],
        ["-netdev", netdev],
        ["-boot", "strict=off"],
        ["-serial", f"file:{qemu_path(p.serial_log)}"],
    ]
    user = shlex.quote(p.ssh_user)
    shutdown = (f"sudo -n sh -c 'rm -f {shlex.quote(p.sudoers)}; userdel --force --remove {user} "
                "|| echo userdel failed >&2; sync; poweroff'")

    def ansible(playbook: Path, extra_vars: Path) -> dict[str, Any]:
        return {
            "type": "ansible",
            "playbook_file": str(playbook),
            "command": p.ansible_playbook,
            "user": p.ssh_user,
            "use_sftp": True,
            "sftp_command": SFTP_SERVER,
            "ansible_ssh_extra_args": [PROXY_SSH_ARGS],
            # builder's Ansible settings that change how fast a play runs: the same for both tools
            "ansible_env_vars": [f"ANSIBLE_ROLES_PATH={':'.join(str(r) for r in p.roles_path)}",
                                 "ANSIBLE_PIPELINING=True", "ANSIBLE_REMOTE_TEMP=/tmp/.ansible-builder",
                                 "ANSIBLE_NOCOLOR=1", "ANSIBLE_FORCE_COLOR=0", "ANSIBLE_RETRY_FILES_ENABLED=False"],
            "extra_arguments": ["--extra-vars", f"@{extra_vars}"],
        }

    return {
        "description": "scripts/benchmark.py run (a): the builder image with Packer's qemu builder and ansible "
                       "provisioner (generated; see docs/benchmark.md)",
        "builders": [{
            "type": "qemu",
            "iso_url": str(p.iso),
            "iso_checksum": f"sha256:{p.iso_sha256}",
            "output_directory": str(p.output_dir),
            "vm_name": p.vm_name,
            "format": "qcow2",
            "disk_size": f"{p.disk_size_mib}M",
            "disk_interface": "virtio",
            "disk_discard": "unmap",
            "disk_compression": True,
            "headless": True,
            "accelerator": p.accel,
            "machine_type": "q35",
            "cpus": p.cpus,
            "memory": p.memory_mib,
            "net_device": "virtio-net",
            "boot_wait": "1s",
            "boot_command": [],
            "communicator": "ssh",
            "ssh_username": p.ssh_user,
            "ssh_private_key_file": str(p.ssh_key),
            "ssh_timeout": PACKER_SSH_TIMEOUT,
            "shutdown_command": shutdown,
            "shutdown_timeout": "10m",
            "qemuargs": qemuargs,
        }],
        "provisioners": [ansible(p.playbook, p.provision_vars), ansible(p.finalize_playbook, p.finalize_vars)],
    }


def machine_readable(line: str) -> tuple[int, str, str, list[str]] | None:
    """One line of ``packer -machine-readable``: (unix time, target, type, data), commas and newlines restored."""
    parts = line.rstrip("\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    data = [d.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r") for d in parts[3:]]
    return int(parts[0]), parts[1], parts[2], data


def ui_text(line: str) -> str | None:
    """A machine-readable line as Packer's normal output shows it (ui lines only)."""
    m = machine_readable(line)
    if m is None or m[2] != "ui" or len(m[3]) < 2:
        return None
    return m[3][1]


# (stage, the ui message that starts it, which occurrence); each stage runs until the next one starts
PACKER_STAGES: tuple[tuple[str, str, int], ...] = (
    ("install", "Waiting for SSH to become available", 0),
    ("provision", "Connected to SSH!", 0),
    ("finalize", "Provisioning with Ansible", 1),  # the second ansible provisioner: the finalize playbook
    ("shutdown", "Gracefully halting virtual machine", 0),
    ("compress", "Converting hard drive", 0),
)


def packer_stages(lines: Iterable[str], start: float, end: float) -> dict[str, float]:
    """Packer's stages from its machine-readable output: ``boot`` (ISO, disk, VM start) from ``start``, then
    :data:`PACKER_STAGES`; the last one found runs to ``end`` (unix times)."""
    seen: dict[str, list[int]] = {}
    for line in lines:
        m = machine_readable(line)
        text = ui_text(line)
        if m is None or text is None:
            continue
        for _stage, marker, _n in PACKER_STAGES:
            if marker in text:
                seen.setdefault(marker, []).append(m[0])
    marks: list[tuple[str, float]] = [("boot", start)]
    for stage, marker, n in PACKER_STAGES:
        times = seen.get(marker, [])
        if len(times) > n:
            marks.append((stage, float(times[n])))
    return {stage: round(max(0.0, (marks[i + 1][1] if i + 1 < len(marks) else end) - t), 1)
            for i, (stage, t) in enumerate(marks)}


GATEWAY_BYTES_RE = re.compile(r"gateway stopped \(\d+ requests? served, (\d+) bytes fetched upstream\)")
ISO_BYTES_RE = re.compile(r"^(?:.*\] INFO +)?wrote .*\((\d+) bytes fetched upstream\)$")


def upstream_bytes(text: str, pattern: re.Pattern[str]) -> int | None:
    found = [int(m.group(1)) for m in (pattern.search(ln) for ln in text.splitlines()) if m]
    return found[-1] if found else None


def packer_version(packer: str) -> str:
    try:
        out = subprocess.run([packer, "version"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, CHECKPOINT_DISABLE="1")).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise Skipped(f"{packer} version failed: {exc}") from None
    m = re.search(r"Packer v(\S+)", out)
    return m.group(1) if m else out.strip() or "unknown"


def ansible_playbook() -> str | None:
    """ansible-playbook of the venv this script runs in (the one builder uses), else from PATH."""
    here = Path(sys.executable).parent / "ansible-playbook"
    return str(here) if here.is_file() else shutil.which("ansible-playbook")


def netboot_kernel(cfg: Any, cache: Path) -> Path | None:
    """The installer kernel in a builder cache (``cache``: a BUILDER_CACHE_DIR), once fetch has extracted it."""
    from builder.archive.cache import ContentCache
    from builder.lock import read_lock

    try:
        lock = read_lock(cfg.lock_path)
        known = json.loads((cache / "extracted" / f"{lock.netboot.sha256}.json").read_text())
        return ContentCache(cache / "blobs").get(known["kernel"])
    except Exception:  # no lock, nothing extracted yet: the probe boots the firmware alone
        return None


def packer_accel(bench: Bench, cfg: Any, cache: Path) -> tuple[str, str]:
    """The accelerator for Packer's VM: --accel; else the one builder's recorded runs used; else the image's
    vm.accel; else builder's probe (a real KVM boot of the installer kernel from ``cache``)."""
    if bench.accel != "auto":
        return bench.accel, "--accel"
    for key in ("b", "c", "d"):
        rec = load_results(bench.results)["runs"].get(key) or {}
        if rec.get("status") == "ok" and rec.get("accel") in ("kvm", "tcg"):
            return rec["accel"], f"as builder's run ({key})"
    if cfg.vm.accel != "auto":
        return cfg.vm.accel, "the image's vm.accel"
    from builder.errors import BuilderError
    from builder.vm.accel import choose_accel

    try:
        return choose_accel("auto", netboot_kernel(cfg, cache))
    except BuilderError as exc:
        return "tcg", f"the KVM probe failed ({exc.message})"


class Gateway:
    """``builder gateway IMAGE --listen 127.0.0.1:0`` in the background, stopped by its PID."""

    def __init__(self, bench: Bench, cache: Path, log: Path) -> None:
        self.log = log
        self.argv = bench.builder_argv("gateway", "--listen", "127.0.0.1:0")
        self._log = log.open("w")
        self.proc = spawn(self.argv, env=child_env(cache), stop_signal=signal.SIGTERM, stdout=subprocess.PIPE,
                          stderr=self._log)
        self._urls: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._urls.put(line.strip())

    def wait_ready(self, timeout: float) -> str:
        """The main archive's URL (``http://127.0.0.1:PORT/debian``) once the gateway serves."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self._urls.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
        raise RuntimeError(f"the gateway did not start ({' '.join(tail) or 'no output'}; see {self.log})")

    def stop(self) -> int | None:
        """Stop it (SIGTERM: it exits 0) and return the bytes it says it fetched upstream."""
        stop_child(self.proc, signal.SIGTERM, 60)
        self._log.close()
        return upstream_bytes(self.log.read_text(errors="replace"), GATEWAY_BYTES_RE)


def fetch_to(url: str, dest: Path) -> Path:
    with urllib.request.urlopen(url, timeout=60) as r:  # the gateway, on 127.0.0.1
        dest.write_bytes(r.read())
    return dest


def packer_prerequisites() -> tuple[str, str]:
    """Packer and ansible-playbook, or Skipped naming what to install."""
    packer = shutil.which("packer")
    if packer is None:
        raise Skipped(PACKER_MISSING)
    ansible = ansible_playbook()
    if ansible is None:
        raise Skipped("ansible-playbook not found (builder's venv has it: scripts/setup-host.sh)")
    if shutil.which("socat") is None:
        raise Skipped("socat not installed (apt-get install socat): the VM reaches the gateway through it")
    return packer, ansible


def packer_inputs(bench: Bench, pdir: Path, *, iso: Path, iso_sha256: str, port: int, accel: str,
                  ansible: str) -> PackerInputs:
    """The template's inputs for this image (the variant of (b)): vars files and the VM's firmware written
    into ``pdir``."""
    from builder.stages.finalize import finalize_vars
    from builder.stages.media import SSH_KEY_FILE

    cfg = bench.config()
    vcfg = cfg.variant(bench.variant) if cfg.variants else cfg
    vars_dir = pdir / "vars"
    vars_dir.mkdir(parents=True, exist_ok=True)
    provision_vars = vars_dir / "provision.json"
    finalize_vars_file = vars_dir / "finalize.json"
    # the image's variables, no nvidia_dkms_tarball: DKMS compiles in the guest, as in a Packer user's build
    provision_vars.write_text(json.dumps({**vcfg.provision.extra_vars, "ansible_python_interpreter": GUEST_PYTHON},
                                         indent=2) + "\n")
    finalize_vars_file.write_text(json.dumps({**finalize_vars(vcfg), "finalize_remove_build_user": False,
                                              "ansible_python_interpreter": GUEST_PYTHON}, indent=2) + "\n")
    firmware = None
    if vcfg.build_firmware != "bios":
        from builder.errors import MissingToolError
        from builder.vm.firmware import locate

        try:
            code, template = locate("uefi")
        except MissingToolError as exc:
            raise Skipped(exc.message) from None
        nvram = pdir / "OVMF_VARS.fd"
        shutil.copyfile(template, nvram)
        firmware = (code, nvram)
    return PackerInputs(
        iso=iso, iso_sha256=iso_sha256, output_dir=pdir / "output", vm_name=f"{vcfg.name}.qcow2",
        disk_size_mib=vcfg.disk.size >> 20, memory_mib=max(vcfg.vm.memory, vcfg.provision.memory) >> 20,
        cpus=vcfg.vm.cpus, accel=accel, ssh_user=vcfg.installer.build_user, ssh_key=pdir / "keys" / SSH_KEY_FILE,
        gateway_port=port, serial_log=pdir / "install.serial.log", firmware=firmware, playbook=vcfg.playbook,
        finalize_playbook=vcfg.finalize_playbook, roles_path=tuple(vcfg.roles_dirs), provision_vars=provision_vars,
        finalize_vars=finalize_vars_file, ansible_playbook=ansible, sudoers="/etc/sudoers.d/90-builder")


def packer_env(pdir: Path) -> dict[str, str]:
    return child_env(None, PACKER_LOG="1", PACKER_LOG_PATH=str(pdir / "packer.log"),
                     PACKER_CACHE_DIR=str(pdir / "packer_cache"), CHECKPOINT_DISABLE="1")


def write_template(pdir: Path, inputs: PackerInputs, packer: str) -> tuple[Path, list[str]]:
    """``template.json`` and ``command.sh`` (the exact Packer command, with its environment) in ``pdir``."""
    template = pdir / "template.json"
    template.write_text(json.dumps(packer_template(inputs), indent=2) + "\n")
    argv = [packer, "build", "-machine-readable", "-force", str(template)]
    env = packer_env(pdir)
    keys = ("PACKER_LOG", "PACKER_LOG_PATH", "PACKER_CACHE_DIR", "CHECKPOINT_DISABLE")
    (pdir / "command.sh").write_text("#!/bin/sh\n# run (a) of scripts/benchmark.py (the gateway verb must be "
                                     f"serving on port {inputs.gateway_port})\n"
                                     + " ".join(f"{k}={shlex.quote(env[k])}" for k in keys)
                                     + f" {shlex.join(argv)}\n")
    return template, argv


def run_packer(bench: Bench) -> dict[str, Any]:
    """Run (a): the gateway verb, the ISO for it, then ``packer build`` of the generated template."""
    from builder.archive.cache import sha256_file
    from builder.gateway.standalone import SIGNING_KEY

    packer, ansible = packer_prerequisites()
    version = packer_version(packer)
    if version != PACKER_VERSION:
        say(f"warning: packer {version} here, the benchmark is written for {PACKER_VERSION}")
    cfg = bench.config()
    vcfg = cfg.variant(bench.variant) if cfg.variants else cfg
    pdir = bench.dir / "packer"
    pdir.mkdir(parents=True, exist_ok=True)
    for old in ("output", "keys", "installer.iso", "install.serial.log"):
        target = pdir / old
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    cache = fresh_dir(pdir / f"builder-cache-{stamp()}", "the gateway's cache")
    record = base_record("a", bench, utc_now())
    record.update({"tool": f"packer {version}", "variant": bench.variant, "cache_dir": str(cache),
                   "log": str(pdir / "machine-readable.log"),
                   # Packer installs every time, and DKMS compiles the module in the guest
                   "install_cached": False, "nvidia_module_origin": "guest-compiled"})
    stages: dict[str, float] = {}
    t0 = time.monotonic()
    gateway = Gateway(bench, cache, pdir / "gateway.log")
    record["gateway"] = {"command": gateway.argv, "pid": gateway.proc.pid, "log": str(gateway.log)}
    iso_bytes: int | None = None
    try:
        say(f"(a) {shlex.join(gateway.argv)}  [BUILDER_CACHE_DIR={cache}, PID {gateway.proc.pid}]")
        url = gateway.wait_ready(timeout=3600)
        port = urllib.parse.urlsplit(url).port or 80
        stages["gateway"] = round(time.monotonic() - t0, 1)
        t1 = time.monotonic()
        accel, why = packer_accel(bench, cfg, cache)
        record.update(accel=accel, accel_reason=why)
        suite_key = fetch_to(f"{url}/{SIGNING_KEY}", pdir / "suite-key.gpg")
        iso = pdir / "installer.iso"
        iso_argv = bench.builder_argv("iso", "-o", str(iso), "--suite-key", str(suite_key),
                                      "--ssh-key-out", str(pdir / "keys"), "--reboot")
        say(f"(a) {shlex.join(iso_argv)}")
        rc, lines = run_logged(iso_argv, env=child_env(cache), log=pdir / "iso.log", prefix="(a) iso: ")
        if rc != 0:
            raise RuntimeError(f"builder iso exited {rc}: {last_error(lines)}")
        iso_bytes = upstream_bytes("\n".join(lines), ISO_BYTES_RE)
        inputs = packer_inputs(bench, pdir, iso=iso, iso_sha256=sha256_file(iso), port=port, accel=accel,
                               ansible=ansible)
        stages["media"] = round(time.monotonic() - t1, 1)
        template, argv = write_template(pdir, inputs, packer)
        record.update(template=str(template), command=argv, packer_command=str(pdir / "command.sh"))
        say(f"(a) Packer template: {template}; command: {pdir / 'command.sh'} (accelerator {accel}: {why})")
        start = time.time()
        rc, lines = run_logged(argv, env=packer_env(pdir), log=pdir / "machine-readable.log", prefix="(a) ",
                               stop_signal=signal.SIGINT, echo=ui_text)
        end = time.time()
        stages.update(packer_stages(lines, start, end))
        if rc != 0:
            raise RuntimeError(f"packer build exited {rc}: {last_error(lines)}")
    except (RuntimeError, OSError) as exc:
        record.update(status="failed", error=str(exc))
    else:
        record["status"] = "ok"
    finally:
        gateway_bytes = gateway.stop()
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["finished"] = utc_now()
    record["stages"] = stages
    # the gateway's count (the installer inputs it fetched before serving, and the VM's downloads) and the ISO's
    if gateway_bytes is not None:
        record["bytes_upstream"] = gateway_bytes + (iso_bytes or 0)
    else:
        record["bytes_upstream"] = None
        record["bytes_upstream_note"] = f"the gateway reported no count (see {gateway.log})"
    qcow2 = pdir / "output" / f"{vcfg.name}.qcow2"
    record["image"] = str(qcow2)
    record["image_bytes"] = qcow2.stat().st_size if qcow2.is_file() else None
    return record


def dry_run(bench: Bench, keys: Sequence[str]) -> None:
    """Print each run's command, and write the Packer template with placeholders (port 0, no ISO yet)."""
    for key in keys:
        if key == "a":
            try:
                packer, ansible = packer_prerequisites()
            except Skipped as exc:
                say(f"(a) skipped: {exc}")
                continue
            from builder.ssh import generate_keypair
            from builder.stages.media import SSH_KEY_FILE

            pdir = bench.dir / "packer"
            generate_keypair("benchmark dry run").write(pdir / "keys", SSH_KEY_FILE)
            inputs = packer_inputs(bench, pdir, iso=pdir / "installer.iso", iso_sha256="0" * 64, port=0,
                                   accel=bench.accel if bench.accel != "auto" else "tcg", ansible=ansible)
            template, argv = write_template(pdir, inputs, packer)
            iso = bench.builder_argv("iso", "-o", str(inputs.iso), "--suite-key", str(pdir / "suite-key.gpg"),
                                     "--ssh-key-out", str(pdir / "keys"), "--reboot")
            print(f"(a) {shlex.join(bench.builder_argv('gateway', '--listen', '127.0.0.1:0'))} &")
            print(f"(a) {shlex.join(iso)}")
            print(f"(a) {shlex.join(argv)}    # the template, with placeholders (gateway port 0, no ISO yet): "
                  f"{template}")
        else:
            variant = bench.variant_d if key == "d" else bench.variant
            roles = bench.dir / "roles-changed" if key == "c" else None
            print(f"({key}) {shlex.join(ours_argv(bench, variant, bench.dir / 'out' / key, roles))}")


# ---------------------------------------------------------------------------------------------- report


def fmt_seconds(s: Any) -> str:
    if not isinstance(s, int | float):
        return "-"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "n/a"
    if n >= 1 << 30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


def stale_reason(record: Mapping[str, Any], image: str) -> str | None:
    if record.get("schema") != SCHEMA:
        return f"recorded by another version of this script (schema {record.get('schema')})"
    if record.get("image_definition") != image:
        return f"recorded for {record.get('image_definition')}, not {image}"
    return None


def report_data(results: Mapping[str, Any], image: str, path: str = "") -> dict[str, Any]:
    """The report as data (``--json`` prints it; :func:`render` draws it)."""
    runs: dict[str, Any] = {}
    notes: list[str] = []
    for key, label in RUNS.items():
        rec = (results.get("runs") or {}).get(key)
        entry: dict[str, Any] = {"label": label, "status": "not run", "record": None}
        if isinstance(rec, dict):
            why = stale_reason(rec, image)
            if why:
                notes.append(f"({key}) not run: the record is stale ({why})")
            elif rec.get("status") == "ok":
                entry.update(status="ok", record=rec)
            else:
                entry.update(status="failed", record=rec)
                notes.append(f"({key}) failed ({rec.get('finished')}): {rec.get('error')}")
            if not why and isinstance(rec.get("last_failure"), dict):
                lf = rec["last_failure"]
                notes.append(f"({key}) a later attempt failed ({lf.get('finished')}): {lf.get('error')}; "
                             "the figures are the earlier run's")
            if not why and rec.get("bytes_upstream_note"):
                notes.append(f"({key}) bytes upstream n/a: {rec['bytes_upstream_note']}")
        runs[key] = entry
    ok = {k: e["record"] for k, e in runs.items() if e["status"] == "ok"}
    ratios = []
    for num, den, target in TARGETS:
        a, b = ok.get(num), ok.get(den)
        value = None
        if a and b and isinstance(a.get("wall_s"), int | float) and b.get("wall_s"):
            value = round(a["wall_s"] / b["wall_s"], 3)
        verdict = "n/a" if value is None else "met" if value <= target else "not met"
        ratios.append({"ratio": f"({num})/({den})", "value": value, "target": target, "verdict": verdict})
    notes += sitting_notes(ok)
    stages = [s for s in STAGE_ORDER if any(s in (r.get("stages") or {}) for r in ok.values())]
    stages += sorted({s for r in ok.values() for s in (r.get("stages") or {}) if s not in stages})
    return {"results": path, "image": image, "runs": runs, "stages": stages, "ratios": ratios, "notes": notes}


def sitting_notes(ok: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Notes when the recorded runs are not from one sitting: other commits, machines, accelerators, days."""
    notes = []

    def differ(what: str, get: Callable[[Mapping[str, Any]], Any]) -> None:
        values = {k: get(r) for k, r in ok.items()}
        if len(set(map(str, values.values()))) > 1:
            notes.append(f"not one sitting: {what} differ (" + ", ".join(f"({k}) {v}" for k, v in values.items())
                         + ")")

    differ("builder commits", lambda r: (r.get("host") or {}).get("commit"))
    differ("machines", lambda r: "{host}, {nproc} cores, {mem}".format(
        host=(r.get("host") or {}).get("host"), nproc=(r.get("host") or {}).get("nproc"),
        mem=fmt_bytes((r.get("host") or {}).get("memory_bytes"))))
    differ("accelerators", lambda r: r.get("accel"))
    times = [t for r in ok.values() for t in (r.get("started"), r.get("finished")) if isinstance(t, str)]
    if times:
        parse = [time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) for t in times]
        span = (max(parse) - min(parse)) / 3600
        if span > 12:
            notes.append(f"not one sitting: the runs span {span:.0f} h ({min(times)} to {max(times)})")
    return notes


def render(data: Mapping[str, Any]) -> str:
    """The side-by-side table: a column per run, a row per figure; then the ratios and the notes."""
    keys = list(RUNS)
    runs = data["runs"]
    head = [COLUMNS[k] for k in keys]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, get: Callable[[Mapping[str, Any]], str]) -> None:
        rows.append((name, [get(runs[k]["record"]) if runs[k]["status"] == "ok" else "" for k in keys]))

    rows.append(("status", [runs[k]["status"] for k in keys]))
    row("wall time", lambda r: fmt_seconds(r.get("wall_s")))
    def stage_time(stage: str) -> Callable[[Mapping[str, Any]], str]:
        return lambda r: fmt_seconds((r.get("stages") or {}).get(stage))

    for stage in data["stages"]:
        row(f"  {stage}", stage_time(stage))
    if any(runs[k]["status"] == "ok" and "verify_s" in runs[k]["record"] for k in keys):
        row("verify (separately)", lambda r: fmt_seconds(r.get("verify_s")) if "verify_s" in r else "-")
    row("bytes upstream", lambda r: fmt_bytes(r.get("bytes_upstream")))
    row("image size", lambda r: fmt_bytes(r.get("image_bytes")))
    row("installed disk", lambda r: "-" if r.get("install_cached") is None
        else "reused" if r["install_cached"] else "installed")
    row("NVIDIA module", lambda r: str(r.get("nvidia_module_origin") or "-"))
    row("accelerator", lambda r: str(r.get("accel") or "-"))
    row("started (UTC)", lambda r: str(r.get("started") or "-").replace("T", " ").rstrip("Z"))
    row("builder commit", lambda r: str((r.get("host") or {}).get("commit") or "-")[:12])
    row("host", lambda r: f"{(r.get('host') or {}).get('nproc')} cores, "
                          f"{fmt_bytes((r.get('host') or {}).get('memory_bytes'))}")
    first = max(len(n) for n, _ in rows)
    widths = [max(len(h), *(len(v[i]) for _, v in rows)) for i, h in enumerate(head)]
    lines = [f"benchmark: {data['image']}" + (f" (results: {data['results']})" if data.get("results") else ""), ""]
    lines.append(" " * first + "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for name, values in rows:
        lines.append(name.ljust(first) + "  " + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))
                     .rstrip())
    lines += ["", "ratio of wall times   value   target    verdict"]
    for r in data["ratios"]:
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"{r['ratio']:<21} {value:<7} <= {r['target']:<6.2f} {r['verdict']}")
    if data["notes"]:
        lines += ["", *(f"note: {n}" for n in data["notes"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def parse_runs(text: str) -> list[str]:
    keys = [k.strip().lower() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in RUNS]
    if not keys or bad:
        raise BenchError(f"--runs {text}: expected a comma-separated subset of {','.join(RUNS)}")
    # builder's runs first: (a) then gets their accelerator, and a failure of the slowest run comes last
    return [k for k in RUN_ORDER if k in keys]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        raise BenchError(f"{message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = _Parser(prog="scripts/benchmark.py", description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--runs", default="a,b,c,d", help="which runs, e.g. b,c,d (default: all four)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                    help=f"the results file each finished run is merged into (default {DEFAULT_RESULTS}); its "
                         "directory holds the outputs, caches, logs and the Packer files")
    ap.add_argument("--report", action="store_true", help="print the table from the results file; run nothing")
    ap.add_argument("--json", action="store_true", help="print the report (after the runs, or --report) as JSON")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the commands, write the Packer template (with placeholders); run nothing")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=f"image definition (default {DEFAULT_IMAGE})")
    ap.add_argument("--variant", default="current", help="the variant of (a), (b) and (c) (default current)")
    ap.add_argument("--other-variant", default="open", help="the variant of (d) (default open)")
    ap.add_argument("--cache-dir", type=Path,
                    help="BUILDER_CACHE_DIR of (b), (c) and (d); empty for (b) (default: a new one next to the "
                         "results file for (b), which (c) and (d) reuse)")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="accelerator of every run (default auto: builder probes; Packer's VM gets what builder's "
                         "runs used)")
    ap.add_argument("--with-verify", action="store_true",
                    help="after each builder run, run the verify verb on its image and show its time apart")
    return ap.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    image = args.image
    if image.is_absolute() and image.is_relative_to(REPO):
        image = image.relative_to(REPO)
    results = args.results if args.results.is_absolute() else REPO / args.results
    bench = Bench(image=image, results=results, dir=results.parent, variant=args.variant,
                  variant_d=args.other_variant, accel=args.accel,
                  cache_dir=args.cache_dir.resolve() if args.cache_dir else None, with_verify=args.with_verify)
    return bench


def check_image(bench: Bench) -> None:
    """The image definition loads and has the variants the runs name (BenchError otherwise)."""
    from builder.errors import BuilderError

    if not bench.image_path.is_file():
        raise BenchError(f"--image {bench.image}: no such file")
    try:
        cfg = bench.config()
        if cfg.variants:
            cfg.select_variants((bench.variant, bench.variant_d))
    except BuilderError as exc:
        raise BenchError(f"--image {bench.image}: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")) from None


def print_report(bench: Bench, as_json: bool) -> None:
    data = report_data(load_results(bench.results), str(bench.image), str(bench.results))
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if as_json else render(data))


def run_all(bench: Bench, keys: Sequence[str], *, as_json: bool = False) -> int:
    failed: list[str] = []
    skipped: list[str] = []
    if "a" in keys:
        try:
            packer_prerequisites()
        except Skipped as exc:
            say(f"(a) will be skipped: {exc}")
    for key in keys:
        if key in ("c", "d") and "b" in failed:
            skipped.append(f"({key}) skipped: (b) failed in this invocation, and ({key}) reuses its cache")
            say(skipped[-1])
            continue
        try:
            record = run_packer(bench) if key == "a" else run_ours(bench, key)
        except Skipped as exc:
            skipped.append(f"({key}) skipped: {exc}")
            say(skipped[-1])
            continue
        except (BenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug or an unreadable file: this run failed, one line, the others go on
            record = {**base_record(key, bench, utc_now()), "status": "failed", "finished": utc_now(),
                      "error": f"{type(exc).__name__}: {exc}"}
        save_record(bench.results, key, record)
        if record.get("status") == "ok":
            say(f"({key}) done in {fmt_seconds(record.get('wall_s'))}; recorded in {bench.results}")
        else:
            failed.append(key)
            say(f"({key}) failed: {record.get('error')} (recorded in {bench.results})")
    print_report(bench, as_json=as_json)
    for line in skipped:
        say(line)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        for s in previous:
            signal.signal(s, interrupt)
        args = parse_args(argv)
        bench = make_bench(args)
        check_image(bench)
        if args.report:
            print_report(bench, args.json)
            return 0
        keys = parse_runs(args.runs)
        if args.dry_run:
            dry_run(bench, keys)
            return 0
        return run_all(bench, keys, as_json=args.json)
    except BenchError as exc:
        sys.stderr.write(f"benchmark: error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        say("interrupted: stopping the runs started (the finished ones are recorded)")
        stop_all()
        return 130
    finally:
        stop_all()
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    raise SystemExit(main())
