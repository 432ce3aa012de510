from pathlib import Path

import pytest

from builder.config import dump_config, format_size, load_config, parse_overrides, parse_size
from builder.errors import ConfigError
from builder.hostapt import _parse_deb822, _parse_list, debian_mirrors


def test_default_image_loads(default_config):
    cfg = default_config
    assert cfg.name == "cloud-gpu-worker"
    assert cfg.debian.suite == "trixie" and cfg.debian.release == 13
    assert cfg.disk.size == 30 << 30
    assert cfg.provision.extra_vars["nvidia_install_cuda"] is False
    assert cfg.debian.mirror.startswith("http")
    assert cfg.lock_path.name == "cloud-gpu-worker.lock.json"
    assert "disk:" in dump_config(cfg) and "30G" in dump_config(cfg)


@pytest.mark.parametrize("text,expected", [("30G", 30 << 30), ("30GiB", 30 << 30), ("512M", 512 << 20),
                                           ("1.5G", 3 << 29), (1024, 1024), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["30X", "", "-1G", "G", "thirty"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert format_size(30 << 30) == "30G" and format_size(512 << 20) == "512M" and format_size(1000) == "1000"


def test_overrides_apply(default_config, repo):
    cfg = load_config(repo / "images/cloud-gpu-worker.yaml", ["disk.size=40G", "vm.cpus=4",
                                                              "provision.extra_vars.nvidia_driver_flavor=open"])
    assert cfg.disk.size == 40 << 30 and cfg.vm.cpus == 4
    assert cfg.provision.extra_vars["nvidia_driver_flavor"] == "open"


def test_overrides_malformed():
    with pytest.raises(ConfigError) as ei:
        parse_overrides(["nokey", "=x", "a.b=ok"])
    assert len(ei.value.problems) == 2


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "img.yaml"
    p.write_text(text)
    return p


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, "name: x\ndisk: {size: 30Q, compresion: zlib}\nvm: {cpus: many, accel: warp}\nbogus: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    paths = {path for path, _ in ei.value.problems}
    assert {"disk.size", "disk.compresion", "vm.cpus", "vm.accel", "bogus"} <= paths, ei.value.problems
    assert ei.value.exit_code == 2


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "name: x\ndisk:\n  size: [30G\n")
    with pytest.raises(ConfigError, match=r"malformed YAML \(line \d+"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_playbook_reported(tmp_path):
    p = write(tmp_path, "provision: {playbook: missing.yml, roles_path: [nowhere]}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    paths = {path for path, _ in ei.value.problems}
    assert {"provision.playbook", "provision.roles_path.0"} <= paths


def test_disk_too_small(tmp_path):
    p = write(tmp_path, "disk: {size: 1G}\nprovision: {enabled: false}\n")
    with pytest.raises(ConfigError, match="at least 4G"):
        load_config(p)


def test_hostapt_formats(tmp_path):
    lst = _parse_list("deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                      "http://mirror.invalid/debian trixie main\n# deb http://x.invalid/debian sid main\n")
    assert lst[0].uri == "http://mirror.invalid/debian" and lst[0].suites == ("trixie",)
    d822 = _parse_deb822("Types: deb\nURIs: http://m.invalid/debian\nSuites: trixie trixie-updates\n"
                         "Components: main\n\nTypes: deb\nURIs: http://m.invalid/debian-security\n"
                         "Suites: trixie-security\nComponents: main\n\nEnabled: no\nTypes: deb\n"
                         "URIs: http://off.invalid/debian\nSuites: x\n")
    assert [s.uri for s in d822] == ["http://m.invalid/debian", "http://m.invalid/debian-security"]
    assert d822[1].is_security


def test_hostapt_root(tmp_path):
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://m.invalid/debian\nSuites: trixie\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://s.invalid/debian-security\nSuites: trixie-security\nComponents: main\n")
    (tmp_path / "etc/apt/sources.list.d/other.list.disabled").write_text("deb http://x.invalid/debian sid main\n")
    assert debian_mirrors(tmp_path) == ("http://m.invalid/debian", "http://s.invalid/debian-security")


def test_configuration_doc_is_generated_and_complete(repo):
    from builder.configdoc import MEANING, render, rows

    missing = [p for p, _, _, m in rows() if not m]
    assert not missing, f"keys without a meaning in builder/configdoc.py: {missing}"
    assert set(MEANING) == {p for p, *_ in rows()}, "MEANING names keys that do not exist"
    assert (repo / "docs/configuration.md").read_text() == render(), \
        "run: python -m builder.configdoc > docs/configuration.md"


def test_var_file_precedence(tmp_path, repo):
    """image < --var-file (in order) < --var, as Packer orders -var-file and -var."""
    a = tmp_path / "a.yaml"
    a.write_text("disk: {size: 40G}\nvm: {cpus: 4}\nprovision: {extra_vars: {nvidia_driver_flavor: open}}\n")
    b = tmp_path / "b.yaml"
    b.write_text("vm: {cpus: 6}\n")
    cfg = load_config(repo / "images/cloud-gpu-worker.yaml", ["vm.cpus=8"], var_files=[a, b])
    assert cfg.disk.size == 40 << 30 and cfg.vm.cpus == 8
    assert cfg.provision.extra_vars["nvidia_driver_flavor"] == "open"
    assert cfg.provision.extra_vars["nvidia_install_cuda"] is False  # merged, not replaced
    assert load_config(repo / "images/cloud-gpu-worker.yaml", var_files=[a, b]).vm.cpus == 6
    with pytest.raises(ConfigError, match="var file not found"):
        load_config(repo / "images/cloud-gpu-worker.yaml", var_files=[tmp_path / "nope.yaml"])
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(repo / "images/cloud-gpu-worker.yaml", var_files=[tmp_path / "bad.yaml"])
