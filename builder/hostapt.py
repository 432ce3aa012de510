"""Read the Debian mirror from the host's own apt sources (so no mirror host name lives in builder).

Both apt source formats are read: one-line ``sources.list`` entries and deb822 ``*.sources`` files.
Disabled entries (``Enabled: no``, commented lines, files not ending in .list/.sources) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEBIAN_KEYRING_HINTS = ("debian-archive-keyring",)


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""

    @property
    def is_security(self) -> bool:
        return any(s.endswith("-security") or "/updates" in s for s in self.suites)


def _parse_list(text: str) -> list[AptSource]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        parts = line.split()[1:]
        signed_by = ""
        if parts and parts[0].startswith("["):
            opts = []
            while parts:
                tok = parts.pop(0)
                opts.append(tok)
                if tok.endswith("]"):
                    break
            for opt in " ".join(opts).strip("[]").split():
                if opt.startswith("signed-by="):
                    signed_by = opt.split("=", 1)[1]
        if len(parts) >= 2:
            out.append(AptSource(parts[0].rstrip("/"), (parts[1],), tuple(parts[2:]), signed_by))
    return out


def _parse_deb822(text: str) -> list[AptSource]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for raw in block.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, val = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        if not fields or fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            out.append(
                AptSource(
                    uri.rstrip("/"),
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "").split()),
                    fields.get("signed-by", ""),
                )
            )
    return out


def read_sources(root: Path = Path("/")) -> list[AptSource]:
    """Every enabled ``deb`` source of the host, in apt's reading order."""
    etc = root / "etc/apt"
    sources: list[AptSource] = []
    main = etc / "sources.list"
    if main.is_file():
        sources += _parse_list(main.read_text(errors="replace"))
    d = etc / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.suffix == ".list":
                sources += _parse_list(f.read_text(errors="replace"))
            elif f.suffix == ".sources":
                sources += _parse_deb822(f.read_text(errors="replace"))
    return sources


def _is_debian(src: AptSource) -> bool:
    if any(h in src.signed_by for h in DEBIAN_KEYRING_HINTS):
        return True
    return src.uri.rstrip("/").endswith(("/debian", "/debian-security"))


def debian_mirrors(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """(archive mirror URI, security mirror URI) from the host's apt sources; None where there is none."""
    mirror = security = None
    for src in read_sources(root):
        if not _is_debian(src):
            continue
        if src.is_security:
            security = security or src.uri
        else:
            mirror = mirror or src.uri
    return mirror, security
