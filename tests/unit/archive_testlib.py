"""Helpers for the hermetic archive tests: a throwaway OpenPGP key, a fake signed Debian archive, a local HTTP server.

Nothing here touches the network: the archive is served from 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import lzma
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "testsuite"


@dataclass
class GpgKey:
    home: Path
    fingerprint: str
    keyring: Path  # exported public key, usable with gpgv --keyring

    def gpg(self, *args: str, input: bytes | None = None) -> bytes:
        argv = ["gpg", "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode", "loopback"]
        argv += ["--passphrase", "", *args]
        return subprocess.run(argv, input=input, check=True, capture_output=True).stdout

    def clearsign(self, text: bytes) -> bytes:
        return self.gpg("--digest-algo", "SHA256", "--clearsign", input=text)


@contextlib.contextmanager
def gpg_key(uid: str) -> Iterator[GpgKey]:
    """A fresh ed25519 signing key in a short temp home (gpg-agent's socket path must stay short)."""
    home = Path(tempfile.mkdtemp(prefix="bgpg"))
    home.chmod(0o700)
    try:
        key = GpgKey(home, "", home / "pub.gpg")
        key.gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
        colons = key.gpg("--with-colons", "--list-keys").decode()
        key.fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
        key.keyring.write_bytes(key.gpg("--export", key.fingerprint))
        yield key
    finally:
        # Stop the gpg-agent this home started (by its home directory, never by process name).
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PACKAGES = b"""Package: hello
Version: 1.0
Architecture: all
Filename: pool/main/h/hello/hello_1.0_all.deb
Size: {size}
SHA256: {sha}
Description: a test package
 with a continuation line

Package: hello
Version: 0.9
Architecture: all
Filename: pool/main/h/hello/hello_0.9_all.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000000

Package: other
Version: 2:1.0-1
Architecture: amd64
Filename: pool/main/o/other/other_1.0-1_amd64.deb
Size: 3
SHA256: 0000000000000000000000000000000000000000000000000000000000000000
"""

UDEB_PACKAGES = b"""Package: anna
Version: 1.90
Architecture: amd64
Filename: pool/main/a/anna/anna_1.90_amd64.udeb
Size: 10
SHA256: 1111111111111111111111111111111111111111111111111111111111111111
"""


@dataclass
class FakeArchive:
    root: Path
    key: GpgKey
    pool_file: str
    pool_data: bytes
    files: dict[str, bytes] = field(default_factory=dict)  # path under dists/<suite>/ -> content

    @property
    def dists(self) -> Path:
        return self.root / "dists" / SUITE

    def write_index(self, path: str, plain: bytes, *, variants: tuple[str, ...] = (".xz", ".gz")) -> None:
        for sfx in variants:
            data = {"": plain, ".xz": lzma.compress(plain), ".gz": gzip.compress(plain, mtime=0)}[sfx]
            self.files[path + sfx] = data

    def publish(self, *, by_hash: bool = True, extra_release: str = "", serve_plain: bool = True) -> None:
        """Write every index (by name and by hash), the Release and its clearsigned InRelease."""
        lines = [
            "Origin: Test",
            "Label: Test",
            "Suite: stable",
            "Version: 1.0",
            f"Codename: {SUITE}",
            "Date: Sat, 21 Nov 2026 09:15:44 UTC",
            f"Acquire-By-Hash: {'yes' if by_hash else 'no'}",
            "Architectures: all amd64",
            "Components: main",
            "Description: fake archive for tests",
        ]
        if extra_release:
            lines.append(extra_release)
        lines.append("MD5Sum:")
        lines += [f" {hashlib.md5(d).hexdigest()} {len(d):8d} {p}" for p, d in sorted(self.files.items())]
        lines.append("SHA256:")
        lines += [f" {sha256(d)} {len(d):8d} {p}" for p, d in sorted(self.files.items())]
        release = ("\n".join(lines) + "\n").encode()
        for path, data in self.files.items():
            target = self.dists / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if serve_plain:
                target.write_bytes(data)
            if by_hash:
                bh = target.parent / "by-hash" / "SHA256" / sha256(data)
                bh.parent.mkdir(parents=True, exist_ok=True)
                bh.write_bytes(data)
        (self.dists / "Release").write_bytes(release)
        (self.dists / "InRelease").write_bytes(self.key.clearsign(release))


def make_archive(root: Path, key: GpgKey) -> FakeArchive:
    pool_data = os.urandom(3 * (1 << 20) + 12345)  # a few chunks
    pool_file = "pool/main/h/hello/hello_1.0_all.deb"
    (root / pool_file).parent.mkdir(parents=True, exist_ok=True)
    (root / pool_file).write_bytes(pool_data)
    arch = FakeArchive(root, key, pool_file, pool_data)
    packages = PACKAGES.replace(b"{size}", str(len(pool_data)).encode()).replace(b"{sha}", sha256(pool_data).encode())
    arch.write_index("main/binary-amd64/Packages", packages)
    arch.write_index("main/debian-installer/binary-amd64/Packages", UDEB_PACKAGES, variants=(".xz",))
    arch.publish()
    return arch


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: ArchiveServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _hook(self) -> bool:
        path = self.path.split("?", 1)[0].lstrip("/").removeprefix("debian/")  # relative to the mirror URL
        self.server.requests.append((self.command, path))
        queue = self.server.fail.get(path)
        if queue:
            code = queue.pop(0)
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        if path in self.server.override:
            body = self.server.override[path]
            self.send_response(200)
            self.send_header("Content-Length", str(self.server.claim_length.get(path, len(body))))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)
            return True
        return False

    def do_GET(self) -> None:
        if not self._hook():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._hook():
            super().do_HEAD()


class ArchiveServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, list[int]] = {}  # path -> HTTP codes to answer before serving normally
        self.override: dict[str, bytes] = {}  # path -> body to serve instead of the file
        self.claim_length: dict[str, int] = {}  # path -> Content-Length to announce (to fake a truncated body)

        def handler(*args: object, **kw: object) -> _Handler:
            return _Handler(*args, directory=str(root), **kw)  # type: ignore[arg-type]

        super().__init__(("127.0.0.1", 0), handler)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/debian"

    def gets(self, suffix: str = "") -> list[str]:
        return [p for m, p in self.requests if m == "GET" and p.endswith(suffix)]


@contextlib.contextmanager
def serve(root: Path) -> Iterator[ArchiveServer]:
    """Serve ``root`` as ``http://127.0.0.1:PORT/debian/`` in a thread."""
    web = root.parent / (root.name + "-www")
    web.mkdir(exist_ok=True)
    link = web / "debian"
    if not link.exists():
        link.symlink_to(root)
    srv = ArchiveServer(web)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
