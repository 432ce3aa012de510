"""Variants: named overrides of what does not change the installed disk, each a distinct image."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from builder.config import ImageConfig, load_config
from builder.errors import ConfigError
from builder.events import Emitter, Event
from builder.ssh import generate_keypair
from builder.stages.media import disk_key
from builder.vm.remote import pick_uri

IMAGE = Path(__file__).resolve().parents[2] / "images" / "cloud-gpu-worker.yaml"


def test_default_image_declares_three_variants_that_validate_and_differ() -> None:
    cfg = load_config(IMAGE)
    assert cfg.select_variants() == ["current", "open", "tesla-535"]
    flavors = {}
    for name in cfg.variants:
        v = cfg.variant(name)
        assert v.name == f"cloud-gpu-worker-{name}"
        flavors[name] = v.provision.extra_vars["nvidia_driver_flavor"]
        assert v.provision.extra_vars["nvidia_install_cuda"] is False  # the base's other variables are kept
        assert not v.variants
    assert flavors == {"current": "current", "open": "open", "tesla-535": "tesla-535"}
    assert cfg.select_variants(("open",)) == ["open"]
    assert cfg.select_variants((), ("open",)) == ["current", "tesla-535"]


def test_variants_share_the_installed_disk() -> None:
    """Everything a variant may change leaves the installed-disk key alone (one install for all)."""
    from builder.installer.preseed import render_preseed
    from builder.lock import read_lock
    from builder.stages.media import preseed_context

    cfg = load_config(IMAGE)
    lock = read_lock(cfg.lock_path)
    client, host = generate_keypair("c"), generate_keypair("h")
    keys = {disk_key(c, lock, render_preseed(preseed_context(c, client, host)).replace(c.name, "NAME"), client, host)
            for c in (cfg, *(cfg.variant(n) for n in cfg.variants))}
    assert len(keys) == 1


@pytest.mark.parametrize(("override", "message"), [
    ("{debian: {suite: bookworm}}", "debian cannot differ between variants"),
    ("{disk: {size: 40G}}", "of disk only compression may differ"),
    ("{installer: {hostname: x}}", "installer cannot differ"),
    ("{provision: {extra_vars: {base_packages: [vim]}}}", "base_packages is the installed disk's package list"),
    ("{provision: {memory: lots}}", "variants.bad.provision.memory"),
    ("[1, 2]", "variants.bad: Input should be a valid dictionary"),
    ("{vm: {memory: 8G}}", "variants.bad.vm.memory: cannot differ between variants: it is the installer's RAM"),
    ("{vm: {accel: tcg}}", "variants.bad.vm.accel: cannot differ between variants"),
    ("{vm: {backend: libvirt}}", "variants.bad.vm.backend: cannot differ between variants"),
    ("{vm: {firmware: uefi}}", "variants.bad.vm.firmware: cannot differ between variants"),
    ("{vm: {cpus: 4, memory: 8G}}", "of vm a variant may set cpus, libvirt_pool, libvirt_pool_dir, libvirt_uri"),
    ("{vm: {colour: red}}", "variants.bad.vm.colour: Extra inputs are not permitted"),
    ("{vm: {libvirt_uri: 'qemu+tcp://gpu1/system'}}", "variants.bad.vm.libvirt_uri"),
    ("{vm: {cpus: 0}}", "variants.bad.vm.cpus"),
    ("{vm: 3}", "variants.bad.vm: Input should be a valid dictionary"),
])
def test_a_variant_that_would_change_the_install_is_refused(tmp_path: Path, override: str, message: str) -> None:
    img = tmp_path / "img.yaml"
    img.write_text(IMAGE.read_text().replace("../", str(IMAGE.parent.parent) + "/")
                   + f"\n  bad: {override}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(img)
    assert message in exc.value.describe()


def _with_variant(tmp_path: Path, extra: str) -> Path:
    img = tmp_path / "img.yaml"
    img.write_text(IMAGE.read_text().replace("../", str(IMAGE.parent.parent) + "/") + extra)
    return img


def test_a_variant_may_set_where_its_vms_run_and_their_cpus(tmp_path: Path) -> None:
    img = _with_variant(tmp_path, "\n  big: {vm: {cpus: 8, libvirt_pool_dir: /srv/b, libvirt_uri: "
                                  "'qemu+ssh://root@gpu9/system'}}\n")
    cfg = load_config(img, ["vm.backend=libvirt"])
    big = cfg.variant("big")
    assert (big.vm.cpus, big.vm.libvirt_pool_dir, big.vm.libvirt_uris) == (8, "/srv/b", ("qemu+ssh://root@gpu9/system",))
    assert (big.vm.memory, big.vm.accel, big.vm.backend) == (cfg.vm.memory, cfg.vm.accel, "libvirt")
    assert cfg.variant("open").vm.cpus == cfg.vm.cpus


def test_every_vm_key_is_decided_for_variants() -> None:
    """A new vm setting must be declared either safe for a variant or the install's (with the reason)."""
    from builder.config import _VARIANT_VM_WHY, VARIANT_VM_KEYS, VmConfig

    assert set(VmConfig.model_fields) == VARIANT_VM_KEYS | set(_VARIANT_VM_WHY)
    assert not VARIANT_VM_KEYS & set(_VARIANT_VM_WHY)


