"""The guest's view of the build host: the one place its addresses are spelled.

Build VMs use QEMU user networking (slirp). From inside the guest:

* ``HOST`` (10.0.2.2) is the build host's loopback; slirp forwards UDP to it as well as TCP. The installer's
  remote syslog goes there (``log_host``/``log_port`` on the installer's kernel command line only, before
  ``---``: nothing of it reaches the installed disk). slirp has no UDP equivalent of ``guestfwd``, so that
  one port stays per build.
* ``GATEWAY`` (10.0.2.100, port 80) is the archive gateway, at the same address in every build: a
  ``guestfwd`` rule connects each guest connection to that address to the gateway's per-build port on the
  host's 127.0.0.1 (through a small relay process per connection, ``socat``). So the mirror written into the
  installed system's apt sources is the same in every build, and a cached installed disk is reused as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST = "10.0.2.2"
GATEWAY_IP = "10.0.2.100"
GATEWAY_PORT = 80
# The guest's view of the gateway as d-i's mirror/http/hostname and apt take it (port 80 needs no ":80").
GATEWAY = GATEWAY_IP if GATEWAY_PORT == 80 else f"{GATEWAY_IP}:{GATEWAY_PORT}"
GATEWAY_URL = f"http://{GATEWAY}"
RELAY_TOOL = "socat"
RELAY_PACKAGE = "socat"


@dataclass(frozen=True)
class GuestService:
    """A host TCP service (on 127.0.0.1:``host_port``) that the guest reaches at ``guest_ip:guest_port``."""

    guest_ip: str
    guest_port: int
    host_port: int

    def relay_command(self, tool: str = RELAY_TOOL) -> str:
        """The command slirp spawns per guest connection, its stdin/stdout being that connection."""
        return f"{tool} STDIO TCP:127.0.0.1:{self.host_port}"

    def netdev_option(self, tool: str = RELAY_TOOL) -> str:
        """The ``-netdev user`` option for this service (QEMU's option syntax: no commas inside)."""
        return f"guestfwd=tcp:{self.guest_ip}:{self.guest_port}-cmd:{self.relay_command(tool)}"


def gateway_service(host_port: int) -> GuestService:
    return GuestService(GATEWAY_IP, GATEWAY_PORT, host_port)
