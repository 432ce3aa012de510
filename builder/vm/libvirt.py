"""The libvirt VM backend: a transient domain (gone when it stops), through libvirt-python.

:func:`domain_xml` is pure (spec → XML). :class:`LibvirtMachine` has the interface of
:class:`~builder.vm.qemu.QemuMachine` and is a context manager that destroys the domain on exit.

- ``<domain type='qemu'>`` for TCG, ``'kvm'`` for KVM.
- User-mode networking with the SSH port forward is passed through ``<qemu:commandline>`` (libvirt 9's
  ``<portForward>`` needs passt). Its PCI device sits at ``bus=pcie.0,addr=0x1e``: without an explicit slot it
  collides with libvirt's first pcie-root-port. libvirt marks such a domain "tainted: custom-argv"; expected.
- The serial log and screendumps are files written by the QEMU that libvirtd runs, i.e. on the libvirt host:
  with a remote URI they are not on this machine.

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
from typing import Any
from urllib.parse import urlparse

from ..errors import VmError
from .logs import tail_lines, wait_for_pattern
from .spec import VmSpec

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_URI = "qemu:///system"


def _is_local(uri: str) -> bool:
    return not urlparse(uri).netloc


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


def domain_xml(spec: VmSpec, *, uri: str = DEFAULT_URI) -> str:
    """The transient domain's XML for ``spec`` (pure). ``uri`` is where it will run: for a local URI the
    emulator is pinned to /usr/bin/qemu-system-x86_64; a remote host picks its own."""
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
    if _is_local(uri):
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
    if spec.serial_log is not None:
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


class LibvirtMachine:
    """A transient libvirt domain for one :class:`VmSpec`; same interface as QemuMachine.

    libvirt reports no exit code: :meth:`wait` and :meth:`shutdown` return 0 when the guest stopped on its
    own or by power-off, -9 when it had to be destroyed.
    """

    def __init__(self, spec: VmSpec, workdir: Path, *, uri: str = DEFAULT_URI) -> None:
        self._libvirt, self._libvirt_qemu = _import_libvirt()
        self.workdir = Path(workdir)
        if spec.serial_log is None:
            spec = replace(spec, serial_log=self.workdir.absolute() / f"{spec.name}.serial.log")
        self.spec = spec
        self.serial_log: Path = spec.serial_log  # type: ignore[assignment]
        self.uri = uri
        self.stop_method: str | None = None
        self.startup_seconds: float | None = None
        self._conn: Any = None
        self._dom: Any = None
        self._rc: int | None = None

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
        xml = domain_xml(self.spec, uri=self.uri)
        (self.workdir / f"{self.name}.domain.xml").write_text(xml)
        t0 = time.monotonic()
        try:
            self._conn = lv.open(self.uri)
        except lv.libvirtError as exc:
            raise VmError(f"cannot connect to libvirt at {self.uri}: {self._error(exc)}",
                          hint="is libvirtd running, and may this user use that URI?") from exc
        log.info("starting libvirt domain %s on %s (%s, %d vCPU, %d MiB)", self.name, self.uri, self.spec.accel,
                 self.spec.cpus, self.spec.memory_mib)
        try:
            self._dom = self._conn.createXML(xml, 0)
        except lv.libvirtError as exc:
            self._conn.close()
            self._conn = None
            raise VmError(f"libvirt could not start VM {self.name}: {self._error(exc)}",
                          log_tail=self.stderr_tail()) from exc
        self.startup_seconds = time.monotonic() - t0
        if self.spec.guest_services and self._spawn_denied():
            self.close()
            raise VmError(
                f"libvirt runs VM {self.name}'s QEMU with -sandbox spawn=deny, so the guest cannot reach builder's "
                "services (QEMU's guestfwd starts a relay per connection)",
                hint="set seccomp_sandbox = 0 in the libvirt host's /etc/libvirt/qemu.conf and restart libvirtd "
                     "(scripts/libvirtd.sh does for a local one), or use vm.backend: qemu")

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
        """PPM of the VGA console, written by QEMU on the libvirt host (so: local URIs only)."""
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._monitor("screendump", {"filename": os.fspath(path)})
        if not path.is_file():
            raise VmError(f"VM {self.name}: screendump wrote nothing to {path} (remote libvirt host?)")
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
        self.kill()
        if self._conn is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> LibvirtMachine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn_denied(self) -> bool:
        """Whether this run's QEMU command line (libvirt's domain log, local hosts only) forbids spawning."""
        log_path = self.domain_log()
        if log_path is None:
            return False
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            return False
        run = text[text.rfind("starting up"):] if "starting up" in text else text
        return "spawn=deny" in run

    def domain_log(self) -> Path | None:
        """libvirt's log of this domain's QEMU (command line and stderr), when it is on this machine."""
        if not _is_local(self.uri):
            return None
        if urlparse(self.uri).path == "/session":
            return Path.home() / ".cache/libvirt/qemu/log" / f"{self.name}.log"
        return Path("/var/log/libvirt/qemu") / f"{self.name}.log"

    def stderr_tail(self, n: int = 20) -> list[str]:
        with contextlib.suppress(OSError):
            return tail_lines(self.domain_log(), n)
        return []

    def serial_tail(self, n: int = 20) -> list[str]:
        return tail_lines(self.serial_log, n)

    def wait_for_serial(self, pattern: str, timeout: float) -> str | None:
        m = wait_for_pattern(self.serial_log, pattern, timeout=timeout, alive=self.is_running)
        return m.group(0) if m else None
