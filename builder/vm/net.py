"""Host-side networking helpers for build VMs."""

from __future__ import annotations

import socket


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the kernel picks it).

    There is an unavoidable window between this call and QEMU binding the port; QEMU then fails at start
    with "Could not set up host forwarding rule", which surfaces as a VmError.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
