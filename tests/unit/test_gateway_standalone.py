"""``python -m builder gateway``: the listen address, the loopback rule, and the gateway served for real on
127.0.0.1 against a local directory standing in for the mirror.

No test here reaches a mirror. The real serve() tests inject ready-made installer inputs (a one-udeb installer
suite) instead of fetching them, because fetch_inputs verifies the real archive's signed InRelease; everything
after that — the ephemeral key, the signed suite, the gateway listening, passing pool files through from the
local upstream, stopping — runs as in production. The non-loopback case is tested with a stand-in Gateway so no
test binds anything but 127.0.0.1.
"""

import functools
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.archive.cache import ContentCache
from builder.config import load_config
from builder.errors import ConfigError
from builder.events import Emitter
from builder.gateway import standalone
from builder.gateway.server import Pin
from builder.gateway.signing import gpgv_verify_detached
from builder.stages.fetch import InstallerInputs

UDEB = b"udeb-bytes" * 100
UDEB_PATH = "debian/pool/main/a/anna/anna_1_amd64.udeb"


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("127.0.0.1", ("127.0.0.1", 0)),
    (":8080", ("127.0.0.1", 8080)),
    ("8080", ("127.0.0.1", 8080)),
    ("localhost:0", ("127.0.0.1", 0)),
    (" 127.0.0.2:65535 ", ("127.0.0.2", 65535)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("192.0.2.7:3142", ("192.0.2.7", 3142)),
])
def test_parse_listen(text, expected):
    assert standalone.parse_listen(text) == expected


@pytest.mark.parametrize("text, why", [
    ("", "empty address"),
    ("127.0.0.1:", "is not a port number"),
    ("127.0.0.1:65536", "is not a port number"),
    ("127.0.0.1:80a", "is not a port number"),
    ("127.0.0.1:²", "is not a port number"),
    ("127.0.0.1:-1", "is not a port number"),
    ("127.1:80", "is not an IPv4 address"),
    ("gateway.example:80", "host names are not resolved"),
    ("[::1]:8080", "IPv4 only"),
    ("::1", "IPv4 only"),
    ("x[/b]:1", "is not an IPv4 address"),
])
def test_parse_listen_rejects(text, why):
    with pytest.raises(ConfigError, match=why.replace("[", r"\[")) as exc:
        standalone.parse_listen(text)
    assert exc.value.exit_code == 2 and "\n" not in exc.value.describe()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10"])
def test_loopback_needs_no_flag(host):
    assert standalone.check_listen((host, 0), allow_remote=False) is False
    assert standalone.check_listen((host, 0), allow_remote=True) is False


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "10.0.2.2"])
def test_other_addresses_need_allow_remote(host):
    with pytest.raises(ConfigError, match="--allow-remote") as exc:
        standalone.check_listen((host, 8080), allow_remote=False)
    assert exc.value.describe() == (f"--listen {host}:8080 is not a loopback address: the gateway has no "
                                    "authentication, pass --allow-remote to serve other hosts")
    assert standalone.check_listen((host, 8080), allow_remote=True) is True


# ---------------------------------------------------------------------------------------------- fixtures


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture()
def upstream(tmp_path):
    root = tmp_path / "mirror"
    (root / "debian/pool/main/a/anna").mkdir(parents=True)
    (root / UDEB_PATH).write_bytes(UDEB)
    (root / "debian/pool/main/c/curl").mkdir(parents=True)
    (root / "debian/pool/main/c/curl/curl_8_amd64.deb").write_bytes(b"deb-bytes" * 50)
    (root / "debian-security/pool/updates/main/o").mkdir(parents=True)
    (root / "debian-security/pool/updates/main/o/openssl_3_amd64.deb").write_bytes(b"sec" * 10)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def image(tmp_path, upstream):
    p = tmp_path / "gw.yaml"
    p.write_text(f"provision: {{enabled: false}}\n"
                 f"debian: {{mirror: '{upstream}/debian', security_mirror: '{upstream}/debian-security'}}\n")
    return p


