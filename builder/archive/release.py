"""Parse the verified text of a Debian ``Release``/``InRelease`` file (pure functions, no I/O).

Only the SHA256 field is used for file entries: MD5Sum is not a security hash and is ignored.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from ..errors import VerificationError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    """One file listed in a Release: path relative to ``dists/<suite>/``, its sha256 and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    suite: str
    codename: str
    version: str
    date: str
    acquire_by_hash: bool
    components: tuple[str, ...]
    architectures: tuple[str, ...]
    files: Mapping[str, FileEntry] = field(hash=False, repr=False)
    text: bytes = field(hash=False, repr=False)
    valid_until: str = ""
    origin: str = ""
    label: str = ""

    def entry(self, path: str) -> FileEntry | None:
        return self.files.get(path)

    @property
    def date_parsed(self) -> datetime | None:
        return _parse_date(self.date)

    @property
    def valid_until_parsed(self) -> datetime | None:
        return _parse_date(self.valid_until)

    def is_expired(self, now: datetime | None = None) -> bool:
        """True if the Release has a Valid-Until in the past (apt then refuses it)."""
        until = self.valid_until_parsed
        if until is None:
            return False
        return (now or datetime.now(UTC)) > until

    def matches_suite(self, suite: str) -> bool:
        """Whether this Release is the one for ``suite`` (by codename or suite name)."""
        return suite in (self.codename, self.suite)


def _parse_date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def iter_fields(text: str) -> Iterator[tuple[str, str]]:
    """(name, value) pairs of one deb822 paragraph; continuation lines are kept, joined with '\\n'."""
    name: str | None = None
    value: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if name is not None:
                # A blank line ends the paragraph; a Release has only one.
                break
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t":
            if name is None:
                raise VerificationError(f"Release: continuation line {lineno} before any field")
            value.append(line)
            continue
        if name is not None:
            yield name, "\n".join(value)
        key, sep, rest = line.partition(":")
        if not sep or not key or " " in key:
            raise VerificationError(f"Release: malformed line {lineno}: {line[:80]!r}")
        name = key
        value = [rest.strip()]
    if name is not None:
        yield name, "\n".join(value)


def _parse_sha256(value: str) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for line in value.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or not _SHA256_RE.fullmatch(parts[0].lower()) or not parts[1].isdigit():
            raise VerificationError(f"Release: malformed SHA256 entry: {line[:120]!r}")
        digest, size, path = parts
        files[path] = FileEntry(path=path, sha256=digest.lower(), size=int(size))
    return files


def parse_release(verified_text: bytes) -> Release:
    """Parse the verified Release text. Raises VerificationError if it is malformed or lists no SHA256 files."""
    try:
        text = verified_text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VerificationError(f"Release: not UTF-8 text ({exc})") from exc
    fields: dict[str, str] = {}
    for name, value in iter_fields(text):
        fields[name.lower()] = value
    if "sha256" not in fields:
        raise VerificationError("Release: no SHA256 field (weaker hashes are not accepted)")
    files = _parse_sha256(fields["sha256"])
    return Release(
        suite=fields.get("suite", ""),
        codename=fields.get("codename", ""),
        version=fields.get("version", ""),
        date=fields.get("date", ""),
        acquire_by_hash=fields.get("acquire-by-hash", "no").strip().lower() == "yes",
        components=tuple(fields.get("components", "").split()),
        architectures=tuple(fields.get("architectures", "").split()),
        files=types.MappingProxyType(files),
        text=bytes(verified_text),
        valid_until=fields.get("valid-until", ""),
        origin=fields.get("origin", ""),
        label=fields.get("label", ""),
    )


__all__ = ["FileEntry", "Release", "iter_fields", "parse_release"]
