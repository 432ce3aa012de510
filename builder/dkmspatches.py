"""Source patches for a DKMS module, given to DKMS with its own ``PATCH[]`` / ``PATCH_MATCH[]`` (``dkms(8)``).

A patch is a ``patch -p1`` file for the module's source tree (``/usr/src/<module>-<version>``). It is copied to
that tree's ``patches/`` and named in its ``dkms.conf``; DKMS then applies it to its copy of the source before
every build for a kernel release its ``match`` (a bash regular expression, unanchored; empty: every kernel)
matches — on the build host's build root (:mod:`builder.hostmodule`) and on the node, for each later kernel.

One script does the edit on both sides: ``roles/nvidia-gpu-drivers/files/dkms-patches.sh`` (:data:`SCRIPT`),
run by the role on the target and uploaded into the host's build root. This module reads and checks the patch
list (the role's ``nvidia_dkms_patches``, by default its flavour's ``dkms_patches``; the builder resolves it once
and hands the same list to both sides: :func:`builder.stages.module.dkms_patches`) and names each patch's bytes,
which enter the module cache key (:meth:`builder.hostmodule.ModulePlan.cache_key`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

VAR = "nvidia_dkms_patches"  # the role's variable: [{file, match}]
FLAVOR_KEY = "dkms_patches"  # a flavour's default list in the role's vars/main.yml
PATCHES_DIR = "files/patches"  # where a relative ``file`` is, in the role
SCRIPT = "files/dkms-patches.sh"  # the role's script that gives a source tree its patches (both sides run it)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_MATCH_FORBIDDEN = re.compile(r"[\"`'\s]|\\\\")


@dataclass(frozen=True)
class DkmsPatch:
    """One patch: ``name`` (its file name in ``patches/``, the ``PATCH[]`` value), where it is on this machine,
    its ``PATCH_MATCH[]`` regular expression ("" for every kernel) and the sha256 of its bytes."""

    name: str
    path: Path
    match: str
    sha256: str

    def key(self) -> list[str]:
        """What of it decides a module's bytes (for the module cache key)."""
        return [self.name, self.match, self.sha256]

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "match": self.match or None, "sha256": self.sha256}

    def role_entry(self) -> dict[str, str]:
        """The entry of the role's ``nvidia_dkms_patches`` for this patch (an absolute path on the controller)."""
        return {"file": str(self.path), "match": self.match}


def match_problem(match: str) -> str | None:
    """Why ``match`` cannot be a ``PATCH_MATCH[]`` value as dkms-patches.sh writes it, or None. dkms sources
    dkms.conf and re-sources the values it read inside double quotes, so a value must read the same there; the
    regular expression itself is checked by bash on the target (Python's dialect is not bash's)."""
    if _MATCH_FORBIDDEN.search(match):
        return "no quotes, backquotes, doubled backslashes or spaces"
    if "$" in match.removesuffix("$"):
        return "$ only as the last character (end of the kernel release)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def load(entries: Any, *, patches_dir: Path | None, where: str) -> tuple[DkmsPatch, ...]:
    """The patches a list of ``{file, match}`` names (``where``: what set it, for the message). ``file`` is a
    file name in ``patches_dir`` (the role's files/patches/) or an absolute path. Every problem is a one-line
    :class:`ConfigError`."""
    if entries is None:
        return ()
    if not isinstance(entries, Sequence) or isinstance(entries, str | bytes):
        raise ConfigError(f"{where} must be a list of {{file, match}}, not {type(entries).__name__}")
    out: list[DkmsPatch] = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be a mapping with file (and match), not {type(entry).__name__}")
        unknown = sorted(set(entry) - {"file", "match"})
        if unknown:
            raise ConfigError(f"{at}: unknown key {unknown[0]!r} (a patch has file and match)")
        file, match = entry.get("file"), entry.get("match", "")
        if not isinstance(file, str) or not file.strip():
            raise ConfigError(f"{at}.file must be a patch file name or an absolute path")
        if match is None:
            match = ""
        if not isinstance(match, str):
            raise ConfigError(f"{at}.match must be a string (a bash regular expression on the kernel release)")
        name = Path(file).name
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{at}.file {file!r}: the file name may have letters, digits and . _ + - only")
        problem = match_problem(match)
        if problem:
            raise ConfigError(f"{at}.match {match!r}: {problem}")
        path = Path(file)
        if not path.is_absolute():
            if patches_dir is None:
                raise ConfigError(f"{at}.file {file!r} is relative, and the role has no {PATCHES_DIR}/ to find it in")
            path = patches_dir / file
        if not path.is_file():
            raise ConfigError(f"{at}.file: {path} is not a file")
        if any(p.name == name for p in out):
            raise ConfigError(f"{at}.file: two patches are named {name} (DKMS keeps them in one patches/ directory)")
        out.append(DkmsPatch(name, path.resolve(), match, _sha256(path)))
    return tuple(out)


def script_args(src_dir: str, patches: Sequence[DkmsPatch], *, where: str | None = None) -> list[str]:
    """dkms-patches.sh's arguments for ``patches`` given to ``src_dir``; each file as it is on that side:
    ``where`` (a directory) holding them by name, or their own paths."""
    args = [src_dir]
    for p in patches:
        args += [f"{where}/{p.name}" if where else str(p.path), p.match]
    return args


__all__ = ["FLAVOR_KEY", "PATCHES_DIR", "SCRIPT", "VAR", "DkmsPatch", "load", "match_problem", "script_args"]
