"""Provisioning: the interface the provision and finalize stages use (:class:`Provisioner`: run a playbook
against a reachable host, stream its events, be cancelled), and its one implementation, ansible-runner
(:class:`AnsibleRunner`), which runs a playbook against the build VM over SSH with its pinned host key.

Pure parts (tested by comparing output): :func:`inventory`, :func:`ssh_common_args`, :func:`build_envvars`,
:func:`failures_from_events`, :func:`provision_error`, :func:`count_listed_tasks`. The effectful parts are
:func:`run_playbook` and :func:`list_task_count`.

Why the environment looks the way it does (ansible-runner's and OpenSSH's behaviour, G1–G7):

* G1 ansible-runner finds ``ansible-playbook`` through PATH: the bin dir of *this* interpreter goes first.
* G2 ``artifacts/<ident>/command`` holds the whole environment: the private data dir is 0700 and the file
  is deleted after the run.
* G3 ansible-runner turns host key checking off unless told otherwise, and OpenSSH keeps the *first* value
  of an option, so ``ANSIBLE_HOST_KEY_CHECKING=True`` is set explicitly, the pinned key lives in a per-build
  known_hosts file, and ``ANSIBLE_SSH_ARGS`` replaces Ansible's 60 s ControlPersist with a short one whose
  sockets live in a short per-build directory (closed and removed afterwards).
* G4 the runner ``timeout`` does not stop a running task (the worker outlives it); ``ANSIBLE_TASK_TIMEOUT``
  gives clean per-task limits, the runner timeout is only a backstop (the caller kills the VM then).
* G5 a unique ident per run, so no old job events are mixed in.
* G6 ``ANSIBLE_ROLES_PATH`` is set as a ':'-joined string.
* G7 the remote interpreter is pinned (no discovery).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import ProvisionError
from .run import run, tail

log = logging.getLogger(__name__)

INVENTORY_NAME = "build-vm"
EVENTS_LOG = "ansible-events.jsonl"
REMOTE_TEMP = "/tmp/.ansible-builder"  # /tmp is a tmpfs on Debian 13: nothing of Ansible's stays in the image
# the first event run_playbook gives ``on_event`` (not ansible-runner's, not in the events log): how many tasks
# ``ansible-playbook --list-tasks`` lists, ``{"event": TASK_COUNT_EVENT, "event_data": {"tasks": N}}``
TASK_COUNT_EVENT = "builder_task_count"
FAILED_EVENTS = ("runner_on_failed", "runner_on_unreachable", "runner_on_async_failed", "runner_item_on_failed")


@dataclass(frozen=True)
class Target:
    """Where to provision: an SSH endpoint (usually a forwarded port on 127.0.0.1) with a pinned host key."""

    host: str
    port: int
    user: str
    private_key_path: Path
    known_hosts_path: Path
    python: str = "/usr/bin/python3"
    become: bool = True


@dataclass
class ProvisionResult:
    status: str  # ansible-runner's: successful, failed, timeout, canceled
    rc: int
    stats: dict[str, Any]
    changed: int  # tasks that reported "changed" (0 on an idempotent re-run)
    failed_tasks: list[dict[str, Any]]
    duration_s: float
    artifact_dir: Path
    events_log: Path | None = field(default=None)


# ------------------------------------------------------------------------------------------------ pure


def ssh_common_args(target: Target) -> str:
    """Options for every ssh/scp/sftp Ansible runs: only the pinned key is trusted, nothing is learned."""
    opts = [
        f"UserKnownHostsFile={target.known_hosts_path}",
        "GlobalKnownHostsFile=/dev/null",
        "StrictHostKeyChecking=yes",
        "UpdateHostKeys=no",
        "IdentitiesOnly=yes",
        "BatchMode=yes",
        "PasswordAuthentication=no",
    ]
    return " ".join(f"-o {shlex.quote(o)}" for o in opts)


def inventory(target: Target, name: str = INVENTORY_NAME) -> dict[str, Any]:
    """The inventory ansible-runner writes to ``inventory/hosts.json``."""
    host: dict[str, Any] = {
        "ansible_host": target.host,
        "ansible_port": target.port,
        "ansible_user": target.user,
        "ansible_ssh_private_key_file": str(target.private_key_path),
        "ansible_ssh_common_args": ssh_common_args(target),
        "ansible_python_interpreter": target.python,
        "ansible_connection": "ssh",
    }
    if target.become:
        host["ansible_become"] = True
        host["ansible_become_method"] = "sudo"
    return {"all": {"hosts": {name: host}}}


def venv_bin() -> str:
    """The directory holding this interpreter (and so ansible-playbook when installed in the same venv)."""
    return str(Path(sys.executable).parent)


def build_envvars(
    *,
    roles_path: Sequence[Path],
    private_data_dir: Path,
    control_path_dir: Path,
    task_timeout: int,
    path: str | None = None,
    bin_dir: str | None = None,
    diff: bool = False,
) -> dict[str, str]:
    """The environment ansible-playbook runs with (see the module docstring for the why)."""
    base_path = os.environ.get("PATH", os.defpath) if path is None else path
    bin_dir = bin_dir or venv_bin()
    parts = [bin_dir] + [p for p in base_path.split(os.pathsep) if p and p != bin_dir]
    env = {
        "PATH": os.pathsep.join(parts),
        "ANSIBLE_CONFIG": str(private_data_dir / "ansible.cfg"),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=15s -o ServerAliveInterval=15 "
        "-o ServerAliveCountMax=8",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_path_dir),
        "ANSIBLE_SSH_CONTROL_PATH": "%(directory)s/%%C",
        "ANSIBLE_SSH_RETRIES": "3",
        "ANSIBLE_TASK_TIMEOUT": str(int(task_timeout)),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_ROLES_PATH": ":".join(str(Path(p).resolve()) for p in roles_path),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCAL_TEMP": str(private_data_dir / "tmp"),
        "ANSIBLE_REMOTE_TEMP": REMOTE_TEMP,
        "ANSIBLE_SYSTEM_WARNINGS": "True",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_INTERPRETER_PYTHON": "auto_silent",  # the inventory pins it; silence discovery if ever used
    }
    if diff:
        env["ANSIBLE_DIFF_ALWAYS"] = "True"
    return env


def _tail_text(value: Any, n: int = 20) -> list[str]:
    if not value:
        return []
    if isinstance(value, list):
        value = "\n".join(str(v) for v in value)
    return tail(str(value), n)


def _summarise(res: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(message, stderr/stdout tail) of one task result, looking into loop items."""
    msg = str(res.get("msg") or "").strip()
    out = _tail_text(res.get("stderr")) or _tail_text(res.get("module_stderr")) or _tail_text(res.get("stdout"))
    items = res.get("results")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping) and item.get("failed"):
                imsg, iout = _summarise(item)
                label = item.get("item")
                if imsg and (not msg or msg.startswith("One or more items failed")):
                    msg = f"{imsg} (item: {label})" if label is not None else imsg
                out = out or iout
                break
    if not msg and res.get("rc") is not None:
        msg = f"exit code {res.get('rc')}"
    return msg or "no message", out


