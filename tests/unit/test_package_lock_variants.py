"""The package lock of an image with variants: seeded with every variant's driver packages, a build whose lock
lacks a selected variant's packages stopped in ``fetch`` before anything is fetched or booted (one error, exit 1,
no traceback), ``lock`` writing the lock whatever ``debian.package_lock`` says, and ``lock --from-build``.

The image is a copy of images/cloud-gpu-worker.yaml in a temporary directory (its locks are written there), with
the repository's roles and playbooks and mirrors on 127.0.0.1 that are never asked; the archive is a synthetic
universe (test_package_lock)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from builder.config import ImageConfig, load_config
from builder.errors import LockError
from builder.pkglock import PackageLock, SignedIndex, pin_from_stanza, read_package_lock, write_package_lock
from builder.pkgresolve import (
    INSTALLER_PACKAGES,
    Universe,
    image_packages,
    installer_installs,
    provisioned,
    required_seeds,
    seeds,
)

ROOT = Path(__file__).resolve().parents[2]
DATE = "Sat, 21 Nov 2026 09:15:44 UTC"
TESLA = ["nvidia-tesla-535-kernel-dkms", "nvidia-tesla-535-smi", "libnvidia-tesla-535-cuda1",
         "libnvidia-tesla-535-cfg1", "firmware-nvidia-tesla-535-gsp"]


def image(tmp_path: Path, *, package_lock: str = "auto", **debian: object) -> Path:
    """A copy of the default image definition under ``tmp_path/images`` (its locks go there)."""
    data = yaml.safe_load((ROOT / "images" / "cloud-gpu-worker.yaml").read_text())
    data["debian"].update({"package_lock": package_lock, "mirror": "http://127.0.0.1:9/debian",
                           "security_mirror": "http://127.0.0.1:9/debian-security", **debian})
    data["provision"].update({"playbook": str(ROOT / "playbooks" / "cloud-gpu-worker.yml"),
                              "roles_path": [str(ROOT / "roles")]})
    data["output"] = {"dir": str(tmp_path / "out" / "{name}")}
    path = tmp_path / "images" / "cloud-gpu-worker.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def stanza(name: str, version: str = "1", **fields: str) -> dict[str, str]:
    comp = "non-free" if "nvidia" in name or "cuda" in name else "main"
    return {"Package": name, "Version": version, "Architecture": "amd64",
            "Filename": f"pool/{comp}/{name[0]}/{name}/{name}_{version}_amd64.deb", "Size": "100",
            "SHA256": hashlib.sha256(f"{name} {version}".encode()).hexdigest(), "Priority": "optional",
            "Section": "misc", **{k.replace("_", "-"): v for k, v in fields.items()}}


def universe_of(cfg: ImageConfig, **extra: dict[str, str]) -> Universe:
    """Every seed of ``cfg`` (each variant's too) and what debian-installer adds, one stanza each; ``extra``:
    name → fields of a stanza in its place or besides."""
    uni = Universe("amd64")
    uni.indexes = [SignedIndex("debian", "trixie", "trixie", DATE, "a" * 64, "Debian", "Debian", "stable", "13.8")]
    names = dict.fromkeys([*seeds(cfg), *extra])
    for name in names:
        uni.add(stanza(name, **extra.get(name, {})), "debian", "trixie", DATE)
    return uni


def variant_lock(cfg: ImageConfig, variant: str, *more: str) -> PackageLock:
    """A lock holding what debian-installer installs for ``cfg`` and what ``variant`` installs (and ``more``)."""
    return lock_holding([*installer_installs(cfg), *image_packages(cfg.variant(variant)), *more])


def lock_holding(names: list[str]) -> PackageLock:
    pins = tuple(sorted((pin_from_stanza(stanza(n), archive="debian", suite="trixie", date=DATE)
                         for n in dict.fromkeys(names)),
                        key=lambda p: p.name))
    return PackageLock("trixie", "trixie", "amd64", "2026-12-01T00:00:00Z", "resolve",
                       (SignedIndex("debian", "trixie", "trixie", DATE, "a" * 64),), pins)


# ------------------------------------------------------------------------------------------- seeds: every variant


def test_the_seeds_are_the_union_of_every_variants_packages(tmp_path):
    cfg = load_config(image(tmp_path))
    assert list(provisioned(cfg)) == ["current", "open", "tesla-535"]
    must = required_seeds(cfg)
    for pkg in ("openssh-server", "nvidia-kernel-dkms", "nvidia-open-kernel-dkms", *TESLA, "linux-headers-amd64"):
        assert pkg in must, pkg
    opened = image_packages(cfg.variant("open"))
    assert "nvidia-open-kernel-dkms" in opened and "nvidia-kernel-dkms" not in opened and "sudo" in opened
    # without variants: the image's own flavour
    plain = load_config(image(tmp_path), ["provision.extra_vars.nvidia_driver_flavor=tesla-535"])
    plain = plain.model_copy(update={"variants": {}})
    assert "nvidia-tesla-535-kernel-dkms" in required_seeds(plain) and "nvidia-kernel-dkms" not in required_seeds(plain)


def test_with_nvidias_repository_the_lock_still_holds_what_the_role_takes_from_debian(tmp_path, monkeypatch):
    """nvidia_driver_source: nvidia takes the driver from NVIDIA's repository (not locked), but nvidia_repo.yml
    installs ca-certificates and gpg from Debian first (each of its apt tasks' names), install.yml names dkms, and
    the headers metapackage and, with a signing key, openssl come from Debian as with the Debian source: they
    are seeds, the resolved lock holds them, and fetch stops a build whose lock lacks one."""
    from builder.pkgresolve import nvidia_packages, resolve_package_lock
    from builder.stages import fetch

    repo_tasks = [t for t in _apt_tasks("nvidia-gpu-drivers")
                  if t["name"] in (["ca-certificates", "gpg"], "{{ _nvidia_packages }}")]
    assert ["ca-certificates", "gpg"] in [t["name"] for t in repo_tasks]
    extra = ["provision.extra_vars.nvidia_driver_source=nvidia"]
    cfg = load_config(image(tmp_path), extra)
    for name in cfg.variants:
        got = nvidia_packages(cfg.variant(name))
        assert got == ("ca-certificates", "gpg", "dkms", "linux-headers-amd64"), (name, got)
        assert "gpg" in image_packages(cfg.variant(name)) and not [p for p in got if "nvidia" in p]
    from builder.secureboot import write_pair

    pair = write_pair(tmp_path / "mok", "test")
    signed = load_config(image(tmp_path), [*extra, f"secure_boot.signing_key={pair.key_path}",
                                           f"secure_boot.signing_cert={pair.cert_path}"])
    assert nvidia_packages(signed.variant("open"))[-1] == "openssl"
    lock = resolve_package_lock(cfg, universe_of(cfg), report=lambda m: None)
    assert {"ca-certificates", "gpg", "dkms", "linux-headers-amd64"} <= set(lock.by_name())
    monkeypatch.setattr(fetch, "fetch_inputs", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("fetched")))
    write_package_lock(lock_holding([n for n in lock.by_name() if n != "gpg"]), cfg.package_lock_path)
    with ExitStack() as stack, pytest.raises(LockError) as exc:
        fetch.run(_ctx(cfg, tmp_path, stack), {n: cfg.variant(n) for n in cfg.variants})
    assert str(exc.value).endswith(": variant current installs gpg; variant open installs gpg; variant tesla-535 "
                                   "installs gpg")


def test_the_resolved_lock_holds_every_variants_driver(tmp_path):
    from builder.pkgresolve import resolve_package_lock

    cfg = load_config(image(tmp_path))
    uni = universe_of(cfg, **{"nvidia-tesla-535-kernel-dkms": {"Depends": "libtesla-helper"},
                              "libtesla-helper": {}})
    lock = resolve_package_lock(cfg, uni, report=lambda m: None)
    names = lock.by_name()
    for pkg in ("nvidia-kernel-dkms", "nvidia-open-kernel-dkms", *TESLA, "libtesla-helper"):
        assert pkg in names, pkg
    assert "nvidia-open-kernel-dkms" in lock.seeds
    # a variant's package the indexes do not list is an error naming it, as the base flavour's would be
    del uni.candidates["nvidia-open-kernel-dkms"]
    uni.versions.pop("nvidia-open-kernel-dkms")
    with pytest.raises(LockError) as exc:
        resolve_package_lock(cfg, uni, report=lambda m: None)
    assert exc.value.log_tail == ["seed nvidia-open-kernel-dkms: no signed index lists it"]


# ------------------------------------------------------------------------------------------- the check in fetch


def _ctx(cfg: ImageConfig, tmp_path: Path, stack: ExitStack):
    from builder.context import BuildContext, BuildOptions
    from builder.events import Emitter

    return BuildContext(cfg, BuildOptions(tmp_path / "out"), tmp_path / "work", Emitter(lambda e: None), stack,
                        None)  # type: ignore[arg-type]


def test_fetch_stops_a_build_whose_lock_lacks_a_selected_variants_packages(tmp_path, monkeypatch):
    from builder.stages import fetch

    def no_fetching(*a, **kw):
        raise AssertionError("fetched although the lock cannot serve the build")

    monkeypatch.setattr(fetch, "fetch_inputs", no_fetching)
    cfg = load_config(image(tmp_path))
    # a lock made from a build of --only current: none of the other flavours' packages
    write_package_lock(variant_lock(cfg, "current"), cfg.package_lock_path)
    with ExitStack() as stack:
        ctx = _ctx(cfg, tmp_path, stack)
        with pytest.raises(AssertionError, match="fetched although"):  # --only current: the lock serves it
            fetch.run(ctx, {"current": cfg.variant("current")})
        with pytest.raises(LockError) as exc:
            fetch.run(ctx, {n: cfg.variant(n) for n in ("current", "open", "tesla-535")})
    assert str(exc.value) == (
        "the package lock cloud-gpu-worker.packages.lock lacks packages the build needs: variant open installs "
        "nvidia-open-kernel-dkms; variant tesla-535 installs " + ", ".join(TESLA))
    assert "lock IMAGE.yaml --update" in (exc.value.hint or "") and exc.value.exit_code == 1
    # off: the lock is not in force, nothing to check; a pinned seed version must be the locked one
    off = load_config(image(tmp_path, package_lock="off"))
    with ExitStack() as stack, pytest.raises(AssertionError, match="fetched although"):
        fetch.run(_ctx(off, tmp_path, stack), {"open": off.variant("open")})
    pinned = load_config(image(tmp_path), ["installer.extra_packages=[jq=9]"])
    write_package_lock(variant_lock(cfg, "current", "jq"), cfg.package_lock_path)
    with ExitStack() as stack, pytest.raises(LockError, match=r"variant current installs jq=9$"):
        fetch.run(_ctx(pinned, tmp_path, stack), {"current": pinned.variant("current")})


@pytest.mark.parametrize(("boot", "firmware"), [("hybrid", "bios"), ("hybrid", "uefi"), ("uefi", "uefi"),
                                                ("bios", "bios")])
def test_what_debian_installer_installs_is_what_the_preseed_makes_it_install(tmp_path, boot, firmware):
    """installer_installs is the preseed's: its kernel, popularity-contest (pkgsel; its question preseeded), the
    boot loader grub-installer installs under that firmware (grub-pc under BIOS, purged again by the late_command
    of a hybrid disk) and every package the late_command installs with apt-get; all of them seeds of the lock."""
    import re

    from builder.installer.preseed import PreseedContext, render_preseed

    cfg = load_config(image(tmp_path), [f"disk.boot={boot}", f"vm.firmware={firmware}"])
    assert cfg.build_firmware == firmware
    got = installer_installs(cfg)
    assert set(got) <= set(INSTALLER_PACKAGES) and set(got) <= set(seeds(cfg))
    text = render_preseed(PreseedContext(config=cfg, mirror_host="127.0.0.1:8000"))
    late = {p for m in re.finditer(r"apt-get -y (?:-o \S+ )*install ([a-z0-9.+ -]+?);", text)
            for p in m.group(1).split()}
    assert late <= set(got) and bool(late) == (boot != "bios")  # a bios disk: the late_command installs nothing
    assert f"d-i base-installer/kernel/image string {got[0]}" in text
    assert "popularity-contest popularity-contest/participate boolean false" in text and "popularity-contest" in got
    assert ("grub-pc" in got) == (firmware == "bios") and ("grub-efi-amd64" in got) == (boot != "bios")
    assert ("dpkg --purge grub-pc" in text) == (boot == "hybrid" and firmware == "bios")


def test_fetch_stops_a_build_whose_lock_lacks_what_debian_installer_installs(tmp_path, monkeypatch):
    """A lock made before completion from a BIOS install of a hybrid disk lacks popularity-contest and grub-pc
    (installed and removed again during the install): it passed fetch and failed inside debian-installer. Now
    fetch names them in the one error, with the variants' gaps; a lock --from-build of today has them."""
    from builder.pkgresolve import lock_from_build
    from builder.stages import fetch

    monkeypatch.setattr(fetch, "fetch_inputs", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("fetched")))
    bios = load_config(image(tmp_path), ["vm.firmware=bios"])
    assert bios.disk.boot == "hybrid"
    everything = {n: bios.variant(n) for n in bios.variants}
    kept = [p for p in current_build(bios) if p != "grub-pc"]  # what packages.txt of that build has
    write_package_lock(lock_holding([*kept, *required_seeds(bios)]), bios.package_lock_path)
    with ExitStack() as stack, pytest.raises(LockError) as exc:
        fetch.run(_ctx(bios, tmp_path, stack), everything)
    assert str(exc.value) == ("the package lock cloud-gpu-worker.packages.lock lacks packages the build needs: "
                              "debian-installer installs popularity-contest, grub-pc (disk.boot hybrid, installed "
                              "under BIOS)")
    assert "lock IMAGE.yaml --update" in (exc.value.hint or "") and exc.value.exit_code == 1
    # with a variant's gaps: one error names both
    write_package_lock(lock_holding(kept), bios.package_lock_path)
    with ExitStack() as stack, pytest.raises(LockError) as exc:
        fetch.run(_ctx(bios, tmp_path, stack), everything)
    assert str(exc.value).startswith("the package lock cloud-gpu-worker.packages.lock lacks packages the build needs: "
                                     "debian-installer installs popularity-contest, grub-pc (disk.boot hybrid, "
                                     "installed under BIOS); variant open installs nvidia-open-kernel-dkms; ")
    # installed under UEFI (the default for a hybrid disk) grub-pc is not needed
    uefi = load_config(image(tmp_path))
    write_package_lock(lock_holding([*kept, "popularity-contest", *required_seeds(uefi)]), uefi.package_lock_path)
    with ExitStack() as stack, pytest.raises(AssertionError, match="fetched"):
        fetch.run(_ctx(uefi, tmp_path, stack), {n: uefi.variant(n) for n in uefi.variants})
    # lock --from-build of that build adds both
    out = built(tmp_path / "out" / "cloud-gpu-worker" / "current", kept)
    write_package_lock(lock_from_build(bios, universe_of(bios), out, report=lambda m: None), bios.package_lock_path)
    with ExitStack() as stack, pytest.raises(AssertionError, match="fetched"):
        fetch.run(_ctx(bios, tmp_path, stack), everything)


WRAPPER = """
import sys
import builder.preflight, builder.services
from builder.stages import fetch
builder.preflight.check = lambda *a, **kw: None  # this host's tools and KVM are not what is tested
fetch.fetch_inputs = lambda *a, **kw: (_ for _ in ()).throw(SystemExit("fetched"))
builder.services.start = lambda *a, **kw: (_ for _ in ()).throw(SystemExit("services started"))
from builder.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(60)
def test_the_build_command_fails_on_it_with_one_error_and_exit_1(tmp_path):
    """``build`` as a user runs it (a process of its own): one error line naming the variants and packages, exit
    code 1, no traceback, and neither fetching nor a VM (both would end the process with another message)."""
    path = image(tmp_path)
    cfg = load_config(path)
    write_package_lock(variant_lock(cfg, "current"), cfg.package_lock_path)
    env = dict(os.environ, BUILDER_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", WRAPPER, "build", str(path), "--except", "current"],
                       capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "fetched" not in p.stderr and "services started" not in p.stderr
    assert ("lacks packages the build needs: variant open installs nvidia-open-kernel-dkms; variant tesla-535 "
            "installs nvidia-tesla-535-kernel-dkms") in " ".join(p.stderr.split())
    assert "nvidia-kernel-dkms," not in p.stderr  # current is not built and not named



# ------------------------------------------------------------------------------------------- lock, whatever the setting


@pytest.fixture
def lock_verb(tmp_path, monkeypatch):
    """``write_locks`` over the synthetic universe, the installer's lock already written and witnessed (so the
    installer part has nothing to fetch: only the mirror's answers are stood in for)."""
    import dataclasses

    from test_lock_and_cache import sample_lock

    from builder import locking
    from builder.archive.http import FetchStats
    from builder.events import Emitter
    from builder.lock import write_lock

    def run(package_lock: str, uni: Universe | None = None, **kw):
        cfg = load_config(image(tmp_path, package_lock=package_lock))
        installer = dataclasses.replace(sample_lock(), witnessed=True)
        write_lock(installer, cfg.lock_path)
        monkeypatch.setattr(locking, "_make_archive", lambda *a: None)
        monkeypatch.setattr(locking, "resolve_lock", lambda *a, **k: installer)
        monkeypatch.setattr(locking, "load_universe", lambda *a, **k: uni or universe_of(cfg))
        return cfg, locking.write_locks(cfg, cache=None, stats=FetchStats(), emitter=Emitter(lambda e: None),  # type: ignore[arg-type]
                                        **kw)

    return run


def test_lock_writes_the_package_lock_while_builds_do_not_use_it(lock_verb):
    cfg, report = lock_verb("off")
    lock = read_package_lock(cfg.package_lock_path)
    assert "nvidia-tesla-535-kernel-dkms" in lock.by_name()
    assert report.lines[0] == "cloud-gpu-worker.lock.json: unchanged"
    assert report.lines[1].startswith(f"wrote {cfg.package_lock_path} ({len(lock.packages)} packages")
    assert report.lines[2] == (
        "debian.package_lock is off: builds do not use cloud-gpu-worker.packages.lock; to build with it, set "
        "debian.package_lock: auto (use it when it exists) or required (fail without it) in cloud-gpu-worker.yaml, "
        "or pass --var debian.package_lock=auto")
    before = cfg.package_lock_path.read_bytes()
    cfg, again = lock_verb("off", update=True)  # --update too: nothing moved, the file stays as it is
    assert again.lines[1:] == [f"cloud-gpu-worker.packages.lock: unchanged ({len(lock.packages)} packages)",
                               report.lines[2]]
    assert cfg.package_lock_path.read_bytes() == before
    cfg, used = lock_verb("auto")
    assert not [line for line in used.lines if "package_lock is off" in line]
    from builder import locking
    from builder.archive.http import FetchStats
    from builder.events import Emitter

    cfg, _ = lock_verb("off")
    cfg.package_lock_path.unlink()
    checked = locking.check_locks(cfg, cache=None, stats=FetchStats(), emitter=Emitter(lambda e: None))  # type: ignore[arg-type]
    assert checked.lines[-1] == ("cloud-gpu-worker.packages.lock: none (create it with: python -m builder lock "
                                 "IMAGE.yaml) (not in force: debian.package_lock is off)")


# ------------------------------------------------------------------------------------------- lock --from-build

SEC_DATE = "Mon, 30 Nov 2026 00:22:33 UTC"


def built(out: Path, names, **versions: str) -> Path:
    """A finished build's output directory: its packages.txt (``name version``, every package at "1" unless
    ``versions`` says otherwise)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "packages.txt").write_text("".join(f"{n} {versions.get(n, '1')}\n" for n in names))
    return out


def current_build(cfg: ImageConfig) -> list[str]:
    """What a build of --only current keeps: its packages and debian-installer's, but not popularity-contest
    (pkgsel installs it and purges it again) and no other flavour's driver."""
    from builder.pkgresolve import INSTALLER_PACKAGES

    return [*image_packages(cfg.variant("current")), *(p for p in INSTALLER_PACKAGES if p != "popularity-contest"),
            "libc6"]


def test_a_lock_from_a_build_of_one_variant_serves_every_variant(tmp_path):
    from builder.pkgresolve import lock_from_build
    from builder.stages.fetch import check_lock_covers

    cfg = load_config(image(tmp_path))
    uni = universe_of(cfg, **{"nvidia-open-kernel-dkms": {"Depends": "libc6 (>= 2.41), open-helper"},
                              "open-helper": {}})
    uni.add(stanza("libc6", "2.41-12"), "debian", "trixie", DATE)
    uni.add(stanza("libc6", "2.41-12+deb13u1"), "debian-security", "trixie-security", SEC_DATE)
    out = built(tmp_path / "out" / "cloud-gpu-worker" / "current", current_build(cfg), libc6="2.41-12")
    said: list[str] = []
    lock = lock_from_build(cfg, uni, out, report=said.append)
    names = lock.by_name()
    # exact for what the build kept: libc6 at the build's version, not -security's newer one
    assert names["libc6"].version == "2.41-12" and names["libc6"].suite == "trixie"
    assert set(current_build(cfg)) <= set(names)
    # what a build installs besides: popularity-contest, the other flavours' drivers and their dependencies
    added = sorted({"popularity-contest", "nvidia-open-kernel-dkms", "open-helper", *TESLA})
    assert sorted(set(names) - set(current_build(cfg))) == added
    # seeds: the build's packages.txt (counted), then every added package by name
    assert lock.method == "build" and lock.seeds == (f"packages.txt of a build ({len(current_build(cfg))} packages)",
                                                     *added)
    assert read_back(lock, tmp_path).seeds == lock.seeds
    assert lock.notes[0].endswith(" ".join(added)) and said[-1].endswith(", ".join(added))
    check_lock_covers(cfg, lock, provisioned(cfg))  # every variant: no gap
    # the build's own packages are pinned as the build had them even when the archive has newer ones: a variant's
    # package whose newest version needs the newer one is added at the listed version that fits the build
    uni.add(stanza("nvidia-tesla-535-kernel-dkms", "2", Depends="libc6 (>= 2.41-12+deb13u1)"), "debian", "trixie",
            DATE)
    assert lock_from_build(cfg, uni, out, report=said.append).by_name()["nvidia-tesla-535-kernel-dkms"].version == "1"
    # and when no listed version fits, apt in the target would fail the same way: the lock fails, naming why
    uni.versions["nvidia-tesla-535-kernel-dkms"] = [c for c in uni.versions["nvidia-tesla-535-kernel-dkms"]
                                                    if c.version == "2"]
    with pytest.raises(LockError, match="cannot add what the other variants") as exc:
        lock_from_build(cfg, uni, out, report=said.append)
    assert exc.value.log_tail == ["nvidia-tesla-535-kernel-dkms 2 depends on libc6 (>= 2.41-12+deb13u1), but the "
                                  "build has libc6 2.41-12"]


def test_a_lock_from_a_build_of_variants_reads_every_variants_packages(tmp_path, lock_verb):
    """``lock --from-build OUTPUT`` of a build of variants (OUTPUT/current/, OUTPUT/open/): both packages.txt,
    merged; what neither built (tesla-535) resolved. Through write_locks, as the lock command runs it."""
    from builder import locking

    cfg = load_config(image(tmp_path))
    root = tmp_path / "out" / "cloud-gpu-worker"
    built(root / "current", current_build(cfg))
    opened = [*current_build(cfg), *image_packages(cfg.variant("open"))]
    built(root / "open", opened, **{"nvidia-open-kernel-dkms": "2"})
    uni = universe_of(cfg)
    uni.add(stanza("nvidia-open-kernel-dkms", "2"), "debian", "trixie", DATE)
    cfg, report = lock_verb("off", uni, from_build=root)
    lock = read_package_lock(cfg.package_lock_path)
    assert lock.by_name()["nvidia-open-kernel-dkms"].version == "2"  # the open build's, exact
    assert sorted(set(lock.by_name()) - set(opened)) == sorted({"popularity-contest", *TESLA})
    assert report.lines[0].startswith(f"wrote {cfg.package_lock_path}") and "package_lock is off" in report.lines[1]
    # two builds that disagree on a version are not one build
    built(root / "open", opened, libc6="9")
    with pytest.raises(LockError, match="installed 1 packages at different versions") as exc:
        locking.write_locks(cfg, cache=None, stats=None, emitter=_quiet(), from_build=root)  # type: ignore[arg-type]
    assert exc.value.log_tail == ["libc6: 1 and 9 (open)"]
    with pytest.raises(LockError, match=r"cannot read .*/nothing/packages\.txt"):
        locking.write_locks(cfg, cache=None, stats=None, emitter=_quiet(), from_build=tmp_path / "nothing")  # type: ignore[arg-type]


def test_an_added_package_takes_the_newest_listed_version_that_fits_the_build():
    """What a build did not keep (grub-pc, which the late_command of a BIOS install of a hybrid disk purges) is added
    at the highest listed version whose hard dependencies the build's packages satisfy: real trixie stanzas, the
    build keeping grub-common, grub2-common and grub-pc-bin 2.12-9+deb13u4, and the archive moved on to a +deb13u5
    of the whole source, whose grub-pc needs grub-common (= 2.12-9+deb13u5)."""
    from trixie_index import moved_on, stanzas, universe

    from builder.pkgresolve import Phase, complete

    real = stanzas()
    old, new = "2.12-9+deb13u4", "2.12-9+deb13u5"
    grub = ["grub-pc", "grub-common", "grub2-common", "grub-pc-bin"]
    assert all(real[n]["Version"] == old for n in grub) and f"grub-common (= {old})" in real["grub-pc"]["Depends"]
    newer = [moved_on(real[n], old, new) for n in grub]
    uni = universe(newer)
    assert uni.candidates["grub-pc"].version == new  # what the resolution used to take, and fail on
    kept = [uni.find(n, st["Version"]) for n, st in real.items() if n != "grub-pc"]
    installer = [Phase("debian-installer", (), ("grub-pc",))]
    added = complete(uni, kept, installer)  # type: ignore[arg-type]
    assert {n: c.version for n, c in added.items()} == {"grub-pc": old}
    # only the newer grub-pc listed: no version fits, and each dependency in the way is named once
    uni.versions["grub-pc"] = [c for c in uni.versions["grub-pc"] if c.version == new]
    with pytest.raises(LockError) as exc:
        complete(uni, kept, installer)  # type: ignore[arg-type]
    assert exc.value.log_tail == [f"grub-pc {new} depends on {n} (= {new}), but the build has {n} {old}"
                                  for n in ("grub-common", "grub2-common", "grub-pc-bin")]


def test_completion_problems_are_said_once_and_never_empty():
    """The small archive of the review: grub-pc 2 needs grub-common (= 2) and a package no index lists, grub-pc 1
    needs the grub-common 1 the build has. Before: grub-pc 1 was never tried, and three lines said two problems,
    one of them "which the build has at " with nothing after it."""
    from builder.pkgresolve import Phase, complete

    uni = Universe("amd64")
    for st in (stanza("grub-common", "1"), stanza("grub-common", "2"),
               stanza("grub-pc", "1", Depends="grub-common (= 1)"),
               stanza("grub-pc", "2", Depends="grub-common (= 2), missing-pkg")):
        uni.add(st, "debian", "trixie", DATE)
    kept = [uni.find("grub-common", "1")]
    phases = [Phase("debian-installer", (), ("grub-pc",))]
    assert {n: c.version for n, c in complete(uni, kept, phases).items()} == {"grub-pc": "1"}  # type: ignore[arg-type]
    uni.versions["grub-pc"] = [c for c in uni.versions["grub-pc"] if c.version == "2"]
    with pytest.raises(LockError) as exc:
        complete(uni, kept, phases)  # type: ignore[arg-type]
    assert exc.value.log_tail == ["grub-pc 2 depends on grub-common (= 2), but the build has grub-common 1",
                                  "grub-pc 2 depends on missing-pkg: nothing satisfies it"]


def read_back(lock: PackageLock, tmp_path: Path) -> PackageLock:
    write_package_lock(lock, tmp_path / "x.packages.lock")
    return read_package_lock(tmp_path / "x.packages.lock")


def _quiet():
    from builder.events import Emitter

    return Emitter(lambda e: None)


# ------------------------------------------------------------------------------------------- Recommends, per phase


def _apt_tasks(role: str) -> list[dict]:
    """Every ansible.builtin.apt task of a role that installs packages (has ``name``), nested blocks included."""
    out: list[dict] = []

    def walk(tasks):
        for t in tasks or ():
            if not isinstance(t, dict):
                continue
            walk(t.get("block"))
            walk(t.get("always"))
            walk(t.get("rescue"))
            apt = t.get("ansible.builtin.apt")
            if isinstance(apt, dict) and "name" in apt:
                out.append(apt)

    for f in sorted((ROOT / "roles" / role / "tasks").glob("*.yml")):
        walk(yaml.safe_load(f.read_text()))
    return out


def test_the_phases_follow_what_the_roles_apt_tasks_do():
    """The resolution's model of the roles: every apt install of the NVIDIA role passes install_recommends: false
    (Ansible's apt module would otherwise use apt's configuration), and the base role installs only the
    installer's seeds again (base_packages + base_extra_packages), with base_install_recommends."""
    nvidia = _apt_tasks("nvidia-gpu-drivers")
    assert len(nvidia) >= 5 and all(t.get("install_recommends") is False for t in nvidia), nvidia
    (base,) = _apt_tasks("base")
    assert base["name"] == "{{ base_packages + base_extra_packages }}"
    assert base["install_recommends"] == "{{ base_install_recommends }}" and base["state"] == "present"


def test_a_variants_own_base_role_installs_with_its_own_recommends(tmp_path):
    """A variant may not set base_packages or base_extra_packages, but it may have a base role of its own (its
    provision.roles_path): what that role names beyond the installer's seeds is installed when the variant is
    provisioned, by the base role's apt task with the variant's base_install_recommends, not by the NVIDIA role
    (no Recommends). The phases say so, and the lock holds those Recommends."""
    import shutil

    from builder.pkgresolve import install_phases, resolve_package_lock

    roles = tmp_path / "variant-roles"
    shutil.copytree(ROOT / "roles" / "base", roles / "base")
    defaults = roles / "base" / "defaults" / "main.yml"
    text = defaults.read_text()
    assert "base_extra_packages: []" in text and "base_install_recommends: false" in text
    defaults.write_text(text.replace("base_extra_packages: []", "base_extra_packages: [jq]")
                        .replace("base_install_recommends: false", "base_install_recommends: true"))
    path = image(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["variants"]["open"]["provision"]["roles_path"] = [str(roles), str(ROOT / "roles")]
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert "jq" in image_packages(cfg.variant("open")) and "jq" not in image_packages(cfg.variant("current"))
    phases = install_phases(cfg)
    assert [(p.what, p.recommends) for p in phases] == [("debian-installer", False), ("base (open)", True),
                                                        ("nvidia-gpu-drivers", False)]
    assert phases[1].seeds == ("jq",) and "jq" not in phases[2].seeds
    uni = universe_of(cfg, jq={"Recommends": "libjq-extra"}, **{"libjq-extra": {}, "nvidia-open-kernel-dkms": {
        "Recommends": "open-extra"}, "open-extra": {}})
    names = resolve_package_lock(cfg, uni, report=lambda m: None).by_name()
    assert "jq" in names and "libjq-extra" in names and "open-extra" not in names
    # without base_install_recommends the variant's base role follows none
    defaults.write_text(text.replace("base_extra_packages: []", "base_extra_packages: [jq]"))
    names = resolve_package_lock(load_config(path), uni, report=lambda m: None).by_name()
    assert "jq" in names and "libjq-extra" not in names


def test_recommends_are_followed_where_the_target_follows_them(tmp_path):
    from builder.pkgresolve import install_phases, resolve_package_lock

    def lock_with(*overrides: str):
        cfg = load_config(image(tmp_path), list(overrides))
        uni = universe_of(cfg, **{
            # an installer seed: its Recommends and theirs (transitively), as apt-install follows them
            "cloud-init": {"Recommends": "eatmydata, not-in-any-index"}, "eatmydata": {"Recommends": "libeatmy"},
            "libeatmy": {},
            # a NVIDIA role package: never its Recommends (install_recommends: false)
            "nvidia-kernel-dkms": {"Recommends": "nvidia-kernel-support-extra"}, "nvidia-kernel-support-extra": {},
            # what debootstrap installs (priority important): never its Recommends
            "apt-listchanges": {"Priority": "important", "Recommends": "python3-debianbts"}, "python3-debianbts": {},
        })
        return cfg, resolve_package_lock(cfg, uni, report=lambda m: None).by_name()

    cfg, plain = lock_with()
    assert not cfg.installer.install_recommends
    assert not {"eatmydata", "libeatmy", "nvidia-kernel-support-extra", "python3-debianbts"} & set(plain)
    cfg, rec = lock_with("installer.install_recommends=true")
    assert {"eatmydata", "libeatmy"} <= set(rec)  # a Recommends no index lists is left out, not an error
    assert not {"nvidia-kernel-support-extra", "python3-debianbts"} & set(rec)
    assert [(p.what, p.recommends) for p in install_phases(cfg)] == [("debian-installer", True),
                                                                      ("nvidia-gpu-drivers", False)]
    # base_install_recommends: the base role's packages are installed already, and Ansible's apt module does not
    # run apt for an installed package, so it adds nothing (the resolution ignores it)
    _, base_rec = lock_with("provision.extra_vars.base_install_recommends=true")
    assert set(base_rec) == set(plain)


def test_check_names_what_the_lock_lacks_though_no_version_moved(lock_verb):
    """A lock made before a variant was declared is up to date package by package and still refused by the
    build; ``lock --check`` says which configuration lacks what and exits 1 (changed)."""
    from builder import locking
    from builder.archive.http import FetchStats
    from builder.events import Emitter
    from builder.pkglock import write_package_lock

    cfg, _ = lock_verb("off")
    lock = read_package_lock(cfg.package_lock_path)
    clean = locking.check_locks(cfg, cache=None, stats=FetchStats(), emitter=Emitter(lambda e: None))  # type: ignore[arg-type]
    assert not clean.changed and not [line for line in clean.lines if "lacks" in line]
    drop = {"nvidia-open-kernel-dkms"}
    assert drop <= set(lock.by_name())
    write_package_lock(dataclasses.replace(lock, packages=tuple(p for p in lock.packages if p.name not in drop)),
                       cfg.package_lock_path)
    checked = locking.check_locks(cfg, cache=None, stats=FetchStats(), emitter=Emitter(lambda e: None))  # type: ignore[arg-type]
    assert checked.changed
    lacks = [line for line in checked.lines if line.startswith("  lacks: ")]
    assert lacks == ["  lacks: variant open installs nvidia-open-kernel-dkms"]
    assert checked.lines[-1] == (
        f"cloud-gpu-worker.packages.lock: none of {len(lock.packages) - 1} packages moved upstream, but it lacks "
        "what the build installs (above): a build under it would be refused; add them with: python -m builder lock "
        "IMAGE.yaml --update (not in force: debian.package_lock is off)")
