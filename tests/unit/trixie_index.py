"""Real index data: stanzas of Debian 13.8 (trixie, the suite's Release of Sat, 21 Nov 2026 09:15:44 UTC), main,
contrib, non-free and non-free-firmware binary-amd64, as the signed Packages indexes list them, in
``data/trixie-13.8-amd64.Packages``. Only the fields builder reads are kept (Package, Version, Architecture,
Multi-Arch, Essential, Priority, Section, Pre-Depends, Depends, Provides, Filename, Size, SHA256); the set is the
hard-dependency closure of what the tests need: the Essential packages and apt, what the host module's build root
installs for nvidia-kernel-dkms and kernel 6.12.117+deb13-amd64 (dkms, gcc-14, the headers, kmod, findutils,
xz-utils, zstd), linux-image-amd64, and grub-pc."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from builder.archive.packages import iter_stanzas
from builder.pkglock import SignedIndex
from builder.pkgresolve import Universe

DATA = Path(__file__).resolve().parent / "data" / "trixie-13.8-amd64.Packages"
DATE = "Sat, 21 Nov 2026 09:15:44 UTC"
KVER = "6.12.117+deb13-amd64"
INDEX = SignedIndex("debian", "trixie", "trixie", DATE, "a" * 64, "Debian", "Debian", "stable", "13.8")


def stanzas() -> dict[str, dict[str, str]]:
    """Every stanza, by package name (one version each)."""
    return {st["Package"]: st for st in iter_stanzas(DATA.read_bytes(), source=DATA.name)}


def universe(extra: list[dict[str, str]] | None = None) -> Universe:
    """The stanzas as the suite's signed index (and ``extra`` besides, e.g. a newer version)."""
    uni = Universe("amd64")
    uni.indexes = [INDEX]
    for st in [*stanzas().values(), *(extra or [])]:
        uni.add(st, "debian", "trixie", DATE)
    return uni


def moved_on(st: dict[str, str], old: str, new: str) -> dict[str, str]:
    """``st`` as a later upload of its source would list it: version ``old`` → ``new`` in its Version, its
    Filename and every relation on that exact version (``(= old)``)."""
    out = dict(st)
    out["Version"] = st["Version"].replace(old, new)
    out["Filename"] = st["Filename"].replace(old, new)
    for f in ("Pre-Depends", "Depends"):
        if f in out:
            out[f] = re.sub(rf"\(= {re.escape(old)}\)", f"(= {new})", out[f])
    out["SHA256"] = hashlib.sha256(f"{st['Package']} {new}".encode()).hexdigest()
    return out
