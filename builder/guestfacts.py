"""What the SBOM needs from inside the provisioned guest and dpkg does not say: the licences the packages
declare, and the NVIDIA kernel modules DKMS built.

This file is a program for the guest as much as a module: ``provision`` sends its source to ``python3 -`` over
SSH (python3 is in every image: Ansible needs it), so it uses the standard library only and runs on the
guest's Python (3.13 on trixie) as on the builder's. It reads, never writes, and prints one JSON object:

* ``licenses``: package → the DEP-5 ``License:`` short names of ``/usr/share/doc/PKG/copyright`` (in order,
  each once), for machine-readable copyright files only; a package whose file is free-form is left out;
* ``modules``: every out-of-tree kernel module named ``nvidia*`` of every kernel installed under /boot (the
  kernels that will boot, not the running one), with its modinfo fields and the file's sha256;
* ``dkms``: ``dkms status`` as records (module, version, kernel, arch, status) with the package that ships
  each module's source under /usr/src.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

DOC = "/usr/share/doc"
# machine-readable copyright files: DEP-5 as published (copyright-format/1.0) and its draft URL
_FORMAT_RE = re.compile(r"copyright-format/1\.0|dep\.debian\.net/deps/dep5", re.IGNORECASE)
_FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)$")
# one DEP-5 short name (GPL-2+, BSD-3-clause, MIT/X11, public-domain) and an optional "with X exception"
_NAME = r"[A-Za-z0-9][A-Za-z0-9.+_/-]*(?:\s+with\s+[A-Za-z0-9.+_-]+\s+exception)?"
_SYNOPSIS_RE = re.compile(rf"{_NAME}(?:\s*,?\s+(?:or|and)\s+{_NAME}|\s*,\s*{_NAME})*", re.IGNORECASE)
MODINFO_FIELDS = ("filename", "name", "version", "license", "description", "author", "srcversion", "vermagic",
                  "intree", "depends", "sig_id", "signer", "sig_key", "sig_hashalgo")
TOOL_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


def dep5_paragraphs(text: str) -> list[dict[str, str]]:
    """The paragraphs of a deb822 file: field (lower case) → first line of its value."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur = {}
        elif line[0] in " \t" or line.startswith("#"):
            continue  # a continuation line (licence text) or a comment
        else:
            m = _FIELD_RE.match(line)
            if m:
                cur.setdefault(m.group(1).lower(), m.group(2).strip())
    if cur:
        out.append(cur)
    return out


def dep5_licenses(text: str) -> list[str] | None:
    """The licence short names a DEP-5 copyright file declares (header and Files paragraphs; the standalone
    License paragraphs only when nothing else names one), each once; None when the file is not
    machine-readable. A synopsis that is not a short-name expression (licence text where the name belongs)
    is skipped."""
    paras = dep5_paragraphs(text)
    if not paras or not _FORMAT_RE.search(paras[0].get("format", "")):
        return None
    named = [p["license"] for i, p in enumerate(paras) if "license" in p and (i == 0 or "files" in p)]
    if not named:
        named = [p["license"] for p in paras[1:] if "license" in p]
    out: list[str] = []
    for synopsis in named:
        value = " ".join(synopsis.split())
        if value and _SYNOPSIS_RE.fullmatch(value) and value not in out:
            out.append(value)
    return out


def licenses(doc: str = DOC) -> dict[str, list[str]]:
    """Package (its /usr/share/doc directory) → declared licences, for the machine-readable files."""
    out: dict[str, list[str]] = {}
    try:
        names = sorted(os.listdir(doc))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(doc, name, "copyright"), "rb") as f:
                text = f.read(4 << 20).decode("utf-8", "replace")
        except OSError:
            continue
        found = dep5_licenses(text)
        if found:
            out[name] = found
    return out


def parse_modinfo(text: str) -> dict[str, str]:
    """``modinfo FILE`` output → the first value of each field in MODINFO_FIELDS."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line[0] in " \t":
            continue  # the signature's hex continues on indented lines
        key, sep, value = line.partition(":")
        if sep and key in MODINFO_FIELDS and key not in out:
            out[key] = value.strip()
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_kernels(boot: str = "/boot") -> list[str]:
    try:
        return sorted(n[len("vmlinuz-"):] for n in os.listdir(boot) if n.startswith("vmlinuz-"))
    except OSError:
        return []


def modules(pattern: str = "nvidia*", *, in_tree: bool = False, boot: str = "/boot",
            modroot: str = "/lib/modules") -> list[dict[str, str]]:
    """The kernel modules whose file name matches ``pattern`` (out-of-tree ones only unless ``in_tree``), for
    each installed kernel: modinfo's fields, ``kernel``, ``path`` and the file's ``sha256``."""
    modinfo = shutil.which("modinfo", path=TOOL_PATH)
    if modinfo is None:
        return []
    out = []
    for kernel in installed_kernels(boot):
        root = Path(modroot) / kernel
        files = sorted(p for p in root.rglob("*.ko*") if fnmatch.fnmatch(p.name, pattern) and p.is_file())
        for path in files:
            res = subprocess.run([modinfo, str(path)], capture_output=True, text=True, errors="replace")
            if res.returncode != 0:
                continue
            info = parse_modinfo(res.stdout)
            if info.get("intree") == "Y" and not in_tree:
                continue
            info.update(kernel=kernel, path=str(path), sha256=sha256_file(str(path)))
            out.append(info)
    return out


_DKMS_RE = re.compile(r"^(?P<module>[^/,:\s]+)[/,]\s*(?P<version>[^,:\s]+)(?:,\s*(?P<kernel>[^,:\s]+))?"
                      r"(?:,\s*(?P<arch>[^,:\s]+))?:\s*(?P<status>.+)$")


def parse_dkms_status(text: str) -> list[dict[str, str]]:
    """``dkms status`` lines (``nvidia-current/550.163.01, 6.12.94+deb13-amd64, x86_64: installed``; the
    comma form of dkms 2 too) → records; warnings and other lines are skipped."""
    out = []
    for line in text.splitlines():
        m = _DKMS_RE.match(line.strip())
        if m:
            out.append({k: v for k, v in m.groupdict().items() if v is not None})
    return out


def dkms() -> list[dict[str, str]]:
    tool = shutil.which("dkms", path=TOOL_PATH)
    if tool is None:
        return []
    res = subprocess.run([tool, "status"], capture_output=True, text=True, errors="replace")
    records = parse_dkms_status(res.stdout)
    for rec in records:
        src = f"/usr/src/{rec['module']}-{rec['version']}"
        q = subprocess.run(["dpkg-query", "-S", src], capture_output=True, text=True, errors="replace")
        owner = q.stdout.split(":", 1)[0].strip() if q.returncode == 0 else ""
        if owner and "," not in owner:
            rec["source_package"] = owner
    return records


def collect(pattern: str = "nvidia*", *, in_tree: bool = False, doc: str = DOC) -> dict[str, Any]:
    return {"licenses": licenses(doc), "modules": modules(pattern, in_tree=in_tree), "dkms": dkms()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="guestfacts")
    ap.add_argument("--modules", default="nvidia*", help="file name pattern of the kernel modules to describe")
    ap.add_argument("--in-tree", action="store_true", help="describe in-tree modules too (tests)")
    args = ap.parse_args(argv)
    json.dump(collect(args.modules, in_tree=args.in_tree), sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
