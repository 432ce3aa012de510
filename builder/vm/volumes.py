"""Storage volumes on a remote libvirt host: the files of one build VM, uploaded before it starts and deleted
after it stopped (libvirt streams over libvirt's own connection: ``virStorageVolUpload``/``Download``).

The pool is ``vm.libvirt_pool`` (it must exist and be active), or, with ``vm.libvirt_pool_dir``, a transient
directory pool that builder creates under that remote directory for the one machine and removes with it. Either
way the pool must hold files (a ``dir``, ``fs`` or ``netfs`` pool): the domain opens them as ``<disk
type='file'>``.

Every volume is created as a raw file of the local file's exact size and filled with its bytes, so a qcow2
stays a qcow2 (the domain XML names the format). A qcow2 with a backing file (the provision overlay on the
cached installed disk) goes up with its whole chain: each backing file as a volume of its own, the overlays
above it as copies rebased (``qemu-img rebase -u``) onto the remote paths. What comes back
(:meth:`VolumeStore.download`) is rebased onto the local backing file again.

Volume names are ``builder-<machine>-<pid>-<token>-<vm>-<n>-<file>`` (:func:`~builder.vm.remote.volume_prefix`),
so a later run on the same machine deletes the volumes of a run that was killed before it could (SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import image
from ..errors import VmError
from .remote import machine_tag, stale_volumes, volume_name

log = logging.getLogger(__name__)

CHUNK = 4 << 20
FILE_POOLS = ("dir", "fs", "netfs")


@dataclass(frozen=True)
class Uploaded:
    """One local file as a volume: its name, its path on the libvirt host, and (for a qcow2 overlay) the
    backing file and format it had here, restored after a download."""

    local: Path
    name: str
    path: str
    backing: str | None = None
    backing_format: str | None = None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class VolumeStore:
    """The volumes of one machine in one pool of the libvirt host behind ``conn``."""

    def __init__(self, libvirt: ModuleType, conn: Any, *, prefix: str, pool: str = "default",
                 pool_dir: str | None = None, run: Any = None, workdir: Path, host: str = "") -> None:
        self._lv = libvirt
        self._conn = conn
        self.prefix = prefix
        self.pool_name = pool
        self.pool_dir = pool_dir
        self._run = run  # SshTunnel.run, to remove a transient pool's directory
        self.workdir = workdir
        self.host = host or "the libvirt host"
        self._pool: Any = None
        self._transient_path: str | None = None
        self.created: list[str] = []
        self.files: dict[Path, Uploaded] = {}
        self.bytes_up = self.bytes_down = 0

    def _err(self, exc: Exception) -> str:
        get = getattr(exc, "get_error_message", None)
        return str(get() if get else exc)

    # ------------------------------------------------------------------------------------------ the pool

    def open(self) -> None:
        lv = self._lv
        if self.pool_dir:
            self._sweep_pools()
            name = f"builder-{machine_tag()}-{os.getpid()}-{secrets.token_hex(3)}-pool"
            path = f"{self.pool_dir.rstrip('/')}/{name}"
            root = ET.Element("pool", type="dir")
            ET.SubElement(root, "name").text = name
            ET.SubElement(ET.SubElement(root, "target"), "path").text = path
            try:
                self._pool = self._conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"),
                                                             lv.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            except lv.libvirtError as exc:
                raise VmError(f"cannot create a directory pool at {path} on {self.host}: {self._err(exc)}",
                              hint="vm.libvirt_pool_dir must be a directory libvirtd may write on that host") from exc
            self._transient_path = path
            self.pool_name = name
            return
        try:
            pool = self._conn.storagePoolLookupByName(self.pool_name)
        except lv.libvirtError as exc:
            raise VmError(f"{self.host} has no storage pool {self.pool_name!r}: {self._err(exc)}",
                          hint="create it (virsh pool-define-as NAME dir --target DIR; pool-build; pool-start), "
                               "set vm.libvirt_pool, or let builder make one under vm.libvirt_pool_dir") from exc
        if not pool.isActive():
            raise VmError(f"the storage pool {self.pool_name!r} on {self.host} is not active",
                          hint=f"virsh pool-start {self.pool_name}")
        kind = ET.fromstring(pool.XMLDesc(0)).get("type")
        if kind not in FILE_POOLS:
            raise VmError(f"the storage pool {self.pool_name!r} on {self.host} is a {kind} pool; builder needs one "
                          f"that holds files ({', '.join(FILE_POOLS)})")
        self._pool = pool
        with contextlib.suppress(lv.libvirtError):
            pool.refresh(0)
        self._sweep()

    def _sweep(self) -> None:
        """Delete the volumes of this machine's builder runs that died before they could."""
        try:
            names = list(self._pool.listVolumes())
        except self._lv.libvirtError:
            return
        stale = stale_volumes(names, tag=machine_tag())
        for n in stale:
            with contextlib.suppress(self._lv.libvirtError):
                self._pool.storageVolLookupByName(n).delete(0)
        if stale:
            log.warning("removed %d volume(s) left in pool %s on %s by builder runs that were killed: %s",
                        len(stale), self.pool_name, self.host, ", ".join(stale))

    def _sweep_pools(self) -> None:
        """Remove the transient pools (and their volumes) of this machine's builder runs that were killed."""
        lv = self._lv
        try:
            names = list(self._conn.listStoragePools())
        except lv.libvirtError:
            return
        for n in stale_volumes(names, tag=machine_tag()):
            with contextlib.suppress(lv.libvirtError):
                pool = self._conn.storagePoolLookupByName(n)
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                for vol in pool.listAllVolumes(0):
                    vol.delete(0)
                pool.destroy()
                log.warning("removed the pool %s on %s left by a builder run that was killed", n, self.host)
                if path and self._run is not None:
                    self._run(f"rmdir {shlex.quote(path)}", check=False)

    def volumes(self) -> list[str]:
        """The pool's volume names now (refreshed)."""
        with contextlib.suppress(self._lv.libvirtError):
            self._pool.refresh(0)
        return sorted(self._pool.listVolumes())

    # ------------------------------------------------------------------------------------------ transfers

    def _create(self, name: str, size: int) -> Any:
        xml = (f"<volume><name>{name}</name><capacity unit='bytes'>{max(size, 1)}</capacity>"
               "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>")
        try:
            vol = self._pool.createXML(xml, 0)
        except self._lv.libvirtError as exc:
            raise VmError(f"cannot create volume {name} in pool {self.pool_name} on {self.host}: "
                          f"{self._err(exc)}") from exc
        self.created.append(name)
        return vol

    def _send(self, vol: Any, local: Path, size: int) -> None:
        stream = self._conn.newStream(0)
        vol.upload(stream, 0, size, 0)
        try:
            with local.open("rb") as f:
                while chunk := f.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        n = stream.send(view.tobytes())
                        if n < 0:
                            raise VmError(f"uploading {local} to {self.host}: the stream would block")
                        view = view[n:]
            stream.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise

    def upload_file(self, local: Path, *, backing: Uploaded | None = None) -> Uploaded:
        """``local`` as a new volume (a qcow2 overlay rebased onto the volume ``backing`` first)."""
        local = Path(local).absolute()
        name = volume_name(self.prefix, len(self.created), local)
        source, orig_backing, orig_fmt = local, None, None
        if backing is not None:
            meta = image.info(local)
            orig_backing = meta.get("backing-filename")
            orig_fmt = meta.get("backing-filename-format") or "qcow2"
            source = self.workdir / f".{name}.rebased"
            shutil.copyfile(local, source)
            image.rebase_unsafe(source, backing.path, orig_fmt)
        try:
            size = source.stat().st_size
            t0 = time.monotonic()
            vol = self._create(name, size)
            log.info("uploading %s (%s) to %s:%s", local.name, _mib(size), self.host, self.pool_name)
            self._send(vol, source, size)
            self.bytes_up += size
            log.debug("uploaded %s in %.1f s", name, time.monotonic() - t0)
        finally:
            if source != local:
                source.unlink(missing_ok=True)
        up = Uploaded(local, name, str(vol.path()), orig_backing, orig_fmt)
        self.files[local] = up
        return up

    def upload(self, local: Path, fmt: str = "raw") -> Uploaded:
        """``local`` and, for a qcow2, its backing chain (each file once per machine)."""
        local = Path(local).absolute()
        if local in self.files:
            return self.files[local]
        if not local.is_file():
            raise VmError(f"cannot upload {local} to {self.host}: no such file")
        backing = None
        if fmt == "qcow2":
            meta = image.info(local)
            under = meta.get("full-backing-filename") or meta.get("backing-filename")
            if under:
                backing = self.upload(Path(under), meta.get("backing-filename-format") or "qcow2")
        return self.upload_file(local, backing=backing)

    def download(self, local: Path) -> None:
        """The volume of ``local`` back into ``local`` (written beside it, then renamed over it)."""
        local = Path(local).absolute()
        up = self.files[local]
        vol = self._pool.storageVolLookupByName(up.name)
        part = local.with_name(f".{local.name}.download")
        stream = self._conn.newStream(0)
        t0 = time.monotonic()
        log.info("downloading %s from %s:%s", local.name, self.host, self.pool_name)
        vol.download(stream, 0, 0, 0)
        size = 0
        try:
            with part.open("wb") as f:
                while True:
                    data = stream.recv(CHUNK)
                    if isinstance(data, int):
                        raise VmError(f"downloading {up.name} from {self.host}: the stream would block")
                    if not data:
                        break
                    f.write(data)
                    size += len(data)
            stream.finish()
            if up.backing:
                image.rebase_unsafe(part, Path(up.backing), up.backing_format or "qcow2")
            os.replace(part, local)
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            part.unlink(missing_ok=True)
            raise
        self.bytes_down += size
        log.info("downloaded %s (%s) in %.1f s", local.name, _mib(size), time.monotonic() - t0)

    # ------------------------------------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Delete every volume this store created (and a transient pool); VmError naming what is left."""
        if self._pool is None:
            return
        lv = self._lv
        left: list[str] = []
        for name in reversed(self.created):
            try:
                self._pool.storageVolLookupByName(name).delete(0)
            except lv.libvirtError as exc:
                left.append(f"{name} ({self._err(exc)})")
        if left:  # a volume whose file went away underneath (libvirt's view is stale) is not left over
            with contextlib.suppress(lv.libvirtError):
                present = set(self.volumes())
                left = [s for s in left if s.split(" ", 1)[0] in present]
        self.created.clear()
        self.files.clear()
        if self._transient_path is not None:
            with contextlib.suppress(lv.libvirtError):
                self._pool.destroy()
            if self._run is not None and not left:
                with contextlib.suppress(VmError):
                    self._run(f"rmdir {shlex.quote(self._transient_path)}", check=False)
        self._pool = None
        if left:
            raise VmError(f"could not delete {len(left)} volume(s) on {self.host}: " + "; ".join(left),
                          hint=f"virsh vol-delete --pool {self.pool_name} NAME")
