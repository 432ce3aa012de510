"""builder.hostmodule without a build root: version resolution, the cache key, the module cache, the mmdebstrap
command line, the tarball check, and build_module's control flow with a fake mmdebstrap on PATH."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from builder import hostmodule as hm
from builder.config import DebianConfig
from builder.errors import HostModuleError

KVER_OLD = "6.12.117+deb13-amd64"
KVER = "6.12.118+deb13-amd64"


def stanza(name: str, version: str, depends: str = "", sha: str = "") -> dict[str, str]:
    st = {"Package": name, "Version": version, "SHA256": sha or (name + version).encode().hex()[:64].ljust(64, "0")}
    if depends:
        st["Depends"] = depends
    return st


def index(*stanzas: dict[str, str]) -> dict[str, dict[str, str]]:
    return {s["Package"]: s for s in stanzas}


def trixie_like() -> list[hm.LabelledIndex]:
    """The shape of trixie: the point release's kernel in the suite, a newer one in -security, gcc and dkms
    in the suite, the NVIDIA source package in non-free."""
    main = index(
        stanza("linux-image-amd64", "6.12.117-1", f"linux-image-{KVER_OLD} (= 6.12.117-1)"),
        stanza(f"linux-image-{KVER_OLD}", "6.12.117-1", "kmod"),
        stanza(f"linux-headers-{KVER_OLD}", "6.12.117-1",
               f"linux-base (>= 4.12~), linux-image-{KVER_OLD} (= 6.12.117-1) | linux-image-{KVER_OLD}-unsigned "
               "(= 6.12.117-1), linux-kbuild-6.12.117+deb13, gcc-14"),
        stanza("gcc-14", "14.2.0-19", "cpp-14 (= 14.2.0-19)"),
        stanza("dkms", "3.2.2-1~deb13u1", "kmod, dpkg-dev"),
    )
    nonfree = index(stanza("nvidia-kernel-dkms", "550.163.01-2", "dkms (>= 3.0.11)"))
    security = index(
        stanza("linux-image-amd64", "6.12.118-1", f"linux-image-{KVER} (= 6.12.118-1)"),
        stanza(f"linux-image-{KVER}", "6.12.118-1", "kmod"),
        stanza(f"linux-headers-{KVER}", "6.12.118-1",
               f"linux-image-{KVER} (= 6.12.118-1) | linux-image-{KVER}-unsigned (= 6.12.118-1), gcc-14"),
    )
    updates = index(stanza("gcc-14", "14.2.0-19+b1", "cpp-14"))
    return [("trixie/main", main), ("trixie/non-free", nonfree), ("trixie-updates/main", updates),
            ("trixie-updates/non-free", {}), ("trixie-security/main", security)]


# ---------------------------------------------------------------------------------------------- resolution


def test_highest_version_across_suites_like_apt():
    idx = [("a", index(stanza("p", "1.0-1"))), ("b", index(stanza("p", "1:0.9-1"))),
           ("c", index(stanza("p", "1.0-1~deb13u1"))), ("d", index(stanza("q", "9")))]
    best = hm.highest(idx, "p")
    assert best is not None and (best.version, best.where) == ("1:0.9-1", "b")  # the epoch wins
    best = hm.highest(idx[:1] + idx[2:], "p")
    assert best is not None and best.version == "1.0-1"  # ~ sorts before the release it precedes
    assert hm.highest(idx, "missing") is None


def test_image_kernel_is_the_metapackage_dependency_at_its_highest_version():
    idx = trixie_like()
    assert hm.image_kernel(idx) == KVER  # -security's metapackage, not the point release's
    assert hm.image_kernel(idx[:2]) == KVER_OLD  # without -security
    with pytest.raises(HostModuleError, match=r"linux-image-arm64 \(the kernel metapackage\) is in none"):
        hm.image_kernel(idx, "arm64")
    odd = [("x", index(stanza("linux-image-amd64", "1", "kmod, initramfs-tools")))]
    with pytest.raises(HostModuleError, match="depends on no versioned linux-image"):
        hm.image_kernel(odd)


def test_depends_names_take_the_first_alternative_without_versions():
    st = {"Depends": "aa (>= 1), bb:any | cc, dd [amd64],\n ee"}
    assert hm.depends_names(st) == ["aa", "bb", "dd", "ee"]
    headers = hm.highest(trixie_like(), f"linux-headers-{KVER}")
    assert headers is not None and hm.compiler_of(headers) == "gcc-14"
    assert hm.compiler_of(hm.Resolved("x", "1", "", "", {"Depends": "make"})) == "gcc"


def test_plan_pins_every_package_at_the_version_the_target_installs():
    plan = hm.plan_module(trixie_like(), "nvidia-kernel-dkms")
    assert plan.kver == KVER
    assert plan.includes() == ("dkms=3.2.2-1~deb13u1", "gcc-14=14.2.0-19+b1", f"linux-headers-{KVER}=6.12.118-1",
                               "nvidia-kernel-dkms=550.163.01-2")
    assert plan.dkms_package.where == "trixie/non-free" and plan.headers.where == "trixie-security/main"
    assert plan.signing == "unsigned"
    old = hm.plan_module(trixie_like(), "nvidia-kernel-dkms", kver=KVER_OLD)  # an explicit kernel
    assert old.headers.pin == f"linux-headers-{KVER_OLD}=6.12.117-1"


@pytest.mark.parametrize(("package", "kver", "message"), [
    ("nvidia-open-kernel-dkms", None, r"nvidia-open-kernel-dkms \(the DKMS source package\) is in none of the "
                                      r"package indexes \(trixie/main, trixie/non-free"),
    ("nvidia-kernel-dkms", "6.1.0-99-amd64", r"linux-headers-6.1.0-99-amd64 \(the headers of kernel"),
    ("nvidia-kernel-dkms", "6.12; rm -rf /", "not a kernel release"),
])
def test_plan_errors_name_what_is_missing(package, kver, message):
    with pytest.raises(HostModuleError, match=message) as ei:
        hm.plan_module(trixie_like(), package, kver=kver)
    assert ei.value.missing_tool is None


def test_load_indexes_keeps_the_packages_a_plan_can_use(monkeypatch):
    text = {
        ("trixie", "main"): b"Package: dkms\nVersion: 3.2\n\nPackage: dkms\nVersion: 3.10\n\n"
                            b"Package: vim\nVersion: 9\n",
        ("trixie", "non-free"): b"Package: nvidia-kernel-dkms\nVersion: 550\n",
        ("trixie-updates", "main"): b"",
        ("trixie-updates", "non-free"): b"",
        ("trixie-security", "main"): b"Package: linux-headers-x\nVersion: 1\n",
    }
    seen = []

    class FakeArchive:
        def __init__(self, url, suite, *, keyring, fingerprints, cache, stats):
            self.url, self.suite, self.fingerprints = url, suite, fingerprints

        def release(self):  # the security archive has no non-free here, and says "updates/main"
            comps = ("main",) if self.suite == "trixie-security" else ("main", "non-free")
            files = {f"{c}/binary-amd64/Packages{sfx}": None for c in comps for sfx in ("", ".xz")}
            return type("R", (), {"components": tuple(f"updates/{c}" for c in comps), "files": files})()

        def index(self, path):
            seen.append((self.url, self.suite, self.fingerprints, path))
            return text[(self.suite, path.split("/", 1)[0])]

    monkeypatch.setattr(hm, "Archive", FakeArchive)
    deb = DebianConfig(mirror="http://gw/debian", security_mirror="http://gw/debian-security",
                       components=("main", "non-free"))
    got = dict(hm.load_indexes(hm.Sources.of(deb), cache=None))  # type: ignore[arg-type]
    assert list(got) == ["trixie/main", "trixie/non-free", "trixie-updates/main", "trixie-updates/non-free",
                         "trixie-security/main"]
    assert got["trixie/main"]["dkms"]["Version"] == "3.10" and "vim" not in got["trixie/main"]
    assert [s[:2] for s in seen if s[3].startswith("main/")] == [
        ("http://gw/debian", "trixie"), ("http://gw/debian", "trixie-updates"),
        ("http://gw/debian-security", "trixie-security")]
    assert seen[-1][2] == deb.security_fingerprints and seen[0][2] == deb.trusted_fingerprints


# ---------------------------------------------------------------------------------------------- cache key


def test_cache_key_covers_what_decides_the_module(tmp_path):
    plan = hm.plan_module(trixie_like(), "nvidia-kernel-dkms")
    key = plan.cache_key()
    assert key == hm.plan_module(trixie_like(), "nvidia-kernel-dkms").cache_key() and len(key) == 32
    r = dataclasses.replace
    variants = [
        r(plan, dkms_package=r(plan.dkms_package, version="550.163.01-3")),
        r(plan, dkms_package=r(plan.dkms_package, sha256="f" * 64)),  # same version, rebuilt source package
        r(plan, dkms_package=r(plan.dkms_package, name="nvidia-open-kernel-dkms")),
        r(plan, kver=KVER_OLD),
        r(plan, headers=r(plan.headers, version="6.12.118-2")),
        r(plan, compiler=r(plan.compiler, version="14.2.0-20")),
        r(plan, dkms=r(plan.dkms, version="3.2.3-1")),
        r(plan, signing="a" * 64),
    ]
    keys = {v.cache_key() for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert r(plan, dkms_package=r(plan.dkms_package, where="trixie-updates/non-free")).cache_key() == key
    cert = tmp_path / "mok.crt"
    cert.write_bytes(b"certificate")
    signed = hm.plan_module(trixie_like(), "nvidia-kernel-dkms", signing_cert=cert)
    assert signed.signing == hashlib.sha256(b"certificate").hexdigest()
    assert signed.cache_key() != key


def test_module_cache_store_and_lookup(tmp_path):
    cache = hm.ModuleCache(tmp_path / "modules")
    assert cache.lookup("k1") is None
    src = tmp_path / "m.tar.gz"
    src.write_bytes(b"tarball")
    stored = cache.store("k1", src, {"module": "m", "version": "1"})
    assert stored == tmp_path / "modules/k1/module.tar.gz" and stored.read_bytes() == b"tarball"
    hit = cache.lookup("k1")
    assert hit is not None and hit[0] == stored and hit[1]["module"] == "m" and hit[1]["key"] == "k1"
    assert not [p for p in (tmp_path / "modules").iterdir() if p.name.startswith(".")]  # no staging left
    # a second store of the same key (a parallel build) keeps the first entry
    src.write_bytes(b"another")
    assert cache.store("k1", src, {"module": "m", "version": "1"}).read_bytes() == b"tarball"
    # a damaged entry is a miss, and is removed
    stored.write_bytes(b"damaged")
    assert cache.lookup("k1") is None and not (tmp_path / "modules/k1").exists()


# ---------------------------------------------------------------------------------------------- mmdebstrap


def sources() -> hm.Sources:
    deb = DebianConfig(mirror="http://x", security_mirror="http://x")
    return hm.Sources.of(deb, mirror="http://127.0.0.1:4711/debian", security_mirror="http://127.0.0.1:4711/debian-security")


def test_mmdebstrap_argv(tmp_path):
    plan = hm.plan_module(trixie_like(), "nvidia-kernel-dkms")
    argv = hm.mmdebstrap_argv(plan, sources(), mode="unshare", script=tmp_path / "s.sh", outdir=tmp_path / "out")
    assert argv[:4] == ["mmdebstrap", "--mode=unshare", "--variant=buildd", "--architectures=amd64"]
    assert "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg" in argv
    assert f"--include=dkms=3.2.2-1~deb13u1,gcc-14=14.2.0-19+b1,linux-headers-{KVER}=6.12.118-1," \
           "nvidia-kernel-dkms=550.163.01-2" in argv
    comps = "main contrib non-free non-free-firmware"
    assert argv[-5:] == ["trixie", "/dev/null", f"deb http://127.0.0.1:4711/debian trixie {comps}",
                         f"deb http://127.0.0.1:4711/debian trixie-updates {comps}",
                         f"deb http://127.0.0.1:4711/debian-security trixie-security {comps}"]
    assert '--aptopt=Acquire::http::Proxy::127.0.0.1 "DIRECT"' in argv
    direct = hm.mmdebstrap_argv(plan, hm.Sources.of(DebianConfig(mirror="http://192.0.2.1/debian",
                                                                  security_mirror="http://192.0.2.1/debian-security")),
                                mode="root", script=tmp_path / "s.sh", outdir=tmp_path / "out")
    assert not [a for a in direct if "Proxy" in a]  # a mirror elsewhere goes through the environment's proxy
    hooks = [a for a in argv if a.startswith(("--essential-hook", "--customize-hook"))]
    assert hooks[0].startswith("--essential-hook=") and "etc/dkms/no-autoinstall" in hooks[0]
    assert hooks[-1] == f"--customize-hook=copy-out /tmp/builder-out {tmp_path / 'out'}"
    assert f"/bin/bash /tmp/builder-build-module nvidia-kernel-dkms {KVER} /tmp/builder-out" in hooks[-2]
    assert not [h for h in hooks if "signing" in h]
    signed = hm.mmdebstrap_argv(plan, sources(), mode="root", script=tmp_path / "s.sh", outdir=tmp_path / "out",
                                signing=(Path("/keys/my key.pem"), Path("/keys/cert.pem")))
    shooks = [a for a in signed if a.startswith("--customize-hook")]
    assert "--customize-hook=upload '/keys/my key.pem' /etc/dkms/builder-signing/signing.key" in shooks
    assert "--customize-hook=upload /keys/cert.pem /etc/dkms/builder-signing/signing.crt" in shooks
    assert shooks[-2].endswith(" /etc/dkms/builder-signing/signing.key /etc/dkms/builder-signing/signing.crt")


def test_mmdebstrap_argv_under_a_package_lock(tmp_path):
    """The lock's view has no build-essential: an apt root with the plan and the tools the view lists (pinned),
    verified with the keyring and signer of the view; without a lock the tools stay out (buildd has them)."""
    idx = [*trixie_like(), ("trixie/extra", index(stanza("kmod", "34.2-2"), stanza("zstd", "1.5.7+dfsg-1")))]
    plan = hm.plan_module(idx, "nvidia-kernel-dkms")
    assert [t.pin for t in plan.tools] == ["kmod=34.2-2", "zstd=1.5.7+dfsg-1"]
    assert plan.cache_key() == hm.plan_module(trixie_like(), "nvidia-kernel-dkms").cache_key()  # no byte of it
    base = ",".join(hm.plan_module(trixie_like(), "nvidia-kernel-dkms").includes())
    unlocked = hm.mmdebstrap_argv(plan, sources(), mode="unshare", script=tmp_path / "s", outdir=tmp_path / "o")
    assert "--variant=buildd" in unlocked and f"--include={base}" in unlocked
    view = sources().locked_view(tmp_path / "target.gpg", "F" * 40, suite="trixie", codename="trixie")
    assert view.fingerprints == view.security_fingerprints == ("F" * 40,) and view.mirror == sources().mirror
    locked = hm.mmdebstrap_argv(plan, view, mode="unshare", script=tmp_path / "s", outdir=tmp_path / "o")
    assert locked[:4] == ["mmdebstrap", "--mode=unshare", "--variant=apt", "--architectures=amd64"]
    assert f"--include={base},kmod=34.2-2,zstd=1.5.7+dfsg-1" in locked
    # the view's keyring is each source's signed-by: no --keyring (apt's legacy trusted.gpg, and the host's
    # trusted.gpg.d trusted besides)
    assert not [a for a in locked if a.startswith("--keyring")]
    comps = "main contrib non-free non-free-firmware"
    ring = tmp_path / "target.gpg"
    assert locked[-3:] == [f"deb [signed-by={ring}] http://127.0.0.1:4711/debian trixie {comps}",
                           f"deb [signed-by={ring}] http://127.0.0.1:4711/debian trixie-updates {comps}",
                           f"deb [signed-by={ring}] http://127.0.0.1:4711/debian-security trixie-security {comps}"]
    # everything else as without a lock
    differ = {"--variant=apt", f"--include={base},kmod=34.2-2,zstd=1.5.7+dfsg-1", *locked[-3:]}
    assert [a for a in locked if a not in differ] == [a for a in unlocked if a != "--variant=buildd"
                                                      and not a.startswith(("--keyring=", "--include=", "deb "))]
    assert unlocked[-3:] == [f"deb http://127.0.0.1:4711/debian trixie {comps}",
                             f"deb http://127.0.0.1:4711/debian trixie-updates {comps}",
                             f"deb http://127.0.0.1:4711/debian-security trixie-security {comps}"]
    for bad in (Path("relative.gpg"), tmp_path / "a b.gpg", tmp_path / "x]y.gpg"):
        with pytest.raises(HostModuleError, match="cannot be an apt source's signed-by"):
            sources().locked_view(bad, "F" * 40, suite="trixie", codename="trixie")


def test_under_a_lock_the_suites_are_named_as_the_lock_names_them(tmp_path):
    """debian.suite may be an alias (stable): the mirror has stable-updates and stable-security too, the lock's
    view only dists/<lock suite>, <codename>-updates and <codename>-security. Without a lock nothing changes."""
    deb = DebianConfig(suite="stable", mirror="http://x", security_mirror="http://x")
    plain = hm.Sources.of(deb, mirror="http://127.0.0.1:4711/debian",
                          security_mirror="http://127.0.0.1:4711/debian-security")
    assert [s for _, s, _ in plain.archives()] == ["stable", "stable-updates", "stable-security"]
    view = plain.locked_view(tmp_path / "t.gpg", "F" * 40, suite="stable", codename="trixie")
    assert [s for _, s, _ in view.archives()] == ["stable", "trixie-updates", "trixie-security"]
    assert [line.split()[3] for line in view.apt_lines()] == ["stable", "trixie-updates", "trixie-security"]


def make_tarball(path: Path, module: str = "m", version: str = "1", kver: str = KVER,
                 extra: dict[str, bytes] | None = None) -> Path:
    files = {"./dkms_binaries_only/PACKAGE_NAME": f"{module}\n".encode(),
             "./dkms_binaries_only/PACKAGE_VERSION": f"{version}\n".encode(),
             "./dkms_binaries_only/dkms.conf": b'PACKAGE_NAME="m"\n',
             f"./dkms_main_tree/{kver}/x86_64/module/{module}.ko.xz": b"\xfd7zXZ module",
             f"./dkms_main_tree/{kver}/x86_64/log/make.log": b"make\n", **(extra or {})}
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_check_tarball(tmp_path):
    good = make_tarball(tmp_path / "good.tar.gz")
    assert hm.check_tarball(good, "m", "1", KVER, "x86_64") == []
    assert hm.check_tarball(good, "n", "2", KVER_OLD, "x86_64") == [
        "not a binaries-only tarball of n", "not of version 2", f"no built module for {KVER_OLD} (x86_64)"]
    leaky = make_tarball(tmp_path / "leaky.tar.gz", extra={"./key.pem": b"-----BEGIN PRIVATE KEY-----\nx\n"})
    assert hm.check_tarball(leaky, "m", "1", KVER, "x86_64") == ["key.pem holds a private key"]
    copied = make_tarball(tmp_path / "copied.tar.gz", extra={"./x": b"secret-bytes-of-a-key"})
    assert hm.check_tarball(copied, "m", "1", KVER, "x86_64", b"secret-bytes-of-a-key\n") == ["x holds a private key"]
    (tmp_path / "junk").write_bytes(b"junk")
    assert hm.check_tarball(tmp_path / "junk", "m", "1", KVER, "x86_64")[0].startswith("not a readable tar.gz")


# ---------------------------------------------------------------------------------------------- build_module

FAKE_MMDEBSTRAP = r"""#!/usr/bin/env python3
# Stands in for mmdebstrap: records its argv, writes what the build script would into copy-out's directory.
import json, os, shutil, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
outdir = next(a.split()[-1] for a in argv if a.startswith("--customize-hook=copy-out "))
res = os.path.join(outdir, "builder-out")
os.makedirs(res, exist_ok=True)
mode = os.environ["FAKE_RESULT"]
if mode == "apt-fails":
    print("E: Version '550.163.01-2' for 'nvidia-kernel-dkms' was not found")
    sys.exit(1)