def fake_inputs():
    """What serve() uses of fetch_inputs' result: the rewritten udeb index and the pins of its udebs."""
    sha = hashlib.sha256(UDEB).hexdigest()
    packages = (f"Package: anna\nVersion: 1\nArchitecture: amd64\nFilename: pool/main/a/anna/anna_1_amd64.udeb\n"
                f"Size: {len(UDEB)}\nSHA256: {sha}\n\n").encode()
    return InstallerInputs(lock=None, kernel=Path("/nonexistent"), initrd=Path("/nonexistent"), isolinux_bin=b"",
                           ldlinux_c32=b"", udeb_packages=packages, udeb_pins={UDEB_PATH: Pin(sha, len(UDEB))},
                           inrelease=b"")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


class Served:
    """serve() in a thread; ``urls`` once ready."""

    def __init__(self, cfg, tmp_path, listen=("127.0.0.1", 0), **kw):
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.events = []
        self.urls = []
        self.result = self.error = None
        cache = ContentCache(tmp_path / "blobs")

        def run():
            try:
                self.result = standalone.serve(cfg, listen, allow_remote=kw.get("allow_remote", False),
                                               emitter=Emitter(self.events.append), ready=self.on_ready,
                                               stop=self.stop, inputs=fake_inputs(), cache=cache)
            except BaseException as exc:  # handed to the test
                self.error = exc
                self.ready.set()

        self.thread = threading.Thread(target=run, daemon=True)

    def on_ready(self, urls):
        self.urls = urls
        self.ready.set()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(60), "gateway not ready"
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


# ---------------------------------------------------------------------------------------------- serve() for real


def test_serve_on_loopback(tmp_path, image):
    cfg = load_config(image)
    with Served(cfg, tmp_path) as s:
        main, security = s.urls
        assert main.startswith("http://127.0.0.1:") and main.endswith("/debian")
        assert security == main + "-security"
        status, release = get(f"{main}/dists/builder-installer/Release")
        assert status == 200 and b"Suite: builder-installer" in release
        _, sig = get(f"{main}/dists/builder-installer/Release.gpg")
        _, pub = get(f"{main}/{standalone.SIGNING_KEY}")
        ring = tmp_path / "ring.gpg"
        ring.write_bytes(pub)
        assert len(gpgv_verify_detached(ring, sig, release)) == 1  # the served key signed the served suite
        assert get(f"{main}/pool/main/a/anna/anna_1_amd64.udeb") == (200, UDEB)  # pinned, checked
        assert get(f"{main}/pool/main/c/curl/curl_8_amd64.deb") == (200, b"deb-bytes" * 50)  # passed through
        assert get(f"{security}/pool/updates/main/o/openssl_3_amd64.deb") == (200, b"sec" * 10)
        assert get(f"{main}/pool/main/n/nope/nope_1_amd64.deb")[0] == 404
        port = int(main.split(":")[2].split("/")[0])
    assert s.error is None and s.result.requests == 7
    assert not [e for e in s.events if e.kind == "warning"]
    with pytest.raises(OSError):  # closed once stopped
        urllib.request.urlopen(f"http://127.0.0.1:{port}/debian/", timeout=2)


def test_serve_on_a_given_port(tmp_path, image):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Served(load_config(image), tmp_path, listen=("127.0.0.1", port)) as s:
        assert s.urls[0] == f"http://127.0.0.1:{port}/debian"
        assert get(f"{s.urls[0]}/dists/builder-installer/Release")[0] == 200


def test_serve_refuses_remote_before_doing_anything(tmp_path, image, monkeypatch):
    monkeypatch.setattr(standalone, "fetch_inputs", lambda *a, **k: pytest.fail("fetched inputs"))
    monkeypatch.setattr(standalone, "EphemeralKey", lambda *a, **k: pytest.fail("made a key"))
    with pytest.raises(ConfigError, match="--allow-remote"):
        standalone.serve(load_config(image), ("0.0.0.0", 0), allow_remote=False, emitter=Emitter())


