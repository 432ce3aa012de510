"""Read Debian binary packages (.deb/.udeb) with the standard library only.

A .deb is an ``ar`` archive with ``debian-binary``, ``control.tar.*`` and ``data.tar.*`` members (xz, gz,
bz2 or uncompressed; zstd is not used by Debian and is not supported). Given a path, members are streamed from
the file, so a 150 MB package is never held in memory; only the requested data members are.

Member names are accepted with or without a leading ``./``. A malformed archive raises VerificationError;
asking for a member the package does not have raises :class:`MissingMemberError` (a BuilderError and a
KeyError).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Union

from ..errors import BuilderError, VerificationError
from .release import iter_fields

_AR_MAGIC = b"!<arch>\n"
_HDR = 60
DebSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


class MissingMemberError(BuilderError, KeyError):
    """A requested file is not in the package."""


# ------------------------------------------------------------------------------------------------ ar


def _ar_index(f: BinaryIO, total: int, what: str) -> dict[str, tuple[int, int]]:
    """Member name -> (offset, size) by walking the ar headers of ``f`` (``total`` bytes long)."""
    f.seek(0)
    if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise VerificationError(f"{what}: not an ar archive (bad magic); not a .deb?")
    off = len(_AR_MAGIC)
    out: dict[str, tuple[int, int]] = {}
    while off < total:
        if total - off == 1:  # trailing padding byte
            break
        f.seek(off)
        hdr = f.read(_HDR)
        if len(hdr) < _HDR or hdr[58:60] != b"`\n":
            raise VerificationError(f"{what}: truncated or corrupt ar header at offset {off}")
        try:
            name = hdr[:16].decode("ascii").strip().rstrip("/")
            size = int(hdr[48:58].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise VerificationError(f"{what}: corrupt ar header at offset {off}") from exc
        start = off + _HDR
        if size < 0 or start + size > total:
            raise VerificationError(f"{what}: ar member {name!r} runs past the end of the file (truncated download?)")
        out[name] = (start, size)
        off = start + size + (size & 1)
    return out


def ar_members(blob: bytes) -> dict[str, bytes]:
    """All members of an ar archive held in memory, by name."""
    mv = memoryview(blob)
    index = _ar_index(io.BytesIO(mv), len(mv), "ar archive")
    return {name: bytes(mv[start : start + size]) for name, (start, size) in index.items()}


class _Slice(io.RawIOBase):
    """A read-only window [start, start+size) of a seekable binary file."""

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _Deb:
    """An opened .deb (from bytes or a path) with its ar index."""

    def __init__(self, src: DebSource) -> None:
        if isinstance(src, (bytes, bytearray, memoryview)):
            self.what = ".deb (in memory)"
            self._f: BinaryIO = io.BytesIO(src)
            total = len(src)
        else:
            self.what = os.fspath(src)
            try:
                self._f = open(src, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise VerificationError(f"cannot open package {self.what}: {exc.strerror}") from exc
            total = os.fstat(self._f.fileno()).st_size
        self.index = _ar_index(self._f, total, self.what)
        if "debian-binary" not in self.index:
            self.close()
            raise VerificationError(f"{self.what}: no debian-binary member; not a Debian package")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Deb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tar(self, prefix: str) -> tarfile.TarFile:
        names = [n for n in self.index if n == prefix or n.startswith(prefix + ".")]
        if not names:
            raise VerificationError(f"{self.what}: no {prefix}.* member (members: {', '.join(self.index)})")
        name = names[0]
        if name.endswith(".zst"):
            raise VerificationError(f"{self.what}: {name} is zstd-compressed, which is not supported")
        start, size = self.index[name]
        raw = io.BufferedReader(_Slice(self._f, start, size), buffer_size=1 << 20)
        try:
            return tarfile.open(fileobj=raw, mode="r|*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise VerificationError(f"{self.what}: {name} is not a readable tar archive: {exc}") from exc


def _norm(name: str) -> str:
    name = name.strip()
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _walk(deb: _Deb, prefix: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    tf = deb.tar(prefix)
    try:
        for info in tf:
            yield info, tf
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # lzma/zlib errors are OSError subclasses
        raise VerificationError(f"{deb.what}: corrupt {prefix} archive: {exc}") from exc
    finally:
        tf.close()


def _link_target(info: tarfile.TarInfo) -> str:
    if info.islnk():
        return _norm(info.linkname)
    base = os.path.dirname(_norm(info.name))
    return _norm(os.path.normpath(os.path.join(base, info.linkname)))


# ------------------------------------------------------------------------------------------------ API


def deb_control(path_or_bytes: DebSource) -> dict[str, str]:
    """The control fields of a .deb/.udeb (Package, Version, Architecture, …)."""
    with _Deb(path_or_bytes) as deb:
        for info, tf in _walk(deb, "control.tar"):
            if _norm(info.name) == "control" and info.isfile():
                fobj = tf.extractfile(info)
                assert fobj is not None
                text = fobj.read().decode("utf-8", "replace")
                return dict(iter_fields(text))
    raise VerificationError(f"{deb.what}: control.tar has no control file")


def deb_list(path_or_bytes: DebSource) -> list[str]:
    """Names of every entry of data.tar (without leading './'; directories end with '/')."""
    out = []
    with _Deb(path_or_bytes) as deb:
        for info, _tf in _walk(deb, "data.tar"):
            name = _norm(info.name)
            if not name or name == ".":
                continue
            out.append(name + "/" if info.isdir() and not name.endswith("/") else name)
    return out


def deb_extract(path_or_bytes: DebSource, members: Iterable[str]) -> dict[str, bytes]:
    """Contents of the named files of data.tar, keyed by the names as given. Links inside the package are followed."""
    wanted = {_norm(m): m for m in members}
    found: dict[str, bytes] = {}
    pending = dict(wanted)  # normalized name to look for -> caller's name
    with _Deb(path_or_bytes) as deb:
        for _round in range(8):  # each pass follows one more level of links (targets may come earlier)
            links: dict[str, str] = {}
            for info, tf in _walk(deb, "data.tar"):
                name = _norm(info.name)
                if name not in pending:
                    continue
                if info.isfile():
                    fobj = tf.extractfile(info)
                    assert fobj is not None
                    found[pending[name]] = fobj.read()
                elif info.issym() or info.islnk():
                    links[_link_target(info)] = pending[name]
                else:
                    raise MissingMemberError(f"{deb.what}: {pending[name]!r} is not a regular file in the package")
            pending = {t: c for t, c in links.items() if c not in found}
            if not pending:
                break
        else:
            raise MissingMemberError(f"{deb.what}: too many levels of links for {sorted(pending.values())}")
    missing = sorted(repr(c) for c in wanted.values() if c not in found)
    if missing:
        raise MissingMemberError(f"{deb.what}: no such file in the package: {', '.join(missing)}")
    return found


def deb_member_names(path_or_bytes: DebSource) -> list[str]:
    """Names of the ar members (debian-binary, control.tar.xz, data.tar.xz)."""
    with _Deb(path_or_bytes) as deb:
        return list(deb.index)


__all__ = [
    "MissingMemberError",
    "ar_members",
    "deb_control",
    "deb_extract",
    "deb_list",
    "deb_member_names",
]
