"""The ``lock`` verb as a user runs it (``python -m builder lock``, a subprocess), on the real archive (the host's
mirror, through builder.hostapt), on a copy of the default image and its locks:

* ``lock --check`` against the committed locks: what it says moved and its exit code agree (the mirror moves
  between a commit and a CI run, so 0 is not required);
* ``lock --update`` (on the committed lock less one variant's package) writes a package lock that reads back,
  covers every variant and what debian-installer installs, pins every file by sha256 to an index it lists;
  ``lock --check`` right after finds it up to date;
* a doctored lock (one pin behind upstream, one variant's package gone): ``lock --check`` exits 1, names the
  package that moved and what the variant lacks.

The unit tests run the verb on a synthetic universe; this is the same code on real indexes and a real resolve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder import hostapt
from builder.archive.cache import cache_base
from builder.config import load_config
from builder.pkglock import PackageLock, read_package_lock, write_package_lock
from builder.pkgresolve import installer_gaps, lock_gaps, provisioned

REPO = Path(__file__).resolve().parents[2]
NAME = "cloud-gpu-worker"
PLOCK = f"{NAME}.packages.lock"
ILOCK = f"{NAME}.lock.json"
# the plain log formatter's "[HH:MM:SS] LEVEL   " (levelname padded to 7): exactly that, the message's own
# indentation ("  lacks: ...") is what the checks read
STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] (?:[A-Z ]{7}|[A-Z]{8,}) ")
FAKE = "0.0-fake"
DROPPED = "nvidia-open-kernel-dkms"  # what only the "open" variant installs

pytestmark = pytest.mark.integration
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    mirror, security = hostapt.debian_mirrors()
    if not mirror or not security:
        pytest.skip("no Debian mirror in the host's apt sources")
    cache = tmp_path_factory.mktemp("lock-verb") / "cache"
    cache.mkdir()
    real = cache_base()
    for sub in ("blobs", "gateway", "extracted"):  # share the downloads, keep everything else apart
        (real / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real / sub)
    return dict(os.environ, BUILDER_CACHE_DIR=str(cache), COLUMNS="400",
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))


def image_copy(d: Path) -> Path:
    """The default image with its committed locks in ``d`` (its paths made absolute)."""
    d.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((REPO / f"images/{NAME}.yaml").read_text())
    data["provision"]["playbook"] = str(REPO / "playbooks/cloud-gpu-worker.yml")
    data["provision"]["roles_path"] = [str(REPO / "roles")]
    data["output"] = {"dir": str(d / "out")}
    img = d / f"{NAME}.yaml"
    img.write_text(yaml.safe_dump(data))
    for f in (ILOCK, PLOCK):
        shutil.copyfile(REPO / "images" / f, d / f)
    if (REPO / f"images/{NAME}.lock.d").is_dir():  # the signed indexes the installer lock's pins are checked against
        shutil.copytree(REPO / f"images/{NAME}.lock.d", d / f"{NAME}.lock.d")
    return img


def lock(env: dict[str, str], img: Path, *args: str, what: str) -> tuple[int, list[str]]:
    """``python -m builder lock IMAGE ARGS``: its exit code and its output lines (log stamps removed)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "builder", "lock", str(img), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1400)
    TIMINGS[what] = time.monotonic() - t0
    lines = [STAMP.sub("", ln) for ln in (proc.stdout + proc.stderr).splitlines()]
    assert proc.returncode in (0, 1), "\n".join(lines[-60:])
    return proc.returncode, lines


def verdicts(lines: list[str]) -> tuple[str, str]:
    """The last line of ``lock --check`` about each lock: (installer lock, package lock)."""
    ilock = [ln for ln in lines if ln.startswith(f"{ILOCK}: ")]
    plock = [ln for ln in lines if ln.startswith(f"{PLOCK}: ")]
    assert len(ilock) == 1 and len(plock) == 1, "\n".join(lines[-60:])
    return ilock[0], plock[0]


def show(capsys, title: str, lines: list[str]) -> None:
    with capsys.disabled():
        print(f"\n--- {title}")
        for ln in lines:
            print(f"    {ln}")


