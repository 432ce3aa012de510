"""DKMS source patches: the role's dkms-patches.sh (what gives a source tree its PATCH[] lines, on the target and
in the host's build root), the open flavour's shipped patch against Debian's source, the patch list the builder
resolves once for both sides, and the module cache key.

The patch is applied with the real ``patch -p1`` as DKMS applies it, to excerpts of Debian's
nvidia-open-kernel-dkms 550.163.01-2 (tests/unit/data/…/SOURCE.md says where they come from); with
``BUILDER_NVIDIA_OPEN_DEB=/path/to/nvidia-open-kernel-dkms_550.163.01-2_amd64.deb`` also to the whole package.
The conftest the patch adds is compiled (with the host's C compiler, a few milliseconds) against two stand-in
``<linux/pci.h>``: the three- and the four-argument prototype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import dkmspatches
from builder import hostmodule as hm
from builder.config import DebianConfig, load_config
from builder.errors import ConfigError, HostModuleError
from builder.hostmodule import HostModule
from builder.stages import module
from builder.stages.provision import playbook_vars

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "nvidia-gpu-drivers"
SCRIPT = ROLE / "files" / "dkms-patches.sh"
OPEN_PATCH = ROLE / "files" / "patches" / "nvidia-open-550-pci-resize-resource-exclude-bars.patch"
EXCERPT = Path(__file__).resolve().parent / "data" / "nvidia-open-550.163.01-2"
IMAGE = ROOT / "images" / "cloud-gpu-worker.yaml"
KVER = "6.12.118+deb13-amd64"
BEGIN = "# BEGIN nvidia-gpu-drivers DKMS patches"

pytestmark = pytest.mark.skipif(shutil.which("patch") is None, reason="patch is not installed (apt-get install patch)")


def give(src: Path, *pairs: str | Path) -> subprocess.CompletedProcess[str]:
    """dkms-patches.sh SRC [FILE MATCH]..."""
    return subprocess.run(["bash", str(SCRIPT), str(src), *map(str, pairs)], capture_output=True, text=True,
                          timeout=60)


# What dkms 3.2 does with PATCH[] before a build (dkms(8)): it sources dkms.conf, re-reads the values it got inside
# double quotes, copies the source tree to its build directory and, there, for each PATCH[i] whose PATCH_MATCH[i]
# is empty or matches the kernel release (bash =~), runs `patch -p1 < ./patches/PATCH[i]`; a failure ends the
# build (exit status 6).
DKMS_BUILD = r"""
set -u
src=$1 kernelver=$2 build=$3
vals=$(arch=x86_64; . "$src/dkms.conf" >/dev/null 2>&1
       for i in "${!PATCH[@]}"; do printf 'PATCH[%s]="%s"\n' "$i" "${PATCH[$i]}"; done
       for i in "${!PATCH_MATCH[@]}"; do printf 'PATCH_MATCH[%s]="%s"\n' "$i" "${PATCH_MATCH[$i]}"; done)
