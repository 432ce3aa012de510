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
    d = INDEX_DIR.format(arch=arch)
    files = {
        f"{d}/Packages": packages,
        f"{d}/Packages.gz": gzip.compress(packages, 9, mtime=0),
        f"{d}/Packages.xz": lzma.compress(packages, preset=6),
    }
    lines = [
        "Origin: builder",
        "Label: builder installer suite",
        f"Suite: {suite}",
        f"Codename: {codename}",
        f"Date: {formatdate(date, usegmt=True)}",
        f"Architectures: {arch}",
        "Components: main",
        f"Description: {description}",
        "SHA256:",
    ]
    for path, data in files.items():
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data):>16} {path}")
    files["Release"] = ("\n".join(lines) + "\n").encode()
    return files
