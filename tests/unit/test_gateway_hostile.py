"""The archive gateway against a hostile mirror (tests/unit/hostile_mirror.py) and hostile clients.

Holes closed here: encoded ``..`` passed upstream, garbage in the request line answered with a 500 and a
traceback, truncated upstream bodies cached for good (and keyed without the upstream), unbounded and
never-ending upstream answers.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_mirror import Answer, HostileMirror, hostile_mirror

from builder.archive.cache import ContentCache
from builder.gateway.server import Gateway

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
FAST: dict[str, object] = {}


@pytest.fixture()
def mirror() -> Iterator[HostileMirror]:
    with hostile_mirror() as m:
        yield m


def gateway(tmp_path: Path, upstream: str, **kw: object) -> Gateway:
    return Gateway(upstreams={"debian": upstream}, cache=ContentCache(tmp_path / "blobs"), keyring=KEYRING,
                   fingerprints=(), state_dir=tmp_path / "gw", **{**FAST, **kw})  # type: ignore[arg-type]


def status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw_status(port: int, request_line: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = s.makefile("rb").readline()
    return int(head.split()[1])


def blobs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "blobs"
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name not in ("locks",)] if root.exists() else []


# ------------------------------------------------------------------------------------------- 2: traversal

TRAVERSALS = [
    "/debian/pool/%2e%2e/%2e%2e/%2e%2e/secret",
    "/debian/pool/%2E%2E/%2E%2E/%2E%2E/secret",
    "/debian/pool/..%2f..%2f..%2fsecret",
    "/debian/pool/main/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret",
    "/debian/dists/%2e%2e/%2e%2e/%2e%2e/secret",
    "/debian/dists/x/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret",
    "/debian/pool/.%2e/.%2e/.%2e/secret",
    "/debian/pool/%2e%2e\\..\\..\\secret",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", TRAVERSALS)
def test_encoded_dot_dot_never_leaves_the_upstream_tree(tmp_path: Path, mirror: HostileMirror, path: str) -> None:
    mirror.route("/secret", Answer(body=b"SECRET outside the mirror tree"))
    with gateway(tmp_path, mirror.url("/debian")) as gw:
        code, body = status(f"http://127.0.0.1:{gw.port}{path}")
    assert code in (400, 404), (code, body)
    assert b"SECRET" not in body
    outside = [r for r in mirror.normalised_requests() if not r.startswith("/debian/")]
    assert outside == [], f"forwarded upstream: {mirror.requests}"
    assert blobs(tmp_path) == []


@pytest.mark.timeout(30)
def test_double_encoding_is_decoded_once_and_stays_inside(tmp_path: Path, mirror: HostileMirror) -> None:
    mirror.route("/secret", Answer(body=b"SECRET"))
    with gateway(tmp_path, mirror.url("/debian")) as gw:
        code, body = status(f"http://127.0.0.1:{gw.port}/debian/pool/%252e%252e/%252e%252e/%252e%252e/secret")
    assert code == 404 and b"SECRET" not in body
    assert mirror.requests == ["/debian/pool/%252e%252e/%252e%252e/%252e%252e/secret"]  # re-encoded, literal


@pytest.mark.timeout(30)
def test_plus_and_tilde_reach_the_mirror_as_a_pool_path(tmp_path: Path, mirror: HostileMirror) -> None:
    mirror.route("/debian/pool/main/g/gcc/g++_1~rc1_amd64.deb", Answer(body=b"deb"))
    with gateway(tmp_path, mirror.url("/debian")) as gw:
        u = f"http://127.0.0.1:{gw.port}/debian/pool/main/g/gcc/"
        assert status(u + "g++_1~rc1_amd64.deb") == (200, b"deb")
        assert status(u + "g%2B%2B_1%7Erc1_amd64.deb") == (200, b"deb")  # same file, from the cache
    assert mirror.hits("/debian/pool/main/g/gcc/g++_1~rc1_amd64.deb") == 1


BAD_LINES = [
    b"GET /debian/pool/\x01x HTTP/1.1",
    b"GET /debian/pool/\x7fx HTTP/1.1",
    b"GET /debian/pool/\xc3\xa9.deb HTTP/1.1",
    b"GET /debian/pool/\xff HTTP/1.1",
    b"GET /debian/pool/%00x HTTP/1.1",
    b"GET /debian/pool/x%0d%0aSet-Cookie:%20a HTTP/1.1",
    b"GET /debian/pool/%c3%a9.deb HTTP/1.1",
    b"GET /debian/pool/%ff.deb HTTP/1.1",
    b"GET /debian/pool/a%20b.deb HTTP/1.1",
    b"HEAD /debian/dists/\x1bx/InRelease HTTP/1.1",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("line", BAD_LINES)
def test_control_and_non_ascii_get_400_without_a_traceback(
    tmp_path: Path, mirror: HostileMirror, line: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with gateway(tmp_path, mirror.url("/debian")) as gw:
        code = raw_status(gw.port, line)
        assert status(f"http://127.0.0.1:{gw.port}/debian/pool/none.deb")[0] == 404  # still serving
    assert code == 400
    assert mirror.requests == ["/debian/pool/none.deb"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert gw.stats.errors == 0