PATCH=() PATCH_MATCH=()
eval "$vals"
cp -a "$src" "$build" && cd "$build" || exit 15
for ((i = 0; i < ${#PATCH[@]}; i++)); do
    if [[ ${PATCH[$i]} && (! ${PATCH_MATCH[$i]:-} || $kernelver =~ ${PATCH_MATCH[$i]:-}) ]]; then
        [ -e "patches/${PATCH[$i]}" ] || exit 5
        patch -p1 < "./patches/${PATCH[$i]}" >> make.log 2>&1 || exit 6
        echo "applied ${PATCH[$i]}"
    fi
done
"""


def dkms_build(src: Path, kver: str, build: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", DKMS_BUILD, "_", str(src), kver, str(build)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def src(tmp_path) -> Path:
    """A copy of the excerpts as a source tree /usr/src/nvidia-current-open-550.163.01."""
    tree = tmp_path / "usr/src/nvidia-current-open-550.163.01"
    shutil.copytree(EXCERPT, tree, ignore=shutil.ignore_patterns("SOURCE.md"))
    return tree


# ---------------------------------------------------------------------------------------------- dkms-patches.sh


def test_the_script_names_the_patches_once_and_a_second_run_changes_nothing(src, tmp_path):
    pristine = (src / "dkms.conf").read_text()
    extra = tmp_path / "extra.patch"
    extra.write_text("--- a/x\n+++ b/x\n")
    first = give(src, OPEN_PATCH, "", extra, r"^6\.12\.")
    assert first.returncode == 0 and first.stdout.splitlines()[-1] == "changed", first.stderr
    conf = (src / "dkms.conf").read_text()
    assert conf.startswith(pristine) and conf.count(BEGIN) == 1
    assert conf[len(pristine):].splitlines()[1:3] == [
        'PATCH+=("nvidia-open-550-pci-resize-resource-exclude-bars.patch")',
        r'PATCH+=("extra.patch"); PATCH_MATCH[${#PATCH[@]}-1]="^6\.12\."']
    assert (src / "patches" / OPEN_PATCH.name).read_bytes() == OPEN_PATCH.read_bytes()
    stamp = (src / "dkms.conf").stat().st_mtime_ns
    second = give(src, OPEN_PATCH, "", extra, r"^6\.12\.")
    assert second.returncode == 0 and second.stdout.splitlines()[-1] == "unchanged"
    assert (src / "dkms.conf").read_text() == conf and (src / "dkms.conf").stat().st_mtime_ns == stamp
    # what DKMS reads: the package's own settings and then the two patches
    got = subprocess.run(["bash", "-c", '. "$1"; echo "$PACKAGE_NAME ${#PATCH[@]} ${PATCH[1]} ${PATCH_MATCH[1]}"',
                          "_", str(src / "dkms.conf")], capture_output=True, text=True, env={"kernelver": KVER})
    assert got.stdout.split() == ["nvidia-current-open", "2", "extra.patch", r"^6\.12\."]


def test_a_smaller_set_takes_the_old_patches_out_and_none_restores_the_package_file(src, tmp_path):
    pristine = (src / "dkms.conf").read_bytes()
    extra = tmp_path / "extra.patch"
    extra.write_text("x\n")
    assert give(src, OPEN_PATCH, "", extra, "").returncode == 0
    assert give(src, OPEN_PATCH, "").stdout.splitlines()[-1] == "changed"
    assert sorted(p.name for p in (src / "patches").iterdir()) == [OPEN_PATCH.name]
    assert (src / "dkms.conf").read_text().count('PATCH+=("') == 1
    assert give(src).stdout.splitlines()[-1] == "changed"
    assert (src / "dkms.conf").read_bytes() == pristine and not (src / "patches").exists()
    assert give(src).stdout.splitlines()[-1] == "unchanged"


def test_a_changed_patch_file_is_copied_again(src, tmp_path):
    mine = tmp_path / "mine.patch"
    mine.write_text("one\n")
    assert give(src, mine, "").returncode == 0
    mine.write_text("two\n")
    assert give(src, mine, "").stdout.splitlines()[-1] == "changed"
    assert (src / "patches/mine.patch").read_text() == "two\n"


@pytest.mark.parametrize(("pairs", "message"), [
    (("{p}",), "each patch needs a MATCH"),
    (("/nonexistent.patch", ""), "/nonexistent.patch is not a file"),
    (("{p}", "a b"), "no quotes, backquotes, doubled backslashes or spaces"),
    (("{p}", 'a"b'), "no quotes"),
    (("{p}", "$(reboot)"), r"$ only as the last character"),
    (("{p}", "(unclosed"), "not a valid bash (POSIX extended) regular expression"),
    (("{p}", "", "{p}", ""), "two patches are named"),
])
def test_bad_arguments_are_one_line_and_change_nothing(src, pairs, message):
    before = (src / "dkms.conf").read_bytes()
    r = give(src, *[a.replace("{p}", str(OPEN_PATCH)) for a in pairs])
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("dkms-patches: ")
    assert (src / "dkms.conf").read_bytes() == before and not (src / "patches").exists()


def test_a_tree_without_dkms_conf_and_a_clash_with_the_packages_own_patch(tmp_path, src):
    r = give(tmp_path, OPEN_PATCH, "")
    assert r.returncode == 1 and "is not a DKMS source tree" in r.stderr
    with (src / "dkms.conf").open("a") as f:
        f.write(f'PATCH[0]="{OPEN_PATCH.name}"\n')
    r = give(src, OPEN_PATCH, "")
    assert r.returncode == 1 and "names nvidia-open-550-pci-resize-resource-exclude-bars.patch itself" in r.stderr


def test_a_patch_file_of_the_package_is_not_overwritten(src, tmp_path):
    (src / "patches").mkdir()
    (src / "patches/fix.patch").write_text("the package's\n")
    mine = tmp_path / "fix.patch"
    mine.write_text("mine\n")
    r = give(src, mine, "")
    assert r.returncode == 1 and "exists and is not one of these patches" in r.stderr
    assert (src / "patches/fix.patch").read_text() == "the package's\n"


# ---------------------------------------------------------------------------------------------- the shipped patch


def test_the_open_patch_applies_as_dkms_applies_it_and_only_once(src, tmp_path):
    assert give(src, OPEN_PATCH, "").returncode == 0
    assert give(src, OPEN_PATCH, "").returncode == 0  # a second run adds no second PATCH[] line
    r = dkms_build(src, KVER, tmp_path / "build")
    assert r.returncode == 0 and r.stdout.splitlines() == [f"applied {OPEN_PATCH.name}"], r.stdout + r.stderr
    build = tmp_path / "build"
    pci = (build / "nvidia/nv-pci.c").read_text()
    assert "#if defined(NV_PCI_RESIZE_RESOURCE_HAS_EXCLUDE_BARS_ARG)\n" in pci
    assert "pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size, 0);" in pci
    assert "    r = pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);\n#endif" in pci
    assert "NV_CONFTEST_TYPE_COMPILE_TESTS += pci_resize_resource_has_exclude_bars_arg\n" in \
        (build / "nvidia/nvidia.Kbuild").read_text()
    assert "        pci_resize_resource_has_exclude_bars_arg)\n" in (build / "conftest.sh").read_text()
    # the source tree itself stays as the package has it
    assert (src / "nvidia/nv-pci.c").read_bytes() == (EXCERPT / "nvidia/nv-pci.c").read_bytes()


def test_patch_match_limits_a_patch_to_the_kernels_it_matches(src, tmp_path):
    assert give(src, OPEN_PATCH, r"^6\.12\.(9[7-9]|[1-9][0-9]{2})").returncode == 0
    assert dkms_build(src, KVER, tmp_path / "new").stdout.split() == ["applied", OPEN_PATCH.name]
    old = dkms_build(src, "6.12.96+deb13-amd64", tmp_path / "old")
    assert old.returncode == 0 and old.stdout == ""
    assert (tmp_path / "old/nvidia/nv-pci.c").read_bytes() == (EXCERPT / "nvidia/nv-pci.c").read_bytes()


def test_a_patch_that_does_not_apply_fails_the_build(src, tmp_path):
    assert give(src, OPEN_PATCH, "").returncode == 0
    (src / "nvidia/nv-pci.c").write_text("something else\n")
    assert dkms_build(src, KVER, tmp_path / "build").returncode == 6


def test_the_open_patch_dry_runs_cleanly_from_the_source_directory(src):
    r = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(OPEN_PATCH)], cwd=src, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.findall(r"^checking file (\S+)", r.stdout, re.M) == ["conftest.sh", "nvidia/nv-pci.c",
                                                                   "nvidia/nvidia.Kbuild"]
    assert "fuzz" not in r.stdout and "FAILED" not in r.stdout


@pytest.mark.skipif(not os.environ.get("BUILDER_NVIDIA_OPEN_DEB"), reason="BUILDER_NVIDIA_OPEN_DEB is not set")
def test_the_open_patch_applies_to_the_whole_package(tmp_path):
    deb = Path(os.environ["BUILDER_NVIDIA_OPEN_DEB"])
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "root")], check=True)
    tree = tmp_path / "root/usr/src/nvidia-current-open-550.163.01"
    assert give(tree, OPEN_PATCH, "").returncode == 0
    r = dkms_build(tree, KVER, tmp_path / "build")
    assert r.returncode == 0 and f"applied {OPEN_PATCH.name}" in r.stdout, r.stderr
    dry = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(OPEN_PATCH)], cwd=tree, capture_output=True,
                         text=True)
    assert dry.returncode == 0 and "offset" not in dry.stdout and "fuzz" not in dry.stdout, dry.stdout


def conftest_code() -> str:
    """The C code of the conftest the patch adds (its CODE="…")."""
    added = "\n".join(line[1:] for line in OPEN_PATCH.read_text().splitlines() if line.startswith("+"))
    m = re.search(r'pci_resize_resource_has_exclude_bars_arg\)\n.*?CODE="\n(.*?)"\n', added, re.S)
    assert m, "no conftest in the patch"
    return m.group(1)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize(("prototype", "defined"), [
    ("int pci_resize_resource(struct pci_dev *dev, int i, int size, int exclude_bars);", True),
    ("int pci_resize_resource(struct pci_dev *dev, int i, int size);", False),
])
def test_the_conftest_tells_the_two_prototypes_apart(tmp_path, prototype, defined):
    # what conftest.sh's compile_check_conftest does for a "types" test: it defines the macro iff this compiles
    (tmp_path / "linux").mkdir()
    (tmp_path / "linux/pci.h").write_text(f"struct pci_dev;\n{prototype}\n")
    (tmp_path / "t.c").write_text(conftest_code())
    r = subprocess.run(["cc", "-I", str(tmp_path), "-Wno-implicit-function-declaration", "-c", "t.c", "-o", "t.o"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert (r.returncode == 0) is defined, r.stderr


# ---------------------------------------------------------------------------------------------- the builder's side


def cfg(*overrides: str):
    return load_config(IMAGE, list(overrides))


def test_the_open_flavour_carries_its_patch_and_the_others_none():
    patches = module.dkms_patches(cfg("provision.extra_vars.nvidia_driver_flavor=open"))
    assert [(p.name, p.path, p.match) for p in patches] == [(OPEN_PATCH.name, OPEN_PATCH, "")]
    assert patches[0].sha256 == hashlib.sha256(OPEN_PATCH.read_bytes()).hexdigest()
    assert module.dkms_patches(cfg()) == ()
    assert module.dkms_patches(cfg("provision.extra_vars.nvidia_driver_flavor=tesla-535")) == ()
    assert module.dkms_patches(cfg("provision.extra_vars.nvidia_driver_source=nvidia")) == ()
    assert module.patch_script(cfg()) == SCRIPT


def test_extra_vars_replace_the_flavours_list(tmp_path):
    mine = tmp_path / "mine.patch"
    mine.write_text("x\n")
    c = cfg("provision.extra_vars.nvidia_driver_flavor=open")
    c.provision.extra_vars["nvidia_dkms_patches"] = [{"file": str(mine), "match": "^6\\."}]
    assert [(p.name, p.match) for p in module.dkms_patches(c)] == [("mine.patch", "^6\\.")]
    c.provision.extra_vars["nvidia_dkms_patches"] = []
    assert module.dkms_patches(c) == ()


@pytest.mark.parametrize(("entries", "message"), [
    ("x.patch", "must be a list of {file, match}, not str"),
    ([{"match": ""}], r"\[0\].file must be a patch file name or an absolute path"),
    ([{"file": "nope.patch"}], r"nope.patch is not a file"),
    ([{"file": "/abs/x y.patch"}], r"letters, digits and \. _ \+ - only"),
    ([{"file": "{p}", "match": "a b"}], "no quotes, backquotes, doubled backslashes or spaces"),
    ([{"file": "{p}", "match": "^6$x"}], r"\$ only as the last character"),
    ([{"file": "{p}", "match": 6}], "match must be a string"),
    ([{"file": "{p}", "when": "x"}], "unknown key 'when'"),
    ([{"file": "{p}"}, {"file": "{p}"}], "two patches are named"),
    ([3], "must be a mapping with file"),
])
def test_bad_patch_lists_are_one_clear_line(entries, message):
    if isinstance(entries, list):
        entries = [{k: (v.replace("{p}", str(OPEN_PATCH)) if isinstance(v, str) else v) for k, v in e.items()}
                   if isinstance(e, dict) else e for e in entries]
    with pytest.raises(ConfigError, match=message) as ei:
        dkmspatches.load(entries, patches_dir=OPEN_PATCH.parent, where="nvidia_dkms_patches")
    assert "\n" not in str(ei.value) and str(ei.value).startswith("nvidia_dkms_patches")


def test_a_relative_name_is_found_in_the_roles_patches_and_a_plain_string_is_a_file():
    got = dkmspatches.load([OPEN_PATCH.name], patches_dir=OPEN_PATCH.parent, where="w")
    assert got[0].path == OPEN_PATCH and got[0].match == ""
    assert dkmspatches.load(None, patches_dir=None, where="w") == ()
    with pytest.raises(ConfigError, match="is relative, and the role has no files/patches/"):
        dkmspatches.load([OPEN_PATCH.name], patches_dir=None, where="w")


def test_the_playbook_gets_the_same_patches_as_the_host_build(tmp_path):
    c = cfg("provision.extra_vars.nvidia_driver_flavor=open")
    v = playbook_vars(c, tmp_path)
    assert v["nvidia_dkms_patches"] == [{"file": str(OPEN_PATCH), "match": ""}]
    assert "nvidia_dkms_patches" not in playbook_vars(cfg(), tmp_path)  # none: the role's own default, []
    patch = module.dkms_patches(c)
    built = HostModule(Path("/m.tar.gz"), "nvidia-current-open", "550.163.01", KVER, "cache", 1.0,
                       "nvidia-open-kernel-dkms", "550.163.01-2", "k", "", patch)
    assert playbook_vars(c, tmp_path, built)["nvidia_dkms_patches"] == [p.role_entry() for p in patch]
    assert built.manifest()["dkms_patches"] == [{"name": OPEN_PATCH.name, "match": None,
                                                 "sha256": patch[0].sha256}]


def test_the_manifest_names_the_patches_the_role_gave_the_target():
    record = {"origin": "prebuilt", "module": "nvidia-current-open", "version": "550.163.01", "kver": KVER,
              "kernels": {KVER: "prebuilt"}, "dkms_patches": [OPEN_PATCH.name]}
    assert module.module_manifest(None, record)["dkms_patches"] == [OPEN_PATCH.name]


def test_inspect_names_the_patches():
    from builder.inspect import _module_plan

    text = _module_plan(cfg("provision.extra_vars.nvidia_driver_flavor=open"))
    assert f"DKMS source patches (PATCH[] in dkms.conf, host and guest alike): {OPEN_PATCH.name} (sha256 " in text
    assert "every kernel" in text and "DKMS source patches" not in _module_plan(cfg())


# ---------------------------------------------------------------------------------------------- cache key, build root


def plan() -> hm.ModulePlan:
    def res(name, version):
        return hm.Resolved(name, version, "a" * 64, "trixie/main")
    return hm.ModulePlan(res("nvidia-open-kernel-dkms", "550.163.01-2"), KVER,
                         res(f"linux-headers-{KVER}", "6.12.118-1"), res("gcc-14", "14.2.0-19"),
                         res("dkms", "3.2.2-1~deb13u1"))


def test_a_patched_module_never_shares_the_unpatched_ones_cache_entry(tmp_path):
    p = plan()
    legacy = {"format": hm.KEY_FORMAT, "dkms_package": p.dkms_package.pin, "dkms_package_sha256": "a" * 64,
              "kver": KVER, "headers": p.headers.pin, "compiler": p.compiler.pin, "dkms": p.dkms.pin,
              "signing": "unsigned"}
    # without patches the key is the one from before patches existed: the unpatched modules stay cached
    assert p.cache_key() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:32]
    patch = dkmspatches.load([OPEN_PATCH.name], patches_dir=OPEN_PATCH.parent, where="w")
    patched = dataclasses.replace(p, patches=patch)
    changed = tmp_path / OPEN_PATCH.name
    changed.write_bytes(OPEN_PATCH.read_bytes() + b"\n")
    keys = {p.cache_key(), patched.cache_key(),
            dataclasses.replace(p, patches=(dataclasses.replace(patch[0], match="^6"),)).cache_key(),
            dataclasses.replace(p, patches=dkmspatches.load([str(changed)], patches_dir=None, where="w")).cache_key()}
    assert len(keys) == 4  # none, the patch, another match, other bytes
    # where the file is does not matter, its bytes do
    moved = tmp_path / "moved" / OPEN_PATCH.name
    moved.parent.mkdir()
    moved.write_bytes(OPEN_PATCH.read_bytes())
    assert dataclasses.replace(p, patches=dkmspatches.load([str(moved)], patches_dir=None, where="w")).cache_key() \
        == patched.cache_key()


def test_the_build_root_gets_the_script_and_the_patches(tmp_path):
    patch = dkmspatches.load([OPEN_PATCH.name], patches_dir=OPEN_PATCH.parent, where="w")
    p = dataclasses.replace(plan(), patches=patch)
    src = hm.Sources.of(DebianConfig(mirror="http://x", security_mirror="http://x"), mirror="http://127.0.0.1:1/d",
                        security_mirror="http://127.0.0.1:1/s")
    argv = hm.mmdebstrap_argv(p, src, mode="unshare", script=tmp_path / "s.sh", outdir=tmp_path / "out",
                              patch_script=SCRIPT)
    hooks = [a for a in argv if a.startswith("--customize-hook")]
    assert f'--customize-hook=mkdir -p "$1{hm.PATCHES_INSIDE}"' in hooks
    assert f"--customize-hook=upload {SCRIPT} {hm.PATCH_SCRIPT_INSIDE}" in hooks
    assert f"--customize-hook=upload {OPEN_PATCH} {hm.PATCHES_INSIDE}/{OPEN_PATCH.name}" in hooks
    # unsigned: empty KEY and CERT, then each patch (as uploaded) and its match
    assert hooks[-2].endswith(f"/tmp/builder-out '' '' {hm.PATCHES_INSIDE}/{OPEN_PATCH.name} ''")
    signed = hm.mmdebstrap_argv(p, src, mode="unshare", script=tmp_path / "s.sh", outdir=tmp_path / "out",
                                patch_script=SCRIPT, signing=(Path("/k.pem"), Path("/c.pem")))
    assert next(a for a in signed if a.startswith("--customize-hook=chroot")).endswith(
        f"/etc/dkms/builder-signing/signing.crt {hm.PATCHES_INSIDE}/{OPEN_PATCH.name} ''")
    # no patches: the build root is what it was
    plain = hm.mmdebstrap_argv(plan(), src, mode="unshare", script=tmp_path / "s.sh", outdir=tmp_path / "out")
    assert not [a for a in plain if "patches" in a]
    with pytest.raises(HostModuleError, match=r"no dkms-patches\.sh"):
        hm.mmdebstrap_argv(p, src, mode="unshare", script=tmp_path / "s.sh", outdir=tmp_path / "out")


def test_the_build_scripts_patch_step_is_the_roles_script_before_dkms_add():
    s = hm.BUILD_SCRIPT
    assert f"bash {hm.PATCH_SCRIPT_INSIDE} " in s and "PATCH_SCRIPT " not in s
    assert s.index(hm.PATCH_SCRIPT_INSIDE) < s.index("dkms add -m")
    assert "shift $(($# < 5 ? $# : 5))" in s


# ---------------------------------------------------------------------------------------------- the role's tasks

PLAYBOOK = """
- hosts: all
  gather_facts: false
  vars:
    spec: "{{ (lookup('file', role_dir ~ '/meta/argument_specs.yml') | from_yaml).argument_specs.main.options }}"
  tasks:
    - name: the role's argument spec takes the list
      ansible.builtin.validate_argument_spec:
        argument_spec: "{{ spec }}"
        provided_arguments: {nvidia_dkms_patches: "{{ nvidia_dkms_patches }}"}
    - name: and refuses an entry without a file
      ansible.builtin.validate_argument_spec:
        argument_spec: "{{ spec }}"
        provided_arguments: {nvidia_dkms_patches: [{match: x}]}
      register: bad
      ignore_errors: true
    - ansible.builtin.assert: {that: bad is failed, quiet: true}
    - ansible.builtin.include_role:
        name: nvidia-gpu-drivers
        tasks_from: dkms_patches
"""


def ansible_playbook() -> str | None:
    found = shutil.which("ansible-playbook")
    venv = Path(sys.executable).parent / "ansible-playbook"
    return str(venv) if venv.exists() else found


@pytest.mark.skipif(ansible_playbook() is None, reason="ansible-playbook is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the role's tasks give the files to root")
@pytest.mark.timeout(300)
def test_the_roles_tasks_give_the_patches_once(src, tmp_path):
    (tmp_path / "pb.yml").write_text(PLAYBOOK)
    extra = {"_nvidia_set": {"dkms_package": "nvidia-open-kernel-dkms"}, "_nvidia_dkms_src": str(src),
             "nvidia_dkms_patches": [{"file": OPEN_PATCH.name}], "role_dir": str(ROLE),
             "ansible_python_interpreter": sys.executable}
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_HOME": str(tmp_path / "home")}

    def run() -> str:
        r = subprocess.run([ansible_playbook(), "-i", "localhost,", "-c", "local", "-e", f"@{tmp_path / 'vars.json'}",
                            str(tmp_path / "pb.yml")], capture_output=True, text=True, env=env, timeout=240)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        return r.stdout

    first = run()
    assert re.search(r"localhost\s*: ok=\d+\s+changed=3\b", first), first[-800:]
    conf = (src / "dkms.conf").read_text()
    assert conf.count(f'PATCH+=("{OPEN_PATCH.name}")') == 1
    second = run()
    assert re.search(r"localhost\s*: ok=\d+\s+changed=0\b", second), second[-800:]
    assert (src / "dkms.conf").read_text() == conf
