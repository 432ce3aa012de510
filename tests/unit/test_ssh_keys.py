"""builder.ssh: key generation and known_hosts lines (pure, no network)."""

from __future__ import annotations

import stat

import paramiko
import pytest

from builder.errors import SshError
from builder.ssh import KeyPair, generate_keypair, host_pattern, known_hosts_line, wait_for_ssh


def test_keypair_round_trip(tmp_path):
    kp = generate_keypair("builder-test")
    assert kp.private_openssh.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert kp.public_openssh.startswith("ssh-ed25519 AAAA")
    assert kp.public_openssh.endswith(" builder-test")
    pkey = kp.pkey()
    assert isinstance(pkey, paramiko.Ed25519Key)
    # the public half paramiko derives from the private key is the one we publish
    assert f"{pkey.get_name()} {pkey.get_base64()}" == kp.public_key_only

    priv, pub = kp.write(tmp_path / "keys", "id_ed25519")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.read_text() == kp.public_openssh + "\n"
    again = paramiko.Ed25519Key.from_private_key_file(str(priv))
    assert again.get_base64() == pkey.get_base64()
    # a rewrite replaces the file and keeps it private
    priv.chmod(0o644)
    kp.write(tmp_path / "keys", "id_ed25519")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_keypairs_differ():
    assert generate_keypair("a").private_openssh != generate_keypair("a").private_openssh


def test_no_comment():
    kp = generate_keypair("")
    assert len(kp.public_openssh.split()) == 2


def test_known_hosts_line():
    kp = generate_keypair("guest host key")
    b64 = kp.public_openssh.split()[1]
    assert known_hosts_line("127.0.0.1", 2222, kp.public_openssh) == f"[127.0.0.1]:2222 ssh-ed25519 {b64}"
    assert known_hosts_line("vm.example", 22, kp.public_openssh) == f"vm.example ssh-ed25519 {b64}"
    assert host_pattern("::1", 2200) == "[::1]:2200"
    with pytest.raises(ValueError):
        known_hosts_line("127.0.0.1", 22, "garbage")


def test_known_hosts_line_is_read_by_paramiko(tmp_path):
    kp = generate_keypair("x")
    f = tmp_path / "known_hosts"
    f.write_text(known_hosts_line("127.0.0.1", 2222, kp.public_openssh) + "\n")
    hk = paramiko.HostKeys(str(f))
    assert hk.lookup("[127.0.0.1]:2222")["ssh-ed25519"].get_base64() == kp.public_openssh.split()[1]


def test_bad_pinned_key_is_an_ssh_error():
    with pytest.raises(SshError, match="pinned host key"):
        wait_for_ssh("127.0.0.1", 9, "root", generate_keypair("c"), "ssh-ed25519 !!!notbase64", timeout=1)


def test_keypair_is_frozen():
    kp = KeyPair("a", "b")
    with pytest.raises(AttributeError):
        kp.private_openssh = "c"  # type: ignore[misc]
