"""Test helpers: a local sshd on 127.0.0.1 and a debootstrapped Debian 13 tree as an Ansible target.

Not a test module. Used by ``test_ssh.py`` and ``test_provision*.py``; also runnable as
``python tests/integration/trixie_target.py`` to warm the cache before a test run.

Every daemon started here is stopped by its PID; every mount is undone in reverse order.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder import hostapt
from builder.run import run

SUITE = "trixie"
# What a freshly installed image has before provisioning, roughly (the installer's pkgsel adds the rest, which
# roles/base installs idempotently). linux-image-amd64 gives the tree an *installed* kernel that is not the
# running one, the situation the nvidia role must handle.
INCLUDE = (
    "openssh-server", "python3", "python3-apt", "sudo", "systemd-sysv", "linux-image-amd64", "initramfs-tools",
    "kmod", "ca-certificates", "zstd",
)
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "builder" / "test-trixie-chroot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process we started (by PID), then SIGKILL if it does not exit."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


# ----------------------------------------------------------------------------------------- host sshd


def sshd_config(port: int, host_key: Path, authorized_keys: Path, *, listen: str = "127.0.0.1") -> str:
    return "\n".join([
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PidFile none",
        "LogLevel ERROR",
        "Subsystem sftp internal-sftp",
        "",
    ])


@contextlib.contextmanager
def local_sshd(workdir: Path, host_key_private: str, client_public: str, *, root: Path | None = None,
               port: int | None = None) -> Iterator[int]:
    """Run ``sshd -D -e`` on 127.0.0.1:<port> (inside ``root`` via chroot when given); yield the port.

    Keys and config live in ``workdir`` (or inside the tree for a chroot, where sshd resolves paths).
    """
    port = port or free_port()
    base = root / "etc/ssh/builder-test" if root else workdir / "sshd"
    base.mkdir(parents=True, exist_ok=True)
    hk = base / "ssh_host_ed25519_key"
    hk.write_text(host_key_private)
    hk.chmod(0o600)
    ak = base / "authorized_keys"
    ak.write_text(client_public.strip() + "\n")
    inside = (lambda p: "/" + str(p.relative_to(root))) if root else str
    cfg = base / "sshd_config"
    cfg.write_text(sshd_config(port, Path(inside(hk)), Path(inside(ak))))
    argv = ["/usr/sbin/sshd", "-D", "-e", "-f", inside(cfg)]
    if root:
        (root / "run/sshd").mkdir(parents=True, exist_ok=True)
        argv = ["chroot", str(root), *argv]
    else:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = (workdir / "sshd.log").open("ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        try:
            wait_port(port)
        except TimeoutError:
            stop_pid(proc)
            raise RuntimeError(f"sshd did not start: {(workdir / 'sshd.log').read_text()[-2000:]}") from None
        yield port
    finally:
        stop_pid(proc)
        log.close()


# ----------------------------------------------------------------------------------------- trixie tree


def mirrors() -> tuple[str, str]:
    mirror, security = hostapt.debian_mirrors()
    if not mirror or not security:
        raise RuntimeError("no Debian mirror in the host's apt sources")
    return mirror, security


def pristine_tree(cache_root: Path = CACHE_ROOT) -> Path:
    """The debootstrapped trixie tree for today (built once a day, then reused). Never modify it: copy it."""
    today = _dt.date.today().isoformat()
    tree = cache_root / today
    if (tree / ".complete").is_file():
        return tree
    cache_root.mkdir(parents=True, exist_ok=True)
    for old in cache_root.iterdir():  # yesterday's trees and broken attempts
        if old.name != today:
            _assert_unmounted(old)
            shutil.rmtree(old, ignore_errors=True)
    partial = cache_root / f"{today}.partial"
    _assert_unmounted(partial)
    shutil.rmtree(partial, ignore_errors=True)
    mirror, _ = mirrors()
    try:
        run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, partial, mirror],
            timeout=3600,
            env={"DEBIAN_FRONTEND": "noninteractive"},
        )
    finally:
        # debootstrap leaves its /proc mounted in the target (seen with 1.0.128+nmu2+deb12u2)
        for m in sorted(mounts_under(partial), key=len, reverse=True):
            run(["umount", m], check=False)
    (partial / ".complete").write_text(today + "\n")
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)
    return tree


def _assert_unmounted(path: Path) -> None:
    p = str(path.resolve())
    with open("/proc/mounts") as f:
        busy = [line.split()[1] for line in f if line.split()[1] == p or line.split()[1].startswith(p + "/")]
    if busy:
        raise RuntimeError(f"refusing to touch {p}: still mounted: {busy}")


def mounts_under(path: Path) -> list[str]:
    p = str(path.resolve())
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1] == p or line.split()[1].startswith(p + "/")]


def working_copy(pristine: Path, dest: Path) -> Path:
    """Copy the pristine tree and point its apt at the host's mirror with every component, as the preseed does."""
    run(["cp", "-a", "--reflink=auto", pristine, dest], timeout=1200)
    mirror, security = mirrors()
    comps = "main contrib non-free non-free-firmware"
    (dest / "etc/apt/sources.list").unlink(missing_ok=True)
    (dest / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: {comps}\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: {comps}\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    # A chroot has no init: keep maintainer scripts from starting daemons (deb-systemd-invoke, invoke-rc.d).
    prc = dest / "usr/sbin/policy-rc.d"
    prc.write_text("#!/bin/sh\nexit 101\n")
    prc.chmod(0o755)
    for name in ("resolv.conf", "hosts"):
        shutil.copyfile(f"/etc/{name}", dest / "etc" / name)
    return dest


@contextlib.contextmanager
def chroot_mounts(tree: Path) -> Iterator[Path]:
    """/proc, /sys, /dev, /dev/pts and a tmpfs /run inside ``tree`` while in use; all unmounted afterwards."""
    specs = [
        (["-t", "proc", "proc"], "proc"),
        (["-t", "sysfs", "sysfs"], "sys"),
        (["--bind", "/dev"], "dev"),
        (["--bind", "/dev/pts"], "dev/pts"),
        (["-t", "tmpfs", "tmpfs"], "run"),
    ]
    done: list[Path] = []
    try:
        for args, sub in specs:
            target = tree / sub
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", *args, target])
            done.append(target)
        yield tree
    finally:
        kill_chroot_processes(tree)
        for target in reversed(done):
            for attempt in range(10):
                if run(["umount", target], check=False).returncode == 0:
                    break
                time.sleep(0.5 * (attempt + 1))
                kill_chroot_processes(tree)
            else:
                run(["umount", "--lazy", target], check=False)


@contextlib.contextmanager
def ansible_target(tree: Path, work: Path, name: str) -> Iterator[Any]:
    """The tree, mounted and served by a chroot sshd on 127.0.0.1 with a pinned host key: a
    builder.provision.Target for root. Everything is unmounted and stopped afterwards."""
    from builder.provision import Target
    from builder.ssh import generate_keypair, known_hosts_line

    client, host = generate_keypair(f"{name}-client"), generate_keypair(f"{name}-host")
    priv, _ = client.write(work / "keys", "id_ed25519")
    with chroot_mounts(tree), local_sshd(work, host.private_openssh, client.public_openssh, root=tree) as port:
        kh = work / "keys" / "known_hosts"
        kh.write_text(known_hosts_line("127.0.0.1", port, host.public_openssh) + "\n")
        yield Target("127.0.0.1", port, "root", priv, kh)


def kill_chroot_processes(tree: Path) -> list[int]:
    """SIGKILL, one PID at a time, the processes whose root directory is ``tree`` (the sshd we started and
    its session children). Returns the PIDs."""
    root = str(tree.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == root:
                pids.append(int(entry.name))
        except OSError:
            continue
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


if __name__ == "__main__":  # warm the cache: python tests/integration/trixie_target.py
    t0 = time.monotonic()
    print(pristine_tree(), f"{time.monotonic() - t0:.0f} s")
