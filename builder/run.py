"""Every subprocess builder runs goes through this module: :func:`run` for commands that finish, and
:func:`spawn` (or :func:`start`) for processes that run alongside the build (QEMU, the KVM probe, qemu-img).

Commands are argv lists (never a shell string), logged at DEBUG. A program that is not installed is always a
:class:`MissingToolError` naming the Debian package (:data:`HOST_TOOLS`); a failure of :func:`run` is a
:class:`ToolError` with the command, exit code and the tail of stderr. A spawned process is always reaped:
leaving :func:`spawn` (normally, by an exception or Ctrl-C) terminates it (SIGTERM, then SIGKILL) and waits for
it; with ``die_with_parent`` the kernel kills it too if builder itself is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import MissingToolError, ToolError

log = logging.getLogger(__name__)

TAIL_LINES = 20

# tool → Debian package that provides it (the hint of every MissingToolError, and the preflight's table)
HOST_TOOLS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "gpg": "gpg",
    "gpgv": "gpgv",
    "gpgconf": "gpgconf",
    "ssh": "openssh-client",
    "debconf-set-selections": "debconf",
    "cpio": "cpio",
    "socat": "socat",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "OVMF_CODE_4M.fd": "ovmf",
    "xorriso": "xorriso",
    "debootstrap": "debootstrap",
}


def package_of(tool: str) -> str | None:
    return HOST_TOOLS.get(Path(tool).name)


def which(tool: str, *, package: str | None = None, why: str | None = None) -> str:
    """Absolute path of ``tool`` or a MissingToolError naming the Debian package that provides it."""
    path = shutil.which(tool)
    if path is None:
        raise MissingToolError(tool, package=package or package_of(tool), why=why)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is alive on this machine. A zombie (exited, not yet reaped) counts as dead: on
    hosts whose PID 1 does not reap orphans, a killed QEMU stays a zombie forever."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X", "x")


def tail(text: str | bytes, n: int = TAIL_LINES) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text.rstrip("\n").splitlines()[-n:]


def _env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return None
    full = dict(os.environ)
    full.update(env)
    return full


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    capture: bool = True,
    stage: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv``; return the CompletedProcess (stdout/stderr as bytes when captured).

    Raises MissingToolError when the program is missing, ToolError when it times out or (with ``check``)
    exits non-zero.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise MissingToolError(args[0], package=package_of(args[0]), stage=stage) from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(
            f"{Path(args[0]).name} timed out after {timeout:.0f} s",
            command=args,
            stderr_tail=tail(exc.stderr or b""),
            stage=stage,
        ) from exc
    if check and proc.returncode != 0:
        raise ToolError(
            f"{Path(args[0]).name} failed with exit code {proc.returncode}",
            command=args,
            returncode=proc.returncode,
            stderr_tail=tail(proc.stderr or b"") or tail(proc.stdout or b""),
            stage=stage,
        )
    return proc


# ---------------------------------------------------------------------------------------------- spawn

_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def die_with_parent_preexec() -> Any:
    """A preexec_fn that makes the child get SIGKILL when the forking thread dies (Linux prctl).

    The kernel sends that signal when the *thread* that forked ends: start long-lived children from the main
    thread, or from a thread that outlives them.
    """
    prctl = _load_libc().prctl  # resolved before fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Child:
    """A process started by :func:`start`. :meth:`stop` (idempotent) terminates and reaps it."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str]) -> None:
        self.popen = popen
        self.argv = argv

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.popen.stdout

    def _signal(self, sig: signal.Signals, group: bool) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group and os.getpgid(self.popen.pid) == self.popen.pid:
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code, or None if it still runs after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0, *, group: bool = False) -> int | None:
        """SIGTERM, ``grace`` seconds, SIGKILL; always reaped (exit code, or None if even SIGKILL hung).

        ``group``: signal the child's whole process group (a child started in a session of its own leads it),
        so that what it started itself (apt, make, compilers) goes too."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM if grace > 0 else signal.SIGKILL, group)
            if self.wait(grace) is None:
                self._signal(signal.SIGKILL, group)
        rc = self.wait(30)
        for f in (self.popen.stdout, self.popen.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        return rc


def start(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    new_session: bool = True,
    die_with_parent: bool = True,
    stage: str | None = None,
) -> Child:
    """Start ``argv`` in the background (stdin from /dev/null). The caller must :meth:`Child.stop` it; prefer
    :func:`spawn`. ``new_session`` keeps a terminal's Ctrl-C away from the child (Python gets it and stops the
    child itself)."""
    args = [os.fspath(a) for a in argv]
    log.debug("spawn: %s", " ".join(args))
    try:
        popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=_env(env), cwd=cwd, close_fds=True,
            start_new_session=new_session, preexec_fn=die_with_parent_preexec() if die_with_parent else None,
            bufsize=0,
        )
    except FileNotFoundError as exc:
        raise MissingToolError(args[0], package=package_of(args[0]), stage=stage) from exc
    except OSError as exc:
        raise ToolError(f"cannot run {args[0]}: {exc}", command=args, stage=stage) from exc
    return Child(popen, args)


@contextlib.contextmanager
def spawn(argv: Sequence[str | os.PathLike[str]], *, grace: float = 5.0, group: bool = False,
          **kw: Any) -> Iterator[Child]:
    """``with spawn(argv) as child:`` — the child is terminated and reaped when the block is left, however
    (with ``group``, its process group: see :meth:`Child.stop`)."""
    child = start(argv, **kw)
    try:
        yield child
    finally:
        child.stop(grace, group=group)
