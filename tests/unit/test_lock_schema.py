"""The lock file's schema is checked on load: a wrong field is a MalformedLockError (exit 2) naming it, never
an unexpected exception later; plus a property test feeding the loader arbitrary bytes and JSON."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lock_and_cache import sample_lock

from builder.errors import LockError, MalformedLockError
from builder.lock import Lock, read_lock

REPO = Path(__file__).resolve().parents[2]


def good() -> dict[str, Any]:
    return json.loads(sample_lock().to_json())


def load(data: object) -> Lock:
    return Lock.from_json(json.dumps(data), source="x.lock.json")


def test_a_bad_sha256_names_the_field_and_exits_2() -> None:
    data = good()
    data["netboot"]["sha256"] = "zz"
    with pytest.raises(MalformedLockError) as exc:
        load(data)
    msg = str(exc.value)
    assert "x.lock.json: malformed lock file" in msg and "netboot.sha256" in msg and "'zz'" in msg
    assert exc.value.exit_code == 2 and isinstance(exc.value, LockError)


def _set(path: str, value: object) -> dict[str, Any]:
    data = good()
    *parents, last = path.split(".")
    node: Any = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


BAD = [
    ("netboot.size", "10", "netboot.size"),
    ("netboot.size", -1, "netboot.size"),
    ("netboot.size", True, "netboot.size"),
    ("netboot.size", 1.5, "netboot.size"),
    ("netboot.sha256", "A" * 64, "netboot.sha256"),
    ("netboot.filename", "../../etc/passwd", "netboot.filename"),
    ("netboot.filename", "pool/../../x.deb", "netboot.filename"),
    ("netboot.filename", "/pool/x.deb", "netboot.filename"),
    ("netboot.filename", "pool/x\n.deb", "netboot.filename"),
    ("netboot.trust", "whatever", "netboot.trust"),
    ("netboot.package", "", "netboot.package"),
    ("netboot", "pool/x.deb", "netboot"),
    ("netboot.extra", 1, "netboot.extra"),
    ("udeb_index.sha256", 7, "udeb_index.sha256"),
    ("udeb_index.path", "main/../../../x", "udeb_index.path"),
    ("udeb_index.size", KeyError, "udeb_index.size"),
    ("overrides.0.sha256", "c" * 63, "overrides[0].sha256"),
    ("overrides.0.md5sum", "m", "overrides[0].md5sum"),
    ("overrides.0.size", None, "overrides[0].size"),
    ("overrides.0", [], "overrides[0]"),
    ("overrides", {"a": 1}, "overrides"),
    ("removed.0.reason", 3, "removed[0].reason"),
    ("boot.0.sha256", "d" * 65, "boot[0].sha256"),
    ("notes", ["ok", 2], "notes[1]"),
    ("arch", ["amd64"], "arch"),
    ("kernel_abi", KeyError, "kernel_abi"),
    ("surprise", "x", "surprise"),
]


@pytest.mark.parametrize(("path", "value", "named"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_every_bad_field_is_named(path: str, value: object, named: str) -> None:
    with pytest.raises(MalformedLockError) as exc:
        load(_set(path, value))
    assert f"  {named}:" in str(exc.value)


def test_every_problem_is_listed_at_once() -> None:
    data = good()
    data["netboot"]["sha256"] = "zz"
    data["boot"][0]["size"] = "7"
    with pytest.raises(MalformedLockError) as exc:
        load(data)
    assert "netboot.sha256" in str(exc.value) and "boot[0].size" in str(exc.value)
    assert [p for p, _ in exc.value.problems] == ["netboot.sha256", "boot[0].size"]


@pytest.mark.parametrize("text", [b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b"{", b"[" * 100000, b'"lock"'])
def test_not_a_lock_at_all(tmp_path: Path, text: bytes) -> None:
    p = tmp_path / "x.lock.json"
    p.write_bytes(text)
    with pytest.raises(MalformedLockError, match="malformed lock file"):
        read_lock(p)


def test_unreadable_lock_is_a_lock_error(tmp_path: Path) -> None:
    (tmp_path / "d.lock.json").mkdir()
    with pytest.raises(LockError, match="cannot read the lock file"):
        read_lock(tmp_path / "d.lock.json")


def test_committed_lock_passes_the_schema() -> None:
    lock = read_lock(REPO / "images/cloud-gpu-worker.lock.json")
    assert Lock.from_json(lock.to_json()) == lock


def test_cli_exits_2_for_a_malformed_lock(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for d in ("playbooks", "roles"):
        (tmp_path / d).symlink_to(REPO / d)
    (images / "w.yaml").write_text((REPO / "images/cloud-gpu-worker.yaml").read_text())
    data = json.loads((REPO / "images/cloud-gpu-worker.lock.json").read_text())
    data["netboot"]["sha256"] = "zz"
    (images / "w.lock.json").write_text(json.dumps(data))
    nowhere = "http://127.0.0.1:9/debian"  # nothing may be fetched; if it were, it would fail here
    p = subprocess.run([sys.executable, "-m", "builder", "fetch", str(images / "w.yaml"), "--var",
                        f"debian.mirror={nowhere}", "--var", f"debian.security_mirror={nowhere}-security"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "netboot.sha256" in out and "'zz'" in out
    assert "internal error" not in out and "Traceback" not in out


# ------------------------------------------------------------------------------------------- property

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
FIELDS = ["suite", "codename", "arch", "created", "netboot", "kernel_abi", "udeb_index", "overrides", "removed",
          "boot", "notes", "lock_version"]


@st.composite
def mutated_locks(draw: st.DrawFn) -> bytes:
    """A valid lock with a few fields (at any depth) replaced by arbitrary JSON or removed."""
    data = good()
    for _ in range(draw(st.integers(1, 3))):
        node: Any = data
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if isinstance(node, dict):
            key = draw(st.sampled_from([*node, *FIELDS, "extra"]))
            if draw(st.booleans()):
                node.pop(key, None)
            else:
                node[key] = draw(json_values)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
    return json.dumps(copy.deepcopy(data)).encode()


def _outcome(raw: bytes | str) -> None:
    try:
        lock = Lock.from_json(raw, source="fuzz")
    except LockError as exc:
        assert "fuzz" in str(exc)
        return
    assert isinstance(lock, Lock)
    assert Lock.from_json(lock.to_json()) == lock  # what loads is a lock that round-trips
    for pin in (lock.netboot, *lock.boot, *lock.overrides, lock.udeb_index):
        assert isinstance(pin.size, int) and len(pin.sha256) == 64


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_load_or_fail_cleanly(raw: bytes) -> None:
    _outcome(raw)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values.map(json.dumps))
def test_arbitrary_json_loads_or_fails_cleanly(text: str) -> None:
    _outcome(text)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_locks())
def test_mutated_lock_loads_or_fails_cleanly(raw: bytes) -> None:
    _outcome(raw)
