"""The installer's udeb suite as the builder decides it (pure functions).

Input: the verified upstream debian-installer ``Packages`` index and the lock file's decisions (entries
replaced by the served build, entries removed). Output: the files of a small suite (``Release`` and the
``Packages`` index in three compressions) that the gateway serves and signs with the build's ephemeral key.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
from collections.abc import Iterable, Mapping
from email.utils import formatdate

INDEX_DIR = "main/debian-installer/binary-{arch}"
STANZA_ORDER = ("Package", "Source", "Version", "Installed-Size", "Maintainer", "Architecture", "Replaces",
                "Provides", "Depends", "Pre-Depends", "Recommends", "Suggests", "Conflicts", "Breaks", "Enhances",
                "Description", "Kernel-Version", "Installer-Menu-Item", "Subarchitecture", "Section", "Priority",
                "Filename", "Size", "MD5sum", "SHA256")


def split_stanzas(index: bytes) -> list[str]:
    return [s for s in index.decode("utf-8").split("\n\n") if s.strip()]


def stanza_fields(stanza: str) -> dict[str, str]:
    """Parse one stanza keeping continuation lines verbatim."""
    out: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            out[key] += "\n" + line
        elif ":" in line:
            key, _, val = line.partition(":")
            out[key] = val.strip()
    return out


def format_stanza(fields: Mapping[str, str]) -> str:
    keys = [k for k in STANZA_ORDER if k in fields] + sorted(k for k in fields if k not in STANZA_ORDER)
    return "\n".join(f"{k}: {fields[k]}" for k in keys)


def rewrite_index(
    index: bytes,
    overrides: Mapping[str, Mapping[str, str]],
    removed: Iterable[str],
) -> bytes:
    """The index with ``overrides`` (package → fields to replace) applied and ``removed`` packages dropped."""
    removed = set(removed)
    missing = set(overrides) - removed
    out = []
    for stanza in split_stanzas(index):
        fields = stanza_fields(stanza)
        name = fields.get("Package", "")
        if name in removed:
            continue
        if name in overrides:
            fields.update(overrides[name])
            missing.discard(name)
        out.append(format_stanza(fields))
    if missing:
        raise KeyError(f"overrides name packages the index does not list: {', '.join(sorted(missing))}")
    return ("\n\n".join(out) + "\n").encode("utf-8")


def index_variants(path: str, data: bytes) -> dict[str, bytes]:
    """An index (``…/Packages``) with its .gz and .xz variants, as a suite serves them."""
    return {path: data, f"{path}.gz": gzip.compress(data, 9, mtime=0), f"{path}.xz": lzma.compress(data, preset=6)}


def release_file(fields: Iterable[tuple[str, str]], files: Mapping[str, bytes]) -> bytes:
    """A ``Release``: the header ``fields`` in order, then the SHA256 of every file (paths under dists/<suite>/)."""
    lines = [f"{k}: {v}" for k, v in fields]
    lines.append("SHA256:")
    for path, data in files.items():
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data):>16} {path}")
    return ("\n".join(lines) + "\n").encode()


def suite_files(
    packages: bytes,
    *,
    suite: str,
    codename: str,
    arch: str = "amd64",
    date: float | None = None,
    description: str = "builder-generated installer suite",
) -> dict[str, bytes]:
    """Files of the generated suite, keyed by path under ``dists/<suite>/`` (Release last, unsigned)."""
    files = index_variants(f"{INDEX_DIR.format(arch=arch)}/Packages", packages)
    files["Release"] = release_file([
        ("Origin", "builder"), ("Label", "builder installer suite"), ("Suite", suite), ("Codename", codename),
        ("Date", formatdate(date, usegmt=True)), ("Architectures", arch), ("Components", "main"),
        ("Description", description)], files)
    return files
