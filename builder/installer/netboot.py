"""Pure helpers for choosing a netboot installer whose kernel matches udebs the mirror really serves.

The netboot images come from the ``debian-installer-<release>-netboot-<arch>`` package in the pool (the
``dists/*/installer-*/images`` tree is unreliable on skewed mirrors, see docs/trust-and-mirrors.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

IMAGE_DIR = "usr/lib/debian-installer/images/{release}/{arch}/text/debian-installer/{arch}"


def netboot_package(release: int, arch: str) -> str:
    return f"debian-installer-{release}-netboot-{arch}"


def image_members(release: int, arch: str) -> dict[str, str]:
    d = IMAGE_DIR.format(release=release, arch=arch)
    return {"kernel": f"{d}/linux", "initrd": f"{d}/initrd.gz"}


def kernel_release(bzimage: bytes) -> str:
    """The kernel release string ('6.12.94+deb13-amd64') read from a bzImage's setup header."""
    if len(bzimage) < 0x210 or bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a Linux bzImage (no HdrS setup header)")
    ptr = int.from_bytes(bzimage[0x20E:0x210], "little")
    if ptr == 0:
        raise ValueError("the bzImage carries no kernel version string")
    start = ptr + 0x200
    end = bzimage.find(b"\0", start, start + 256)
    text = bzimage[start:end].decode("ascii", "replace")
    return text.split()[0]


def abi_of_module_udeb(package: str) -> str | None:
    """'nic-modules-6.12.94+deb13-amd64-di' → '6.12.94+deb13-amd64'; None for other udebs."""
    m = re.match(r"^.+?-modules-(\d+\.\d+\.\d+[^ ]*?-\w+)-di$", package) or re.match(
        r"^kernel-image-(\d+\.\d+\.\d+[^ ]*?-\w+)-di$", package
    )
    return m.group(1) if m else None


def module_abis(index: Mapping[str, Mapping[str, str]]) -> dict[str, list[str]]:
    """Kernel ABIs that the udeb index has module udebs for → their package names."""
    out: dict[str, list[str]] = {}
    for name in index:
        abi = abi_of_module_udeb(name)
        if abi:
            out.setdefault(abi, []).append(name)
    return out


def parse_status(text: str) -> dict[str, str]:
    """A dpkg/udpkg status file → {package: version} for installed packages."""
    out: dict[str, str] = {}
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" ")
        )
        if "Package" in fields and "Version" in fields and "installed" in fields.get("Status", "installed"):
            out[fields["Package"]] = fields["Version"]
    return out


def parse_built_using(value: str) -> dict[str, str]:
    """'linux (= 6.12.94-1), util-linux (= 2.41-5)' → {'linux': '6.12.94-1', 'util-linux': '2.41-5'}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"([a-z0-9][a-z0-9.+-]*) \(= ([^)]+)\)", value)}


def strip_epoch(version: str) -> str:
    return version.split(":", 1)[1] if ":" in version else version


def source_name(stanza: Mapping[str, str]) -> str:
    src = stanza.get("Source", stanza.get("Package", ""))
    return src.split(" ", 1)[0]


def _dec(version: str, pattern: str) -> Iterator[str]:
    m = re.search(pattern, version)
    if not m:
        return
    n = int(m.group(2))
    for k in range(n - 1, 0, -1):
        yield version[: m.start(2)] + str(k) + version[m.end(2):]
    yield version[: m.start(1)] + version[m.end(2):]


def candidate_versions(index_version: str, *, hints: tuple[str, ...] = ()) -> list[str]:
    """Versions to probe in the pool when ``index_version`` is not served, most likely first.

    ``hints`` are versions known from elsewhere (the netboot initrd's own status file, the netboot package's
    Built-Using), tried first, each also with binNMU suffixes. Then the index version counted down:
    ``+b3`` → ``+b2``, ``+b1``, none; ``+deb13u4`` → ``u3``…``u1``, none; and one rebuild up (``+b1``).
    """
    seen: dict[str, None] = {}

    def add(v: str) -> None:
        if v and v != index_version:
            seen.setdefault(v, None)

    for h in hints:
        add(h)
        for k in range(1, 10):
            add(f"{h}+b{k}")
    work = [index_version]
    for v in work:
        for pat in (r"(\+b)(\d+)$", r"([+~]deb\d+u)(\d+)", r"([+~]bpo\d+\+)(\d+)"):
            for w in _dec(v, pat):
                if w not in seen and w != index_version:
                    add(w)
                    work.append(w)
    for v in list(seen) or [index_version]:
        if not re.search(r"\+b\d+$", v):
            add(f"{v}+b1")
    if not re.search(r"\+b\d+$", index_version):
        add(f"{index_version}+b1")
    return list(seen)


def pool_filename(stanza: Mapping[str, str], version: str) -> str:
    """The pool path of another version of the package in ``stanza`` (same directory, Debian naming)."""
    d, _, base = stanza["Filename"].rpartition("/")
    ext = base.rsplit(".", 1)[1]
    arch = stanza.get("Architecture", "amd64")
    return f"{d}/{stanza['Package']}_{strip_epoch(version)}_{arch}.{ext}"
