"""The config loader under hostile input: the only outcomes are a valid config or ConfigError (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.config import ImageConfig, load_config
from builder.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, data: bytes, overrides: list[str] | None = None) -> ImageConfig | ConfigError:
    p = tmp_path / "img.yaml"
    p.write_bytes(data)
    try:
        return load_config(p, overrides or [])
    except ConfigError as exc:
        return exc


def _validate(tmp_path: Path, data: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    p = tmp_path / "img.yaml"
    p.write_bytes(data)
    return subprocess.run([sys.executable, "-m", "builder", "validate", str(p), *args], capture_output=True,
                          text=True, timeout=60)


def test_non_utf8_bytes_are_one_clear_line(tmp_path):
    p = _validate(tmp_path, b"name: caf\xe9\n")
    assert p.returncode == 2 and "not UTF-8 text (byte 0xe9 on line 1)" in p.stderr and "Traceback" not in p.stderr


def test_unknown_output_placeholder_is_refused_by_validate(tmp_path):
    p = _validate(tmp_path, b"output: {dir: 'out/{nmae}'}\n")
    assert p.returncode == 2 and "output.dir" in p.stderr and "{name}" in p.stderr
    assert isinstance(_load(tmp_path, b"output: {dir: 'out/{name}-{{x}}'}\n"), ImageConfig)


def test_no_debian_section_takes_the_host_mirrors(tmp_path):
    cfg = _load(tmp_path, b"name: minimal\n")
    assert isinstance(cfg, ImageConfig) and cfg.debian.mirror.startswith("http")


def test_alias_bomb_is_refused_quickly(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    data = f"provision:\n  extra_vars:\n    {bomb.replace(chr(10), chr(10) + '    ')}".encode()
    p = _validate(tmp_path, data)
    assert p.returncode == 2 and "aliases are expanded" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "builder", "show-config", str(tmp_path / "img.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stdout) == 0


def test_oversized_file_is_refused(tmp_path):
    p = _validate(tmp_path, b"description: '" + b"x" * (2 << 20) + b"'\n")
    assert p.returncode == 2 and "larger than" in p.stderr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_arbitrary_bytes(tmp_path, data):
    out = _load(tmp_path, data)
    assert isinstance(out, ImageConfig | ConfigError)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
_docs = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.sampled_from(["name", "debian", "disk", "vm", "installer", "provision", "output", "size", "mirror",
                     "components", "packages", "extra_vars", "dir", "cpus", "memory", "locale", "x"]) | st.text(),
    kids, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_docs)
def test_arbitrary_yaml_documents(tmp_path, doc):
    import yaml

    out = _load(tmp_path, yaml.safe_dump(doc, allow_unicode=True).encode())
    assert isinstance(out, ImageConfig | ConfigError)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=40), max_size=3))
def test_arbitrary_overrides(tmp_path, overrides):
    out = _load(tmp_path, b"name: x\n", overrides)
    assert isinstance(out, ImageConfig | ConfigError)


@pytest.mark.parametrize("path", ["output.dir", "provision.playbook", "provision.finalize_playbook"])
def test_nul_in_a_path_is_a_config_error(tmp_path, path):
    out = _load(tmp_path, b"name: x\n", [f"{path}=a\x00b"])
    assert isinstance(out, ConfigError)
