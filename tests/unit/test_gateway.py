"""The archive gateway against a real local HTTP server standing in for the mirror (a directory served on
127.0.0.1), and real gpgv checking the suite the gateway signs with a real ephemeral key."""

import functools
import hashlib
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.archive.cache import ContentCache
from builder.errors import VerificationError
from builder.gateway import udeb
from builder.gateway.server import Gateway, Pin
from builder.gateway.signing import EphemeralKey, combined_keyring, gpgv_verify_detached

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture()
def upstream(tmp_path):
    root = tmp_path / "mirror"
    (root / "debian/pool/main/a/anna").mkdir(parents=True)
    (root / "debian/pool/main/a/anna/anna_1_amd64.udeb").write_bytes(b"udeb-bytes" * 100)
    (root / "debian/pool/main/c/curl").mkdir(parents=True)
    (root / "debian/pool/main/c/curl/curl_8_amd64.deb").write_bytes(b"deb-bytes" * 50)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def status_of(url):
    try:
        return get(url)[0]
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture()
def key():
    with EphemeralKey("builder test") as k:
        yield k


def test_signed_suite_accepted_by_gpgv_only_with_the_ephemeral_key(tmp_path, key, upstream):
    _, base = upstream
    files = udeb.suite_files(b"Package: anna\nVersion: 1\n", suite="builder-installer", codename="builder-installer")
    generated = {f"debian/dists/builder-installer/{k}": v for k, v in files.items()}
    generated["debian/dists/builder-installer/Release.gpg"] = key.detach_sign(files["Release"])
    cache = ContentCache(tmp_path / "blobs")
    with Gateway(upstreams={"debian": base + "/debian"}, cache=cache, keyring=DEBIAN_KEYRING, fingerprints=(),
                 generated=generated, state_dir=tmp_path / "gw") as gw:
        u = f"http://127.0.0.1:{gw.port}/debian/dists/builder-installer"
        _, release = get(u + "/Release")
        _, sig = get(u + "/Release.gpg")
        _, pk = get(u + "/main/debian-installer/binary-amd64/Packages.xz")
    assert release == files["Release"]
    assert hashlib.sha256(pk).hexdigest() in release.decode()
    ring = tmp_path / "archive.gpg"
    ring.write_bytes(combined_keyring(DEBIAN_KEYRING, key.public_key()))
    assert gpgv_verify_detached(ring, sig, release) == [key.fingerprint]
    with pytest.raises(VerificationError):
        gpgv_verify_detached(DEBIAN_KEYRING, sig, release)  # Debian's keyring alone: rejected
    with pytest.raises(VerificationError):
        gpgv_verify_detached(ring, sig, release.replace(b"builder-installer", b"evil-installer1"))


def test_pinned_pool_file_cached_and_checked(tmp_path, upstream):
    root, base = upstream
    data = (root / "debian/pool/main/a/anna/anna_1_amd64.udeb").read_bytes()
    pins = {"debian/pool/main/a/anna/anna_1_amd64.udeb": Pin(hashlib.sha256(data).hexdigest(), len(data)),
            "debian/pool/main/c/curl/curl_8_amd64.deb": Pin("0" * 64, 450)}
    cache = ContentCache(tmp_path / "blobs")
    with Gateway(upstreams={"debian": base + "/debian"}, cache=cache, keyring=DEBIAN_KEYRING, fingerprints=(),
                 pins=pins, state_dir=tmp_path / "gw") as gw:
        u = f"http://127.0.0.1:{gw.port}/debian/"
        assert get(u + "pool/main/a/anna/anna_1_amd64.udeb") == (200, data)
        (root / "debian/pool/main/a/anna/anna_1_amd64.udeb").unlink()  # upstream gone: served from the cache
        assert get(u + "pool/main/a/anna/anna_1_amd64.udeb") == (200, data)
        assert gw.stats.cache_hits >= 1
        assert status_of(u + "pool/main/c/curl/curl_8_amd64.deb") == 502  # pin mismatch: never served
        assert status_of(u + "pool/main/x/none.deb") == 404
        assert status_of(u + "../etc/passwd") == 404
        assert status_of(f"http://127.0.0.1:{gw.port}/other/x") == 404


def test_unpinned_pool_file_passed_through_and_cached(tmp_path, upstream):
    root, base = upstream
    cache = ContentCache(tmp_path / "blobs")
    data = (root / "debian/pool/main/c/curl/curl_8_amd64.deb").read_bytes()
    with Gateway(upstreams={"debian": base + "/debian"}, cache=cache, keyring=DEBIAN_KEYRING, fingerprints=(),
                 state_dir=tmp_path / "gw") as gw:
        u = f"http://127.0.0.1:{gw.port}/debian/pool/main/c/curl/curl_8_amd64.deb"
        assert get(u) == (200, data)
        before = gw.stats.upstream_requests
        assert get(u) == (200, data)
        assert gw.stats.upstream_requests == before  # second time from the cache
    assert cache.get(hashlib.sha256(data).hexdigest()) is not None


def test_offline_serves_saved_release_files(tmp_path, upstream):
    root, base = upstream
    (root / "debian/dists/x").mkdir(parents=True)
    (root / "debian/dists/x/Release").write_bytes(b"Origin: test\n")
    cache = ContentCache(tmp_path / "blobs")
    kw = dict(cache=cache, keyring=DEBIAN_KEYRING, fingerprints=(), state_dir=tmp_path / "gw", backoff=0.01)
    with Gateway(upstreams={"debian": base + "/debian"}, **kw) as gw:
        assert get(f"http://127.0.0.1:{gw.port}/debian/dists/x/Release") == (200, b"Origin: test\n")
    with Gateway(upstreams={"debian": "http://127.0.0.1:9/debian"}, **kw) as gw:  # upstream unreachable
        assert get(f"http://127.0.0.1:{gw.port}/debian/dists/x/Release") == (200, b"Origin: test\n")
        assert status_of(f"http://127.0.0.1:{gw.port}/debian/pool/main/q/q.deb") == 502
