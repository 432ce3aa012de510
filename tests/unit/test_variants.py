"""Variants: named overrides of what does not change the installed disk, each a distinct image."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.config import load_config
from builder.errors import ConfigError
from builder.events import Emitter, Event
from builder.ssh import generate_keypair
from builder.stages.media import disk_key

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
])
def test_a_variant_that_would_change_the_install_is_refused(tmp_path: Path, override: str, message: str) -> None:
    img = tmp_path / "img.yaml"
    img.write_text(IMAGE.read_text().replace("../", str(IMAGE.parent.parent) + "/")
                   + f"\n  bad: {override}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(img)
    assert message in exc.value.describe()


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
