"""A remote libvirt host for real: the local libvirtd reached over ``qemu+ssh://root@127.0.0.1:PORT/system``
through a real sshd on loopback (started here with generated keys; libvirtd by scripts/libvirtd.sh, as in CI).

* the SSH tunnels (gateway-style forward, serial sink, UDP relay, local forward to a remote port);
* storage volumes: a qcow2 overlay goes up with its backing file, what a guest wrote comes back onto the
  local backing file, the volumes of a killed run are swept, a transient directory pool leaves nothing;
* a machine staged on the remote host without booting it: every file a volume with the same bytes, the remote
  domain XML valid for libvirt (defined, never started, undefined), every volume gone afterwards; a
  provision-like machine whose disk comes back onto the local base when its domain has stopped;
* (``vm``) the real installer in a transient domain on the "remote" host up to "preseed loaded" on its serial
  console, with its syslog and the gateway reached through the tunnels, and every volume gone afterwards.

Needs root (sshd logs in as root), openssh-server, socat, libvirtd and libvirt-python; skipped without them,
failed instead in CI (BUILDER_TEST_LIBVIRT=1). libvirt's own ssh (no_verify=1) adds the test sshd's key to
~/.ssh/known_hosts; the fixture removes that line again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder import image
from builder.errors import VmError
from builder.ssh import generate_keypair
from builder.vm.net import find_free_port
from builder.vm.remote import machine_tag, parse_remote_uri, volume_prefix
from builder.vm.spec import Drive, VmSpec

try:
    from conftest_vm import installer_context, require_libvirt
    from trixie_target import local_sshd
except ImportError:  # tests/ imported as a package
    from .conftest_vm import installer_context, require_libvirt
    from .trixie_target import local_sshd

pytestmark = [pytest.mark.integration, pytest.mark.libvirt, pytest.mark.remote_libvirt]

LOCAL_URI = "qemu:///system"


def _unavailable(reason: str) -> None:
    # CI starts libvirtd (scripts/libvirtd.sh) and sets BUILDER_TEST_LIBVIRT=1: there a missing piece fails
    (pytest.fail if os.environ.get("BUILDER_TEST_LIBVIRT") == "1" else pytest.skip)(reason)


@pytest.fixture(scope="module")
def lv() -> Any:
    return require_libvirt(LOCAL_URI)


def _names_host(line: str, host: str) -> bool:
    """Whether a known_hosts line is for ``host`` (plain, or hashed as ``|1|salt|hmac``: HashKnownHosts)."""
    first = line.split(" ", 1)[0]
    if first.startswith("|1|"):
        with contextlib.suppress(ValueError, binascii.Error):
            salt, digest = (base64.b64decode(x) for x in first[3:].split("|", 1))
            return hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), digest)
        return False
    return host in first.split(",")


def _forget_host_key(port: int) -> None:
    """Drop the line libvirt's ssh (StrictHostKeyChecking=no) added for the test sshd."""
    kh = Path.home() / ".ssh" / "known_hosts"
    with contextlib.suppress(OSError):
        lines = kh.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if not _names_host(ln, f"[127.0.0.1]:{port}")]
        if kept != lines:
            kh.write_text("".join(kept))