def test_variant_names_are_directory_names(tmp_path: Path) -> None:
    img = tmp_path / "img.yaml"
    img.write_text(IMAGE.read_text().replace("../", str(IMAGE.parent.parent) + "/") + "\n  ../x: {}\n")
    with pytest.raises(ConfigError, match="variant name"):
        load_config(img)


def test_variant_events_carry_the_variant() -> None:
    seen: list[Event] = []
    parent = Emitter(seen.append)
    child = Emitter(parent.emit, prefix="open")
    with child.stage("provision"):
        child.info("hello")
    assert [(e.kind, e.stage) for e in seen] == [("stage-start", "open/provision"), ("info", "open/provision"),
                                                 ("stage-end", "open/provision")]
    assert all(e.data["variant"] == "open" for e in seen)
    assert set(child.durations) == {"provision"} and not parent.durations


# ---------------------------------------------------------------------------------------------- libvirt hosts

HOSTS = ["qemu+ssh://root@gpu1/system?keyfile=/k/id", "qemu+ssh://root@gpu2/system", "qemu+ssh://root@gpu3/system"]


def _on_hosts(img: Path, n: int) -> ImageConfig:
    return load_config(img, ["vm.backend=libvirt", f"vm.libvirt_uri={json.dumps(HOSTS[:n])}"])


def _vm_hosts(cfg: ImageConfig) -> dict[str, str]:
    """Where each VM of a build of every variant runs: the install, then each variant's (provision, verify)."""
    out = {"install": cfg.vm.machine_options(cfg.name)["libvirt_uri"]}
    for name in cfg.variants:
        v = cfg.variant(name)
        out[name] = v.vm.machine_options(v.name)["libvirt_uri"]
    return out


def test_three_variants_over_two_and_three_hosts() -> None:
    two = _on_hosts(IMAGE, 2)
    assert _vm_hosts(two) == {"install": pick_uri(HOSTS[:2], "cloud-gpu-worker"),
                              "current": HOSTS[0], "open": HOSTS[1], "tesla-535": HOSTS[0]}
    three = _on_hosts(IMAGE, 3)
    assert _vm_hosts(three) == {"install": pick_uri(HOSTS, "cloud-gpu-worker"),
                                "current": HOSTS[0], "open": HOSTS[1], "tesla-535": HOSTS[2]}
    # the configuration decides, not the order the variants are written in or the ones a build selects
    assert three.model_copy(update={"variants": dict(reversed(three.variants.items()))}).variant_hosts() == \
        three.variant_hosts()
    one = load_config(IMAGE, ["vm.backend=libvirt"])
    assert set(_vm_hosts(one).values()) == {"qemu:///system"}


def test_a_pinned_variant_and_the_others_around_it(tmp_path: Path) -> None:
    img = _with_variant(tmp_path, f"\n  pinned: {{vm: {{libvirt_uri: '{HOSTS[1]}'}}}}\n")
    hosts = _vm_hosts(_on_hosts(img, 2))
    # placed first; the three others fill the hosts with fewest variants, in sorted order
    assert [hosts[n] for n in ("pinned", "current", "open", "tesla-535")] == [HOSTS[1], HOSTS[0], HOSTS[0], HOSTS[1]]
    elsewhere = _with_variant(tmp_path, "\n  pinned: {vm: {libvirt_uri: 'qemu+ssh://root@gpu9/system'}}\n")
    hosts = _vm_hosts(_on_hosts(elsewhere, 2))
    assert [hosts[n] for n in ("pinned", "current", "open", "tesla-535")] == [
        "qemu+ssh://root@gpu9/system", HOSTS[0], HOSTS[1], HOSTS[0]]
    chooser = _with_variant(tmp_path, f"\n  picky: {{vm: {{libvirt_uri: ['{HOSTS[2]}', '{HOSTS[1]}']}}}}\n")
    assert _vm_hosts(_on_hosts(chooser, 3))["picky"] in HOSTS[1:]


