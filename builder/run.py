"""The one subprocess wrapper. Every external command builder runs goes through :func:`run`.

Commands are argv lists (never a shell string), logged at DEBUG, and on failure raise :class:`ToolError`
with the command, exit code and the tail of stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ToolError

log = logging.getLogger(__name__)

TAIL_LINES = 20


def which(tool: str, *, package: str | None = None) -> str:
    """Absolute path of ``tool`` or a ToolError naming the Debian package that provides it."""
    path = shutil.which(tool)
    if path is None:
        hint = f"install it: apt-get install {package}" if package else None
        raise ToolError(f"required tool not found: {tool}", command=[tool], hint=hint)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead)."""
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
    return state != "Z"


def tail(text: str | bytes, n: int = TAIL_LINES) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text.rstrip("\n").splitlines()[-n:]


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

    Raises ToolError when the program is missing, times out, or (with ``check``) exits non-zero.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ToolError(f"required tool not found: {args[0]}", command=args, stage=stage) from exc
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
