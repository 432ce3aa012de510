"""builder.ssh against a real sshd on 127.0.0.1 (openssh-server on the host)."""

from __future__ import annotations

import socket
import time

import pytest

from builder.errors import SshError
from builder.ssh import generate_keypair, run_command, wait_for_ssh

try:
    from trixie_target import free_port, local_sshd
except ImportError:  # tests/ made a package
    from .trixie_target import free_port, local_sshd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def keys():
    return {"client": generate_keypair("builder-test-client"), "host": generate_keypair("builder-test-host")}


@pytest.fixture(scope="module")
def sshd(keys, tmp_path_factory):
    wd = tmp_path_factory.mktemp("sshd")
    with local_sshd(wd, keys["host"].private_openssh, keys["client"].public_openssh) as port:
        yield port


def test_connects_with_pinned_key_and_runs_commands(sshd, keys):
    attempts = []
    client = wait_for_ssh("127.0.0.1", sshd, "root", keys["client"], keys["host"].public_openssh, timeout=20,
                          on_attempt=lambda n, last: attempts.append(n))
    try:
        assert attempts == [1]
        rc, out, err = run_command(client, "echo hello; echo oops >&2")
        assert (rc, out, err) == (0, "hello\n", "oops\n")
        rc, out, _ = run_command(client, "exit 3", check=False)
        assert rc == 3
        with pytest.raises(SshError, match="exited 4") as ei:
            run_command(client, "echo why >&2; exit 4")
        assert ei.value.log_tail == ["why"]
        with pytest.raises(SshError, match="timed out"):
            run_command(client, "sleep 5", timeout=1)
    finally:
        client.close()


def test_wrong_pinned_key_fails_at_once(sshd, keys):
    other = generate_keypair("not-the-host")
    t0 = time.monotonic()
    with pytest.raises(SshError, match="differs from the pinned key"):
        wait_for_ssh("127.0.0.1", sshd, "root", keys["client"], other.public_openssh, timeout=30)
    assert time.monotonic() - t0 < 10


def test_closed_port_times_out_cleanly(keys, capfd):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(SshError, match="did not come up within 3 s") as ei:
        wait_for_ssh("127.0.0.1", port, "root", keys["client"], keys["host"].public_openssh, timeout=3, interval=0.5)
    assert 2.5 <= time.monotonic() - t0 < 10
    assert "NoValidConnectionsError" in ei.value.log_tail[0]
    assert "Traceback" not in capfd.readouterr().err


def test_silent_listener_retries_banner_errors_quietly(keys, capfd):
    """A socket that accepts but never speaks SSH (like QEMU's slirp hostfwd before sshd is up)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        with pytest.raises(SshError, match="did not come up") as ei:
            wait_for_ssh("127.0.0.1", port, "root", keys["client"], keys["host"].public_openssh, timeout=3,
                         interval=0.2)
    assert "SSHException" in ei.value.log_tail[0] or "EOFError" in ei.value.log_tail[0]
    assert "Traceback" not in capfd.readouterr().err


def test_dead_vm_fails_at_once(keys):
    t0 = time.monotonic()
    with pytest.raises(SshError, match="exited"):
        wait_for_ssh("127.0.0.1", free_port(), "root", keys["client"], keys["host"].public_openssh, timeout=60,
                     is_alive=lambda: False)
    assert time.monotonic() - t0 < 2


def test_vm_dying_while_waiting(keys):
    calls = iter([True, True, False])
    with pytest.raises(SshError, match="exited"):
        wait_for_ssh("127.0.0.1", free_port(), "root", keys["client"], keys["host"].public_openssh, timeout=60,
                     interval=0.1, is_alive=lambda: next(calls))


def test_wrong_client_key_retries_then_times_out(sshd, keys):
    stranger = generate_keypair("stranger")
    with pytest.raises(SshError, match="did not come up") as ei:
        wait_for_ssh("127.0.0.1", sshd, "root", stranger, keys["host"].public_openssh, timeout=3, interval=0.5)
    assert "Authentication" in ei.value.log_tail[0]
