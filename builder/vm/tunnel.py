"""One SSH connection to a remote libvirt host and the tunnels a build VM needs through it (paramiko).

The domain runs on the remote host, so everything its QEMU reaches on "the host" is that host's loopback:

* **guest services** (the archive gateway): QEMU's ``guestfwd`` relay connects to the remote 127.0.0.1:R;
  :meth:`SshTunnel.forward_to_local` asks the remote sshd to listen there (``tcpip-forward``, the port picked by
  sshd) and carries each connection to this machine's 127.0.0.1:PORT.
* **the serial console**: a ``<serial type='tcp'>`` chardev connects to such a remote port too;
  :meth:`SshTunnel.sink_to_file` appends what arrives to the local serial log file.
* **UDP to the host** (the installer's syslog to 10.0.2.2:PORT): SSH carries no UDP, so
  :meth:`SshTunnel.relay_udp` runs ``socat -u UDP-RECV:PORT,bind=127.0.0.1 STDOUT`` on the remote host through
  this connection and sends each line that comes back as a datagram to 127.0.0.1:PORT here.
* **the guest's SSH** (QEMU's ``hostfwd`` on the remote 127.0.0.1:R): :meth:`SshTunnel.forward_from_local`
  listens on this machine's 127.0.0.1:PORT and opens a ``direct-tcpip`` channel to the remote port per
  connection, so paramiko and Ansible connect to 127.0.0.1:PORT as with a local VM.

Authentication is libvirt's own: the URI's user, host, port and ``keyfile=``, ``~/.ssh/config``, the agent and
the default keys; the host key is checked against ``~/.ssh/known_hosts`` (and ``known_hosts=``) unless the URI
says ``no_verify=1``.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shlex
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from ..errors import VmError
from .remote import RemoteHost

log = logging.getLogger(__name__)

BUF = 64 * 1024
RELAY_READY = "starting data transfer loop"


def _close(*things: Any) -> None:
    for t in things:
        with contextlib.suppress(Exception):
            t.close()


class SshTunnel:
    """The SSH connection to ``host`` and every tunnel opened through it; :meth:`close` ends them all."""

    def __init__(self, host: RemoteHost, *, timeout: float = 20.0) -> None:
        self.host = host
        self.timeout = timeout
        self._client: paramiko.SSHClient | None = None
        self._targets: dict[int, Callable[[paramiko.Channel], None]] = {}
        self._listeners: list[socket.socket] = []
        self._acceptors: list[threading.Thread] = []
        self._relays: list[tuple[paramiko.Channel, int]] = []
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------ connection

    def __enter__(self) -> SshTunnel:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _login(self) -> dict[str, Any]:
        """connect() arguments: the URI first, then ~/.ssh/config for what it leaves open."""
        h = self.host
        cfg: dict[str, Any] = {}
        conf = Path.home() / ".ssh" / "config"
        if conf.is_file():
            with contextlib.suppress(Exception):
                cfg = dict(paramiko.SSHConfig.from_path(os.fspath(conf)).lookup(h.host))
        keys = [h.keyfile] if h.keyfile else []
        keys += [os.path.expanduser(k) for k in cfg.get("identityfile", [])]
        return {
            "hostname": cfg.get("hostname", h.host), "port": h.port or int(cfg.get("port", 22)),
            "username": h.user or cfg.get("user") or getpass.getuser(),
            "key_filename": [k for k in keys if os.path.exists(k)] or None,
            "allow_agent": True, "look_for_keys": True, "timeout": self.timeout,
            "banner_timeout": self.timeout, "auth_timeout": self.timeout,
        }

    def open(self) -> None:
        if self._client is not None:
            return
        h = self.host
        client = paramiko.SSHClient()
        if h.no_verify:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # in memory: nothing is written
        else:
            client.load_system_host_keys()
            if h.known_hosts:
                with contextlib.suppress(OSError):
                    client.get_host_keys().load(os.path.expanduser(h.known_hosts))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        args = self._login()
        where = f"{args['username']}@{args['hostname']}:{args['port']}"
        try:
            client.connect(**args)
        except paramiko.AuthenticationException as exc:
            client.close()
            raise VmError(f"cannot log in to the libvirt host {where} over SSH: {exc}",
                          hint="the same login libvirt's qemu+ssh uses: keyfile=PATH in the URI, the SSH agent, "
                               "or ~/.ssh/config") from exc
        except paramiko.SSHException as exc:
            client.close()
            hint = ("its host key is not in ~/.ssh/known_hosts: ssh to it once, or add no_verify=1 to the URI"
                    if "known_hosts" in str(exc) or "not found" in str(exc) else None)
            raise VmError(f"SSH to the libvirt host {where} failed: {exc}", hint=hint) from exc
        except OSError as exc:
            client.close()
            raise VmError(f"cannot reach the libvirt host {where} over SSH: {exc}") from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(30)
        self._client = client
        log.debug("SSH tunnel to %s open", where)

    @property
    def transport(self) -> paramiko.Transport:
        if self._client is None or (t := self._client.get_transport()) is None or not t.is_active():
            raise VmError(f"the SSH connection to the libvirt host {self.host.label} is closed")
        return t

    def run(self, command: str, *, timeout: float = 60, check: bool = True) -> tuple[int, str, str]:
        """``command`` on the remote host (its login shell): exit code, stdout, stderr."""
        chan = self.transport.open_session(timeout=self.timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            out, err = chan.makefile("rb").read(), chan.makefile_stderr("rb").read()
            rc = chan.recv_exit_status()
        except TimeoutError as exc:
            raise VmError(f"{command!r} on the libvirt host {self.host.label} timed out after {timeout:.0f} s") \
                from exc
        finally:
            chan.close()
        text, etext = out.decode(errors="replace"), err.decode(errors="replace")
        if check and rc != 0:
            raise VmError(f"{command!r} on the libvirt host {self.host.label} exited {rc}",
                          log_tail=etext.strip().splitlines()[-5:])
        return rc, text, etext

    def same_machine(self) -> bool:
        """Whether the remote host is this machine, in this network namespace (same boot id, same net
        namespace), so its loopback is ours: a test over qemu+ssh://127.0.0.1."""
        rc, out, _ = self.run("cat /proc/sys/kernel/random/boot_id; readlink /proc/self/ns/net", check=False)
        try:
            here = [Path("/proc/sys/kernel/random/boot_id").read_text().strip(), os.readlink("/proc/self/ns/net")]
        except OSError:
            return False
        return rc == 0 and out.split() == here

    def free_ports(self, n: int) -> list[int]:
        """``n`` TCP ports free on the remote host's 127.0.0.1 right now (sshd picks them; as racy as
        :func:`~builder.vm.net.find_free_port`). Before any :meth:`forward_to_local`: cancelling a forward
        unsets paramiko's single forward handler."""
        if self._targets:
            raise RuntimeError("free_ports() must come before the remote forwards")
        t = self.transport
        ports = [t.request_port_forward("127.0.0.1", 0) for _ in range(n)]
        for p in ports:
            t.cancel_port_forward("127.0.0.1", p)
        return ports

    def close(self) -> None:
        self._stop.set()
        for chan, pid in self._relays:
            with contextlib.suppress(Exception):
                self.run(f"kill {pid}", timeout=10, check=False)
            _close(chan)
        self._relays.clear()
        _close(*self._listeners)
        for th in self._acceptors:  # a listener is gone once its accept loop has left poll()
            th.join(2)
        self._listeners.clear()
        self._acceptors.clear()
        with self._lock:
            _close(*self._open)
            self._open.clear()
        for port in list(self._targets):  # sshd closes each listener before it answers
            with contextlib.suppress(Exception):
                self.transport.cancel_port_forward("127.0.0.1", port)
        self._targets.clear()
        if self._client is not None:
            _close(self._client)
            self._client = None

    # ------------------------------------------------------------------------------------------ tunnels

    def _track(self, *things: Any) -> None:
        with self._lock:
            self._open.update(things)

    def _untrack(self, *things: Any) -> None:
        with self._lock:
            self._open.difference_update(things)
        _close(*things)

    def _splice(self, sock: socket.socket, chan: paramiko.Channel) -> None:
        """Copy both ways between a local socket and a channel until both sides are done."""
        self._track(sock, chan)

        def up() -> None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                while data := sock.recv(BUF):
                    chan.sendall(data)
            with contextlib.suppress(Exception):
                chan.shutdown_write()

        t = threading.Thread(target=up, name="tunnel-up", daemon=True)
        t.start()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while data := chan.recv(BUF):
                sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        t.join()
        self._untrack(sock, chan)

    def _on_forwarded(self, chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]) -> None:
        target = self._targets.get(int(server[1]))
        if target is None or self._stop.is_set():
            _close(chan)
            return
        threading.Thread(target=target, args=(chan,), name=f"tunnel-{server[1]}", daemon=True).start()

    def _listen_remote(self, target: Callable[[paramiko.Channel], None]) -> int:
        try:
            port = self.transport.request_port_forward("127.0.0.1", 0, handler=self._on_forwarded)
        except paramiko.SSHException as exc:
            raise VmError(f"the libvirt host {self.host.label} refused a port forward: {exc}",
                          hint="its sshd needs AllowTcpForwarding yes (the default)") from exc
        self._targets[int(port)] = target
        return int(port)

    def forward_to_local(self, local_port: int) -> int:
        """Remote 127.0.0.1:R → local 127.0.0.1:``local_port`` (a TCP service of builder); returns R."""

        def to_local(chan: paramiko.Channel) -> None:
            try:
                sock = socket.create_connection(("127.0.0.1", local_port), timeout=10)
            except OSError as exc:
                log.debug("tunnel to local port %d: %s", local_port, exc)
                _close(chan)
                return
            sock.settimeout(None)
            self._splice(sock, chan)

        return self._listen_remote(to_local)

    def sink_to_file(self, path: Path) -> int:
        """Remote 127.0.0.1:R → appended to the local ``path`` (a serial console); returns R."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

        def sink(chan: paramiko.Channel) -> None:
            self._track(chan)
            with path.open("ab") as f, contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                while data := chan.recv(BUF):
                    f.write(data)
                    f.flush()
            self._untrack(chan)

        return self._listen_remote(sink)

    def forward_from_local(self, local_port: int, remote_port: int) -> None:
        """Local 127.0.0.1:``local_port`` → remote 127.0.0.1:``remote_port`` (the guest's SSH via hostfwd)."""
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(("127.0.0.1", local_port))
        except OSError as exc:
            srv.close()
            raise VmError(f"cannot listen on 127.0.0.1:{local_port} for the tunnel to the guest: {exc}") from exc
        srv.listen(16)
        srv.settimeout(0.2)
        self._listeners.append(srv)

        def serve(conn: socket.socket, peer: tuple[str, int]) -> None:
            try:
                chan = self.transport.open_channel("direct-tcpip", ("127.0.0.1", remote_port), peer,
                                                   timeout=self.timeout)
            except (VmError, paramiko.SSHException, OSError, EOFError) as exc:
                log.debug("tunnel to remote port %d: %s", remote_port, exc)  # QEMU not listening (yet)
                _close(conn)
                return
            conn.settimeout(None)
            self._splice(conn, chan)

        def accept() -> None:
            while not self._stop.is_set():
                try:
                    conn, peer = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=serve, args=(conn, peer), name=f"tunnel-{local_port}", daemon=True).start()

        th = threading.Thread(target=accept, name=f"tunnel-listen-{local_port}", daemon=True)
        th.start()
        self._acceptors.append(th)

    def relay_udp(self, remote_port: int, local_port: int, *, timeout: float = 15.0) -> None:
        """Datagrams to the remote 127.0.0.1:``remote_port`` → lines over SSH → datagrams to the local
        127.0.0.1:``local_port``. Newline-framed (busybox syslogd ends each message with one), so it is for
        line-based protocols such as syslog. Needs ``socat`` on the remote host (as QEMU's guestfwd does)."""
        cmd = f"echo $$; exec socat -d -d -u UDP-RECV:{remote_port},bind=127.0.0.1 STDOUT"
        chan = self.transport.open_session(timeout=self.timeout)
        chan.exec_command(f"sh -c {shlex.quote(cmd)}")
        out, err = chan.makefile("rb"), chan.makefile_stderr("rb")
        settled = threading.Event()
        started: list[bool] = []
        problems: list[str] = []

        def watch() -> None:
            for raw in err:
                line = raw.decode(errors="replace").strip()
                if RELAY_READY in line:
                    started.append(True)
                    settled.set()
                elif "received packet" not in line:
                    problems.append(line)
                    log.debug("UDP relay %d: %s", remote_port, line)
            settled.set()  # socat ended (or never ran)

        threading.Thread(target=watch, name=f"udp-relay-err-{remote_port}", daemon=True).start()
        first = out.readline().strip()
        settled.wait(timeout)
        if not first.isdigit() or not started:
            _close(chan)
            raise VmError(f"the UDP relay on the libvirt host {self.host.label} (127.0.0.1:{remote_port}) did not "
                          "start", log_tail=[first.decode(errors="replace"), *problems][-6:],
                          hint="the host needs socat, and that port free on its loopback")
        self._relays.append((chan, int(first)))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._track(sender)

        def pump() -> None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException, ValueError):
                for line in out:
                    sender.sendto(line, ("127.0.0.1", local_port))
            self._untrack(sender)

        threading.Thread(target=pump, name=f"udp-relay-{remote_port}", daemon=True).start()