def test_allow_remote_binds_as_asked_and_warns(tmp_path, image, monkeypatch):
    """With a stand-in Gateway (nothing is bound): the address reaches the gateway and a warning is emitted."""
    made = {}

    class FakeGateway:
        def __init__(self, **kw):
            made.update(kw)
            self.upstreams = kw["upstreams"]
            self.port = 3142
            self.stats = type("S", (), {"requests": 0, "served_bytes": 0, "upstream_bytes": 0})()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            made["closed"] = True

    class FakeKey:
        fingerprint = "F" * 40

        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def detach_sign(self, data):
            return b"sig"

        def clearsign(self, data):
            return b"signed " + data

        def public_key(self):
            return b"pub"

    monkeypatch.setattr(standalone, "Gateway", FakeGateway)
    monkeypatch.setattr(standalone, "EphemeralKey", FakeKey)
    events, urls = [], []
    stop = threading.Event()
    stop.set()
    standalone.serve(load_config(image), ("192.0.2.7", 3142), allow_remote=True, emitter=Emitter(events.append),
                     ready=urls.extend, stop=stop, inputs=fake_inputs(), cache=ContentCache(tmp_path / "blobs"))
    assert (made["bind"], made["port"], made["closed"]) == ("192.0.2.7", 3142, True)
    assert urls == ["http://192.0.2.7:3142/debian", "http://192.0.2.7:3142/debian-security"]
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "192.0.2.7" in warnings[0] and "not a loopback address" in warnings[0]
    assert made["generated"][f"debian/{standalone.SIGNING_KEY}"] == b"pub"


# ---------------------------------------------------------------------------------------------- the verb


def run(*args):
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("listen, why", [
    ("0.0.0.0:8080", "is not a loopback address"),
    ("192.0.2.7:0", "is not a loopback address"),
    ("127.0.0.1:99999", "is not a port number"),
    ("[::1]:8080", "IPv4 only"),
    ("x[/b]", "is not an IPv4 address"),
])
def test_verb_rejects_bad_listen_with_one_line(image, listen, why):
    p = run("gateway", str(image), "--listen", listen)
    assert p.returncode == 2, p.stderr
    lines = plain(p.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --listen {listen.strip()}") and why in lines[0]
    assert p.stdout == ""


VERB = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_gateway_standalone as t
    import builder.cli as cli
    import builder.gateway.standalone as standalone

    standalone.fetch_inputs = lambda *a, **k: t.fake_inputs()  # the only part that would need the mirror
    raise SystemExit(cli.main(["gateway", {image!r}, *sys.argv[1:]]))
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_verb_serves_until_signalled(tmp_path, image, sig, code):
    """The verb as a process (inputs injected as above): URLs on stdout, then a clean stop on the signal."""
    env = dict(os.environ, BUILDER_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.Popen([sys.executable, "-c", VERB.format(tests=str(Path(__file__).parent), image=str(image))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        main = p.stdout.readline().strip()
        security = p.stdout.readline().strip()
        assert main.startswith("http://127.0.0.1:") and main.endswith("/debian"), p.stderr.read()
        assert security == main + "-security"
        assert get(f"{main}/dists/builder-installer/InRelease")[0] == 200
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == code, err
    assert "Traceback" not in err and out == ""
    assert plain(err).rstrip().splitlines()[-1] == ("interrupted" if sig == signal.SIGINT else
                                             "gateway stopped (1 request served, 0 bytes fetched upstream)")
    assert "gateway ready: " + main in err


def test_verb_sigterm_while_still_starting_is_an_interrupt(tmp_path, image):
    """SIGTERM before the gateway listens (here: during a slow fetch) stops like any verb: exit 130."""
    script = VERB.format(tests=str(Path(__file__).parent), image=str(image)).replace(
        "standalone.fetch_inputs = lambda *a, **k: t.fake_inputs()",
        "import time\n"
        "def slow(*a, **k):\n"
        "    print('fetching', flush=True)\n"
        "    time.sleep(30)\n"
        "standalone.fetch_inputs = slow")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, BUILDER_CACHE_DIR=str(tmp_path / "cache")))
    try:
        assert p.stdout.readline() == "fetching\n", p.stderr.read()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert out == ""
    assert p.returncode == 130 and plain(err).rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def plain(text: str) -> str:
    """Output without the ``[HH:MM:SS] LEVEL`` of plain (non-terminal) log lines."""
    return re.sub(r"(?m)^\[\d\d:\d\d:\d\d\] [A-Z]+ +", "", text)