def failures_from_events(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Failed and unreachable tasks (not the ignored ones), in order: host, task, action, msg, output tail."""
    found = []
    for ev in events:
        kind = ev.get("event")
        if kind not in FAILED_EVENTS or kind == "runner_item_on_failed":
            continue
        data = ev.get("event_data") or {}
        if data.get("ignore_errors"):
            continue
        res = data.get("res") or {}
        msg, out = _summarise(res)
        found.append({
            "event": kind,
            "unreachable": kind == "runner_on_unreachable",
            "host": data.get("host") or data.get("remote_addr") or "?",
            "task": data.get("task") or "?",
            "action": data.get("task_action") or "",
            "role": data.get("role") or "",
            "msg": msg,
            "output_tail": out,
        })
    return found


def provision_error(
    failed: Sequence[Mapping[str, Any]],
    *,
    status: str,
    rc: int,
    address: str | None = None,
    output_tail: Sequence[str] = (),
) -> ProvisionError:
    """One ProvisionError that names the host, the failing task and its message."""
    where = f" ({address})" if address else ""
    if failed:
        first = failed[0]
        task = first["task"]
        role = f"{first['role']} : " if first.get("role") else ""
        if first.get("unreachable"):
            message = f"host {first['host']}{where} unreachable in task '{role}{task}': {first['msg']}"
            hint = "check that the VM is up and that its SSH host key is the pinned one"
        else:
            message = f"task '{role}{task}' failed on host {first['host']}{where}: {first['msg']}"
            hint = None
        lines = list(first.get("output_tail") or ())
        for other in failed[1:]:
            lines.append(f"also failed: '{other['task']}' on {other['host']}: {other['msg']}")
        return ProvisionError(message, host=first["host"], task=task, stage="provision", hint=hint,
                              log_tail=lines)
    if status == "timeout":
        return ProvisionError(
            f"ansible-playbook timed out{where}",
            stage="provision",
            hint="the running task may go on inside the VM: stop the VM",
            log_tail=output_tail,
        )
    return ProvisionError(
        f"ansible-playbook {status} (exit code {rc}){where} before any task failed",
        stage="provision",
        log_tail=output_tail,
    )


def _tags(tags: str | Iterable[str]) -> str | None:
    if isinstance(tags, str):
        return tags or None
    joined = ",".join(tags)
    return joined or None


def count_listed_tasks(listing: str) -> int:
    """The tasks in ``ansible-playbook --list-tasks`` output: the lines of every play's ``tasks:`` block (fact
    gathering and handlers are never listed; statically imported tasks are)."""
    count, in_tasks = 0, False
    for line in listing.splitlines():
        if not line.strip():
            continue
        if line.strip() == "tasks:":
            in_tasks = True
        elif not line.startswith("      "):  # "playbook: …", "  play #N (…)": a new section
            in_tasks = False
        elif in_tasks:
            count += 1
    return count


# --------------------------------------------------------------------------------------------- effects


def list_task_count(playbook: Path, *, envvars: Mapping[str, str], extra_vars: Mapping[str, Any], scratch: Path,
                    tags: str | None = None, timeout: float = 60) -> int | None:
    """How many tasks ``playbook`` has (``ansible-playbook --list-tasks``, about a second; nothing connects to
    a host), or None when it cannot tell. The extra variables go through a file in ``scratch`` (removed)."""
    binary = shutil.which("ansible-playbook", path=envvars.get("PATH"))
    if binary is None:
        return None
    fd, name = tempfile.mkstemp(prefix="list-vars-", suffix=".json", dir=scratch)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(extra_vars), f, default=str)
        argv = [binary, "--list-tasks", "-i", f"{INVENTORY_NAME},", "-e", f"@{name}", os.fspath(playbook)]
        if tags:
            argv[2:2] = ["--tags", tags]
        proc = run(argv, env=envvars, check=False, timeout=timeout)
    except Exception as exc:  # a task count is a nicety: never a reason to fail the build
        log.debug("ansible-playbook --list-tasks failed: %s", exc)
        return None
    finally:
        Path(name).unlink(missing_ok=True)
    if proc.returncode != 0:
        log.debug("ansible-playbook --list-tasks: exit code %d: %s", proc.returncode, tail(proc.stderr, 5))
        return None
    return count_listed_tasks(proc.stdout.decode("utf-8", "replace"))



def _close_control_masters(control_dir: Path) -> None:
    """Ask every lingering ssh mux master in ``control_dir`` to exit (by its socket), then remove the dir."""
    if control_dir.is_dir():
        for sock in control_dir.iterdir():
            with contextlib.suppress(Exception):
                run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "builder-mux"], check=False, timeout=10)
    shutil.rmtree(control_dir, ignore_errors=True)


def run_playbook(
    playbook: Path,
    target: Target,
    *,
    roles_path: Sequence[Path],
    extra_vars: Mapping[str, Any],
    workdir: Path,
    task_timeout: int = 3600,
    timeout: int = 7200,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    check: bool = False,
    tags: str | Iterable[str] = (),
    diff: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> ProvisionResult:
    """Run ``playbook`` against ``target`` with ansible-runner; raise ProvisionError unless it succeeds.

    Events go to ``on_event`` and are appended to ``workdir/ansible-events.jsonl``; the first one ``on_event``
    gets is the playbook's task count (:data:`TASK_COUNT_EVENT`, when ``--list-tasks`` tells). ``check`` runs in
    check mode; ``diff`` reports file differences (rendered templates) in the events. ``cancel`` is polled
    while the playbook runs (every few seconds); when it returns True the run is stopped and reported as
    ``canceled`` (the caller says why, e.g. the VM died).
    """
    import ansible_runner  # slow import (~0.3 s); only when provisioning

    playbook = Path(playbook).resolve()
    if not playbook.is_file():
        raise ProvisionError(f"playbook not found: {playbook}", stage="provision")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pdd = workdir / "ansible"
    pdd.mkdir(mode=0o700, exist_ok=True)
    pdd.chmod(0o700)
    (pdd / "tmp").mkdir(mode=0o700, exist_ok=True)
    (pdd / "ansible.cfg").write_text("# generated by builder: settings come from the environment\n[defaults]\n")
    ident = f"provision-{uuid.uuid4().hex}"
    artifacts = pdd / "artifacts"
    control_dir = Path(tempfile.mkdtemp(prefix="bcp-"))  # short: unix socket paths are limited to 108 bytes
    events_log = workdir / EVENTS_LOG
    address = f"{target.user}@{target.host}:{target.port}"
    envvars = build_envvars(
        roles_path=roles_path, private_data_dir=pdd, control_path_dir=control_dir, task_timeout=task_timeout,
        diff=diff,
    )
    events: list[dict[str, Any]] = []

    def handler(ev: dict[str, Any]) -> bool:
        events.append(ev)
        with events_log.open("a") as f:
            f.write(json.dumps(ev, default=str, sort_keys=True) + "\n")
        if on_event is not None:
            try:
                on_event(ev)
            except Exception:  # a broken progress display must not break the build
                log.exception("on_event callback failed")
        return True

    if on_event is not None:
        total = list_task_count(playbook, envvars=envvars, extra_vars=extra_vars, scratch=pdd / "tmp",
                                tags=_tags(tags))
        if total is not None:
            try:
                on_event({"event": TASK_COUNT_EVENT, "event_data": {"tasks": total}})
            except Exception:  # a broken progress display must not break the build
                log.exception("on_event callback failed")

    cmdline = ["--check"] if check else []
    if diff:
        cmdline.append("--diff")
    log.info("provisioning %s with %s (ident %s)", address, playbook.name, ident)
    t0 = time.monotonic()
    try:
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            artifact_dir=str(artifacts),
            ident=ident,
            playbook=str(playbook),
            inventory=inventory(target),
            extravars=dict(extra_vars),
            envvars=envvars,
            cmdline=" ".join(cmdline) or None,
            tags=_tags(tags),
            suppress_env_files=True,
            rotate_artifacts=0,
            event_handler=handler,
            quiet=True,
            timeout=timeout,
            cancel_callback=cancel,
        )
    except Exception as exc:  # ansible-runner's ConfigurationError, OSError from pexpect, …
        raise ProvisionError(f"ansible-runner could not run {playbook.name}: {exc}", stage="provision") from exc
    finally:
        duration = time.monotonic() - t0
        (artifacts / ident / "command").unlink(missing_ok=True)  # G2: it holds the whole environment
        _close_control_masters(control_dir)
    art = artifacts / ident
    stats = dict(r.stats or {})
    changed = sum((stats.get("changed") or {}).values())
    failed = failures_from_events(events)
    result = ProvisionResult(
        status=r.status, rc=int(r.rc if r.rc is not None else -1), stats=stats, changed=changed,
        failed_tasks=failed, duration_s=duration, artifact_dir=art, events_log=events_log,
    )
    log.info("provisioning %s: %s in %.0f s (changed %d)", address, r.status, duration, changed)
    if r.status != "successful":
        stdout_file = art / "stdout"
        out = tail(stdout_file.read_bytes(), 30) if stdout_file.is_file() else []
        err = provision_error(failed, status=r.status, rc=result.rc, address=address, output_tail=out)
        err.result = result  # type: ignore[attr-defined]  # for callers that want the stats and artifacts
        raise err
    return result


class Provisioner(Protocol):
    """What the provision and finalize stages need from a provisioning tool."""

    def run(self, playbook: Path, target: Target, *, roles_path: Sequence[Path], extra_vars: Mapping[str, Any],
            workdir: Path, on_event: Callable[[dict[str, Any]], None] | None = None,
            cancel: Callable[[], bool] | None = None, check: bool = False) -> ProvisionResult: ...


@dataclass(frozen=True)
class AnsibleRunner:
    """:class:`Provisioner` through ansible-runner (:func:`run_playbook`)."""

    task_timeout: int = 3600
    timeout: int = 7200

    def run(self, playbook: Path, target: Target, *, roles_path: Sequence[Path], extra_vars: Mapping[str, Any],
            workdir: Path, on_event: Callable[[dict[str, Any]], None] | None = None,
            cancel: Callable[[], bool] | None = None, check: bool = False) -> ProvisionResult:
        return run_playbook(playbook, target, roles_path=roles_path, extra_vars=extra_vars, workdir=workdir,
                            task_timeout=self.task_timeout, timeout=self.timeout, on_event=on_event, cancel=cancel,
                            check=check)