@dataclasses.dataclass
class Updated:
    img: Path
    rc: int
    lines: list[str]
    before: PackageLock  # the committed package lock


@pytest.fixture(scope="module")
def updated(env, tmp_path_factory) -> Updated:
    """``lock --update`` on a copy of the committed locks less one variant's package: the one resolve of this
    module. Without that gap an archive that has not moved since the commit leaves the lock as it is
    ("unchanged") and the writing half of --update would go untested."""
    img = image_copy(tmp_path_factory.mktemp("updated") / "images")
    before = read_package_lock(img.parent / PLOCK)
    assert DROPPED in before.by_name()
    write_package_lock(dataclasses.replace(before, packages=tuple(p for p in before.packages if p.name != DROPPED)),
                       img.parent / PLOCK)
    rc, lines = lock(env, img, "--update", what="lock --update")
    return Updated(img, rc, lines, before)


@pytest.mark.timeout(1500)
def test_check_against_the_committed_locks(env, tmp_path, capsys):
    img = image_copy(tmp_path / "images")
    rc, lines = lock(env, img, "--check", what="lock --check (committed)")
    ilock, plock = verdicts(lines)
    show(capsys, f"lock --check against the committed locks: exit {rc}, {TIMINGS['lock --check (committed)']:.0f} s",
         [ln for ln in lines if ln.startswith(("  ", ILOCK, PLOCK))])
    installer_moved = ilock.endswith(": differs from the archive")
    assert installer_moved or ilock.endswith(": up to date"), ilock
    packages_moved = "packages moved upstream" in plock or "it lacks what the build installs" in plock
    assert packages_moved or ": up to date (" in plock, plock
    # what it says and how it exits agree: 1 exactly when something moved
    assert rc == (1 if installer_moved or packages_moved else 0), (rc, ilock, plock)
    if installer_moved:
        assert any(ln.startswith("  ") and not ln.startswith("  lacks: ") for ln in lines), "no difference named"
    if "packages moved upstream" in plock:  # one line per package, between the two verdicts
        n = int(re.search(r": (\d+) of \d+ packages moved", plock).group(1))  # type: ignore[union-attr]
        between = lines[lines.index(ilock) + 1:lines.index(plock)]
        assert n == len([ln for ln in between if ln.startswith("  ") and not ln.startswith("  lacks: ")]), plock


@pytest.mark.timeout(1500)
def test_update_writes_a_complete_lock_that_check_finds_up_to_date(env, updated, capsys):
    img, lines = updated.img, updated.lines
    assert updated.rc == 0, "\n".join(lines[-60:])
    wrote = [ln for ln in lines if ln.startswith(f"wrote {img.parent / PLOCK} (")]
    assert len(wrote) == 1, "\n".join(lines[-60:])
    # the variant package it lacked is back (a new dependency of it would be "added" too)
    assert any(ln.startswith(f"packages: added {DROPPED} ") for ln in lines), "\n".join(lines[-60:])
    plock = read_package_lock(img.parent / PLOCK)
    cfg = load_config(img)
    assert installer_gaps(plock, cfg) == []
    assert lock_gaps(plock, provisioned(cfg)) == {}
    assert set(provisioned(cfg)) == {"current", "open", "tesla-535"}
    older_dates = 0
    for p in plock.packages:
        assert re.fullmatch(r"[0-9a-f]{64}", p.sha256), p
        idx = plock.index(p.archive, p.suite)
        assert idx is not None, p
        older_dates += idx.date != p.date  # an unchanged pin keeps the index that listed it when first locked
    # --update keeps the package set: nothing the committed lock pinned is dropped
    before = updated.before
    assert set(before.by_name()) <= set(plock.by_name())
    assert not [ln for ln in lines if ln.startswith("packages: dropped ")], "\n".join(lines[-60:])
    rc, check = lock(env, img, "--check", what="lock --check (after --update)")
    ilock, pverdict = verdicts(check)
    assert rc == 0, "\n".join(check[-60:])
    assert ilock == f"{ILOCK}: up to date"
    assert pverdict.startswith(f"{PLOCK}: up to date ({len(plock.packages)} packages)"), pverdict
    per_suite: dict[str, int] = {}
    for p in plock.packages:
        per_suite[p.suite] = per_suite.get(p.suite, 0) + 1
    show(capsys, f"lock --update: {TIMINGS['lock --update']:.0f} s; lock --check after it: exit {rc}, "
                 f"{TIMINGS['lock --check (after --update)']:.0f} s",
         [*[ln for ln in lines if ln.startswith(("installer: ", "packages: ", "wrote ", f"{ILOCK}: ", f"{PLOCK}: "))],
          f"{len(plock.packages)} packages ({len(before.packages)} committed), "
          f"{sum(p.size for p in plock.packages) >> 20} MiB, per suite {per_suite}; {older_dates} pins keep an "
          f"older Release date than their index's; {len(plock.indexes)} indexes",
          *[ln for ln in check if ln.startswith(("  ", ILOCK, PLOCK))]])


