"""builder.stages.module: when the NVIDIA module is built on the host, how a failure is handled, what reaches the
playbook and the manifest. No build root: the host build is replaced where it would run."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from builder.config import load_config
from builder.context import BuildContext, BuildOptions
from builder.errors import HostModuleError
from builder.events import Emitter
from builder.gateway.server import Pin
from builder.hostmodule import HostModule, Sources
from builder.secureboot import write_pair
from builder.stages import module
from builder.stages.provision import playbook_vars

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "images" / "cloud-gpu-worker.yaml"
KVER = "6.12.118+deb13-amd64"


def cfg(*overrides: str):
    return load_config(IMAGE, list(overrides))


@pytest.mark.parametrize(("overrides", "package", "why"), [
    ((), "nvidia-kernel-dkms", "nvidia_driver_flavor current"),
    (("provision.extra_vars.nvidia_driver_flavor=open",), "nvidia-open-kernel-dkms", "flavor open"),
    (("provision.extra_vars.nvidia_driver_flavor=tesla-535",), "nvidia-tesla-535-kernel-dkms", "tesla-535"),
    (("provision.host_module=off",), None, "provision.host_module is off"),
    (("provision.enabled=false",), None, "provisioning is off"),
    (("provision.extra_vars.nvidia_driver_source=nvidia",), None, "nvidia_driver_source is 'nvidia'"),
    (("provision.extra_vars.nvidia_driver_flavor=nope",), None, "nvidia_driver_flavor 'nope' names no DKMS"),
    (("provision.extra_vars.nvidia_dkms_tarball=/x.tar.gz",), None, "sets nvidia_dkms_tarball already"),
])
def test_which_package_is_built_on_the_host(overrides, package, why):
    got, reason = module.dkms_package(cfg(*overrides))
    assert got == package and why in reason


def test_the_role_decides_its_own_report_path():
    assert module.report_path(cfg()) == "/var/lib/nvidia-gpu-drivers/module.json"
    assert module.report_path(cfg("provision.extra_vars.nvidia_module_report=")) is None


def built(origin="host-built") -> HostModule:
    return HostModule(Path("/cache/modules/k/module.tar.gz"), "nvidia-current", "550.163.01", KVER, origin,
                      312.4, "nvidia-kernel-dkms", "550.163.01-2", "k")


def test_playbook_vars_carry_the_tarball(tmp_path):
    c = cfg()
    assert playbook_vars(c, tmp_path, None) == dict(c.provision.extra_vars)
    assert playbook_vars(c, tmp_path, built())["nvidia_dkms_tarball"] == "/cache/modules/k/module.tar.gz"


def test_module_manifest():
    record = {"origin": "prebuilt", "module": "nvidia-current", "version": "550.163.01", "kver": KVER,
              "kernels": {KVER: "prebuilt"}, "guest_seconds": 21.0}
    assert module.module_manifest(built("cache"), record) == {
        "origin": "cache", "module": "nvidia-current", "version": "550.163.01", "kver": KVER, "seconds": 312.4,
        "kernels": {KVER: "cache"}}
    guest = {**record, "origin": "guest-compiled", "kernels": {KVER: "guest-compiled"}, "guest_seconds": "2712.3"}
    assert module.module_manifest(None, guest) == {
        "origin": "guest-compiled", "module": "nvidia-current", "version": "550.163.01", "kver": KVER,
        "seconds": 2712.3, "kernels": {KVER: "guest-compiled"}}
    # the tarball was for another kernel than the installed one: the role compiled in the guest
    assert module.module_manifest(built(), guest)["origin"] == "guest-compiled"
    assert module.module_manifest(None, None) is None
    unknown = module.module_manifest(built(), None)
    assert unknown is not None and unknown["origin"] == "host-built" and "recorded nothing" in unknown["note"]


@pytest.fixture
def events() -> list:
    return []


@pytest.fixture
def ctx(tmp_path, events):
    with ExitStack() as stack:
        yield BuildContext(cfg(), BuildOptions(tmp_path / "out"), tmp_path, Emitter(events.append), stack,
                           None)  # type: ignore[arg-type]


class FakeJob(module.ModuleJob):
    def __init__(self, ctx, *, result=None, error=None):
        super().__init__(ctx, "nvidia-kernel-dkms")
        self.result, self.error = result, error
        self.thread = threading.Thread(target=lambda: None)
        self.thread.start()


class FakeGateway:
    def url(self, prefix, host="127.0.0.1"):
        return f"http://{host}:4711/{prefix}"


def test_finish_returns_the_module_and_records_it(ctx):
    assert module.finish(ctx, FakeJob(ctx, result=built())) == built()
    assert ctx.manifest["host_module"]["status"] == "used" and ctx.manifest["host_module"]["origin"] == "host-built"
    assert module.finish(ctx, None) is None


def test_a_missing_tool_falls_back_to_the_guest_with_a_warning_at_once(ctx, events, monkeypatch):
    err = HostModuleError("mmdebstrap is not installed", missing_tool="mmdebstrap", hint="apt-get install mmdebstrap")

    def fake_build(*a, **kw):
        raise err

    monkeypatch.setattr(module, "build_module", fake_build)
    monkeypatch.setattr(type(ctx), "gateway", property(lambda self: FakeGateway()))
    job = module.start(ctx)
    assert job is not None
    job.thread.join(10)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert warnings == ["mmdebstrap is not installed: DKMS compiles the NVIDIA module in the guest instead "
                        "(apt-get install mmdebstrap)"]  # before the install is over
    assert module.finish(ctx, job) is None
    assert ctx.manifest["host_module"]["status"] == "fell back to the guest"
    assert len([e for e in events if e.kind == "warning"]) == 1


def test_any_other_failure_fails_the_build(ctx):
    err = HostModuleError("the host-side DKMS build of nvidia-kernel-dkms failed", log_tail=["make: *** Error 2"])
    with pytest.raises(HostModuleError, match="DKMS build") as ei:
        module.finish(ctx, FakeJob(ctx, error=err))
    assert ei.value.stage == "provision" and ei.value.log_tail == ["make: *** Error 2"]


def test_a_failed_host_build_is_said_at_once_and_fails_that_image_at_provisioning(ctx, events, monkeypatch):
    # what a cold build met: Debian's nvidia-open-kernel-dkms 550.163.01-2 does not compile for 6.12.118+deb13
    err = HostModuleError("the host-side DKMS build of nvidia-open-kernel-dkms=550.163.01-2 for kernel "
                          "6.12.118+deb13-amd64 failed: dkms build exited with 10; first error: nvidia/nv-pci.c:237:9: "
                          "error: too few arguments to function 'pci_resize_resource'", hint="build log: X")

    def fake_build(*a, **kw):
        raise err

    monkeypatch.setattr(module, "build_module", fake_build)
    monkeypatch.setattr(type(ctx), "gateway", property(lambda self: FakeGateway()))
    job = module.start(ctx, label="open")
    assert job is not None
    job.thread.join(10)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "pci_resize_resource" in warnings[0]  # while the installer still runs
    assert "open will fail at provisioning (build log: X)" in warnings[0]
    with pytest.raises(HostModuleError, match="pci_resize_resource"):
        module.finish(ctx, job)


def test_start_runs_the_build_in_a_thread_that_the_build_stops(ctx, monkeypatch):
    started, stopped = threading.Event(), threading.Event()

    def fake_build(sources, package, *, cancel, **kw):
        assert package == "nvidia-kernel-dkms" and sources.mirror == "http://127.0.0.1:4711/debian"
        assert sources.security_mirror == "http://127.0.0.1:4711/debian-security"
        started.set()
        cancel.wait(10)
        stopped.set()
        raise HostModuleError("the host-side module build was cancelled")

    monkeypatch.setattr(module, "build_module", fake_build)
    monkeypatch.setattr(type(ctx), "gateway", property(lambda self: FakeGateway()))
    job = module.start(ctx)
    assert job is not None and started.wait(10)
    ctx.stack.close()  # the build ends (fails) before provisioning: the host build is cancelled
    assert stopped.is_set() and not job.thread.is_alive()
    off = ctx.with_(config=cfg("provision.host_module=off"), stack=ExitStack())
    assert module.start(off) is None and off.manifest["host_module"]["status"] == "not used"


def test_a_guest_on_another_kernel_gets_a_module_built_for_it(ctx, monkeypatch):
    calls = []

    def fake_build(sources, package, *, kver, **kw):
        calls.append((package, kver))
        if kver == "6.12.99+deb13-amd64":
            raise HostModuleError("mmdebstrap is not installed", missing_tool="mmdebstrap")
        return HostModule(Path("/m/other.tar.gz"), "nvidia-current", "550.163.01", kver, "host-built", 60.0,
                          package, "550.163.01-2", "k2")

    monkeypatch.setattr(module, "build_module", fake_build)
    monkeypatch.setattr(type(ctx), "gateway", property(lambda self: FakeGateway()))
    first = built()
    assert module.for_kernel(ctx, first, KVER) is first and not calls
    again = module.for_kernel(ctx, first, "6.12.117+deb13-amd64")
    assert again is not None and again.kver == "6.12.117+deb13-amd64"
    assert calls == [("nvidia-kernel-dkms", "6.12.117+deb13-amd64")]
    assert ctx.manifest["host_module"]["rebuilt_for_the_guest_kernel"] is True
    assert module.for_kernel(ctx, first, "6.12.99+deb13-amd64") is None  # no mmdebstrap: the guest compiles


def test_the_module_rebuilt_for_another_kernel_is_signed_with_the_same_key(ctx, monkeypatch, tmp_path):
    """Under Secure Boot an unsigned module cannot load: the rebuild for the guest's kernel gets the build's key
    pair as the first build did (build_module is replaced: what is checked is what the stage hands it)."""
    write_pair(tmp_path / "keys", "builder test")
    key, cert = tmp_path / "keys" / "mok.key", tmp_path / "keys" / "mok.der"
    signed = ctx.with_(config=cfg(f"secure_boot.signing_key={key}", f"secure_boot.signing_cert={cert}"))
    seen = []

    def fake_build(sources, package, *, kver, signing_key=None, signing_cert=None, **kw):
        seen.append((signing_key, signing_cert))
        return HostModule(Path("/m/other.tar.gz"), "nvidia-current", "550.163.01", kver, "host-built", 60.0,
                          package, "550.163.01-2", "k2")

    monkeypatch.setattr(module, "build_module", fake_build)
    monkeypatch.setattr(type(ctx), "gateway", property(lambda self: FakeGateway()))
    assert module.for_kernel(signed, built(), "6.12.117+deb13-amd64") is not None
    assert module.for_kernel(ctx, built(), "6.12.117+deb13-amd64") is not None
    assert seen == [(key, cert), (None, None)]


@pytest.mark.timeout(60)
def test_a_client_in_the_build_reads_through_its_gateway_from_a_cold_cache(tmp_path, events, key, server):
    """The host-side module build reads the indexes through the build's gateway, in the build's process. With the
    gateway's own cache the client holds the index's cache lock while the gateway waits for it to fetch the same
    file: each read stalled until the client's timeout (a cold build did that: four one-minute timeouts, then the
    module build failed). A real gateway over a real signed archive on 127.0.0.1, both caches cold."""
    from archive_testlib import SUITE

    from builder.archive.cache import ContentCache
    from builder.archive.client import Archive
    from builder.gateway.server import Gateway

    gw_cache = ContentCache(tmp_path / "gateway-blobs")
    with ExitStack() as stack:
        ctx = BuildContext(cfg(), BuildOptions(tmp_path / "out"), tmp_path / "work", Emitter(events.append), stack,
                           None, cache=gw_cache)  # type: ignore[arg-type]
        client_cache = module.gateway_client_cache(ctx)
        assert client_cache.root != gw_cache.root and client_cache.root.is_relative_to(ctx.workdir)
        with Gateway(upstreams={"debian": server.url}, cache=gw_cache, keyring=key.keyring,
                     fingerprints=(key.fingerprint,), state_dir=tmp_path / "gw") as gw:
            # a short client timeout: a stall shows as a failure in seconds, not minutes
            archive = Archive(gw.url("debian"), SUITE, keyring=key.keyring, fingerprints=[key.fingerprint],
                              cache=client_cache, timeout=5, retries=0)
            archive.release()
            index = archive.index("main/binary-amd64/Packages")
    assert b"Package: hello" in index


# ---------------------------------------------------------------------------------------------- under a package lock

LOCKED = {  # name -> (version, component, Depends): what a host build of nvidia-kernel-dkms needs, and tools
    "linux-image-amd64": ("6.12.118-1", "main", f"linux-image-{KVER} (= 6.12.118-1)"),
    f"linux-image-{KVER}": ("6.12.118-1", "main", "kmod"),
    f"linux-headers-{KVER}": ("6.12.118-1", "main", "gcc-14"),
    "gcc-14": ("14.2.0-19", "main", ""),
    "dkms": ("3.2.2-1~deb13u1", "main", "kmod"),
    "nvidia-kernel-dkms": ("550.163.01-2", "non-free", "dkms (>= 3.0.11)"),
    "kmod": ("34.2-2", "main", ""),
    "findutils": ("4.10.0-3", "main", ""),
    "zstd": ("1.5.7+dfsg-1", "main", ""),
    "apt": ("3.0.3", "main", ""),
}
DATE = "Sat, 21 Nov 2026 09:15:44 UTC"


def synthetic_stanzas() -> list[dict[str, str]]:
    """LOCKED as index stanzas, each of a real (minimal) .deb made from its control fields."""
    from test_package_lock import make_deb

    out = []
    for name, (version, comp, depends) in LOCKED.items():
        control = {"Package": name, "Version": version, "Architecture": "amd64", **({"Depends": depends} if depends
                                                                                     else {})}
        deb = make_deb(control)
        out.append({**control, "Filename": f"pool/{comp}/{name[0]}/{name}/{name}_{version}_amd64.deb",
                    "Size": str(len(deb)), "SHA256": hashlib.sha256(deb).hexdigest()})
    return out


@contextmanager
def locked_build(tmp_path: Path, events: list, stanzas: list[dict[str, str]], *overrides: str, suite: str = "trixie",
                 codename: str = "trixie"):
    """A build context with a package lock of ``stanzas`` in force: the real gateway (services.gateway_for)
    serving the lock's view of the three suites (``suite``, ``<codename>-updates``, ``<codename>-security``),
    signed by a real ephemeral key, on 127.0.0.1; the mirrors are never asked."""
    from test_package_lock import _inputs

    from builder import services
    from builder.archive.cache import ContentCache
    from builder.context import Services
    from builder.gateway.signing import EphemeralKey
    from builder.gateway.target import target_views, view_pins, view_stanza
    from builder.pkgfetch import TargetInputs
    from builder.pkglock import PackageLock, SignedIndex, pin_from_stanza

    pins, texts = [], {}
    for st in stanzas:
        pin = pin_from_stanza(st, archive="debian", suite=suite, date=DATE)
        pins.append(pin)
        texts[pin.key] = view_stanza({k: v for k, v in st.items() if k not in ("Filename", "Size", "SHA256")}, pin)
    index = SignedIndex("debian", suite, codename, DATE, "a" * 64, "Debian", "Debian", "stable", "13.8")
    plock = PackageLock(suite, codename, "amd64", "2026-12-01T00:00:00Z", "resolve", (index,), tuple(pins))
    c = cfg("debian.mirror=http://127.0.0.1:9/debian", "debian.security_mirror=http://127.0.0.1:9/debian-security",
            f"debian.suite={suite}", *overrides)
    target = TargetInputs(plock, target_views(plock, texts, components=c.debian.components),
                          {k: Pin(*v) for k, v in view_pins(plock).items()}, 0)
    with ExitStack() as stack:
        key = stack.enter_context(EphemeralKey("builder test build key", home_parent=tmp_path / "keys"))
        base = BuildContext(c, BuildOptions(tmp_path / "out"), tmp_path / "work", Emitter(events.append), stack,
                            None, cache=ContentCache(tmp_path / "gateway-blobs"))  # type: ignore[arg-type]
        gw = stack.enter_context(services.gateway_for(base, _inputs(tmp_path, target), key))  # type: ignore[arg-type]
        yield base.with_(services=Services(gw, key, None, None, plock))  # type: ignore[arg-type]


@pytest.fixture
def locked_ctx(tmp_path, events, monkeypatch):
    """A build context with a package lock of LOCKED in force (:func:`locked_build`)."""
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))
    with locked_build(tmp_path, events, synthetic_stanzas()) as ctx:
        yield ctx


@pytest.mark.timeout(60)
def test_under_a_lock_the_host_build_reads_the_view_with_the_targets_keyring(locked_ctx):
    """The view is signed by the build's key: read with Debian's keyring alone (what the host build did) every
    suite is refused; read as apt in the target reads it (Debian's keyring plus the build key, the build key's
    signature required) it gives the plan, from the locked versions."""
    from builder import hostmodule as hm
    from builder.gateway.signing import combined_keyring

    ctx = locked_ctx
    gw, key = ctx.services.gateway, ctx.services.signing_key
    plain = Sources.of(ctx.config.debian, mirror=gw.url("debian"), security_mirror=gw.url("debian-security"))
    with pytest.raises(HostModuleError, match="signature verification failed"):
        hm.load_indexes(plain, module.gateway_client_cache(ctx))
    sources = module.gateway_sources(ctx)
    assert sources.locked and sources.mirror == plain.mirror and sources.security_mirror == plain.security_mirror
    assert sources.keyring == ctx.workdir / module.TARGET_KEYRING
    assert sources.keyring.read_bytes() == combined_keyring(ctx.config.debian.keyring, key.public_key())
    assert sources.fingerprints == sources.security_fingerprints == (key.fingerprint,)
    plan = hm.plan_module(hm.load_indexes(sources, module.gateway_client_cache(ctx)), "nvidia-kernel-dkms")
    assert plan.kver == KVER and plan.dkms_package.pin == "nvidia-kernel-dkms=550.163.01-2"
    assert [t.name for t in plan.tools] == ["kmod", "findutils", "zstd"]  # the lock holds no xz-utils
    # Debian's own signature is not what the view is: a Debian-signed index through the same sources is refused
    debian_only = dataclasses.replace(sources, fingerprints=ctx.config.debian.trusted_fingerprints,
                                      security_fingerprints=ctx.config.debian.security_fingerprints)
    with pytest.raises(HostModuleError, match="no signature by a trusted key"):
        hm.load_indexes(debian_only, module.gateway_client_cache(ctx))
    # without a lock: the image's keyring and signers, as before
    unlocked = ctx.with_(services=dataclasses.replace(ctx.services, package_lock=None))
    assert module.gateway_sources(unlocked) == plain and not plain.locked


def fake_mmdebstrap(ctx: BuildContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kver: str):
    """A stand-in mmdebstrap on PATH (test_hostmodule_pure.FAKE_MMDEBSTRAP: it records its argv and leaves a
    module tarball for ``kver``); returns build() (build_module of nvidia-kernel-dkms through ``ctx``'s gateway)
    and calls() (every argv it got)."""
    import json

    from test_hostmodule_pure import FAKE_MMDEBSTRAP, make_tarball

    from builder import hostmodule as hm

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mmdebstrap").write_text(FAKE_MMDEBSTRAP)
    (bindir / "mmdebstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_TARBALL", str(make_tarball(tmp_path / "built.tar.gz", kver=kver)))
    monkeypatch.setenv("FAKE_RESULT", "ok")
    monkeypatch.setattr(hm, "mmdebstrap_mode", lambda: "unshare")

    def build():
        return hm.build_module(module.gateway_sources(ctx), "nvidia-kernel-dkms", workdir=ctx.workdir / "hostmodule",
                               cache=module.gateway_client_cache(ctx), modules=hm.ModuleCache(tmp_path / "modules"),
                               niceness=None)

    def calls() -> list[list[str]]:
        log = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return build, calls


@pytest.mark.timeout(60)
def test_under_a_lock_the_build_root_is_apt_with_only_locked_packages(locked_ctx, tmp_path, monkeypatch):
    """build_module through the locked view, with a stand-in mmdebstrap on PATH: the plan (made before the
    module-cache lookup) comes from the view, the build root is --variant=apt with the plan and the tools the lock
    holds, pinned, verified with the target's keyring; the second call is a cache hit."""
    ctx = locked_ctx
    build, calls = fake_mmdebstrap(ctx, tmp_path, monkeypatch, KVER)
    first = build()
    assert first.origin == "host-built" and first.kver == KVER
    (argv,) = calls()
    assert "--variant=apt" in argv and "--variant=buildd" not in argv
    ring = ctx.workdir / module.TARGET_KEYRING
    assert not [a for a in argv if a.startswith("--keyring")]
    assert [a.split()[:2] for a in argv[-3:]] == [["deb", f"[signed-by={ring}]"]] * 3
    assert (f"--include=dkms=3.2.2-1~deb13u1,gcc-14=14.2.0-19,linux-headers-{KVER}=6.12.118-1,"
            "nvidia-kernel-dkms=550.163.01-2,kmod=34.2-2,findutils=4.10.0-3,zstd=1.5.7+dfsg-1") in argv
    assert not [a for a in argv if "build-essential" in a]
    second = build()
    assert second.origin == "cache" and second.key == first.key


def test_the_build_roots_closure_resolves_from_real_trixie_stanzas():
    """build_root_closure over real trixie stanzas (trixie_index) and the plan made from them: Essential, apt, the
    DKMS package, dkms, gcc-14, the headers and the tools, with their hard dependencies, all there; a view
    without cpp-14 and patch names both and who needs them."""
    from trixie_index import KVER as REAL_KVER
    from trixie_index import stanzas

    from builder import hostmodule as hm

    real = stanzas()
    indexes = [("trixie/main", real)]
    plan = hm.plan_module(indexes, "nvidia-kernel-dkms")
    assert plan.kver == REAL_KVER and plan.compiler.pin == "gcc-14=14.2.0-19"
    assert [t.name for t in plan.tools] == list(hm.BUILD_ROOT_TOOLS)
    root = hm.build_root_closure(indexes, plan)
    assert root.unmet == [] and root.problems == []
    assert {"apt", "dpkg", "libc6", "binutils", "cpp-14", "make", "patch", "nvidia-kernel-support"} <= set(
        root.selected)
    less = {n: st for n, st in real.items() if n not in ("cpp-14", "patch")}
    root = hm.build_root_closure([("trixie/main", less)], plan)
    assert root.unmet == ["patch", "cpp-14 (= 14.2.0-19)", "patch (>= 2.7)"]
    assert root.problems == ["dkms 3.2.2-1~deb13u1 depends on patch: nothing satisfies it",
                             "gcc-14 14.2.0-19 depends on cpp-14 (= 14.2.0-19): nothing satisfies it",
                             "dpkg-dev 1.22.22 depends on patch (>= 2.7): nothing satisfies it"]


@pytest.mark.timeout(120)
def test_under_a_lock_a_view_that_cannot_make_the_build_root_fails_before_mmdebstrap(tmp_path, events, monkeypatch):
    """Real trixie stanzas as the lock's view, served by the real gateway and read with the target's keyring: with
    the build root's whole closure the (stand-in) mmdebstrap runs; with a lock that lacks cpp-14 and patch the
    host build stops before mmdebstrap would run, in one HostModuleError naming them (not an apt error from inside
    mmdebstrap), and its log names who needs them."""
    from trixie_index import KVER as REAL_KVER
    from trixie_index import stanzas

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))
    real = list(stanzas().values())
    with locked_build(tmp_path / "whole", events, real) as ctx:
        build, calls = fake_mmdebstrap(ctx, tmp_path / "whole", monkeypatch, REAL_KVER)
        assert build().origin == "host-built"
        assert [a for a in calls()[0] if a.startswith("--include=")] == [
            "--include=dkms=3.2.2-1~deb13u1,gcc-14=14.2.0-19,linux-headers-6.12.117+deb13-amd64=6.12.117-1,"
            "nvidia-kernel-dkms=550.163.01-2,kmod=34.2-2,findutils=4.10.0-3,xz-utils=5.8.1-1+deb13u2,zstd=1.5.7+dfsg-1"]
    less = [st for st in real if st["Package"] not in ("cpp-14", "patch")]
    with locked_build(tmp_path / "less", events, less) as ctx:
        build, calls = fake_mmdebstrap(ctx, tmp_path / "less", monkeypatch, REAL_KVER)
        with pytest.raises(HostModuleError) as exc:
            build()
        assert calls() == []
    assert exc.value.message == ("the package lock's view cannot make the build root of nvidia-kernel-dkms="
                                 f"550.163.01-2 for {REAL_KVER}: it lacks patch, cpp-14 (= 14.2.0-19), patch (>= 2.7)")
    assert exc.value.log_tail == ["dkms 3.2.2-1~deb13u1 depends on patch: nothing satisfies it",
                                  "gcc-14 14.2.0-19 depends on cpp-14 (= 14.2.0-19): nothing satisfies it",
                                  "dpkg-dev 1.22.22 depends on patch (>= 2.7): nothing satisfies it"]
    assert exc.value.missing_tool is None and "provision.host_module: off" in (exc.value.hint or "")