open(os.path.join(res, "info"), "w").write("module=m\nversion=1\n" + os.environ.get("FAKE_SIGNER", "signer=\n"))
open(os.path.join(res, "make.log"), "w").write("".join(f"make line {i}\n" for i in range(40)) + "error: it broke\n")
if mode == "compile-fails":
    open(os.path.join(res, "error"), "w").write("dkms build -m m -v 1 -k KVER exited with 10\n")
    sys.exit(0)
shutil.copyfile(os.environ["FAKE_TARBALL"], os.path.join(res, "module.tar.gz"))
open(os.path.join(res, "status"), "w").write("ok\n")
"""


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "mmdebstrap"
    tool.write_text(FAKE_MMDEBSTRAP)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_TARBALL", str(make_tarball(tmp_path / "built.tar.gz")))
    monkeypatch.setenv("FAKE_RESULT", "ok")
    monkeypatch.setattr(hm, "load_indexes", lambda *a, **kw: trixie_like())
    monkeypatch.setattr(hm, "mmdebstrap_mode", lambda: "unshare")

    def calls() -> list[list[str]]:
        log = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def build(**kw):
        kw.setdefault("kver", KVER)
        return hm.build_module(sources(), "nvidia-kernel-dkms", workdir=tmp_path / "work", cache=None,
                               modules=hm.ModuleCache(tmp_path / "modules"), niceness=None, **kw)

    return build, calls, monkeypatch


def test_build_then_cache_hit_without_mmdebstrap(fake_build, tmp_path):
    build, calls, _ = fake_build
    first = build()
    assert (first.origin, first.module, first.version, first.kver) == ("host-built", "m", "1", KVER)
    assert first.tarball == tmp_path / "modules" / first.key / "module.tar.gz" and first.tarball.is_file()
    assert first.package == "nvidia-kernel-dkms" and first.package_version == "550.163.01-2"
    assert len(calls()) == 1 and (tmp_path / "work/build-module.sh").read_text() == hm.BUILD_SCRIPT
    second = build()
    assert second.origin == "cache" and second.tarball == first.tarball and len(calls()) == 1
    assert second.manifest() | {"seconds": 0} == {
        "origin": "cache", "module": "m", "version": "1", "kver": KVER, "seconds": 0,
        "package": "nvidia-kernel-dkms=550.163.01-2", "cache_key": first.key, "signer": None, "dkms_patches": []}


def test_a_failed_compile_is_one_error_with_the_end_of_make_log(fake_build):
    build, _, mp = fake_build
    mp.setenv("FAKE_RESULT", "compile-fails")
    with pytest.raises(HostModuleError, match=r"host-side DKMS build of nvidia-kernel-dkms=550.163.01-2 for kernel "
                                              r"6.12.118\+deb13-amd64 failed: dkms build .* exited with 10") as ei:
        build()
    assert ei.value.log_tail[-1] == "error: it broke" and len(ei.value.log_tail) == 25
    assert ei.value.missing_tool is None


def test_a_failed_build_root_shows_mmdebstraps_output(fake_build):
    build, _, mp = fake_build
    mp.setenv("FAKE_RESULT", "apt-fails")
    with pytest.raises(HostModuleError, match=r"mmdebstrap could not make the build root .* exit code 1") as ei:
        build()
    assert any("was not found" in line for line in ei.value.log_tail)


def test_signing_needs_both_files_and_a_signed_module(fake_build, tmp_path):
    build, calls, mp = fake_build
    key, cert = tmp_path / "mok.key", tmp_path / "mok.crt"
    key.write_text("-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n")
    cert.write_text("cert")
    with pytest.raises(HostModuleError, match="both a key and a certificate"):
        build(signing_key=key)
    with pytest.raises(HostModuleError, match="is not a file"):
        build(signing_key=key, signing_cert=tmp_path / "none.crt")
    with pytest.raises(HostModuleError, match="not signed although a signing key was given"):
        build(signing_key=key, signing_cert=cert)
    mp.setenv("FAKE_SIGNER", "signer=builder test\n")
    signed = build(signing_key=key, signing_cert=cert)
    assert signed.signer == "builder test" and signed.origin == "host-built"
    assert f"--customize-hook=upload {key} /etc/dkms/builder-signing/signing.key" in calls()[-1]
    unsigned = build()
    assert unsigned.key != signed.key  # the certificate is part of the key


def test_missing_mmdebstrap_is_a_missing_tool(fake_build, monkeypatch, tmp_path):
    build, _, _ = fake_build
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HostModuleError, match="mmdebstrap is not installed") as ei:
        build()
    assert ei.value.missing_tool == "mmdebstrap" and "apt-get install mmdebstrap" in (ei.value.hint or "")


def test_the_build_script_is_valid_bash(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text(hm.BUILD_SCRIPT)
    assert os.system(f"bash -n {script}") == 0


def test_first_compile_error_of_a_dkms_make_log():
    # lines of the make.log of Debian's nvidia-open-kernel-dkms 550.163.01-2 against 6.12.118+deb13-amd64
    log = b"""# CC [M]  /var/lib/dkms/nvidia-current-open/550.163.01/build/nvidia/nv-pci.o
/var/lib/dkms/nvidia-current-open/550.163.01/build/nvidia/nv-pci.c: In function 'nv_resize_pcie_bars':
/var/lib/dkms/nvidia-current-open/550.163.01/build/nvidia/nv-pci.c:237:9: error: too few arguments to function \
'pci_resize_resource'
  237 |     r = pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);
make[4]: *** [scripts/Makefile.build:234: nvidia/nv-pci.o] Error 1
"""
    got = hm.first_compile_error(log)
    assert got.startswith("nvidia/nv-pci.c:237:9: error: too few arguments to function")
    assert hm.first_compile_error(b"CONFTEST: dma_fence_set_error\nmake: *** Error 2\n") == ""
