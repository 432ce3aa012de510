"""newc cpio archives, and appending files to an installer initrd.

The Linux kernel unpacks every archive it finds in the initrd, one after the other (plain or compressed,
with NUL padding in between), and later entries overwrite earlier ones. So adding files to debian-installer's
``initrd.gz`` needs no unpacking: ``initrd + gzip(cpio(new files))`` is a valid initrd whose root also holds
the new files (``/preseed.cfg``, the installer keyring, …).

Only the "new ASCII" format (``070701``) is written, with the checksum variant (``070702``) also read.
Everything here is pure (bytes in, bytes out); :func:`read_cpio` exists for tests and for reading files
out of a netboot initrd.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..errors import MediaError

NEWC_MAGIC = b"070701"
CRC_MAGIC = b"070702"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110
BLOCK = 512

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
INITRD_MAGICS = (GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC, NEWC_MAGIC, CRC_MAGIC, b"\x02\x21\x4c\x18", b"BZh", b"\x89LZO")


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` is the full ``st_mode`` (file type and permission bits)."""

    name: str
    data: bytes = b""
    mode: int = stat.S_IFREG | 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644, *, uid: int = 0, gid: int = 0) -> CpioEntry:
        return cls(name, bytes(data), stat.S_IFREG | (perm & 0o7777), uid, gid)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755, *, uid: int = 0, gid: int = 0) -> CpioEntry:
        return cls(name, b"", stat.S_IFDIR | (perm & 0o7777), uid, gid)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, target.encode(), stat.S_IFLNK | 0o777)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def normalize_name(name: str) -> str:
    """'/preseed.cfg', './preseed.cfg' → 'preseed.cfg'. Rejects '..', empty parts and NUL."""
    n = name
    while n.startswith("./"):
        n = n[2:]
    n = n.lstrip("/")
    parts = n.split("/")
    if not n or "\0" in n or any(p in ("", ".", "..") for p in parts):
        raise MediaError(f"not a usable path inside an initrd: {name!r}")
    return n


def _align(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, size: int, namesize: int) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, 0, 0, namesize, 0)
    for v in fields:
        if not 0 <= v <= 0xFFFFFFFF:
            raise MediaError(f"cpio header field out of range: {v}")
    return NEWC_MAGIC + "".join(f"{v:08X}" for v in fields).encode("ascii")


def cpio_newc(entries: Iterable[CpioEntry], *, pad_to: int = BLOCK) -> bytes:
    """A newc archive of ``entries`` (in order), closed with ``TRAILER!!!`` and padded to ``pad_to`` bytes.

    Names are stored without a leading '/' or './' (the kernel unpacks relative to the root). Parent
    directories are not added implicitly: the kernel does not create them, so list them as entries (or rely
    on the base initrd having them). Inode numbers count from 1; files get nlink 1 so the kernel never
    treats two of them as hard links.
    """
    out = bytearray()
    seen: set[str] = set()
    for ino, e in enumerate(entries, 1):
        name = normalize_name(e.name)
        if name == TRAILER:
            raise MediaError(f"{TRAILER} is reserved")
        if name in seen:
            raise MediaError(f"duplicate cpio entry: {name}")
        seen.add(name)
        if not (e.is_file or e.is_dir or e.is_symlink):
            raise MediaError(f"{name}: only regular files, directories and symlinks are supported")
        if e.is_dir and e.data:
            raise MediaError(f"{name}: a directory has no data")
        nb = name.encode("utf-8") + b"\0"
        hdr = _header(ino, e.mode, e.uid, e.gid, 2 if e.is_dir else 1, e.mtime, len(e.data), len(nb))
        out += hdr + nb + _align(HEADER_LEN + len(nb))
        out += e.data + _align(len(e.data))
    nb = TRAILER.encode("ascii") + b"\0"
    out += _header(0, 0, 0, 0, 1, 0, 0, len(nb)) + nb + _align(HEADER_LEN + len(nb))
    if pad_to > 1:
        out += b"\0" * (-len(out) % pad_to)
    return bytes(out)


FileSpec = bytes | tuple[bytes, int]
DirSpec = str | tuple[str, int]


