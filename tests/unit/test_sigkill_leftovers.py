"""What a SIGKILLed builder leaves behind is swept by the next one: partial downloads in the blob cache's tmp
dir (named after their writer's PID) and ephemeral GNUPGHOMEs (the private signing key, a gpg-agent)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_mirror import Answer, HostileMirror, hostile_mirror

from builder.archive.cache import ContentCache
from builder.gateway.signing import EphemeralKey, sweep_stale_homes
from builder.run import pid_alive, spawn

REPO = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    assert not pid_alive(0) and not pid_alive(-1)


def test_spawn_with_group_stops_what_the_child_started(tmp_path: Path) -> None:
    """A build root's mmdebstrap starts apt, dpkg, make: stopping its process group stops them too."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; trap '' TERM; wait"  # the leader even ignores SIGTERM
    with spawn(["sh", "-c", script], grace=0.5, group=True) as child:
        deadline = time.monotonic() + 10
        while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(pids.read_text())
        assert pid_alive(grandchild)
    assert child.returncode is not None
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:  # reaped by init once orphaned
        time.sleep(0.05)
    assert not pid_alive(grandchild)


# ------------------------------------------------------------------------------------------- blob cache

DOWNLOADER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from builder.archive import Archive, ContentCache
    a = Archive(sys.argv[2], "x", keyring=Path("/nonexistent"), fingerprints=(), cache=ContentCache(Path(sys.argv[3])))
    a.fetch("pool/slow.deb", "0" * 64, 100000)
    """
)


@pytest.fixture()
def mirror() -> Iterator[HostileMirror]:
    with hostile_mirror() as m:
        yield m


@pytest.mark.timeout(30)
def test_partial_download_of_a_killed_process_is_swept_at_next_open(mirror: HostileMirror, tmp_path: Path) -> None:
    mirror.route("/debian/pool/slow.deb", Answer(body=b"x" * 100000, drip=0.01))
    root = tmp_path / "blobs"
    proc = subprocess.Popen([sys.executable, "-c", DOWNLOADER, str(REPO), mirror.url("/debian"), str(root)])
    tmp = root / "tmp"
    deadline = time.monotonic() + 15
    while not (tmp.is_dir() and any(tmp.iterdir()) and mirror.requests):
        assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
        time.sleep(0.05)
    time.sleep(0.2)  # a few bytes in
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list(tmp.iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(f"{proc.pid}.")  # the writer's PID is in the name
    ContentCache(root)  # the next open
    assert list(tmp.iterdir()) == []


def test_staging_of_a_live_process_is_kept(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    with cache.staging() as (path, f):
        f.write(b"in progress")
        f.flush()
        ContentCache(tmp_path)  # another open while this process is still writing
        assert path.exists() and path.name.startswith(f"{os.getpid()}.")
    foreign = cache.tmp_dir / "not-ours.part"  # no PID in the name: not ours to judge, left alone
    foreign.write_bytes(b"x")
    dead = cache.tmp_dir / f"{dead_pid()}.{path.name.split('.')[1]}.blob-x"
    dead.write_bytes(b"x")
    ContentCache(tmp_path)
    assert foreign.exists() and not dead.exists()


def test_put_stages_in_the_tmp_dir_under_the_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from builder.archive import cache as cache_mod

    seen: list[str] = []
    real = cache_mod.os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(os.fspath(src))
        real(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", spy)
    c = ContentCache(tmp_path)
    c.put(b"data", hashlib.sha256(b"data").hexdigest())
    assert seen and all(Path(s).parent == c.tmp_dir and Path(s).name.startswith(f"{os.getpid()}.") for s in seen)


# ------------------------------------------------------------------------------------------- gpg homes

KEYMAKER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from builder.gateway.signing import EphemeralKey
    key = EphemeralKey("builder sigkill test", home_parent=Path(sys.argv[2]))
    key.create()
    print(key._home, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def agent_pid(home: Path) -> int | None:
    p = subprocess.run(["gpg-connect-agent", "--homedir", str(home), "--no-autostart", "getinfo pid", "/bye"],
                       capture_output=True, text=True, timeout=20, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("D ")]
    return int(lines[0][2:]) if lines else None


@pytest.fixture()
def short_parent() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bgh"))  # short: gpg-agent's socket path must fit in sun_path
    try:
        yield d
    finally:
        for home in d.iterdir():  # never leave an agent behind, whatever the test did
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False,
                           capture_output=True, timeout=20)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(60)
def test_killed_build_leaves_a_key_and_an_agent_that_the_sweep_removes(short_parent: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KEYMAKER, str(REPO), str(short_parent)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    home = Path(proc.stdout.strip())  # a short alias in the temp dir (gpg-agent's socket path must fit)
    real = home.resolve()
    assert home.is_symlink() and home.parent == Path(tempfile.gettempdir())
    assert home.name.startswith("builder-gnupg-") and real.parent == short_parent  # the key: in the work dir
    assert any((real / "private-keys-v1.d").iterdir())  # the ephemeral private key, left behind
    agent = agent_pid(home)
    assert agent is not None and pid_alive(agent)  # and its gpg-agent, still running
    assert home in sweep_stale_homes()
    assert not home.is_symlink() and not real.exists()
    deadline = time.monotonic() + 10
    while pid_alive(agent):
        assert time.monotonic() < deadline, "gpg-agent still running"
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_sweep_keeps_live_homes_and_foreign_dirs(short_parent: Path) -> None:
    with EphemeralKey("builder live test", home_parent=short_parent) as key:
        assert key._home is not None and key._home.resolve().parent == short_parent
        assert key._home.name.startswith(f"builder-gnupg-{os.getpid()}-")
        alias, real = key._home, key._home.resolve()
        other = short_parent / "builder-gnupg-notapid"
        other.mkdir()
        stale = short_parent / f"builder-gnupg-{dead_pid()}-abc"
        stale.mkdir()
        assert sweep_stale_homes(short_parent) == [stale]
        assert key._home.exists() and other.exists()
        assert key.detach_sign(b"still works")
    assert not alias.is_symlink() and not real.exists()  # closed normally: both removed
    assert sweep_stale_homes(short_parent / "missing") == []


@pytest.mark.timeout(60)
def test_default_home_is_still_in_the_system_tmp_dir() -> None:
    with EphemeralKey("builder default test") as key:
        assert key._home is not None and key._home.parent == Path(tempfile.gettempdir())
        home = key._home
    assert not home.exists()
