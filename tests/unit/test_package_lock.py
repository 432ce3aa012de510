"""The package lock: its file (round trip, one package per line, schema), the resolver on a small synthetic
universe (alternatives, virtual packages, versions, priorities), what ``--check`` reports, ``--from-build``,
and the target's view of the archive made from the lock (pure), served by the gateway with nothing else."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder.archive import Archive, ContentCache
from builder.config import from_dict
from builder.errors import LockError, MalformedLockError, OfflineError, VerificationError
from builder.gateway.server import Gateway, Pin
from builder.gateway.target import ReleaseFields, suite_view, target_views, view_pins, view_stanza
from builder.pkgfetch import control_stanza, fetch_packages
from builder.pkglock import PackageLock, PackagePin, SignedIndex, differences, keep_unchanged
from builder.pkgresolve import Universe, lock_from_build, moved, resolve

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DATE = "Sat, 21 Nov 2026 09:15:44 UTC"
SEC_DATE = "Mon, 30 Nov 2026 00:22:33 UTC"


def stanza(name: str, version: str, **fields: str) -> dict[str, str]:
    st = {"Package": name, "Version": version, "Architecture": fields.pop("arch", "amd64"),
          "Filename": fields.pop("filename", f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb"),
          "Size": fields.pop("size", "100"), "SHA256": fields.pop("sha", hashlib.sha256(name.encode()).hexdigest()),
          "Priority": fields.pop("priority", "optional"), "Section": "misc"}
    st.update({k.replace("_", "-"): v for k, v in fields.items()})
    return st


def universe() -> Universe:
    uni = Universe("amd64")
    uni.indexes = [SignedIndex("debian", "trixie", "trixie", DATE, "a" * 64, "Debian", "Debian", "stable", "13.8"),
                   SignedIndex("debian-security", "trixie-security", "trixie-security", SEC_DATE, "b" * 64, "Debian",
                               "Debian-Security", "stable-security", "13")]
    main = [
        stanza("base-files", "13.8", priority="required"),
        stanza("libc6", "2.41-12", priority="optional"),
        stanza("mawk", "1.3.4", priority="required", Provides="awk"),
        stanza("gawk", "5.2", Provides="awk"),
        stanza("app", "1.0", Depends="libc6 (>= 2.34), awk, libfoo1 | libfoo-alt, virtual-mta"),
        stanza("libfoo-alt", "1"),
        stanza("exim4", "4.98", Provides="virtual-mta", priority="standard"),
        stanza("postfix", "3.9", Provides="virtual-mta", priority="optional"),
        stanza("tool", "2.0", Pre_Depends="libtool2 (= 2.0)", Recommends="extra"),
        stanza("libtool2", "2.0"),
        stanza("extra", "1"),
        stanza("i386-only", "1", arch="i386"),
    ]
    for st in main:
        uni.add(st, "debian", "trixie", DATE)
    sec = [stanza("libc6", "2.41-12+deb13u1", filename="pool/updates/main/g/glibc/libc6_2.41-12+deb13u1_amd64.deb",
                  sha="c" * 64),
           stanza("tool", "2.1", Pre_Depends="libtool2 (= 2.1)"), stanza("libtool2", "2.1")]
    for st in sec:
        uni.add(st, "debian-security", "trixie-security", SEC_DATE)
    return uni


def lock_of(uni: Universe, names: list[str]) -> PackageLock:
    res = resolve(uni, names, priorities=())
    assert not res.problems, res.problems
    return PackageLock("trixie", "trixie", "amd64", "2026-12-01T00:00:00Z", "resolve", tuple(uni.indexes),
                       tuple(sorted((c.pin() for c in res.selected.values()), key=lambda p: p.name)))


def test_resolve_like_apt() -> None:
    uni = universe()
    res = resolve(uni, ["app"])
    got = {n: c.version for n, c in res.selected.items()}
    # priority required seeds; the highest candidate (libc6 from -security); an alternative already satisfied by a
    # required package (mawk provides awk); the first satisfiable alternative; the higher-priority provider
    assert got == {"base-files": "13.8", "mawk": "1.3.4", "app": "1.0", "libc6": "2.41-12+deb13u1",
                   "libfoo-alt": "1", "exim4": "4.98"}
    assert res.selected["libc6"].suite == "trixie-security"
    assert "i386-only" not in uni.candidates


def test_an_older_locked_version_takes_its_own_dependencies() -> None:
    res = resolve(universe(), ["tool=2.0"], priorities=())
    assert {n: c.version for n, c in res.selected.items()} == {"tool": "2.0", "libtool2": "2.0"}
    rec = resolve(universe(), ["tool=2.0"], priorities=(), recommends=True)
    assert "extra" in rec.selected


def test_unresolvable_seeds_and_dependencies_are_named() -> None:
    uni = universe()
    uni.add(stanza("broken", "1", Depends="nothere (>= 1)"), "debian", "trixie", DATE)
    res = resolve(uni, ["nosuch", "broken", "tool=9"], optional=["maybe"], priorities=())
    assert res.problems == ["seed nosuch: no signed index lists it", "seed tool=9: no signed index lists tool 9",
                            "broken 1 depends on nothere (>= 1): nothing satisfies it"]
    assert res.skipped == ["maybe"]


def test_lock_file_round_trip_one_package_a_line(tmp_path: Path) -> None:
    lock = lock_of(universe(), ["app"])
    text = lock.to_json()
    assert PackageLock.from_json(text) == lock
    lines = text.splitlines()
    for p in lock.packages:  # each package on one line, with its signed index
        line = next(ln for ln in lines if f'"name": "{p.name}"' in ln)
        assert p.sha256 in line and p.version in line and f'"suite": "{p.suite}"' in line and p.date in line
    assert json.loads(text)["packages_lock_version"] == 1


def test_a_malformed_package_lock_names_every_bad_field() -> None:
    data = json.loads(lock_of(universe(), ["app"]).to_json())
    data["packages"][0]["sha256"] = "XYZ"
    data["packages"][1]["archive"] = "elsewhere"
    data["packages"].append(dict(data["packages"][2]))
    data["indexes"][0].pop("date")
    with pytest.raises(MalformedLockError) as exc:
        PackageLock.from_json(json.dumps(data), source="x.packages.lock")
    fields = [p for p, _ in exc.value.problems]
    last = len(data["packages"]) - 1
    assert fields == ["indexes[0].date", "packages[0].sha256", "packages[1].archive", f"packages[{last}]"]
    assert exc.value.exit_code == 2
    with pytest.raises(MalformedLockError, match="unsupported package lock version"):
        PackageLock.from_json('{"packages_lock_version": 7}')


def test_check_reports_security_updates_by_package() -> None:
    uni = universe()
    lock = lock_of(uni, ["tool=2.0", "libc6=2.41-12"])
    got = {m.name: m for m in moved(lock, uni)}
    assert set(got) == {"tool", "libtool2", "libc6"}
    assert got["libc6"].security and got["libc6"].line() == (
        "libc6: 2.41-12 -> 2.41-12+deb13u1 (security update, trixie-security)")
    gone = dataclasses.replace(lock, packages=(*lock.packages, dataclasses.replace(lock.packages[0], name="gone")))
    assert any(m.line() == f"gone {lock.packages[0].version}: no longer listed in any signed index"
               for m in moved(gone, uni))


def test_relocking_changes_only_what_moved() -> None:
    uni = universe()
    old = lock_of(uni, ["app"])
    later = dataclasses.replace(old, created="2027-01-01T00:00:00Z",
                                packages=tuple(dataclasses.replace(p, date="later") for p in old.packages))
    assert keep_unchanged(old, later) is old  # nothing moved: the file stays as it is
    bumped = dataclasses.replace(later, packages=tuple(
        dataclasses.replace(p, version="9", sha256="d" * 64) if p.name == "app" else p for p in later.packages))
    kept = keep_unchanged(old, bumped)
    assert [p.date for p in kept.packages if p.name != "app"] == [DATE if p.suite == "trixie" else SEC_DATE
                                                                   for p in old.packages if p.name != "app"]
    assert differences(old, kept) == ["app: 1.0 -> 9 (trixie)"]


def test_lock_from_a_build_is_exact(tmp_path: Path) -> None:
    from builder.pkgresolve import required_seeds

    uni = universe()
    cfg = from_dict({"debian": {"mirror": "http://127.0.0.1:9/debian",
                                "security_mirror": "http://127.0.0.1:9/debian-security"},
                     "provision": {"extra_vars": {"nvidia_driver_source": "nvidia"}}})
    for name in required_seeds(cfg):  # what a build installs besides (test_package_lock_variants: more of it)
        uni.add(stanza(name, "1"), "debian", "trixie", DATE)
    (tmp_path / "packages.txt").write_text("libc6 2.41-12\nmawk 1.3.4\nnvidia-driver-cuda 580.1\n")
    lock = lock_from_build(cfg, uni, tmp_path, report=lambda m: None)
    kept = [(p.name, p.version, p.suite) for p in lock.packages if p.name in ("libc6", "mawk")]
    assert kept == [("libc6", "2.41-12", "trixie"), ("mawk", "1.3.4", "trixie")]  # not -security's libc6
    # besides: what a build installs that this one did not keep (the seeds; base-files: debootstrap's, priority)
    assert {p.name for p in lock.packages} == {"libc6", "mawk", "base-files", *required_seeds(cfg)}
    assert [f.name for f in lock.foreign] == ["nvidia-driver-cuda"] and lock.method == "build"
    (tmp_path / "packages.txt").write_text("libc6 2.40-1\n")
    with pytest.raises(LockError, match="no longer listed at that version") as exc:
        lock_from_build(cfg, uni, tmp_path, report=lambda m: None)
    assert exc.value.log_tail == ["libc6 2.40-1 (the indexes list 2.41-12, 2.41-12+deb13u1)"]


# ------------------------------------------------------------------------------------------- the target's view


def make_deb(control: dict[str, str]) -> bytes:
    """A minimal .deb (ar: debian-binary, control.tar.xz, data.tar.xz)."""
    def tar_xz(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    text = "".join(f"{k}: {v}\n" for k, v in control.items()).encode()
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", tar_xz({"./control": text})),
               (b"data.tar.xz", tar_xz({}))]
    out = b"!<arch>\n"
    for name, data in members:
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        out += str(len(data)).encode().ljust(10) + b"`\n" + data + (b"\n" if len(data) % 2 else b"")
    return out


def pinned(name: str, version: str, deb: bytes, *, archive: str = "debian", suite: str = "trixie",
           filename: str | None = None) -> PackagePin:
    return PackagePin(name, version, "amd64", filename or f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb",
                      len(deb), hashlib.sha256(deb).hexdigest(), archive, suite,
                      SEC_DATE if archive == "debian-security" else DATE, "important", "admin")


def test_view_stanza_is_the_control_file_with_the_pin() -> None:
    control = {"Package": "hello", "Version": "2.10-5", "Architecture": "amd64", "Priority": "optional",
               "Description": "greets\n the world", "Original-Maintainer": "x"}
    pin = pinned("hello", "2.10-5", b"deb")
    text = view_stanza(control, pin)
    assert text.splitlines()[:3] == ["Package: hello", "Version: 2.10-5", "Architecture: amd64"]
    assert "Priority: important" in text and f"SHA256: {pin.sha256}" in text and "Size: 3" in text
    assert "Description: greets\n the world" in text and "Original-Maintainer" not in text
    with pytest.raises(VerificationError, match=r"control file says Version '2\.10-4'"):
        view_stanza({**control, "Version": "2.10-4"}, pin)


def test_views_list_every_locked_package_in_the_suite_and_nothing_newer() -> None:
    a = pinned("hello", "1", b"a")
    b = pinned("libc6", "2", b"b", archive="debian-security", suite="trixie-security",
               filename="pool/updates/main/g/glibc/libc6_2_amd64.deb")
    c = pinned("fw", "3", b"c", filename="pool/non-free-firmware/f/fw/fw_3_all.deb")
    lock = PackageLock("trixie", "trixie", "amd64", "2026-12-01T00:00:00Z", "resolve", tuple(universe().indexes),
                       (a, b, c))
    stanzas = {p.key: f"Package: {p.name}\nVersion: {p.version}\nFilename: {p.filename}" for p in lock.packages}
    views = target_views(lock, stanzas, components=("main", "non-free-firmware"))
    assert [(v.prefix, v.suite) for v in views] == [("debian", "trixie"), ("debian", "trixie-updates"),
                                                    ("debian-security", "trixie-security")]
    main = views[0].files
    assert lzma.decompress(main["main/binary-amd64/Packages.xz"]).decode().count("Package: ") == 2
    assert b"Package: fw" in main["non-free-firmware/binary-amd64/Packages"]
    release = main["Release"].decode()
    # the upstream identity and date as the lock recorded them, and every index by its sha256
    for line in ("Origin: Debian", "Suite: stable", "Codename: trixie", "Version: 13.8", f"Date: {DATE}"):
        assert line in release
    for path, data in main.items():
        if path != "Release":
            assert f" {hashlib.sha256(data).hexdigest()} " in release
    assert views[1].files["main/binary-amd64/Packages"] == b""  # -updates: empty
    assert "Label: Debian-Security" in views[2].files["Release"].decode()
    # the security package is named under the main suite's pool and fetched from the security mirror
    assert view_pins(lock)[f"debian/{b.filename}"] == (b.sha256, b.size, f"debian-security/{b.filename}")
    with pytest.raises(VerificationError, match="component contrib"):
        suite_view([(pinned("x", "1", b"x", filename="pool/contrib/x/x/x_1_all.deb"), "Package: x")],
                   release=ReleaseFields("Debian", "Debian", "stable", "trixie"), date=DATE, components=("main",),
                   arch="amd64", prefix="debian", suite="trixie")


@pytest.mark.timeout(60)
def test_each_component_has_its_release_listed_in_the_signed_inrelease(tmp_path: Path) -> None:
    """debian-installer's choose-mirror reads dists/SUITE/COMPONENT/binary-ARCH/Release (its Architecture) to
    accept the mirror: the view has one per component and suite, listed with size and sha256 in the Release the
    build key signs, and the gateway serves it offline (no upstream to fall through to)."""
    from builder.archive.release import parse_release
    from builder.archive.verify import verify_inrelease
    from builder.gateway.signing import EphemeralKey, combined_keyring
    from builder.services import sign

    a, b = pinned("hello", "1", b"a"), pinned("fw", "3", b"c", filename="pool/non-free-firmware/f/fw/fw_3_all.deb")
    lock = PackageLock("trixie", "trixie", "amd64", "2026-12-01T00:00:00Z", "resolve", tuple(universe().indexes),
                       (a, b))
    comps = ("main", "contrib", "non-free-firmware")
    views = target_views(lock, {p.key: f"Package: {p.name}" for p in lock.packages}, components=comps)
    for view in views:
        release = view.files["Release"].decode()
        for comp in comps:
            path = f"{comp}/binary-amd64/Release"
            data = view.files[path]
            assert f" {hashlib.sha256(data).hexdigest()} {len(data):>16} {path}\n" in release
        assert "Component: contrib\nArchitecture: amd64\n" in view.files["contrib/binary-amd64/Release"].decode()
    assert views[0].files["main/binary-amd64/Release"] == (b"Archive: stable\nOrigin: Debian\nLabel: Debian\n"
                                                           b"Version: 13.8\nComponent: main\nArchitecture: amd64\n")
    assert b"Label: Debian-Security\n" in views[2].files["main/binary-amd64/Release"]
    with EphemeralKey("builder test build key", home_parent=tmp_path / "keys") as key:
        generated: dict[str, bytes] = {}
        for view in views:
            generated.update(sign(view.files, key, f"{view.prefix}/dists/{view.suite}"))
        ring = tmp_path / "target.gpg"
        ring.write_bytes(combined_keyring(DEBIAN_KEYRING, key.public_key()))
        with Gateway(upstreams={"debian": "http://127.0.0.1:9/debian", "debian-security": "http://127.0.0.1:9/x"},
                     cache=ContentCache(tmp_path / "blobs"), keyring=DEBIAN_KEYRING, fingerprints=(),
                     generated=generated, pinned_pool_only=True, offline=True, state_dir=tmp_path / "gw") as gw:
            for prefix, suite in (("debian", "trixie"), ("debian-security", "trixie-security")):
                base = f"{gw.url(prefix)}/dists/{suite}"
                with urllib.request.urlopen(f"{base}/InRelease", timeout=10) as r:
                    signed = parse_release(verify_inrelease(r.read(), ring, [key.fingerprint]))
                for comp in comps:
                    with urllib.request.urlopen(f"{base}/{comp}/binary-amd64/Release", timeout=10) as r:
                        served = r.read()
                    entry = signed.files[f"{comp}/binary-amd64/Release"]
                    assert (entry.sha256, entry.size) == (hashlib.sha256(served).hexdigest(), len(served))
                    # what choose-mirror does with it: wget … | grep ^Architecture:
                    assert [ln for ln in served.decode().splitlines() if ln.startswith("Architecture:")] == [
                        "Architecture: amd64"]
            # and through the verifying client, as apt would fetch it
            client = Archive(gw.url("debian"), "trixie", keyring=ring, fingerprints=[key.fingerprint],
                             cache=ContentCache(tmp_path / "client"), retries=0, timeout=5)
            assert client.index("non-free-firmware/binary-amd64/Release").endswith(b"Architecture: amd64\n")


def test_control_stanza_read_once_from_the_deb(tmp_path: Path) -> None:
    deb = make_deb({"Package": "hello", "Version": "1", "Architecture": "amd64", "Depends": "libc6 (>= 2.34)"})
    cache = ContentCache(tmp_path / "blobs")
    pin = pinned("hello", "1", deb)
    path = cache.put(deb, pin.sha256)
    text = control_stanza(cache, pin, path)
    assert "Depends: libc6 (>= 2.34)" in text and f"SHA256: {pin.sha256}" in text
    path.unlink()  # remembered by the .deb's sha256
    assert control_stanza(cache, pin, path) == text


@pytest.fixture()
def mirror(tmp_path: Path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

    root = tmp_path / "mirror"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _put(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def archives_for(base: str, cache: ContentCache, *, offline: bool = False) -> dict[str, Archive]:
    return {name: Archive(f"{base}/{name}", "trixie", keyring=DEBIAN_KEYRING, fingerprints=(), cache=cache,
                          retries=0, timeout=5, offline=offline) for name in ("debian", "debian-security")}


@pytest.mark.timeout(30)
def test_fetch_names_every_locked_file_gone_from_the_mirror(tmp_path: Path, mirror) -> None:
    root, base = mirror
    debs = {n: make_deb({"Package": n, "Version": "1", "Architecture": "amd64"}) for n in ("a1", "b1", "c1")}
    pins = [pinned(n, "1", d) for n, d in debs.items()]
    pins[2] = dataclasses.replace(pins[2], archive="debian-security", filename="pool/updates/main/c/c1/c1_1.deb")
    _put(root, f"debian/{pins[0].filename}", debs["a1"])
    lock = PackageLock("trixie", "trixie", "amd64", "x", "resolve", (), tuple(pins))
    cache = ContentCache(tmp_path / "blobs")
    with pytest.raises(LockError) as exc:
        fetch_packages(lock, archives_for(base, cache))
    assert str(exc.value).startswith("2 files the package lock pins are gone from the mirror: b1 1, c1 1")
    assert any("/debian-security/pool/updates/main/c/c1/c1_1.deb (404)" in ln for ln in exc.value.log_tail)
    assert "lock IMAGE.yaml --update" in (exc.value.hint or "")
    _put(root, f"debian/{pins[1].filename}", debs["b1"])
    _put(root, f"debian-security/{pins[2].filename}", debs["c1"])
    paths, downloaded = fetch_packages(lock, archives_for(base, cache))
    assert downloaded == 2 and len(paths) == 3
    # offline, from the cache alone; what is not cached is named, in one error
    paths, downloaded = fetch_packages(lock, archives_for("http://127.0.0.1:9", cache, offline=True))
    assert downloaded == 0 and len(paths) == 3
    extra = pinned("d1", "1", b"not cached")
    with pytest.raises(OfflineError) as off:
        fetch_packages(dataclasses.replace(lock, packages=(*lock.packages, extra)),
                       archives_for("http://127.0.0.1:9", cache, offline=True))
    assert off.value.missing == [f"d1 1 ({extra.filename})"]


@pytest.mark.timeout(30)
def test_the_gateway_serves_the_target_only_pinned_pool_files(tmp_path: Path, mirror) -> None:
    root, base = mirror
    data = b"the security build" * 10
    pin = pinned("libc6", "2", data, archive="debian-security", filename="pool/updates/main/g/glibc/libc6_2.deb")
    _put(root, f"debian-security/{pin.filename}", data)
    _put(root, "debian/pool/main/o/other/other_1.deb", b"not locked")
    lock = PackageLock("trixie", "trixie", "amd64", "x", "resolve", (), (pin,))
    pins = {k: Pin(sha, size, src) for k, (sha, size, src) in view_pins(lock).items()}
    with Gateway(upstreams={"debian": f"{base}/debian", "debian-security": f"{base}/debian-security"},
                 cache=ContentCache(tmp_path / "blobs"), keyring=DEBIAN_KEYRING, fingerprints=(), pins=pins,
                 pinned_pool_only=True, generated={"debian/dists/trixie/Release": b"Origin: Debian\n"},
                 state_dir=tmp_path / "gw") as gw:
        u = f"http://127.0.0.1:{gw.port}"
        with urllib.request.urlopen(f"{u}/debian/{pin.filename}", timeout=10) as r:
            assert r.read() == data  # under the main suite's pool, fetched from the security mirror
        with urllib.request.urlopen(f"{u}/debian/dists/trixie/Release", timeout=10) as r:
            assert r.read() == b"Origin: Debian\n"
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{u}/debian/pool/main/o/other/other_1.deb", timeout=10)
        assert exc.value.code == 404


# ------------------------------------------------------------------------------------------- the installer's side


def _inputs(tmp_path: Path, target: object) -> object:
    import gzip

    from builder.installer.cpio import CpioEntry, cpio_newc
    from builder.stages.fetch import InstallerInputs

    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(cpio_newc([CpioEntry.file("init", b"#!/bin/sh\n", 0o755)])))
    return InstallerInputs(lock=None, kernel=Path("/nonexistent"), initrd=initrd, isolinux_bin=b"",  # type: ignore[arg-type]
                           ldlinux_c32=b"", udeb_packages=b"", udeb_pins={}, inrelease=b"", target=target)  # type: ignore[arg-type]


def test_with_a_package_lock_the_target_trusts_the_build_key(tmp_path: Path) -> None:
    import subprocess

    from builder.gateway.target import KEY_FILE
    from builder.installer.cpio import read_cpio_entries
    from builder.stages.media import KEY_IN_INITRD, TRUST_HOOK, installer_initrd

    cfg = from_dict({"debian": {"mirror": "http://127.0.0.1:9/debian",
                                "security_mirror": "http://127.0.0.1:9/debian-security"}})
    plain = {e.name: e for e in read_cpio_entries(installer_initrd(cfg, _inputs(tmp_path, None), "x", b"KEY"))}
    assert TRUST_HOOK not in plain and KEY_IN_INITRD not in plain
    entries = {e.name: e for e in read_cpio_entries(installer_initrd(cfg, _inputs(tmp_path, object()), "x", b"KEY"))}
    hook, key = entries[TRUST_HOOK], entries[KEY_IN_INITRD]
    assert hook.mode & 0o777 == 0o755 and key.data == b"KEY"
    assert entries["usr/lib/base-installer.d"].is_dir
    # the hook, run the way base-installer runs it (with / and /target moved under a scratch root)
    root = tmp_path / "root"
    (root / KEY_IN_INITRD).parent.mkdir(parents=True)
    (root / KEY_IN_INITRD).write_bytes(b"KEY")
    script = hook.data.decode().replace("/target", f"{root}/target").replace(f" /{KEY_IN_INITRD}",
                                                                             f" {root}/{KEY_IN_INITRD}")
    subprocess.run(["sh", "-c", script], check=True)
    installed = root / "target" / KEY_FILE.lstrip("/")
    assert installed.read_bytes() == b"KEY" and installed.stat().st_mode & 0o777 == 0o644


def test_the_installed_disk_key_covers_the_package_lock() -> None:
    from test_lock_and_cache import sample_lock

    from builder.ssh import generate_keypair
    from builder.stages.media import disk_key

    cfg = from_dict({"debian": {"mirror": "http://127.0.0.1:9/debian",
                                "security_mirror": "http://127.0.0.1:9/debian-security"}})
    client, host = generate_keypair("c"), generate_keypair("h")
    plock = lock_of(universe(), ["app"])
    keys = {disk_key(cfg, sample_lock(), "preseed", client, host, package_lock=p)
            for p in (None, plock, dataclasses.replace(plock, created="later"),
                      dataclasses.replace(plock, packages=plock.packages[1:]))}
    assert len(keys) == 3  # no lock, the lock, a lock pinning other packages; not when it was made
