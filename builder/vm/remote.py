"""Remote libvirt hosts: which URIs are remote, how builder reaches them over SSH, and the build VM as the
remote host sees it (pure; docs/remote-libvirt.md tells the whole design).

A remote ``qemu+ssh://[USER@]HOST[:PORT]/system[?keyfile=…&no_verify=1]`` host runs the domain; everything the
domain needs from this machine crosses one SSH connection that builder opens itself (:mod:`builder.vm.tunnel`)
besides libvirt's own, and every file it reads or writes is a storage volume (:mod:`builder.vm.volumes`).
:func:`remote_spec` rewrites a :class:`~builder.vm.spec.VmSpec` into the remote host's terms: volume paths for
the files, the remote ports of the tunnels for the guest services and the port forwards, no serial log file (the
console comes back through a tunnel).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import VmError
from .firmware import Firmware
from .spec import VmSpec

SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
_TRUE = ("1", "yes", "true", "on")


@dataclass(frozen=True)
class RemoteHost:
    """Where a remote libvirt URI points: the SSH login builder uses for its tunnels (the same as libvirt's)."""

    uri: str
    host: str
    port: int | None = None  # None: ~/.ssh/config's Port, else 22
    user: str | None = None
    keyfile: str | None = None
    no_verify: bool = False
    known_hosts: str | None = None
    path: str = "/system"

    @property
    def label(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"{who}{self.host}:{self.port or 22}"

    def domain_log(self, name: str) -> str:
        """libvirt's log of domain ``name``'s QEMU on that host (``~`` for a session URI: the login's home)."""
        if self.path == "/session":
            return f"~/.cache/libvirt/qemu/log/{name}.log"
        return f"/var/log/libvirt/qemu/{name}.log"


def parse_remote_uri(uri: str) -> RemoteHost | None:
    """The remote host of a libvirt URI, or None for a local one (no host part). A remote URI must go over SSH:
    builder's tunnels need an SSH login on that host (VmError otherwise)."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return None
    scheme = parts.scheme
    driver, _, transport = scheme.partition("+")
    if driver != "qemu" or transport not in SSH_TRANSPORTS:
        raise VmError(f"libvirt URI {uri!r}: a remote libvirt host is reached over SSH only (qemu+ssh://)",
                      hint="builder tunnels the guest's services and its SSH through an SSH login on that host: "
                           "use qemu+ssh://USER@HOST/system")
    if parts.hostname is None:
        raise VmError(f"libvirt URI {uri!r} names no host")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    try:
        port = parts.port
    except ValueError as exc:
        raise VmError(f"libvirt URI {uri!r}: {exc}") from None
    return RemoteHost(
        uri=uri, host=parts.hostname, port=port, user=unquote(parts.username) if parts.username else None,
        keyfile=query.get("keyfile") or None, no_verify=query.get("no_verify", "0").lower() in _TRUE,
        known_hosts=query.get("known_hosts") or None, path=parts.path or "/system",
    )


def is_local(uri: str) -> bool:
    return not urlsplit(uri).netloc


def pick_uri(uris: Sequence[str], key: str) -> str:
    """The libvirt URI of a build whose image is called ``key``: one of ``uris`` by a stable hash of the name,
    so an image always lands on the same host (a variant of a ``variants:`` build: :func:`assign_uris`)."""
    if not uris:
        raise VmError("no libvirt URI configured (vm.libvirt_uri)")
    if len(uris) == 1:
        return uris[0]
    digest = hashlib.sha256(key.encode()).digest()
    return uris[int.from_bytes(digest[:8], "big") % len(uris)]


def assign_uris(uris: Sequence[str], own: Mapping[str, Sequence[str] | None]) -> dict[str, str]:
    """The libvirt URI of each variant's provision and verify VMs: a variant with URIs of its own (``own[name]``)
    takes one of them, the others one of ``uris``. Pinned variants (one URI) come first, then the rest in sorted
    name order, each on its candidate with the fewest variants so far (ties: the first in its list): without
    pins, sorted round-robin, so N variants over N hosts never share one. It depends on the configuration
    only (every declared variant counts, not the ones a build selects), so a variant always lands on the
    same host."""
    if not uris:
        raise VmError("no libvirt URI configured (vm.libvirt_uri)")
    load: Counter[str] = Counter()
    out: dict[str, str] = {}
    for name in sorted(own, key=lambda n: (len(own[n] or uris) != 1, n)):
        cands = list(own[name] or uris)
        pick = min(cands, key=lambda u: (load[u], cands.index(u)))
        load[pick] += 1
        out[name] = pick
    return {name: out[name] for name in own}


def public_uri(uri: str) -> str:
    """``uri`` as a manifest may show it: no query (``keyfile=``, ``known_hosts=``, …), no password."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}@{hostport}"
    return f"{parts.scheme}://{netloc}{parts.path}"


_VOL_RE = re.compile(r"[^A-Za-z0-9._-]+")


def volume_name(prefix: str, index: int, local: Path) -> str:
    """The storage volume of the ``index``-th file a machine uploads (a file name in a dir pool)."""
    return f"{prefix}-{index}-{_VOL_RE.sub('_', Path(local).name)}"[:200]


def machine_tag() -> str:
    """A short stable id of this machine (volume names carry it with the PID, for the stale-volume sweep)."""
    for f in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text:
            return hashlib.sha256(text.encode()).hexdigest()[:8]
    return hashlib.sha256(os.uname().nodename.encode()).hexdigest()[:8]


def volume_prefix(name: str, token: str, *, pid: int | None = None, tag: str | None = None) -> str:
    """``builder-<machine>-<pid>-<token>-<vm name>``: what every volume of one machine's run starts with."""
    return f"builder-{tag or machine_tag()}-{pid or os.getpid()}-{token}-{name}"


STALE_RE = re.compile(r"^builder-(?P<tag>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+-")


def stale_volumes(names: Sequence[str], *, tag: str, alive: Mapping[int, bool] | None = None) -> list[str]:
    """The volumes in ``names`` left behind by a builder run of this machine (``tag``) whose process is gone
    (``alive[pid]`` False; looked up with :func:`os.kill` when not given)."""
    from ..run import pid_alive

    stale = []
    for n in names:
        m = STALE_RE.match(n)
        if not m or m.group("tag") != tag:
            continue
        pid = int(m.group("pid"))
        running = alive[pid] if alive is not None and pid in alive else pid_alive(pid)
        if not running and pid != os.getpid():
            stale.append(n)
    return stale


def local_files(spec: VmSpec) -> list[Path]:
    """Every file of this machine that the domain of ``spec`` opens, absolute, each once, in a stable order
    (firmware, kernel, initrd, drives): what a remote host needs as volumes."""
    files: list[Path] = []
    fw = spec.firmware
    if fw.uefi:
        files += [p for p in (fw.code, fw.vars) if p is not None]
    files += [p for p in (spec.kernel, spec.initrd) if p is not None]
    files += [d.path for d in spec.drives]
    return list(dict.fromkeys(Path(p).absolute() for p in files))


def remote_spec(spec: VmSpec, paths: Mapping[Path, str], *, forwards: Mapping[int, int],
                services: Mapping[int, int]) -> VmSpec:
    """``spec`` as the remote host runs it: every file (:func:`local_files`) at its volume path in ``paths``,
    the host ports of the SSH and extra forwards replaced by the remote ports in ``forwards`` (the local port
    → the remote port the tunnel reaches), each guest service's host port by the remote end of its tunnel in
    ``services``, and no serial log file."""

    def at(p: Path) -> Path:
        try:
            return Path(paths[Path(p).absolute()])
        except KeyError:
            raise VmError(f"VM {spec.name}: {p} has no volume on the libvirt host") from None

    fw = spec.firmware
    firmware = Firmware(fw.kind, at(fw.code), at(fw.vars)) if fw.uefi and fw.code and fw.vars else fw
    try:
        return replace(
            spec,
            drives=tuple(replace(d, path=at(d.path)) for d in spec.drives),
            kernel=at(spec.kernel) if spec.kernel is not None else None,
            initrd=at(spec.initrd) if spec.initrd is not None else None,
            firmware=firmware,
            serial_log=None,
            ssh_forward=forwards[spec.ssh_forward] if spec.ssh_forward is not None else None,
            extra_forwards=tuple((forwards[h], g) for h, g in spec.extra_forwards),
            guest_services=tuple(replace(s, host_port=services[s.host_port]) for s in spec.guest_services),
        )
    except KeyError as exc:
        raise VmError(f"VM {spec.name}: port {exc.args[0]} has no tunnel to the libvirt host") from None