@pytest.mark.timeout(1500)
def test_check_names_a_moved_pin_and_a_variant_the_lock_lacks(env, updated, tmp_path, capsys):
    assert updated.rc == 0
    src = updated.img
    img = image_copy(tmp_path / "images")
    shutil.copyfile(src.parent / ILOCK, img.parent / ILOCK)  # the locks --update wrote, not the committed ones
    shutil.rmtree(img.parent / f"{NAME}.lock.d", ignore_errors=True)
    if (src.parent / f"{NAME}.lock.d").is_dir():
        shutil.copytree(src.parent / f"{NAME}.lock.d", img.parent / f"{NAME}.lock.d")
    fresh = read_package_lock(src.parent / PLOCK)
    assert DROPPED in fresh.by_name()
    # one pin behind upstream: a package with a security update when there is one (the line says so)
    security = sorted((p for p in fresh.packages if p.suite.endswith("-security")), key=lambda p: p.size)
    pick = security[0] if security else min((p for p in fresh.packages if p.name != DROPPED), key=lambda p: p.size)
    fake = dataclasses.replace(pick, version=FAKE, sha256=hashlib.sha256(f"{pick.name} {FAKE}".encode()).hexdigest())
    doctored = dataclasses.replace(fresh, packages=tuple(fake if p.name == pick.name else p for p in fresh.packages
                                                         if p.name != DROPPED))
    write_package_lock(doctored, img.parent / PLOCK)
    assert read_package_lock(img.parent / PLOCK) == doctored
    rc, lines = lock(env, img, "--check", what="lock --check (doctored)")
    _ilock, pverdict = verdicts(lines)
    assert rc == 1, "\n".join(lines[-60:])
    named = [ln for ln in lines if ln.startswith(f"  {pick.name}: ")]
    assert len(named) == 1, "\n".join(lines[-60:])
    m = re.fullmatch(rf"  {re.escape(pick.name)}: {re.escape(FAKE)} -> (\S+) \((security update|update), (\S+)\)",
                     named[0])
    assert m is not None, named[0]
    assert (m.group(2) == "security update") == m.group(3).endswith("-security")
    if security:
        assert m.group(2) == "security update", named[0]
    assert "  lacks: variant open installs nvidia-open-kernel-dkms" in lines, "\n".join(lines[-60:])
    n = int(re.search(r": (\d+) of (\d+) packages moved upstream \((\d+) security updates?\)", pverdict)  # type: ignore[union-attr]
            .group(1))
    assert n >= 1 and f" of {len(doctored.packages)} packages moved upstream" in pverdict, pverdict
    show(capsys, f"lock --check on the doctored lock ({pick.name} {pick.version} -> {FAKE}, {DROPPED} removed): "
                 f"exit {rc}, {TIMINGS['lock --check (doctored)']:.0f} s; timings "
                 f"{ {k: round(v) for k, v in TIMINGS.items()} }",
         [ln for ln in lines if ln.startswith(("  ", ILOCK, PLOCK))])
