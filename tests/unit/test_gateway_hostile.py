"""The archive gateway against a hostile mirror (tests/unit/hostile_mirror.py) and hostile clients.

Holes closed here: encoded ``..`` passed upstream, garbage in the request line answered with a 500 and a
traceback, truncated upstream bodies cached for good (and keyed without the upstream), unbounded and
never-ending upstream answers.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_mirror import Answer, HostileMirror, hostile_mirror

from builder.archive.cache import ContentCache
from builder.gateway.server import Gateway

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
FAST = {"retries": 1, "backoff": 0.01}


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


# ------------------------------------------------------------------------------------------- 3: truncation

POOL = "/debian/pool/main/t/tool/tool_1_amd64.deb"


@pytest.mark.timeout(30)
def test_truncated_body_is_not_cached_and_a_good_mirror_serves_the_file(tmp_path: Path) -> None:
    good = bytes(range(256)) * 4  # 1024 bytes
    with hostile_mirror() as bad:
        bad.route(POOL, Answer(body=good[:10], length=len(good)))  # announces 1024, sends 10, hangs up
        with gateway(tmp_path, bad.url("/debian")) as gw:
            code, body = status(f"http://127.0.0.1:{gw.port}{POOL}")
            assert code == 502 and b"10 of 1024" in body
        assert bad.hits(POOL) == 2  # retried once (retries=1)
    assert blobs(tmp_path) == []
    assert not list((tmp_path / "gw").rglob("paths/*"))
    with hostile_mirror() as fine:
        fine.route(POOL, Answer(body=good))
        with gateway(tmp_path, fine.url("/debian")) as gw:
            assert status(f"http://127.0.0.1:{gw.port}{POOL}") == (200, good)


@pytest.mark.timeout(30)
def test_path_map_is_keyed_by_upstream(tmp_path: Path) -> None:
    with hostile_mirror() as a, hostile_mirror() as b:
        a.route(POOL, Answer(body=b"what mirror A serves"))
        b.route(POOL, Answer(body=b"what mirror B serves"))
        with gateway(tmp_path, a.url("/debian")) as gw:
            assert status(f"http://127.0.0.1:{gw.port}{POOL}") == (200, b"what mirror A serves")
        with gateway(tmp_path, b.url("/debian")) as gw:
            assert status(f"http://127.0.0.1:{gw.port}{POOL}") == (200, b"what mirror B serves")
        with gateway(tmp_path, a.url("/debian")) as gw:
            assert status(f"http://127.0.0.1:{gw.port}{POOL}") == (200, b"what mirror A serves")
        assert a.hits(POOL) == 1 and b.hits(POOL) == 1  # each mirror's copy is taken from the cache


@pytest.mark.timeout(30)
def test_truncated_chunked_release_is_a_502_not_a_500(
    tmp_path: Path, mirror: HostileMirror, caplog: pytest.LogCaptureFixture
) -> None:
    mirror.route("/debian/dists/x/Release", Answer(body=b"Origin: cut", chunked=True))
    with gateway(tmp_path, mirror.url("/debian")) as gw:
        code, body = status(f"http://127.0.0.1:{gw.port}/debian/dists/x/Release")
    assert code == 502, body
    assert b"short read" in body
    assert not [r for r in caplog.records if r.exc_info]
    assert mirror.hits("/debian/dists/x/Release") == 2


@pytest.mark.timeout(30)
def test_pinned_file_short_or_wrong_is_never_stored(tmp_path: Path, mirror: HostileMirror) -> None:
    from builder.gateway.server import Pin

    data = b"the udeb" * 100
    sha = hashlib.sha256(data).hexdigest()
    path = "pool/main/a/anna/anna_1_amd64.udeb"
    mirror.route("/debian/" + path, Answer(body=data[:50], length=len(data)), Answer(body=b"X" * len(data)),
                 Answer(body=data + b"more"), Answer(body=data))
    with gateway(tmp_path, mirror.url("/debian"), pins={"debian/" + path: Pin(sha, len(data))}, retries=0) as gw:
        u = f"http://127.0.0.1:{gw.port}/debian/{path}"
        assert status(u)[0] == 502  # short
        assert status(u)[0] == 502  # wrong hash
        assert status(u)[0] == 502  # too long
        assert blobs(tmp_path) == []
        assert status(u) == (200, data)
        assert status(u) == (200, data)
    assert mirror.hits("/debian/" + path) == 4


# ------------------------------------------------------------------------------------------- 4: bounds


@pytest.mark.timeout(30)
def test_oversized_index_answer_is_refused_early(tmp_path: Path, mirror: HostileMirror) -> None:
    from builder.archive.http import Limits

    mirror.route("/debian/dists/x/Release", Answer(size=600 << 20))  # 600 MiB announced and sent
    mirror.route("/debian/dists/y/Release", Answer(size=8 << 20, length=-1))  # 8 MiB, no Content-Length
    with gateway(tmp_path, mirror.url("/debian"), limits=Limits(max_index_size=1 << 20)) as gw:
        started = time.monotonic()
        code, body = status(f"http://127.0.0.1:{gw.port}/debian/dists/x/Release")
        assert code == 502 and b"more than" in body and b"/debian/dists/x/Release" in body
        code, body = status(f"http://127.0.0.1:{gw.port}/debian/dists/y/Release")
        assert code == 502 and b"more than" in body
        assert time.monotonic() - started < 10
        assert gw.stats.upstream_bytes <= 2 * (1 << 20) + (2 << 20)  # the caps plus one read each, not 608 MiB


@pytest.mark.timeout(30)
def test_unpinned_pool_file_has_a_cap_too(tmp_path: Path, mirror: HostileMirror) -> None:
    from builder.archive.http import Limits

    mirror.route(POOL, Answer(size=4 << 20))
    with gateway(tmp_path, mirror.url("/debian"), limits=Limits(max_file_size=1 << 20)) as gw:
        code, body = status(f"http://127.0.0.1:{gw.port}{POOL}")
    assert code == 502 and b"more than 1048576 bytes" in body
    assert blobs(tmp_path) == []


@pytest.mark.timeout(30)
def test_dripping_mirror_hits_the_overall_deadline(tmp_path: Path, mirror: HostileMirror) -> None:
    from builder.archive.http import Limits

    mirror.route(POOL, Answer(body=b"x" * 1000, drip=0.05))  # 50 s in total; every single read is quick
    with gateway(tmp_path, mirror.url("/debian"), timeout=5, limits=Limits(min_deadline=0.5)) as gw:
        started = time.monotonic()
        code, body = status(f"http://127.0.0.1:{gw.port}{POOL}")
        took = time.monotonic() - started
    assert code == 502 and b"deadline" in body and POOL.encode() in body
    assert took < 3
    assert mirror.hits(POOL) == 1  # a deadline is not retried
    assert blobs(tmp_path) == []


@pytest.mark.timeout(30)
def test_redirect_to_file_and_4xx_5xx_are_502(tmp_path: Path, mirror: HostileMirror) -> None:
    mirror.route("/debian/pool/r.deb", Answer(302, location="file:///etc/passwd"))
    mirror.route("/debian/pool/f.deb", Answer(403, b"forbidden"))
    mirror.route("/debian/pool/e.deb", Answer(500, b"oops"), Answer(500, b"oops"), Answer(200, b"ok now"))
    with gateway(tmp_path, mirror.url("/debian"), retries=2) as gw:
        u = f"http://127.0.0.1:{gw.port}/debian/pool/"
        code, body = status(u + "r.deb")
        assert code == 502 and b"root:" not in body
        assert status(u + "f.deb")[0] == 502
        assert status(u + "e.deb") == (200, b"ok now")  # 5xx retried
    assert mirror.hits("/debian/pool/f.deb") == 1  # 4xx not retried