def entries_for(files: Mapping[str, FileSpec], dirs: Sequence[DirSpec] = ()) -> list[CpioEntry]:
    """Directories first (in the order given), then files: ``{name: data}`` or ``{name: (data, perm)}``."""
    out: list[CpioEntry] = []
    for d in dirs:
        name, perm = (d, 0o755) if isinstance(d, str) else d
        out.append(CpioEntry.directory(name, perm))
    for name, spec in files.items():
        if isinstance(spec, tuple):
            data, perm = spec
        else:
            data, perm = spec, 0o644
        if not isinstance(data, bytes | bytearray):
            raise MediaError(f"{name}: file content must be bytes, not {type(data).__name__}")
        if stat.S_IFMT(perm) not in (0, stat.S_IFREG):
            raise MediaError(f"{name}: mode {perm:o} is not a regular file")
        out.append(CpioEntry.file(name, bytes(data), stat.S_IMODE(perm)))
    return out


def append_to_initrd(initrd: bytes, files: Mapping[str, FileSpec], dirs: Sequence[DirSpec] = ()) -> bytes:
    """``initrd`` followed by a gzip'ed newc archive of ``dirs`` and ``files``.

    Beware that a directory entry for a directory the initrd already has resets its mode and owner (the
    kernel chmods existing directories): list only directories that need creating, with their real mode.
    """
    if not files and not dirs:
        raise MediaError("nothing to append to the initrd")
    if not initrd or not initrd.startswith(INITRD_MAGICS):
        raise MediaError("the base initrd is empty or not a cpio/compressed cpio archive")
    archive = cpio_newc(entries_for(files, dirs))
    return bytes(initrd) + gzip.compress(archive, compresslevel=9, mtime=0)


# ---------------------------------------------------------------------------------------------- reading


def _parse_newc(data: bytes, pos: int) -> tuple[list[CpioEntry], int]:
    """Entries of one newc archive starting at ``pos``; returns them and the offset after its trailer."""
    out: list[CpioEntry] = []
    while True:
        magic = data[pos:pos + 6]
        if magic not in (NEWC_MAGIC, CRC_MAGIC):
            raise MediaError(f"bad cpio header at offset {pos}: {magic!r}")
        if pos + HEADER_LEN > len(data):
            raise MediaError(f"truncated cpio header at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise MediaError(f"bad cpio header at offset {pos}") from exc
        mode, uid, gid, mtime, size, namesize = f[1], f[2], f[3], f[5], f[6], f[11]
        name_start = pos + HEADER_LEN
        name_end = name_start + namesize
        if name_end > len(data) or namesize == 0:
            raise MediaError(f"truncated cpio entry name at offset {pos}")
        name = data[name_start:name_end - 1].decode("utf-8", "surrogateescape")
        dstart = name_end + (-name_end % 4)
        dend = dstart + size
        if dend > len(data):
            raise MediaError(f"truncated cpio entry {name!r} at offset {pos}")
        pos = dend + (-dend % 4)
        if name == TRAILER:
            return out, pos
        out.append(CpioEntry(name, data[dstart:dend], mode, uid, gid, mtime))


def _decompress_one(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decompress one gzip member / xz stream at ``pos``; return the payload and the offset after it."""
    if data.startswith(GZIP_MAGIC, pos):
        d = zlib.decompressobj(wbits=31)
    elif data.startswith(XZ_MAGIC, pos):
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)  # type: ignore[assignment]
    else:
        raise MediaError(f"unsupported compression at offset {pos}: {data[pos:pos + 6]!r}")
    try:
        payload = d.decompress(data[pos:])
    except (zlib.error, lzma.LZMAError) as exc:
        raise MediaError(f"corrupt compressed archive at offset {pos}: {exc}") from exc
    if not d.eof:
        raise MediaError(f"truncated compressed archive at offset {pos}")
    return payload, len(data) - len(d.unused_data)


def iter_cpio(data: bytes) -> Iterator[CpioEntry]:
    """Every entry of a (possibly concatenated, gzip/xz compressed) newc stream, in archive order."""
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:
            pos += 1
            continue
        if data.startswith((NEWC_MAGIC, CRC_MAGIC), pos):
            entries, pos = _parse_newc(data, pos)
            yield from entries
        else:
            payload, pos = _decompress_one(data, pos)
            yield from iter_cpio(payload)


def read_cpio_entries(data: bytes) -> list[CpioEntry]:
    return list(iter_cpio(data))


def read_cpio(data: bytes) -> dict[str, bytes]:
    """Regular files of a (concatenated, compressed) newc stream: normalized name → content.

    Names lose a leading './' or '/' ('./var/lib/dpkg/status' → 'var/lib/dpkg/status'); a later archive's
    file replaces an earlier one, as when the kernel unpacks the stream.
    """
    out: dict[str, bytes] = {}
    for e in iter_cpio(data):
        if not e.is_file:
            continue
        try:
            name = normalize_name(e.name)
        except MediaError:
            continue
        out[name] = e.data
    return out
