"""`validate` and `build` accept exactly the same configurations: every check rendering the preseed does is a
config validator, so each render-time problem is an exit 2 from `validate` (before anything is fetched)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.config import load_config
from builder.errors import ConfigError
from builder.installer.preseed import PreseedContext, render_preseed
from builder.ssh import generate_keypair

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "images" / "cloud-gpu-worker.yaml"

# (--var overrides, the config path the problem is reported at)
PROBLEMS = [
    (["installer.locale=not a locale"], "installer.locale"),
    (["installer.locale=xx_YY.UTF-8"], "installer.locale"),  # well-formed, but no such locale
    (["installer.timezone=Europe/Berlin; reboot"], "installer.timezone"),
    (["installer.keymap=us'"], "installer.keymap"),
    (["installer.domain=-bad-.org"], "installer.domain"),
    (["installer.kernel_cmdline=[console=ttyS0, \"foo='a b'\"]"], "installer.kernel_cmdline"),
    (["installer.extra_packages=['vim; rm -rf /']"], "installer.extra_packages"),
    (["installer.extra_packages=[vim, vim]"], "installer.extra_packages"),
    (["debian.components=[main, bogus]"], "debian.components"),
    (["debian.components=[contrib]"], "debian.components"),
    (["debian.suite=Trixie!"], "debian.suite"),
    # the seed list lives in the base role; overriding it without what the build needs is refused
    (["provision.extra_vars.base_packages=[vim, curl]"], "provision.extra_vars"),
    (["provision.extra_vars.base_packages=[openssh-server, sudo, python3, network-manager, 'Bad Name']"],
     "provision.extra_vars"),
]


@pytest.mark.parametrize(("overrides", "path"), PROBLEMS)
def test_validate_rejects_each_render_time_problem(overrides, path):
    with pytest.raises(ConfigError) as err:
        load_config(IMAGE, overrides)
    assert any(p == path or p.startswith(path + ".") for p, _ in err.value.problems), err.value.problems
    args = [a for o in overrides for a in ("--var", o)]
    proc = subprocess.run([sys.executable, "-m", "builder", "validate", str(IMAGE), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert path in proc.stderr and "Traceback" not in proc.stderr


def test_what_validates_renders():
    """The other direction: a config that validates renders (no render-only check is left)."""
    for overrides in ([], ["installer.locale=de_DE.UTF-8", "installer.keymap=de(nodeadkeys)",
                           "installer.extra_packages=[tmux]", "debian.components=[main, non-free]"]):
        cfg = load_config(IMAGE, overrides)
        c, h = generate_keypair("c"), generate_keypair("h")
        text = render_preseed(PreseedContext(cfg, mirror_host="10.0.2.100", authorized_key=c.public_openssh,
                                             host_key_private=h.private_openssh, host_key_public=h.public_openssh))
        include = next(ln for ln in text.splitlines() if ln.startswith("d-i pkgsel/include"))
        seed = yaml.safe_load((REPO / "roles/base/defaults/main.yml").read_text())["base_packages"]
        assert all(p in include.split() for p in seed)