def apt_update(root: Path, lines: list[str], *, trusted: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The host's real ``apt-get update`` in an apt tree of its own under ``root`` (nothing of the host's apt
    configuration, no key trusted but ``trusted`` as apt's trusted.gpg), on the sources ``lines``."""
    etc = root / "etc" / "apt"
    for d in (etc / "apt.conf.d", etc / "trusted.gpg.d", etc / "sources.list.d", etc / "preferences.d",
              root / "var/lib/apt/lists/partial", root / "var/cache/apt/archives/partial", root / "var/lib/dpkg",
              root / "var/log/apt"):
        d.mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text("")
    (etc / "sources.list").write_text("\n".join(lines) + "\n")
    conf = root / "apt.conf"
    conf.write_text(f'Dir "{root}/";\nDir::State::status "{root}/var/lib/dpkg/status";\n'
                    f'Dir::Etc::Trusted "{trusted or etc / "trusted.gpg"}";\n'
                    'APT::Architecture "amd64";\nAPT::Architectures { "amd64"; };\nAPT::Sandbox::User "root";\n'
                    'Acquire::Languages "none";\nAcquire::http::Proxy "DIRECT";\nDebug::NoLocking "true";\n')
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(["apt-get", "update"], env={**env, "APT_CONFIG": str(conf), "LC_ALL": "C"},
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("gpgv") is None, reason="no apt-get, no gpgv")
def test_apt_reads_the_locked_view_through_signed_by_alone(locked_ctx, tmp_path):
    """The build root's sources as mmdebstrap gives them to apt under a lock (Sources.apt_lines), read by the
    host's real apt-get update (gpgv) from the real gateway, in an apt tree that trusts no key of its own: each
    line's signed-by (the target's keyring: Debian's plus the build key) verifies the view, with no warning. The
    same keyring as apt's trusted.gpg, what mmdebstrap --keyring=FILE makes of it, draws apt's legacy-keyring
    warning; without either apt refuses the view."""
    sources = module.gateway_sources(locked_ctx)
    ring = sources.keyring
    ok = apt_update(tmp_path / "signed-by", sources.apt_lines())
    said = ok.stdout + ok.stderr
    assert ok.returncode == 0 and "W:" not in said and "E:" not in said, said
    lists = sorted(p.name for p in (tmp_path / "signed-by/var/lib/apt/lists").iterdir() if p.is_file())
    assert any(n.endswith("_dists_trixie_InRelease") for n in lists), lists
    assert any(n.endswith("_dists_trixie_main_binary-amd64_Packages") for n in lists), lists
    plain = [line.replace(f"[signed-by={ring}] ", "") for line in sources.apt_lines()]
    assert plain == dataclasses.replace(sources, locked=False).apt_lines()
    legacy = apt_update(tmp_path / "keyring", plain, trusted=ring)
    assert legacy.returncode == 0 and "legacy trusted.gpg keyring" in legacy.stdout + legacy.stderr
    refused = apt_update(tmp_path / "none", plain)
    assert refused.returncode != 0 and "NO_PUBKEY" in refused.stdout + refused.stderr


@pytest.mark.timeout(60)
def test_under_a_lock_with_a_suite_alias_the_host_build_reads_the_views_suites(tmp_path, events, monkeypatch):
    """debian.suite: stable, and a lock made from it (suite stable, codename trixie): the gateway serves the view at
    dists/stable, dists/trixie-updates and dists/trixie-security only. The host build reads exactly those (it asked
    for stable-updates and stable-security, which the view does not have) and plans from the view."""
    from builder import hostmodule as hm

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))
    with locked_build(tmp_path, events, synthetic_stanzas(), suite="stable", codename="trixie") as ctx:
        assert ctx.config.debian.suite == "stable" and ctx.services.package_lock.codename == "trixie"
        sources = module.gateway_sources(ctx)
        assert [s for _, s, _ in sources.archives()] == ["stable", "trixie-updates", "trixie-security"]
        indexes = hm.load_indexes(sources, module.gateway_client_cache(ctx))
        assert list(dict.fromkeys(label.split("/")[0] for label, _ in indexes)) == ["stable", "trixie-updates",
                                                                                    "trixie-security"]
        assert hm.plan_module(indexes, "nvidia-kernel-dkms").kver == KVER
        # what it asked for before is not the view: the gateway has no such suite of its own (it passes the
        # request on to the mirror, here none)
        views = {p.split("/dists/")[1].split("/")[0] for p in ctx.services.gateway.generated if "/dists/" in p}
        assert views - {"builder-installer"} == {"stable", "trixie-updates", "trixie-security"}  # and the udebs
        before = dataclasses.replace(sources, codename="")
        assert [s for _, s, _ in before.archives()] == ["stable", "stable-updates", "stable-security"]


def test_under_a_lock_both_host_builds_get_the_locked_sources(locked_ctx, monkeypatch):
    """The job started while the installer runs and the rebuild for another guest kernel (for_kernel)."""
    seen = []

    def fake_build(sources, package, **kw):
        seen.append(sources)
        return HostModule(Path("/m.tar.gz"), "nvidia-current", "550.163.01", kw.get("kver") or KVER, "host-built",
                          1.0, package, "550.163.01-2", "k")

    monkeypatch.setattr(module, "build_module", fake_build)
    job = module.start(locked_ctx)
    assert job is not None
    first = module.finish(locked_ctx, job)
    assert first is not None
    module.for_kernel(locked_ctx, first, "6.12.117+deb13-amd64")
    assert len(seen) == 2 and all(s.locked and s.fingerprints == (locked_ctx.services.signing_key.fingerprint,)
                                  for s in seen)
