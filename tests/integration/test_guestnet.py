"""The guest reaches a host service at the fixed address of builder.vm.guestnet (QEMU guestfwd through socat),
on both VM backends: a small real disk (small_disk.py) boots, and from inside it a download from
http://10.0.2.100/ is answered by an HTTP server on the host's 127.0.0.1 with a per-test port."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

from builder.ssh import generate_keypair, run_command, wait_for_ssh
from builder.vm import Drive, VmSpec, find_free_port, guestnet, open_machine

try:
    import small_disk
except ImportError:  # tests/ made a package
    from . import small_disk

pytestmark = [pytest.mark.integration, pytest.mark.vm]
BODY = b"served by the host on a per-test port\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/hello" else 404)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    work = tmp_path_factory.mktemp("guestnet")
    client, host = generate_keypair("c"), generate_keypair("h")
    base, boot = small_disk.make_small_disk(work, "builder", client, host, size="2G")
    return {"work": work, "base": base, "boot": boot, "client": client, "host": host}


@pytest.fixture()
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _libvirt_ready() -> str | None:
    try:
        import libvirt
    except ImportError:
        return "libvirt-python is not installed"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        return f"no libvirtd: {exc}"
    return None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["qemu", pytest.param("libvirt", marks=pytest.mark.libvirt)])
def test_guest_reaches_the_service_at_the_fixed_address(disk, http_server, backend, tmp_path):
    if backend == "libvirt" and (why := _libvirt_ready()):
        (pytest.fail if os.environ.get("BUILDER_TEST_LIBVIRT") == "1" else pytest.skip)(why)
    from builder import image

    overlay = image.overlay(disk["base"], tmp_path / "disk.qcow2")
    port = find_free_port()
    boot = disk["boot"]
    spec = VmSpec(name=f"guestnet-{backend}", memory_mib=1024, cpus=2, accel="tcg", drives=(Drive(overlay),),
                  boot="disk", kernel=boot.kernel, initrd=boot.initrd, append=boot.append,
                  serial_log=tmp_path / "serial.log", ssh_forward=port, no_reboot=False,
                  guest_services=(guestnet.gateway_service(http_server),))
    with open_machine(spec, tmp_path, backend=backend) as vm:  # type: ignore[arg-type]
        client = wait_for_ssh("127.0.0.1", port, "builder", disk["client"], disk["host"].public_openssh,
                              timeout=400, is_alive=vm.is_running)
        try:
            url = f"{guestnet.GATEWAY_URL}/hello"
            rc, out, err = run_command(client, f"python3 -c \"import urllib.request as u; "
                                       f"print(u.urlopen('{url}', timeout=30).read().decode(), end='')\"",
                                       check=False, timeout=120)
            # a second connection: every guest connection gets its own relay
            rc2, out2, _ = run_command(client, f"python3 -c \"import urllib.request as u; "
                                       f"print(len(u.urlopen('{url}', timeout=30).read()))\"", check=False)
        finally:
            client.close()
    assert rc == 0 and out.encode() == BODY, (rc, out, err, Path(tmp_path / "serial.log").read_text()[-1500:])
    assert rc2 == 0 and out2.strip() == str(len(BODY))
