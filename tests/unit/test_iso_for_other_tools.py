"""The ``iso`` verb for another tool's VM (the benchmark's Packer run): the installer trusts a running gateway
verb's suite key (--suite-key), the SSH keys the preseed installs are written out (--ssh-key-out), and the
install can end in a reboot (--reboot). No mirror: fetch is replaced by the lock's inputs, the ISO by a stub."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder.config import load_config
from builder.events import Emitter
from builder.installer.preseed import render_preseed
from builder.lock import read_lock
from builder.ssh import generate_keypair
from builder.stages import fetch, media

IMAGE = Path(__file__).resolve().parents[2] / "images" / "cloud-gpu-worker.yaml"
POWEROFF = "d-i debian-installer/exit/poweroff boolean"
# what `gpg --export` writes first for an ed25519 key: an old-format public-key packet (tag 6)
SUITE_KEY = bytes([0x98, 0x33, 0x04]) + b"\x00" * 48


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """write_iso with the lock's inputs and make_iso recording what it was given (and writing a stub ISO)."""
    cfg = load_config(IMAGE)
    inputs = fetch.InstallerInputs(lock=read_lock(cfg.lock_path), kernel=Path("/nonexistent"),
                                   initrd=Path("/nonexistent"), isolinux_bin=b"", ldlinux_c32=b"", udeb_packages=b"",
                                   udeb_pins={}, inrelease=b"")
    calls: list[dict[str, Any]] = []

    def fake_make_iso(cfg: Any, inputs: Any, m: media.Media, key: Any, target: Path) -> Path:
        calls.append({"media": m, "key": key})
        target.write_bytes(b"iso")
        return target

    monkeypatch.setattr(fetch, "fetch_inputs", lambda *a, **k: inputs)
    monkeypatch.setattr(media, "make_iso", fake_make_iso)
    return calls


def write(tmp_path: Path, **kw: Any) -> Path:
    from builder.archive.http import FetchStats

    return media.write_iso(load_config(IMAGE), tmp_path / "out.iso", emitter=Emitter(), stats=FetchStats(), **kw)


def test_the_suite_key_keys_and_reboot_reach_the_iso(tmp_path: Path, made: list[dict[str, Any]]) -> None:
    iso = write(tmp_path, suite_key=SUITE_KEY, ssh_key_out=tmp_path / "keys", reboot=True)
    assert iso.read_bytes() == b"iso"
    (call,) = made
    assert call["key"] == SUITE_KEY  # the gateway's public key, not a throw-away one
    m: media.Media = call["media"]
    assert f"{POWEROFF} false" in m.preseed and f"{POWEROFF} true" not in m.preseed
    keys = tmp_path / "keys"
    private = keys / media.SSH_KEY_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text() == m.client_key.private_openssh
    public = (keys / f"{media.SSH_KEY_FILE}.pub").read_text().strip()
    assert public == m.client_key.public_openssh.strip()
    assert " ".join(public.split()[:2]) in m.preseed  # the key the preseed installs for the build user
    assert (keys / media.HOST_KEY_FILE).read_text().strip() == m.host_key.public_openssh.strip()


def test_by_default_a_throwaway_key_signs_and_the_install_powers_off(tmp_path: Path,
                                                                      made: list[dict[str, Any]]) -> None:
    write(tmp_path)
    (call,) = made
    assert not isinstance(call["key"], bytes)
    assert f"{POWEROFF} true" in call["media"].preseed
    assert not (tmp_path / "keys").exists()


def test_reboot_changes_only_the_exit_line_of_the_preseed() -> None:
    cfg = load_config(IMAGE)
    client, host = generate_keypair("c"), generate_keypair("h")
    off = render_preseed(media.preseed_context(cfg, client, host)).splitlines()
    on = render_preseed(media.preseed_context(cfg, client, host, poweroff=False)).splitlines()
    changed = [ln for ln in on if ln not in off]
    assert changed[-1] == f"{POWEROFF} false"
    assert all(ln.startswith("#") for ln in changed[:-1])  # besides, only the comment above it
    assert [ln for ln in off if ln not in on and not ln.startswith("#")] == [f"{POWEROFF} true"]


def test_an_unwritable_key_directory_is_one_error(tmp_path: Path, made: list[dict[str, Any]]) -> None:
    from builder.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--ssh-key-out: cannot write the SSH keys"):
        write(tmp_path, ssh_key_out=blocker / "keys")
    assert not (tmp_path / "out.iso").exists() and not list(tmp_path.glob(".out.iso.part"))


@pytest.mark.parametrize(("content", "why"), [
    (None, "cannot read it"),
    (b"", "not a binary OpenPGP public key"),
    (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n", "not a binary OpenPGP public key"),
])
def test_a_bad_suite_key_is_one_error_and_exit_2(tmp_path: Path, content: bytes | None, why: str) -> None:
    key = tmp_path / "key.gpg"
    if content is not None:
        key.write_bytes(content)
    p = subprocess.run([sys.executable, "-m", "builder", "iso", str(IMAGE), "--suite-key", str(key),
                        "-o", str(tmp_path / "x.iso")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert f"error: --suite-key {key}: {why}" in lines[0], p.stderr
    assert all("hint: " in ln for ln in lines[1:]), p.stderr  # one error line (and its hint)
    assert "Traceback" not in p.stderr and not (tmp_path / "x.iso").exists()