def test_each_variants_vms_and_volumes_have_their_own_names(tmp_path: Path) -> None:
    from builder.stages.provision import provision_spec
    from builder.vm.remote import volume_prefix
    from builder.vm.spec import vm_name

    cfg = _on_hosts(IMAGE, 2)
    names = set()
    for n in cfg.variants:
        v = cfg.variant(n)
        spec = provision_spec(v, tmp_path / "disk.qcow2", tmp_path, "tcg", 2222, 8080)
        names |= {spec.name, vm_name(v.name, "verify")}
    assert names == {f"cloud-gpu-worker-{n}-{r}" for n in cfg.variants for r in ("provision", "verify")}
    prefixes = {volume_prefix(n, "ab12cd", pid=1, tag="0123abcd") for n in names}
    assert len(prefixes) == len(names)  # even with the same token, PID and machine


def test_build_variants_runs_each_variant_on_its_host_and_its_manifest_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_variants with the install and the image stages stubbed: which host, accelerator and manifest
    each variant's stages get."""
    from builder import pipeline, services
    from builder.archive.cache import ContentCache
    from builder.context import BuildContext
    from builder.diagnostics import Diagnostics
    from builder.installcache import InstalledDiskCache

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _on_hosts(IMAGE, 2)
    install_host = cfg.vm.libvirt_host(cfg.name)

    def fake_base(cfg: ImageConfig, options: Any, emitter: Emitter, stack: Any, images: dict[str, Any]) -> Any:
        wd = tmp_path / "work"
        wd.mkdir()
        ctx = BuildContext(cfg, options, wd, emitter, stack, Diagnostics(wd), cache=ContentCache(tmp_path / "b"),
                           disks=InstalledDiskCache(tmp_path / "i"), accel="kvm",
                           manifest={"accel": "kvm", "vm": cfg.vm.host_record(cfg.name)})
        return ctx, None, None, dict.fromkeys(images), SimpleNamespace(kernel=None)

    seen: dict[str, tuple[str, str, dict[str, Any]]] = {}

    def fake_image(vctx: BuildContext, base: Any, job: Any, inputs: Any) -> str:
        seen[vctx.manifest["variant"]] = (vctx.config.vm.machine_options(vctx.name)["libvirt_uri"], vctx.accel,
                                          vctx.manifest)
        return "published"

    asked: list[str | None] = []

    def fake_pick(requested: str, kernel: Any, emitter: Emitter, *, libvirt_uri: str | None = None) -> str:
        asked.append(libvirt_uri)
        return "tcg"

    monkeypatch.setattr(pipeline, "_base", fake_base)
    monkeypatch.setattr(pipeline, "_image", fake_image)
    monkeypatch.setattr(pipeline.preflight, "check", lambda *a, **k: None)
    monkeypatch.setattr(services, "pick_accel", fake_pick)
    lines: list[str] = []
    res = pipeline.build_variants(cfg, names=["open", "tesla-535"], output=tmp_path / "out", parallel=2,
                                  on_event=lambda e: lines.append(e.message))
    assert res.ok and set(res.results) == {"open", "tesla-535"}
    assert {n: s[0] for n, s in seen.items()} == {"open": HOSTS[1], "tesla-535": HOSTS[0]}
    # the accelerator is chosen again only for a variant whose host is not the install's
    assert sorted(asked, key=str) == [h for h in HOSTS[:2] if h != install_host]  # (threads: any order)
    for name, (host, accel, manifest) in seen.items():
        assert accel == manifest["accel"] == ("kvm" if host == install_host else "tcg")
        assert manifest["vm"] == {"backend": "libvirt", "libvirt_uri": host.split("?")[0]}  # no keyfile
        assert manifest["variant"] == name
    assert any(line.startswith("libvirt hosts: the install on qemu+ssh://root@gpu") for line in lines)
    assert not any("keyfile" in line for line in lines)