@pytest.fixture(scope="module")
def uri(lv: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The qemu+ssh URI of the local libvirtd through a loopback sshd for root."""
    if os.geteuid() != 0:
        _unavailable("needs root: the loopback sshd logs in as root, as libvirt's qemu+ssh://root@ does")
    for tool in ("/usr/sbin/sshd", "socat", "ssh"):
        if not shutil.which(tool):
            _unavailable(f"needs {tool} (openssh-server, socat, openssh-client)")
    wd = tmp_path_factory.mktemp("remote-sshd")
    client, host = generate_keypair("builder-remote-test"), generate_keypair("builder-remote-host")
    key, _ = client.write(wd, "id_ed25519")
    with local_sshd(wd, host.private_openssh, client.public_openssh) as port:
        remote = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={key}&no_verify=1&no_tty=1"
        try:
            t0 = time.monotonic()
            try:
                lv.open(remote).close()
            except lv.libvirtError as exc:
                _unavailable(f"libvirt over {remote}: {exc}")
            print(f"\nlibvirt over qemu+ssh answered in {time.monotonic() - t0:.2f} s")
            yield remote
        finally:
            _forget_host_key(port)


@pytest.fixture
def pool(lv: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A fresh persistent dir pool of the local libvirtd (the "remote" host's), removed afterwards."""
    name = f"builder-test-{os.getpid()}-{tmp_path.name[-12:]}"
    target = tmp_path / "pool"
    conn = lv.open(LOCAL_URI)
    p = conn.storagePoolDefineXML(f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target>"
                                  "</pool>", 0)
    try:
        p.build(0)
        p.create(0)
        yield name, target
    finally:
        with contextlib.suppress(lv.libvirtError):
            p.refresh(0)
            for v in p.listAllVolumes(0):
                v.delete(0)
        with contextlib.suppress(lv.libvirtError):
            p.destroy()
        with contextlib.suppress(lv.libvirtError):
            p.undefine()
        conn.close()


def _volumes(lv: Any, name: str) -> list[str]:
    conn = lv.open(LOCAL_URI)
    try:
        p = conn.storagePoolLookupByName(name)
        p.refresh(0)
        return sorted(p.listVolumes())
    finally:
        conn.close()


def _sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(b"echo:" + data)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------------------------------------ tunnels


@pytest.mark.timeout(60)
def test_tunnels_through_the_ssh_connection(uri: str, tmp_path: Path) -> None:
    from builder.vm.tunnel import SshTunnel

    host = parse_remote_uri(uri)
    assert host is not None
    t0 = time.monotonic()
    with echo_server() as service, SshTunnel(host) as t:
        opened = time.monotonic() - t0
        assert t.run("id -un")[1].strip() == "root"
        assert t.same_machine()
        there, spare = t.free_ports(2)
        # a service of builder (like the gateway), reached from the remote host's 127.0.0.1:R
        r = t.forward_to_local(service)
        assert t.run(f"printf abc | socat -t 2 - TCP:127.0.0.1:{r}")[1] == "echo:abc"
        # the serial console: QEMU's tcp chardev connects to R, the bytes land in a local file
        serial = tmp_path / "serial.log"
        s = t.sink_to_file(serial)
        t.run(f"printf 'Linux version 6.12\\n' | socat -u - TCP:127.0.0.1:{s}")
        deadline = time.monotonic() + 5
        while b"Linux version" not in serial.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serial.read_bytes() == b"Linux version 6.12\n"
        # the guest's SSH: a local port to a remote one (here a socat echo on the remote loopback)
        remote_echo = t.transport.open_session()  # closing the channel does not end it: killed by its PID below
        remote_echo.exec_command(f"echo $$; exec socat TCP-LISTEN:{there},bind=127.0.0.1,reuseaddr,fork EXEC:cat")
        echo_pid = int(remote_echo.makefile("rb").readline())
        deadline = time.monotonic() + 5
        while not _listening(there) and time.monotonic() < deadline:
            time.sleep(0.05)
        local = find_free_port()
        t.forward_from_local(local, there)
        with socket.create_connection(("127.0.0.1", local), timeout=5) as c:
            c.sendall(b"SSH-2.0-test\r\n")
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == b"SSH-2.0-test\r\n"
        # nothing listens on the remote port yet (QEMU not started): the local connection just closes
        dead = find_free_port()
        t.forward_from_local(dead, spare)
        with socket.create_connection(("127.0.0.1", dead), timeout=5) as c:
            c.settimeout(5)
            assert c.recv(10) == b""
        # UDP (the installer's syslog) over SSH: the remote port differs from the local one here, since the
        # "remote" host is this machine and the listener holds its own port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.settimeout(5)
            relay = find_free_port()
            t.relay_udp(relay, listener.getsockname()[1])
            t.run(f"printf '<13>anna[1]: retrieving a\\n' | socat -u - UDP-SENDTO:127.0.0.1:{relay}; "
                  f"printf '<13>x: one\\n<13>x: two\\n' | socat -u - UDP-SENDTO:127.0.0.1:{relay}")
            got = [listener.recv(1000) for _ in range(3)]
            assert got == [b"<13>anna[1]: retrieving a\n", b"<13>x: one\n", b"<13>x: two\n"]
            with pytest.raises(VmError, match="UDP relay") as info:
                t.relay_udp(relay, 9)  # the port is taken on the remote host
            assert any("Address already in use" in ln for ln in info.value.log_tail)
        t.run(f"kill {echo_pid}")
        remote_echo.close()
    for port in (r, s, local, relay):
        assert not _listening(port), f"port {port} still listens after close"
    print(f"\nSSH tunnel opened in {opened:.2f} s, all tunnels checked in {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------ volumes


def _qemu_io(path: Path | str, cmd: str, *, ro: bool = False) -> None:
    argv = ["qemu-io", "-f", "qcow2", *(["-r"] if ro else []), "-c", cmd, os.fspath(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_volumes_chain_download_and_cleanup(lv: Any, uri: str, pool: tuple[str, Path], tmp_path: Path) -> None:
    from builder.vm.tunnel import SshTunnel
    from builder.vm.volumes import VolumeStore

    name, target = pool
    base = image.create(tmp_path / "base.qcow2", 64 << 20)
    _qemu_io(base, "write -P 0x11 0 64k")
    overlay = image.overlay(base, tmp_path / "disk.qcow2")
    base_sha = _sha(base)
    # a run of this machine that was killed left a volume behind
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"builder-{machine_tag()}-{dead.pid}-0badc0-x-0-disk.qcow2"
    conn0 = lv.open(LOCAL_URI)
    conn0.storagePoolLookupByName(name).createXML(
        f"<volume><name>{leftover}</name><capacity>1024</capacity></volume>", 0)
    conn0.close()
    host = parse_remote_uri(uri)
    assert host is not None
    conn = lv.open(uri)
    try:
        with SshTunnel(host) as t:
            store = VolumeStore(lv, conn, prefix=volume_prefix("t-vol", "a1b2c3"), pool=name, run=t.run,
                                workdir=tmp_path, host=host.label)
            t0 = time.monotonic()
            store.open()
            assert leftover not in store.volumes()  # swept
            up = store.upload(overlay, "qcow2")
            assert len(store.created) == 2  # the backing file went up first, as a volume of its own
            remote_base = store.files[base.absolute()].path
            assert Path(remote_base).parent == target and _sha(remote_base) == base_sha
            meta = image.info(Path(up.path))
            assert meta["backing-filename"] == remote_base and meta["backing-filename-format"] == "qcow2"
            assert image.info(overlay)["backing-filename"] == str(base.absolute())  # the local file untouched
            _qemu_io(up.path, "read -P 0x11 0 64k", ro=True)  # the base's data through the remote chain
            _qemu_io(up.path, "write -P 0x22 64k 64k")  # what a guest writes
            store.download(overlay)
            assert image.info(overlay)["backing-filename"] == str(base.absolute())
            _qemu_io(overlay, "read -P 0x11 0 64k", ro=True)
            _qemu_io(overlay, "read -P 0x22 64k 64k", ro=True)
            assert _sha(base) == base_sha
            store.close()
            took = time.monotonic() - t0
            assert _volumes(lv, name) == []

            # a transient dir pool under vm.libvirt_pool_dir: created for one machine, gone with it
            pool_dir = tmp_path / "pools"
            pool_dir.mkdir()
            raw = tmp_path / "vars.fd"
            raw.write_bytes(os.urandom(256 << 10))
            # the transient pool of a killed run (with a volume in it) is removed by the next run's open()
            stale = f"builder-{machine_tag()}-{dead.pid}-0badc0-pool"
            spool = conn.storagePoolCreateXML(f"<pool type='dir'><name>{stale}</name><target><path>{pool_dir}/"
                                              f"{stale}</path></target></pool>", lv.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            spool.createXML("<volume><name>v</name><capacity>1024</capacity></volume>", 0)
            tstore = VolumeStore(lv, conn, prefix=volume_prefix("t-tmp", "d4e5f6"), pool_dir=str(pool_dir),
                                 run=t.run, workdir=tmp_path, host=host.label)
            tstore.open()
            assert stale not in conn.listStoragePools() and not (pool_dir / stale).exists()
            tname = tstore.pool_name
            assert tname in conn.listStoragePools()
            vol = tstore.upload(raw)
            assert Path(vol.path).parent.parent == pool_dir and _sha(vol.path) == _sha(raw)
            tstore.close()
            assert tname not in conn.listStoragePools() + conn.listDefinedStoragePools()
            assert list(pool_dir.iterdir()) == []
    finally:
        conn.close()
    print(f"\nvolumes: chain up, download, rebase, delete in {took:.2f} s")


def test_missing_pool_is_named(lv: Any, uri: str, tmp_path: Path) -> None:
    from builder.vm.volumes import VolumeStore

    conn = lv.open(uri)
    try:
        store = VolumeStore(lv, conn, prefix="builder-x", pool="no-such-pool-here", workdir=tmp_path, host="h")
        with pytest.raises(VmError, match="no storage pool 'no-such-pool-here'") as info:
            store.open()
        assert "vm.libvirt_pool_dir" in (info.value.hint or "")
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------ a machine


@pytest.mark.timeout(180)
def test_machine_staged_on_the_remote_host_without_booting(lv: Any, uri: str, pool: tuple[str, Path],
                                                           tmp_path: Path) -> None:
    """Everything start() does before createXML, for real; the XML is defined (validated) but never started."""
    from builder.vm.firmware import prepare
    from builder.vm.guestnet import gateway_service
    from builder.vm.libvirt import LibvirtMachine

    name, target = pool
    disk = image.create(tmp_path / "installed.qcow2", 1 << 30)
    iso = tmp_path / "installer.iso"
    iso.write_bytes(os.urandom(1 << 20))
    try:
        fw = prepare("uefi", tmp_path / "t.vars.fd")
    except Exception as exc:  # MissingToolError without ovmf
        pytest.skip(f"no OVMF: {exc}")
    with echo_server() as gateway:
        ssh_port = find_free_port()
        spec = VmSpec(name=f"t-stage-{os.getpid()}", memory_mib=512, cpus=1, accel="tcg", firmware=fw,
                      drives=(Drive(disk, cache="unsafe"), Drive.cdrom(iso)), boot="cdrom",
                      serial_log=tmp_path / "serial.log", ssh_forward=ssh_port,
                      guest_services=(gateway_service(gateway),), udp_to_host=(find_free_port(),))
        m = LibvirtMachine(spec, tmp_path, uri=uri, pool=name)
        assert m.remote is not None
        m._conn = lv.open(uri)
        t0 = time.monotonic()
        try:
            xml = m._stage_remote(m.remote)
            staged = time.monotonic() - t0
            rs = m.remote_spec
            assert rs is not None
            for local, remote in ((fw.code, rs.firmware.code), (fw.vars, rs.firmware.vars), (disk, rs.drives[0].path),
                                  (iso, rs.drives[1].path)):
                assert remote is not None and local is not None
                assert Path(remote).parent == target and _sha(remote) == _sha(local)
            root = ET.fromstring(xml)
            serial = root.find("devices/serial")
            assert serial is not None and serial.get("type") == "tcp"
            args = " ".join(a.get("value") or "" for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg"))
            remote_gw = rs.guest_services[0].host_port
            assert f"TCP:127.0.0.1:{remote_gw}" in args and f"hostfwd=tcp:127.0.0.1:{rs.ssh_forward}-:22" in args
            # the gateway's tunnel works from the remote host's loopback, and the SSH port listens here
            with socket.create_connection(("127.0.0.1", remote_gw), timeout=5) as c:
                c.sendall(b"GET")
                assert c.recv(100) == b"echo:GET"
            assert _listening(ssh_port)
            # libvirt accepts the XML (schema and QEMU driver); defined, never started
            conn = lv.open(uri)
            try:
                dom = conn.defineXMLFlags(xml, lv.VIR_DOMAIN_DEFINE_VALIDATE)
                try:
                    assert not dom.isActive()
                finally:
                    dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
            finally:
                conn.close()
        finally:
            m._discard = True
            m.close()
    assert _volumes(lv, name) == []
    assert not _listening(ssh_port) and not _listening(remote_gw)
    print(f"\nstaged a UEFI install machine on the remote host in {staged:.2f} s (4 volumes), "
          f"torn down in {time.monotonic() - t0 - staged:.2f} s")


class _Stopped:
    """A domain that ran and stopped on its own (as the machine sees one after the guest powered off)."""

    def isActive(self) -> bool:  # libvirt spells it so
        return False


@pytest.mark.timeout(180)
def test_provision_machine_disk_comes_back_onto_the_local_base(lv: Any, uri: str, pool: tuple[str, Path],
                                                               tmp_path: Path) -> None:
    """A provision-like machine (overlay on a cached base, direct-boot kernel and initrd, SSH forward) staged on
    the remote host; once its domain has stopped, close() brings the overlay back onto the local base, and
    leaves no volume; a machine left because of an error brings nothing back."""
    from builder.vm.libvirt import LibvirtMachine

    name, _ = pool
    base = image.create(tmp_path / "cache" / "installed.qcow2", 256 << 20)
    _qemu_io(base, "write -P 0x11 0 64k")
    base_sha = _sha(base)
    for attempt, failed in (("ok", False), ("failed", True)):
        disk = image.overlay(base, tmp_path / attempt / "disk.qcow2")
        kernel, initrd = tmp_path / attempt / "vmlinuz", tmp_path / attempt / "initrd.img"
        kernel.write_bytes(os.urandom(64 << 10))
        initrd.write_bytes(os.urandom(64 << 10))
        ssh_port = find_free_port()
        spec = VmSpec(name=f"t-prov-{attempt}-{os.getpid()}", memory_mib=512, cpus=1, accel="tcg",
                      drives=(Drive(disk),), kernel=kernel, initrd=initrd, append="console=ttyS0",
                      serial_log=tmp_path / attempt / "serial.log", ssh_forward=ssh_port, no_reboot=False)
        m = LibvirtMachine(spec, tmp_path / attempt, uri=uri, pool=name)
        assert m.remote is not None
        m._conn = lv.open(uri)
        try:
            xml = m._stage_remote(m.remote)
            rs = m.remote_spec
            assert rs is not None and len(_volumes(lv, name)) == 4  # base, overlay, kernel, initrd
            assert _sha(rs.kernel) == _sha(kernel) and _sha(rs.initrd) == _sha(initrd)  # type: ignore[arg-type]
            assert ET.fromstring(xml).findtext("os/kernel") == str(rs.kernel)
            assert _listening(ssh_port)
            _qemu_io(rs.drives[0].path, "write -P 0x33 1M 64k")  # the guest provisions
            m._dom = _Stopped()
            m.stop_method = "exited"
        finally:
            if failed:
                m._discard = True  # as __exit__ does when the with block raised
            m.close()
        assert _volumes(lv, name) == [] and not _listening(ssh_port)
        assert image.info(disk)["backing-filename"] == str(base.absolute()) and _sha(base) == base_sha
        if failed:
            _qemu_io(disk, "read -P 0x00 1M 64k", ro=True)  # nothing came back
        else:
            _qemu_io(disk, "read -P 0x33 1M 64k", ro=True)
            _qemu_io(disk, "read -P 0x11 0 64k", ro=True)


@pytest.mark.timeout(120)
def test_ctrl_c_while_uploading_leaves_no_volume(lv: Any, uri: str, pool: tuple[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of the second upload: start() raises KeyboardInterrupt, and every volume created
    so far (the half-written one too) is deleted, the tunnels closed. (createXML is disabled: nothing boots.)"""
    from builder.vm import volumes
    from builder.vm.libvirt import LibvirtMachine

    name, _ = pool

    def no_boot(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the test must not start a domain")

    monkeypatch.setattr(lv.virConnect, "createXML", no_boot)
    real_send, calls = volumes.VolumeStore._send, []

    def interrupted(self: Any, vol: Any, local: Path, size: int) -> None:
        calls.append(local)
        if len(calls) == 2:
            stream = self._conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            stream.send(local.read_bytes()[: 1 << 20])
            with contextlib.suppress(Exception):
                stream.abort()
            raise KeyboardInterrupt
        real_send(self, vol, local, size)

    monkeypatch.setattr(volumes.VolumeStore, "_send", interrupted)
    disk = image.create(tmp_path / "d.qcow2", 1 << 30)
    iso = tmp_path / "i.iso"
    iso.write_bytes(os.urandom(4 << 20))
    ssh_port = find_free_port()
    spec = VmSpec(name=f"t-int-{os.getpid()}", memory_mib=512, cpus=1, accel="tcg", boot="cdrom",
                  drives=(Drive(disk), Drive.cdrom(iso)), ssh_forward=ssh_port)
    m = LibvirtMachine(spec, tmp_path, uri=uri, pool=name)
    with pytest.raises(KeyboardInterrupt):
        m.start()
    assert len(calls) == 2
    assert _volumes(lv, name) == []
    assert m._tunnel is None and m._store is None and m._conn is None and not _listening(ssh_port)


# ------------------------------------------------------------------------------------------------ the installer


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_installer_on_a_remote_libvirt_host(lv: Any, uri: str, pool: tuple[str, Path], default_config: Any,
                                            tmp_path: Path) -> None:
    """The real installer ISO in a transient domain on the "remote" host: its serial console comes back through
    the tunnel up to "preseed loaded", d-i's syslog and the gateway work through it, and afterwards no volume
    is left in the pool (the stopped domain's installed disk came back as a valid qcow2)."""
    from contextlib import ExitStack

    from builder.installer.preseed import MILESTONE_LOADED
    from builder.installer.progress import console_question
    from builder.stages.install import install_spec
    from builder.vm import open_machine
    from builder.vm.logs import read_text

    deadline = time.monotonic() + 780  # of the 900 s: the rest for the teardown (download, volumes)
    name, _ = pool
    cfg = default_config
    vm_name = f"t-rinstall-{os.getpid()}"
    with ExitStack() as stack:
        ctx, m = installer_context(stack, cfg, tmp_path)
        gw, tracker = ctx.services.gateway, ctx.services.tracker
        assert m.iso is not None
        disk = image.create(tmp_path / "installed.qcow2", cfg.disk.size)
        spec = install_spec(name=vm_name, iso=m.iso, disk=disk, accel=ctx.accel, cpus=cfg.vm.cpus,
                            memory=cfg.vm.memory, workdir=tmp_path, gateway_port=gw.port,
                            firmware=ctx.firmware(vm_name), syslog_port=ctx.services.syslog.port)
        t0 = time.monotonic()
        with open_machine(spec, tmp_path, backend="libvirt", libvirt_uri=uri, libvirt_pool=name) as vm:
            staged = time.monotonic() - t0
            assert _volumes(lv, name), "the machine's files are volumes in the pool while it runs"
            assert vm.status() == "running"  # QMP through libvirt's connection
            # libvirt's log of the domain on the remote host, read through the SSH connection
            assert any("starting up" in ln or "qemu-system" in ln for ln in vm.stderr_tail(50))
            loaded = vm.wait_for_serial(f"BUILDER {MILESTONE_LOADED}", timeout=max(60, deadline - time.monotonic()))
            assert loaded, "no 'preseed loaded' on the serial console:\n" + "\n".join(vm.serial_tail(30))
            took = time.monotonic() - t0
            shot = vm.screendump(tmp_path / "screen.ppm")  # virDomainScreenshot: PPM (or PNG) from the remote
            assert shot.read_bytes()[:2] in (b"P6", b"\x89P")
            # then the network: d-i's syslog reaches the listener, and its mirror (the gateway) is used
            while time.monotonic() < deadline and not (tracker.tail and gw.stats.served_bytes):
                assert vm.is_running(), "the installer VM stopped:\n" + "\n".join(vm.serial_tail(30))
                assert tracker.failed is None, f"d-i failed: {tracker.failed}"
                q = console_question(read_text(spec.serial_log)[-20000:])
                assert q is None, f"d-i asks a question the preseed does not answer:\n{q}"
                time.sleep(2)
        serial = read_text(spec.serial_log)
        conn = lv.open(LOCAL_URI)
        try:
            assert vm_name not in [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()
    assert _volumes(lv, name) == [], "builder left volumes in the pool"
    assert f"BUILDER {MILESTONE_LOADED}" in serial
    assert tracker.tail, "no d-i syslog line arrived"
    assert gw.stats.served_bytes > 0, "the guest never reached the gateway through the tunnel"
    assert image.info(disk)["format"] == "qcow2"  # came back from the remote volume when the machine closed
    assert vm.domain_log() == tmp_path / f"{vm_name}.qemu.log"  # kept for the failure bundle
    print(f"\nremote libvirt: staged in {staged:.1f} s, 'preseed loaded' after {took:.0f} s, gateway served "
          f"{gw.stats.served_bytes} bytes, {len(tracker.tail)} syslog lines, step '{tracker.step}'")


def test_remote_accel_comes_from_the_hosts_capabilities(lv: Any, uri: str) -> None:
    from builder.vm.libvirt import choose_remote_accel

    conn = lv.open(LOCAL_URI)
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        offered = True
    except lv.libvirtError:
        offered = False
    finally:
        conn.close()
    accel, why = choose_remote_accel("auto", uri)
    assert accel == ("kvm" if offered else "tcg") and uri in why
    assert choose_remote_accel("tcg", uri)[0] == "tcg"
