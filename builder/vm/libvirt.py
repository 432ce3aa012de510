"""The libvirt VM backend: a transient domain (gone when it stops), through libvirt-python.

:func:`domain_xml` is pure (spec → XML). :class:`LibvirtMachine` has the interface of
:class:`~builder.vm.qemu.QemuMachine` and is a context manager that destroys the domain on exit.

- ``<domain type='qemu'>`` for TCG, ``'kvm'`` for KVM.
- User-mode networking with the SSH port forward is passed through ``<qemu:commandline>`` (libvirt 9's
  ``<portForward>`` needs passt). Its PCI device sits at ``bus=pcie.0,addr=0x1e``: without an explicit slot it
  collides with libvirt's first pcie-root-port. libvirt marks such a domain "tainted: custom-argv"; expected.
- Locally, the serial log and screendumps are files written by the QEMU that libvirtd runs.
- A remote ``qemu+ssh://`` host (docs/remote-libvirt.md): the files go up as storage volumes
  (:mod:`~builder.vm.volumes`) and the disks the build needs come back when the domain stopped; the guest's
  services, its serial console, its UDP to the host and its SSH cross builder's own SSH connection
  (:mod:`~builder.vm.tunnel`); screendumps come through libvirt (``virDomainScreenshot``). The domain is
  created with AUTODESTROY: if builder dies, libvirt destroys it when the connection drops.

libvirt-python is an optional dependency (``pip install builder[libvirt]``); it is imported only when a
LibvirtMachine is created. Running it needs a libvirtd (see docs: the daemon can be started by hand, without
systemd).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from ..errors import VmError
from .logs import tail_lines, wait_for_pattern
from .remote import RemoteHost, is_local, local_files, parse_remote_uri, remote_spec, volume_prefix
from .spec import VmSpec

if TYPE_CHECKING:
    from .tunnel import SshTunnel
    from .volumes import VolumeStore

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_URI = "qemu:///system"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def _cpu(spec: VmSpec, root: ET.Element) -> None:
    model = spec.effective_cpu_model
    if model == "host":
        _sub(root, "cpu", mode="host-passthrough", check="none")
    elif model == "max":
        _sub(root, "cpu", mode="maximum", check="none")
    else:
        cpu = _sub(root, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", model, fallback="allow")


def domain_xml(spec: VmSpec, *, uri: str = DEFAULT_URI, serial_port: int | None = None) -> str:
    """The transient domain's XML for ``spec`` (pure). ``uri`` is where it will run: for a local URI the
    emulator is pinned to /usr/bin/qemu-system-x86_64; a remote host picks its own. ``serial_port``: the serial
    console goes to a TCP connection to that port of the libvirt host's 127.0.0.1 (a tunnel back to builder)
    instead of ``spec.serial_log``."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(root, "name", spec.name)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.cpus))
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    fw = spec.firmware
    if fw.uefi:
        assert fw.code is not None and fw.vars is not None
        _sub(os_el, "loader", os.fspath(fw.code), readonly="yes", type="pflash", secure="yes" if fw.secure else "no")
        _sub(os_el, "nvram", os.fspath(fw.vars))
    if spec.kernel is not None:
        _sub(os_el, "kernel", os.fspath(spec.kernel))
        if spec.initrd is not None:
            _sub(os_el, "initrd", os.fspath(spec.initrd))
        if spec.append:
            _sub(os_el, "cmdline", spec.append)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if fw.secure:
        _sub(features, "smm", state="on")
    _cpu(spec, root)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "destroy" if spec.no_reboot else "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    if is_local(uri):
        _sub(devices, "emulator", "/usr/bin/qemu-system-x86_64")
    q35 = spec.machine.startswith("q35")
    order = [i for i, d in enumerate(spec.drives) if d.media == spec.boot]
    order += [i for i, d in enumerate(spec.drives) if d.media != spec.boot]
    n_disk = n_cd = 0
    for i, drive in enumerate(spec.drives):
        cdrom = drive.media == "cdrom"
        disk = _sub(devices, "disk", type="file", device="cdrom" if cdrom else "disk")
        driver = {"name": "qemu", "type": drive.format, "cache": drive.cache}
        if drive.discard and not cdrom and not drive.readonly:
            driver.update(discard="unmap", detect_zeroes="unmap")
        _sub(disk, "driver", **driver)
        _sub(disk, "source", file=os.fspath(drive.path))
        if cdrom:
            dev = ("sd" if q35 else "hd") + chr(ord("a") + n_cd)
            _sub(disk, "target", dev=dev, bus="sata" if q35 else "ide")
            n_cd += 1
        else:
            _sub(disk, "target", dev="vd" + chr(ord("a") + n_disk), bus="virtio")
            n_disk += 1
        if cdrom or drive.readonly:
            _sub(disk, "readonly")
        _sub(disk, "boot", order=str(order.index(i) + 1))
    if serial_port is not None:
        serial = _sub(devices, "serial", type="tcp")
        _sub(serial, "source", mode="connect", host="127.0.0.1", service=str(serial_port))
        _sub(serial, "protocol", type="raw")
    elif spec.serial_log is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=os.fspath(spec.serial_log))
    else:
        serial = _sub(devices, "serial", type="null")
    _sub(serial, "target", port="0")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    video = _sub(devices, "video")  # no <graphics>: libvirt runs QEMU with -display none; VGA for screendump
    _sub(video, "model", type="vga")
    _sub(devices, "memballoon", model="none")

    cmdline = _sub(root, f"{{{QEMU_NS}}}commandline")
    netdev = spec.user_netdev("hn0")
    bus = "pcie.0" if q35 else "pci.0"
    args = ["-netdev", netdev, "-device", f"{spec.nic_model},netdev=hn0,bus={bus},addr=0x1e,romfile="]
    for arg in [*args, *spec.extra_args]:
        _sub(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _import_libvirt() -> tuple[ModuleType, ModuleType]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as exc:
        raise VmError("the libvirt backend needs libvirt-python, which is not installed",
                      hint="pip install builder[libvirt] (builds against the system libvirt: apt-get install "
                           "libvirt-dev pkg-config gcc python3-dev)") from exc
    return libvirt, libvirt_qemu


def choose_remote_accel(requested: str, uri: str) -> tuple[Literal["kvm", "tcg"], str]:
    """``accel: auto|kvm|tcg`` for VMs on the libvirt host at ``uri``: KVM when its libvirt offers ``kvm``
    domains (its domain capabilities; no boot probe there), else TCG (VmError if ``kvm`` was required)."""
    if requested == "tcg":
        return "tcg", "accel: tcg requested"
    lv, _ = _import_libvirt()
    lv.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        raise VmError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from exc
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        return "kvm", f"the libvirt host {uri} offers KVM"
    except lv.libvirtError as exc:
        reason = exc.get_error_message()
    finally:
        conn.close()
    if requested == "kvm":
        raise VmError(f"accel: kvm was requested, but the libvirt host {uri} has no KVM: {reason}",
                      hint="set vm.accel to 'tcg' (slow) or 'auto'")
    return "tcg", f"the libvirt host {uri} has no KVM ({reason}); using TCG (software emulation, much slower)"


class LibvirtMachine:
    """A transient libvirt domain for one :class:`VmSpec`; same interface as QemuMachine.

    libvirt reports no exit code: :meth:`wait` and :meth:`shutdown` return 0 when the guest stopped on its
    own or by power-off, -9 when it had to be destroyed.

    On a remote host (``qemu+ssh://``) :meth:`close` downloads the writable disks (``Drive.keep``) back into
    their local files, unless the machine is left because of an exception (``with`` block), then deletes every
    volume it uploaded, in all cases.
    """

    def __init__(self, spec: VmSpec, workdir: Path, *, uri: str = DEFAULT_URI, pool: str = "default",
                 pool_dir: str | None = None) -> None:
        self._libvirt, self._libvirt_qemu = _import_libvirt()
        self.workdir = Path(workdir)
        if spec.serial_log is None:
            spec = replace(spec, serial_log=self.workdir.absolute() / f"{spec.name}.serial.log")
        self.spec = spec
        self.serial_log: Path = spec.serial_log  # type: ignore[assignment]
        self.uri = uri
        self.remote: RemoteHost | None = parse_remote_uri(uri)
        self.pool = pool
        self.pool_dir = pool_dir
        self.remote_spec: VmSpec | None = None
        self.stop_method: str | None = None
        self.startup_seconds: float | None = None
        self.transfer_seconds: float = 0.0
        self._conn: Any = None
        self._dom: Any = None
        self._rc: int | None = None
        self._tunnel: SshTunnel | None = None
        self._store: VolumeStore | None = None
        self._discard = False

    @property
    def name(self) -> str:
        return self.spec.name

    def _error(self, exc: Exception) -> str:
        get = getattr(exc, "get_error_message", None)
        return str(get() if get else exc)

    def start(self) -> None:
        if self._dom is not None:
            if self.is_running():
                return
            raise VmError(f"VM {self.name} has already run; create a new LibvirtMachine to start it again")
        lv = self._libvirt
        lv.registerErrorHandler(lambda _ctx, _err: None, None)  # else libvirt prints every error to stderr
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self._conn = lv.open(self.uri)
        except lv.libvirtError as exc:
            raise VmError(f"cannot connect to libvirt at {self.uri}: {self._error(exc)}",
                          hint="is libvirtd running, and may this user use that URI?") from exc
        flags = 0
        try:
            if self.remote is not None:
                xml = self._stage_remote(self.remote)
                flags = lv.VIR_DOMAIN_START_AUTODESTROY
                t0 = time.monotonic()
            else:
                xml = domain_xml(self.spec, uri=self.uri)
            (self.workdir / f"{self.name}.domain.xml").write_text(xml)
            log.info("starting libvirt domain %s on %s (%s, %d vCPU, %d MiB)", self.name, self.uri,
                     self.spec.accel, self.spec.cpus, self.spec.memory_mib)
            try:
                self._dom = self._conn.createXML(xml, flags)
            except lv.libvirtError as exc:
                raise VmError(f"libvirt could not start VM {self.name}: {self._error(exc)}",
                              log_tail=self.stderr_tail()) from exc
        except BaseException:
            self._discard = True
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        if self.spec.guest_services and self._spawn_denied():
            self._discard = True
            self.close()
            raise VmError(
                f"libvirt runs VM {self.name}'s QEMU with -sandbox spawn=deny, so the guest cannot reach builder's "
                "services (QEMU's guestfwd starts a relay per connection)",
                hint="set seccomp_sandbox = 0 in the libvirt host's /etc/libvirt/qemu.conf and restart libvirtd "
                     "(scripts/libvirtd.sh does for a local one), or use vm.backend: qemu")

    def _stage_remote(self, host: RemoteHost) -> str:
        """Volumes for every file, tunnels for every port, the serial console back here: the remote XML."""
        import secrets

        from .tunnel import SshTunnel
        from .volumes import VolumeStore

        t0 = time.monotonic()
        spec = self.spec
        self._tunnel = tunnel = SshTunnel(host)
        tunnel.open()
        if spec.guest_services or spec.udp_to_host:
            rc, _, _ = tunnel.run("command -v socat", check=False)
            if rc != 0:
                raise VmError(f"the libvirt host {host.label} has no socat: QEMU's guestfwd there needs it to "
                              "reach builder's services", hint="apt-get install socat on that host")
        self._store = store = VolumeStore(
            self._libvirt, self._conn, prefix=volume_prefix(self.name, secrets.token_hex(3)), pool=self.pool,
            pool_dir=self.pool_dir, run=tunnel.run, workdir=self.workdir, host=host.label)
        store.open()
        formats = {d.path.absolute(): d.format for d in spec.drives}
        paths = {f: store.upload(f, formats.get(f, "raw")).path for f in local_files(spec)}
        local_ports = [h for h, _ in spec.forwards]
        remote_ports = tunnel.free_ports(len(local_ports))  # before the remote forwards (see free_ports)
        services = {s.host_port: tunnel.forward_to_local(s.host_port) for s in spec.guest_services}
        self.serial_log.write_bytes(b"")
        serial_port = tunnel.sink_to_file(self.serial_log)
        for here, there in zip(local_ports, remote_ports, strict=True):
            tunnel.forward_from_local(here, there)
        if spec.udp_to_host:
            if tunnel.same_machine():  # its 127.0.0.1 is ours: the datagrams reach the listener as they are
                log.info("the libvirt host %s is this machine: no UDP relay", host.label)
            else:
                for port in spec.udp_to_host:
                    tunnel.relay_udp(port, port)
        self.remote_spec = remote_spec(spec, paths, forwards=dict(zip(local_ports, remote_ports, strict=True)),
                                       services=services)
        self.transfer_seconds += time.monotonic() - t0
        log.info("VM %s staged on %s in %.1f s (%d volume(s) in pool %s)", self.name, host.label,
                 time.monotonic() - t0, len(store.created), store.pool_name)
        return domain_xml(self.remote_spec, uri=self.uri, serial_port=serial_port)

    def _teardown_remote(self) -> None:
        """Download what the build needs (unless discarded), keep libvirt's log of the domain, delete every
        volume, close the tunnels. Runs once."""
        store, tunnel = self._store, self._tunnel
        self._store = self._tunnel = None
        download = self._dom is not None and not self._discard and store is not None
        t0 = time.monotonic()
        try:
            if download and store is not None:
                for d in self.spec.drives:
                    if d.media == "disk" and not d.readonly and d.keep:
                        store.download(d.path)
        finally:
            try:
                if tunnel is not None and self._dom is not None:
                    self._save_domain_log(tunnel)
                if store is not None:
                    try:
                        store.close()
                    except VmError as exc:
                        if download:
                            raise
                        log.error("%s", exc)
            finally:
                if tunnel is not None:
                    tunnel.close()
                self.transfer_seconds += time.monotonic() - t0

    def _remote_log_text(self, tunnel: SshTunnel | None, size: int = 256 * 1024) -> str | None:
        if tunnel is None or self.remote is None:
            return None
        try:
            rc, out, _ = tunnel.run(f"tail -c {size} {self.remote.domain_log(self.name)}", timeout=20, check=False)
        except VmError:
            return None
        return out if rc == 0 else None

    def _save_domain_log(self, tunnel: SshTunnel) -> None:
        text = self._remote_log_text(tunnel)
        if text is not None:
            (self.workdir / f"{self.name}.qemu.log").write_text(text)

    def is_running(self) -> bool:
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except self._libvirt.libvirtError:  # a transient domain is gone once it stopped
            return False

    def wait(self, timeout: float | None = None) -> int | None:
        if self._dom is None:
            raise VmError(f"VM {self.name} has not been started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running():
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.2)
        if self.stop_method is None:
            self.stop_method = "exited"
            log.info("VM %s stopped", self.name)
        if self._rc is None:
            self._rc = 0
        return self._rc

    def _monitor(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if not self.is_running():
            raise VmError(f"VM {self.name} is not running (QMP {command!r})")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            reply = json.loads(self._libvirt_qemu.qemuMonitorCommand(self._dom, json.dumps(msg), 0))
        except self._libvirt.libvirtError as exc:
            raise VmError(f"QMP command {command!r} through libvirt failed: {self._error(exc)}") from exc
        if "error" in reply:
            raise VmError(f"QMP command {command!r} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def status(self) -> str:
        if self._dom is None:
            raise VmError(f"VM {self.name} has not been started")
        if not self.is_running():
            return "exited"
        return str(self._monitor("query-status")["status"])

    def screendump(self, path: Path) -> Path:
        """The VGA console at ``path``: PPM written by QEMU on a local host; from a remote one whatever
        ``virDomainScreenshot`` sends (PPM, or PNG from newer libvirt)."""
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.remote is not None:
            return self._screenshot(path)
        self._monitor("screendump", {"filename": os.fspath(path)})
        if not path.is_file():
            raise VmError(f"VM {self.name}: screendump wrote nothing to {path}")
        return path

    def _screenshot(self, path: Path) -> Path:
        if not self.is_running():
            raise VmError(f"VM {self.name} is not running (screenshot)")
        stream = self._conn.newStream(0)
        try:
            self._dom.screenshot(stream, 0, 0)
            data = bytearray()
            while chunk := stream.recv(1 << 20):
                if isinstance(chunk, int):
                    raise VmError(f"VM {self.name}: screenshot stream would block")
                data.extend(chunk)
            stream.finish()
        except self._libvirt.libvirtError as exc:
            with contextlib.suppress(Exception):
                stream.abort()
            raise VmError(f"VM {self.name}: screenshot through libvirt failed: {self._error(exc)}") from exc
        path.write_bytes(bytes(data))
        return path

    def powerdown(self) -> None:
        if not self.is_running():
            raise VmError(f"VM {self.name} is not running")
        try:
            self._dom.shutdownFlags(self._libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except self._libvirt.libvirtError as exc:
            raise VmError(f"VM {self.name}: ACPI power-down failed: {self._error(exc)}") from exc

    def shutdown(self, timeout: float = 60) -> int:
        if self._dom is None:
            raise VmError(f"VM {self.name} has not been started")
        if self.is_running():
            self.stop_method = "powerdown"
            with contextlib.suppress(VmError):
                self.powerdown()
            if self.wait(timeout) is None:
                log.warning("VM %s did not power off within %.0f s; destroying it", self.name, timeout)
                self.kill()
        rc = self.wait(0) or 0
        self.close()
        return rc

    def kill(self) -> None:
        if self.is_running():
            self.stop_method = "kill"
            self._rc = -9
            with contextlib.suppress(self._libvirt.libvirtError):
                self._dom.destroy()

    def close(self) -> None:
        """Stop the domain; on a remote host download the kept disks (unless discarded) and delete every
        volume. Idempotent."""
        try:
            self.kill()
            if self._store is not None or self._tunnel is not None:
                self._teardown_remote()
        finally:
            if self._conn is not None:
                with contextlib.suppress(self._libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def __enter__(self) -> LibvirtMachine:
        self.start()
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        if exc_type is not None:
            self._discard = True  # the block failed: what the guest wrote is not wanted
        self.close()

    def _spawn_denied(self) -> bool:
        """Whether this run's QEMU command line (libvirt's domain log) forbids spawning."""
        if self.remote is not None:
            text = self._remote_log_text(self._tunnel, 64 * 1024)
        else:
            log_path = self.domain_log()
            try:
                text = log_path.read_text(errors="replace") if log_path is not None else None
            except OSError:
                text = None
        if text is None:
            return False
        run = text[text.rfind("starting up"):] if "starting up" in text else text
        return "spawn=deny" in run

    def domain_log(self) -> Path | None:
        """libvirt's log of this domain's QEMU (command line and stderr) on this machine: libvirt's own file for
        a local host, the copy fetched when the machine closed for a remote one."""
        if self.remote is not None:
            copy = self.workdir / f"{self.name}.qemu.log"
            return copy if copy.is_file() else None
        if urlparse(self.uri).path == "/session":
            return Path.home() / ".cache/libvirt/qemu/log" / f"{self.name}.log"
        return Path("/var/log/libvirt/qemu") / f"{self.name}.log"

    def stderr_tail(self, n: int = 20) -> list[str]:
        if self.remote is not None and self._tunnel is not None:
            text = self._remote_log_text(self._tunnel, 64 * 1024) or ""
            return [ln for ln in text.splitlines() if ln.strip()][-n:]
        with contextlib.suppress(OSError):
            return tail_lines(self.domain_log(), n)
        return []

    def serial_tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.serial_log, n)

    def wait_for_serial(self, pattern: str, timeout: float) -> str | None:
        m = wait_for_pattern(self.serial_log, pattern, timeout=timeout, alive=self.is_running)
        return m.group(0) if m else None
