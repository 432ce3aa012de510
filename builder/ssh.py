"""SSH to the build VM: ephemeral ed25519 keys, a pinned-host-key wait loop, remote commands.

The builder generates both the client key and the guest's host key on the host (the preseed installs them),
so the host key is always *pinned*: paramiko gets it in its host-key table plus ``RejectPolicy``, and
Ansible gets it as a known_hosts line (:func:`known_hosts_line`). Nothing is ever trusted on first use.

:func:`wait_for_ssh` retries only the "not up yet" errors (connection refused, no banner yet, EOF, auth not
ready); a host key that differs from the pinned one fails at once, as does a VM that has died.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import SshError

log = logging.getLogger(__name__)

# paramiko's transport thread logs full tracebacks ("Error reading SSH protocol banner") at ERROR while the
# guest is still booting; without a handler Python's last-resort handler prints them to stderr. Silence them
# unless the application has chosen a level for "paramiko" itself (e.g. --debug sets it to DEBUG).
_plog = logging.getLogger("paramiko")
if _plog.level == logging.NOTSET:
    _plog.setLevel(logging.CRITICAL)
_plog.addHandler(logging.NullHandler())

#: errors that mean "sshd is not (fully) up yet": retried until the deadline
RETRYABLE: tuple[type[BaseException], ...] = (
    paramiko.ssh_exception.NoValidConnectionsError,
    paramiko.AuthenticationException,  # before the authorized key is in place / sshd still starting
    paramiko.SSHException,  # banner timeout, "No existing session", protocol errors while starting
    socket.timeout,
    ConnectionError,
    EOFError,
    OSError,
)


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair in OpenSSH formats (private: ``-----BEGIN OPENSSH PRIVATE KEY-----``)."""

    private_openssh: str
    public_openssh: str

    def write(self, dir: Path, name: str) -> tuple[Path, Path]:
        """Write ``dir/name`` (0600, created so) and ``dir/name.pub``; return both paths."""
        dir.mkdir(parents=True, exist_ok=True)
        priv = dir / name
        pub = dir / f"{name}.pub"
        priv.unlink(missing_ok=True)
        fd = _open_private(priv)
        with open(fd, "w") as f:
            f.write(self.private_openssh)
        pub.write_text(self.public_openssh.rstrip("\n") + "\n")
        return priv, pub

    def pkey(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.private_openssh))

    @property
    def public_key_only(self) -> str:
        """``ssh-ed25519 AAAA…`` without the comment."""
        return " ".join(self.public_openssh.split()[:2])


def _open_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def generate_keypair(comment: str) -> KeyPair:
    """A fresh ed25519 key pair (via cryptography; paramiko has no key generator)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    if comment:
        public = f"{public} {comment}"
    return KeyPair(private, public)


def host_pattern(host: str, port: int) -> str:
    """The known_hosts host field: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, public_openssh: str) -> str:
    """``[127.0.0.1]:2222 ssh-ed25519 AAAA…`` (the key's comment is dropped)."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise ValueError(f"not an OpenSSH public key: {public_openssh!r}")
    return f"{host_pattern(host, port)} {parts[0]} {parts[1]}"


def _host_pkey(public_openssh: str) -> paramiko.PKey:
    parts = public_openssh.split()
    if len(parts) < 2:
        raise SshError(f"not an OpenSSH public key: {public_openssh!r}")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:  # paramiko raises several types for bad blobs
        raise SshError(f"cannot read the pinned host key: {exc}") from exc


def _pinned_client(host: str, port: int, host_key: paramiko.PKey) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.get_host_keys().add(host_pattern(host, port), host_key.get_name(), host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def wait_for_ssh(
    host: str,
    port: int,
    user: str,
    client_key: KeyPair,
    host_key_public: str,
    *,
    timeout: float = 600,
    interval: float = 3,
    is_alive: Callable[[], bool] | None = None,
    on_attempt: Callable[[int, str | None], None] | None = None,
) -> paramiko.SSHClient:
    """Connect with the pinned host key, retrying until ``timeout`` seconds have passed.

    Returns a connected client on which ``true`` has run. Raises :class:`SshError` at once when the host key
    differs from the pinned one or ``is_alive()`` turns False (the VM exited); after the deadline with the
    last error. ``on_attempt(n, last_error)`` is called before every attempt (progress display).
    """
    pinned = _host_pkey(host_key_public)
    pkey = client_key.pkey()
    deadline = time.monotonic() + timeout
    attempt = 0
    last: str | None = None
    while True:
        if is_alive is not None and not is_alive():
            raise SshError(
                f"the VM exited while waiting for SSH on {host}:{port}",
                stage="provision",
                log_tail=[last] if last else (),
            )
        attempt += 1
        if on_attempt is not None:
            on_attempt(attempt, last)
        remaining = deadline - time.monotonic()
        step = max(1.0, min(15.0, remaining))
        client = _pinned_client(host, port, pinned)
        try:
            client.connect(
                host,
                port=port,
                username=user,
                pkey=pkey,
                timeout=step,
                banner_timeout=step,
                auth_timeout=step,
                channel_timeout=step,
                allow_agent=False,
                look_for_keys=False,
            )
            _, out, _ = client.exec_command("true", timeout=step)
            status = out.channel.recv_exit_status()
            if status == 0:
                log.debug("ssh %s@%s:%d up after %d attempt(s)", user, host, port, attempt)
                return client
            last = f"'true' exited {status}"
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise SshError(
                f"host key of {host}:{port} differs from the pinned key "
                f"(got {exc.key.get_name()} {exc.key.get_base64()[:24]}…)",
                stage="provision",
                hint="the VM is not the one this build installed, or its host key was replaced",
            ) from exc
        except RETRYABLE as exc:
            last = _describe(exc)
            log.debug("ssh %s:%d not ready (attempt %d): %s", host, port, attempt, last)
        client.close()
        if time.monotonic() + interval >= deadline:
            raise SshError(
                f"SSH on {host}:{port} did not come up within {timeout:.0f} s ({attempt} attempts)",
                stage="provision",
                log_tail=[f"last error: {last}"] if last else (),
            )
        time.sleep(interval)


def run_command(
    client: paramiko.SSHClient, command: str, *, timeout: float = 600, check: bool = True,
    input: bytes | None = None,
) -> tuple[int, str, str]:
    """Run ``command`` (a shell string) on the remote, ``input`` on its standard input; return (exit status,
    stdout, stderr).

    SshError when it exits non-zero (with ``check``), when it runs longer than ``timeout`` or the session breaks.
    """
    try:
        stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
        if input:
            stdin.write(input)
            stdin.flush()
            stdin.channel.shutdown_write()
        stdin.close()
        chan = stdout.channel
        # Read both streams fully before asking for the status (a full window would block the remote).
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        status = chan.recv_exit_status()
    except TimeoutError as exc:
        raise SshError(f"remote command timed out after {timeout:.0f} s: {command}", stage="provision") from exc
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SshError(f"remote command failed: {command}: {_describe(exc)}", stage="provision") from exc
    if check and status != 0:
        tail = (err or out).rstrip("\n").splitlines()[-20:]
        raise SshError(f"remote command exited {status}: {command}", stage="provision", log_tail=tail)
    return status, out, err
