"""scripts/benchmark.py, its pure parts: the Packer template, Packer's stages from its machine-readable output,
the results file (merged run by run, resumable), the report and its ratios, the role change of run (c). Nothing
here starts a VM or a build; `packer validate` runs on the generated template where Packer is installed."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "images" / "cloud-gpu-worker.yaml"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_script"] = module
    spec.loader.exec_module(module)
    return module


bm = _load()


def bench(tmp_path: Path, **kw: Any) -> Any:
    args = bm.parse_args(["--results", str(tmp_path / "bench" / "results.json"), *kw.pop("argv", [])])
    return bm.make_bench(args)


# ---------------------------------------------------------------------------------------------- the template


def inputs(tmp_path: Path, *, firmware: bool = True, port: int = 41234, accel: str = "tcg") -> Any:
    fw = (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), tmp_path / "OVMF_VARS.fd") if firmware else None
    return bm.PackerInputs(
        iso=tmp_path / "installer.iso", iso_sha256="ab" * 32, output_dir=tmp_path / "output",
        vm_name="cloud-gpu-worker-current.qcow2", disk_size_mib=30720, memory_mib=4096, cpus=2, accel=accel,
        ssh_user="builder", ssh_key=tmp_path / "keys" / "build_key", gateway_port=port,
        serial_log=tmp_path / "serial.log", firmware=fw, playbook=REPO / "playbooks" / "cloud-gpu-worker.yml",
        finalize_playbook=REPO / "playbooks" / "finalize.yml", roles_path=(REPO / "roles",),
        provision_vars=tmp_path / "vars" / "provision.json", finalize_vars=tmp_path / "vars" / "finalize.json",
        ansible_playbook="/usr/bin/ansible-playbook", sudoers="/etc/sudoers.d/90-builder")


def qemuargs(template: dict[str, Any], flag: str) -> list[str]:
    return [value for f, value in template["builders"][0]["qemuargs"] if f == flag]


def test_the_template_is_packers_qemu_builder_and_ansible_provisioner(tmp_path: Path) -> None:
    from builder.vm.guestnet import GATEWAY_IP, GATEWAY_PORT

    t = bm.packer_template(inputs(tmp_path))
    json.dumps(t)  # what is written is JSON
    (b,) = t["builders"]
    assert b["type"] == "qemu" and b["accelerator"] == "tcg" and b["machine_type"] == "q35"
    assert b["format"] == "qcow2" and b["disk_compression"] is True and b["headless"] is True
    assert b["disk_size"] == "30720M" and b["cpus"] == 2 and b["memory"] == 4096
    assert b["iso_url"] == str(tmp_path / "installer.iso") and b["iso_checksum"] == "sha256:" + "ab" * 32
    # key authentication only, the key the preseed installed; no password anywhere
    assert b["communicator"] == "ssh" and b["ssh_username"] == "builder"
    assert b["ssh_private_key_file"] == str(tmp_path / "keys" / "build_key")
    assert not any("password" in k for k in b)
    assert b["ssh_timeout"] == bm.PACKER_SSH_TIMEOUT
    # the accelerator is Packer's option: an -accel argument conflicts with the -machine accel= Packer sets
    assert all(row[0] != "-accel" for row in b["qemuargs"])
    assert all(len(row) == 2 for row in b["qemuargs"])  # Packer joins a row's values into one argument
    (netdev,) = qemuargs(t, "-netdev")
    assert netdev.startswith("user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22,")
    assert f"guestfwd=tcp:{GATEWAY_IP}:{GATEWAY_PORT}-cmd:socat STDIO TCP:127.0.0.1:41234" in netdev
    devices = qemuargs(t, "-device")
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in devices  # the disk first: after the install's reboot
    assert "ide-cd,drive=cd0,bus=ide.0,bootindex=1" in devices  # the VM boots the installed system
    assert any(d.startswith("virtio-net,netdev=user.0") for d in devices)  # Packer's NIC id, so it adds none
    drives = qemuargs(t, "-drive")
    assert drives[0].startswith("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
    assert drives[1] == f"if=pflash,format=raw,unit=1,file={tmp_path / 'OVMF_VARS.fd'}"
    assert drives[2].startswith("file={{ .OutputDir }}/{{ .Name }},if=none,id=disk0,format=qcow2")
    assert drives[3].startswith(f"file={tmp_path / 'installer.iso'},if=none,id=cd0,media=cdrom")
    assert qemuargs(t, "-cpu") == ["max"]
    assert qemuargs(t, "-boot") == ["strict=off"]  # not Packer's once=d: the boot indexes decide
    # the build user goes last, as roles/finalize removes it (its sudo rule first), then the power-off
    shutdown = b["shutdown_command"]
    assert shutdown.startswith("sudo -n sh -c ") and shutdown.index("rm -f /etc/sudoers.d/90-builder") < \
        shutdown.index("userdel --force --remove builder") < shutdown.index("poweroff")
    provision, finalize = t["provisioners"]
    for prov, playbook, extra in ((provision, "cloud-gpu-worker.yml", "provision.json"),
                                  (finalize, "finalize.yml", "finalize.json")):
        assert prov["type"] == "ansible" and prov["playbook_file"] == str(REPO / "playbooks" / playbook)
        assert prov["user"] == "builder" and prov["extra_arguments"] == ["--extra-vars", f"@{tmp_path}/vars/{extra}"]
        assert f"ANSIBLE_ROLES_PATH={REPO / 'roles'}" in prov["ansible_env_vars"]
        assert prov["use_sftp"] is True and prov["sftp_command"].startswith("/usr/lib/openssh/sftp-server")
        assert "HostKeyAlgorithms=+ssh-rsa" in prov["ansible_ssh_extra_args"][0]
        assert "use_proxy" not in prov  # Packer's own SSH proxy, its default


def test_bios_and_kvm_change_only_firmware_and_cpu(tmp_path: Path) -> None:
    uefi = bm.packer_template(inputs(tmp_path))
    bios = bm.packer_template(inputs(tmp_path, firmware=False, accel="kvm"))
    assert not any(d.startswith("if=pflash") for d in qemuargs(bios, "-drive"))
    assert qemuargs(bios, "-drive") == qemuargs(uefi, "-drive")[2:]
    assert qemuargs(bios, "-cpu") == ["host"] and bios["builders"][0]["accelerator"] == "kvm"


def test_a_comma_in_a_path_is_doubled_for_qemu(tmp_path: Path) -> None:
    t = bm.packer_template(inputs(tmp_path / "a,b"))
    assert any(d.startswith(f"file={tmp_path}/a,,b/installer.iso,if=none") for d in qemuargs(t, "-drive"))


def packer_files(tmp_path: Path) -> tuple[Any, Path]:
    """packer_inputs for the default image, as run (a) makes them, and a key file where the ISO would put it."""
    from builder.archive.cache import sha256_file
    from builder.ssh import generate_keypair
    from builder.stages.media import SSH_KEY_FILE

    b = bench(tmp_path)
    pdir = tmp_path / "packer"
    generate_keypair("test").write(pdir / "keys", SSH_KEY_FILE)
    (pdir / "installer.iso").write_bytes(b"iso")
    try:
        p = bm.packer_inputs(b, pdir, iso=pdir / "installer.iso", iso_sha256=sha256_file(pdir / "installer.iso"),
                             port=41234, accel="tcg", ansible=bm.ansible_playbook() or "ansible-playbook")
    except bm.Skipped as exc:  # no OVMF on this host
        pytest.skip(str(exc))
    return p, pdir


def test_packer_gets_the_image_playbooks_and_variables_without_the_host_module(tmp_path: Path) -> None:
    from builder.config import load_config
    from builder.stages.finalize import finalize_vars

    p, pdir = packer_files(tmp_path)
    vcfg = load_config(IMAGE).variant("current")
    assert p.playbook == vcfg.playbook and p.finalize_playbook == vcfg.finalize_playbook
    assert list(p.roles_path) == vcfg.roles_dirs
    assert p.vm_name == "cloud-gpu-worker-current.qcow2" and p.disk_size_mib == vcfg.disk.size >> 20
    provision = json.loads(p.provision_vars.read_text())
    assert "nvidia_dkms_tarball" not in provision  # DKMS compiles in the guest, as in a Packer user's build
    assert provision == {**vcfg.provision.extra_vars, "ansible_python_interpreter": "/usr/bin/python3"}
    finalize = json.loads(p.finalize_vars.read_text())
    assert finalize == {**finalize_vars(vcfg), "finalize_remove_build_user": False,
                        "ansible_python_interpreter": "/usr/bin/python3"}
    assert p.firmware is not None and p.firmware[1] == pdir / "OVMF_VARS.fd" and p.firmware[1].is_file()
    template, argv = bm.write_template(pdir, p, "packer")
    assert json.loads(template.read_text()) == bm.packer_template(p)
    assert argv == ["packer", "build", "-machine-readable", "-force", str(template)]
    command = (pdir / "command.sh").read_text()
    assert "CHECKPOINT_DISABLE=1" in command and f"packer build -machine-readable -force {template}" in command


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed (apt-get install packer)")
def test_packer_validates_the_generated_template(tmp_path: Path) -> None:
    if bm.ansible_playbook() is None:
        pytest.skip("no ansible-playbook (Packer's ansible provisioner runs it to validate)")
    p, pdir = packer_files(tmp_path)
    template, _ = bm.write_template(pdir, p, "packer")
    proc = subprocess.run(["packer", "validate", str(template)], capture_output=True, text=True, timeout=300,
                          env=bm.packer_env(pdir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = json.loads(template.read_text())
    bad["builders"][0]["qemuargs"].append(["-accel", "tcg"])  # what is not checked here: it fails at run time
    bad["builders"][0]["no_such_option"] = 1
    (pdir / "bad.json").write_text(json.dumps(bad))
    proc = subprocess.run(["packer", "validate", str(pdir / "bad.json")], capture_output=True, text=True,
                          timeout=300, env=bm.packer_env(pdir))
    assert proc.returncode != 0 and "no_such_option" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- Packer's output


MACHINE_READABLE = """\
1700000000,,ui,say,Build 'qemu' finished.
1700000010,qemu,ui,say,==> qemu: Starting VM%!(PACKER_COMMA) booting from CD-ROM
1700000020,qemu,ui,say,==> qemu: Waiting for SSH to become available...
1700003620,qemu,ui,say,==> qemu: Connected to SSH!
1700003621,qemu,ui,say,==> qemu: Provisioning with Ansible...
1700003700,qemu,ui,message,    qemu: TASK [base : Install the seed packages]
1700006621,qemu,ui,say,==> qemu: Provisioning with Ansible...
1700006921,qemu,ui,say,==> qemu: Gracefully halting virtual machine...
1700006951,qemu,ui,say,==> qemu: Converting hard drive...
1700007000,qemu,artifact-count,1
"""


def test_machine_readable_lines_are_restored() -> None:
    line = MACHINE_READABLE.splitlines()[1]
    assert bm.machine_readable(line) == (1700000010, "qemu", "ui",
                                         ["say", "==> qemu: Starting VM, booting from CD-ROM"])
    assert bm.ui_text(line) == "==> qemu: Starting VM, booting from CD-ROM"
    assert bm.ui_text("1700007000,qemu,artifact-count,1") is None
    assert bm.machine_readable("not machine-readable") is None
    assert bm.ui_text(r"1,,ui,error,two\nlines") == "two\nlines"


def test_packer_stages_from_its_messages() -> None:
    stages = bm.packer_stages(MACHINE_READABLE.splitlines(), start=1700000005.0, end=1700007010.0)
    assert stages == {"boot": 15.0, "install": 3600.0, "provision": 3001.0, "finalize": 300.0, "shutdown": 30.0,
                      "compress": 59.0}


def test_packer_stages_of_a_run_that_failed_during_the_install() -> None:
    lines = MACHINE_READABLE.splitlines()[:3]
    assert bm.packer_stages(lines, start=1700000005.0, end=1700000100.0) == {"boot": 15.0, "install": 80.0}


def test_bytes_upstream_from_the_gateway_and_the_iso_verb() -> None:
    log = ("[04:51:45] INFO    gateway ready: http://127.0.0.1:1/debian\n"
           "[05:51:45] INFO    gateway stopped (3 requests served, 1234 bytes fetched upstream)\n")
    assert bm.upstream_bytes(log, bm.GATEWAY_BYTES_RE) == 1234
    assert bm.upstream_bytes("[05:51:45] INFO    gateway stopped (1 request served, 0 bytes fetched upstream)",
                             bm.GATEWAY_BYTES_RE) == 0
    assert bm.upstream_bytes("interrupted", bm.GATEWAY_BYTES_RE) is None
    iso = "[04:51:45] INFO    wrote /x/installer.iso, SSH keys in /x/keys (5678 bytes fetched upstream)"
    assert bm.upstream_bytes(iso, bm.ISO_BYTES_RE) == 5678


def test_the_last_error_line_of_a_child() -> None:
    assert bm.last_error(["[1] INFO x", "[2] ERROR   error: the install failed", "hint: y"]) == "the install failed"
    assert bm.last_error(["1,qemu,ui,say,x", "2,qemu,ui,error,Build 'qemu' errored"]) == "Build 'qemu' errored"
    assert bm.last_error([]) == "no output"


# ---------------------------------------------------------------------------------------------- results


def record(key: str, wall: float, **kw: Any) -> dict[str, Any]:
    rec = {"run": key, "label": bm.RUNS[key], "schema": bm.SCHEMA, "image_definition": "images/cloud-gpu-worker.yaml",
           "status": "ok", "started": "2025-01-01T10:00:00Z", "finished": "2025-01-01T11:00:00Z", "wall_s": wall,
           "stages": {"install": wall / 2, "provision": wall / 4}, "bytes_upstream": 900 << 20,
           "image_bytes": 800 << 20, "accel": "tcg",
           "host": {"host": "h", "nproc": 2, "memory_bytes": 24 << 30, "commit": "abc123"}}
    rec.update(kw)
    return rec


def test_each_run_is_merged_into_the_results_file_and_a_second_invocation_adds_to_it(tmp_path: Path) -> None:
    results = tmp_path / "deep" / "results.json"
    bm.save_record(results, "b", record("b", 3000))
    bm.save_record(results, "c", record("c", 250))
    bm.save_record(results, "a", record("a", 7200))  # later, another invocation: --runs a
    data = json.loads(results.read_text())
    assert set(data["runs"]) == {"a", "b", "c"} and data["runs"]["b"]["wall_s"] == 3000
    assert data["schema"] == bm.SCHEMA
    assert [p.name for p in results.parent.iterdir()] == ["results.json"]  # written whole, by a rename
    bm.save_record(results, "b", record("b", 2900))  # a rerun replaces its own record only
    data = json.loads(results.read_text())
    assert data["runs"]["b"]["wall_s"] == 2900 and data["runs"]["c"]["wall_s"] == 250


def test_a_failed_attempt_keeps_the_figures_recorded_before(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    bm.save_record(results, "a", record("a", 7200))
    bm.save_record(results, "a", {"run": "a", "status": "failed", "error": "packer build exited 1: boom",
                                  "started": "s", "finished": "f"})
    a = json.loads(results.read_text())["runs"]["a"]
    assert a["status"] == "ok" and a["wall_s"] == 7200
    assert a["last_failure"]["error"] == "packer build exited 1: boom"
    bm.save_record(results, "d", {"run": "d", "status": "failed", "error": "x"})  # nothing before: recorded
    assert json.loads(results.read_text())["runs"]["d"]["status"] == "failed"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"runs": [1]}'])
def test_a_results_file_that_is_not_ours_is_one_error(tmp_path: Path, content: str) -> None:
    results = tmp_path / "results.json"
    results.write_text(content)
    with pytest.raises(bm.BenchError, match="move it away or pick another --results"):
        bm.load_results(results)
    assert bm.load_results(tmp_path / "absent.json") == {"schema": bm.SCHEMA, "runs": {}}


# ---------------------------------------------------------------------------------------------- report


IMG = "images/cloud-gpu-worker.yaml"


def test_ratios_against_their_targets() -> None:
    results = {"runs": {"a": record("a", 7200), "b": record("b", 3000), "c": record("c", 250),
                        "d": record("d", 500)}}
    data = bm.report_data(results, IMG)
    assert [(r["ratio"], r["value"], r["target"], r["verdict"]) for r in data["ratios"]] == [
        ("(b)/(a)", 0.417, 0.5, "met"), ("(c)/(b)", 0.083, 0.1, "met"), ("(d)/(b)", 0.167, 0.15, "not met")]
    assert data["notes"] == []  # one sitting
    assert data["stages"] == ["install", "provision"]
    text = bm.render(data)
    assert "(b)/(a)               0.417   <= 0.50   met" in text
    assert "(d)/(b)               0.167   <= 0.15   not met" in text
    assert "wall time" in text and "120.0 min" in text and "50.0 min" in text and "4.2 min" in text
    assert "900 MiB" in text and "800 MiB" in text


def test_absent_stale_and_failed_runs_show_as_not_run_and_their_ratios_as_na() -> None:
    results = {"runs": {"a": record("a", 7200, image_definition="images/other.yaml"),
                        "b": record("b", 3000),
                        "c": {"run": "c", "status": "failed", "error": "boom", "finished": "f",
                              "schema": bm.SCHEMA, "image_definition": IMG}}}
    data = bm.report_data(results, IMG)
    assert {k: e["status"] for k, e in data["runs"].items()} == {"a": "not run", "b": "ok", "c": "failed",
                                                                "d": "not run"}
    assert [r["verdict"] for r in data["ratios"]] == ["n/a", "n/a", "n/a"]
    assert any("(a) not run: the record is stale (recorded for images/other.yaml" in n for n in data["notes"])
    assert "(c) failed (f): boom" in data["notes"]
    text = bm.render(data)
    assert text.count("not run") >= 2 and "n/a" in text
    empty = bm.report_data({"runs": {}}, IMG)
    assert all(e["status"] == "not run" for e in empty["runs"].values()) and "not run" in bm.render(empty)


def test_the_report_says_when_the_runs_are_not_from_one_sitting() -> None:
    other = {"host": "h2", "nproc": 8, "memory_bytes": 64 << 30, "commit": "def456"}
    results = {"runs": {"a": record("a", 7200, started="2025-01-03T10:00:00Z", finished="2025-01-03T12:00:00Z",
                                    host=other, accel="kvm"),
                        "b": record("b", 3000)}}
    notes = bm.report_data(results, IMG)["notes"]
    assert any(n.startswith("not one sitting: builder commits differ ((a) def456, (b) abc123)") for n in notes)
    assert any(n.startswith("not one sitting: machines differ") for n in notes)
    assert any(n.startswith("not one sitting: accelerators differ ((a) kvm, (b) tcg)") for n in notes)
    assert any("the runs span 50 h" in n for n in notes)


def test_report_and_json_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    bm.save_record(results, "b", record("b", 3000, image_definition=IMG))
    assert bm.main(["--report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "(b) ours cold" in out and "50.0 min" in out and out.count("not run") >= 3
    assert bm.main(["--report", "--json", "--results", str(results)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"]["b"]["status"] == "ok" and data["ratios"][0]["verdict"] == "n/a"


@pytest.mark.parametrize(("argv", "message"), [
    (["--runs", "a,x"], "--runs a,x: expected a comma-separated subset of a,b,c,d"),
    (["--runs", ""], "--runs : expected"),
    (["--image", "nonexistent.yaml"], "--image nonexistent.yaml: no such file"),
    (["--other-variant", "nope"], "unknown variant nope"),
    (["--accel", "fast"], "invalid choice: 'fast'"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--dry-run",
                        "--results", str(tmp_path / "r.json"), *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark: error: ") and message in lines[0], p.stderr
    assert p.stdout == ""


def test_a_bad_results_file_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--report",
                        "--results", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_without_packer_run_a_is_skipped_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    real_which = shutil.which
    monkeypatch.setattr(bm.shutil, "which", lambda name, *a, **k: None if name == "packer" else real_which(name))
    results = tmp_path / "results.json"
    assert bm.main(["--runs", "a", "--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert "(a) skipped: packer not installed (apt-get install packer)" in err and "Traceback" not in err
    assert not results.exists()  # nothing recorded: an earlier (a) would be kept


# ---------------------------------------------------------------------------------------------- our runs


def test_run_b_records_the_manifests_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(b) with builder replaced by a stub that publishes what stages/publish.py does: the figures come from the
    manifest, the wall time from outside, the image size from the file."""
    b = bench(tmp_path)
    seen: list[list[str]] = []

    def fake_build(argv: list[str], **kw: Any) -> tuple[int, list[str]]:
        seen.append(argv)
        assert kw["env"]["BUILDER_CACHE_DIR"] == str(cache)
        out = Path(argv[argv.index("--output") + 1]) / "current"
        out.mkdir(parents=True)
        (out / "cloud-gpu-worker-current.qcow2").write_bytes(b"q" * 4096)
        (out / "manifest.json").write_text(json.dumps({
            "image": "cloud-gpu-worker-current.qcow2", "size_bytes": 4096, "duration_s": 3600.5,
            "stages": {"fetch": 5.0, "install": 1800.0, "provision": 1200.0}, "bytes_fetched_upstream": 123456,
            "accel": "tcg", "install": {"cached": False}, "nvidia_module": {"origin": "host-built"}}))
        return 0, ["built"]

    cache = tmp_path / "fresh-cache"
    b.cache_dir = cache
    monkeypatch.setattr(bm, "run_logged", fake_build)
    rec = bm.run_ours(b, "b")
    (argv,) = seen
    assert argv[3:] == ["build", str(IMAGE), "--only", "current", "--no-verify", "--force", "--output",
                        str(b.dir / "out" / "b")]
    assert rec["status"] == "ok" and rec["stages"] == {"fetch": 5.0, "install": 1800.0, "provision": 1200.0}
    assert rec["bytes_upstream"] == 123456 and rec["image_bytes"] == 4096 and rec["accel"] == "tcg"
    assert rec["install_cached"] is False and rec["nvidia_module_origin"] == "host-built"
    assert rec["cache_dir"] == str(cache) and isinstance(rec["wall_s"], float)
    assert set(rec["host"]) >= {"nproc", "memory_bytes", "commit"} and rec["image_definition"] == str(b.image)


def test_run_b_needs_an_empty_cache(tmp_path: Path) -> None:
    b = bench(tmp_path)
    b.cache_dir = tmp_path / "used"
    (b.cache_dir / "blobs").mkdir(parents=True)
    with pytest.raises(bm.BenchError, match="is not empty: a cold run needs an empty cache"):
        bm.run_ours(b, "b")


def test_runs_c_and_d_reuse_the_cache_of_b(tmp_path: Path) -> None:
    b = bench(tmp_path)
    with pytest.raises(bm.Skipped, match=r"\(c\) reuses the cache of \(b\): run b first"):
        bm.cache_for(b, "c", fresh=False)
    cache = tmp_path / "cache-b"
    cache.mkdir()
    bm.save_record(b.results, "b", record("b", 3000, cache_dir=str(cache)))
    assert bm.cache_for(b, "d", fresh=False) == cache


def test_run_c_passes_the_changed_roles_through_a_var(tmp_path: Path) -> None:
    b = bench(tmp_path, argv=["--accel", "tcg"])
    argv = bm.ours_argv(b, "current", tmp_path / "out", tmp_path / "roles")
    assert argv[-4:] == ["--var", f'provision.roles_path=["{tmp_path / "roles"}"]', "--var", "vm.accel=tcg"]


def test_the_role_change_is_one_harmless_task_that_leaves_both_caches_valid(tmp_path: Path) -> None:
    """The copy differs by one task of the nvidia role: the seed packages (so the preseed and the installed
    disk's key) and the role's variables (so the host-built module's key) are the same."""
    from builder.config import install_packages, load_config
    from builder.installer.preseed import render_preseed
    from builder.lock import read_lock
    from builder.ssh import generate_keypair
    from builder.stages import module
    from builder.stages.media import disk_key, preseed_context

    copy = bm.copy_roles_with_change(REPO / "roles", tmp_path / "roles")
    tasks = yaml.safe_load((copy / "nvidia-gpu-drivers" / "tasks" / "main.yml").read_text())
    original = yaml.safe_load((REPO / "roles" / "nvidia-gpu-drivers" / "tasks" / "main.yml").read_text())
    assert tasks[:-1] == original
    assert tasks[-1]["ansible.builtin.copy"]["dest"] == bm.ROLE_CHANGE_MARKER.rstrip()
    assert bm.ROLE_CHANGE_MARKER.startswith("/run/")  # a tmpfs: nothing of it reaches the image

    def differing(cmp: filecmp.dircmp[str], at: Path = Path()) -> list[str]:
        out = [str(at / f) for f in cmp.diff_files + cmp.left_only + cmp.right_only]
        for name, sub in cmp.subdirs.items():
            out += differing(sub, at / name)
        return out

    assert differing(filecmp.dircmp(REPO / "roles", copy)) == ["nvidia-gpu-drivers/tasks/main.yml"]
    before = load_config(IMAGE)
    after = load_config(IMAGE, [f"provision.roles_path={json.dumps([str(copy)])}"])
    assert after.roles_dirs[0] == copy
    assert install_packages(after) == install_packages(before)
    for name in ("current", "tesla-535"):
        assert module.role_vars(after.variant(name)) == module.role_vars(before.variant(name))
    lock = read_lock(before.lock_path)
    client, host = generate_keypair("c"), generate_keypair("h")
    keys = {disk_key(c, lock, render_preseed(preseed_context(c, client, host)), client, host) for c in (before, after)}
    assert len(keys) == 1
    again = bm.copy_roles_with_change(REPO / "roles", tmp_path / "roles")  # a rerun replaces the copy
    assert again == copy and (copy / "nvidia-gpu-drivers" / "tasks" / "main.yml").read_text().count(
        "Benchmark role change") == 1


def test_packers_accelerator_is_builders(tmp_path: Path) -> None:
    from builder.config import load_config

    cfg = load_config(IMAGE)
    assert bm.packer_accel(bench(tmp_path, argv=["--accel", "kvm"]), cfg, tmp_path) == ("kvm", "--accel")
    b = bench(tmp_path)
    bm.save_record(b.results, "c", record("c", 250, accel="tcg"))
    assert bm.packer_accel(b, cfg, tmp_path) == ("tcg", "as builder's run (c)")
    tcg = load_config(IMAGE, ["vm.accel=tcg"])
    assert bm.packer_accel(bench(tmp_path / "fresh"), tcg, tmp_path) == ("tcg", "the image's vm.accel")
    assert bm.netboot_kernel(cfg, tmp_path / "empty-cache") is None  # nothing fetched: the probe boots firmware


def test_builders_runs_go_first() -> None:
    assert bm.parse_runs("a,b,c,d") == ["b", "c", "d", "a"] and bm.parse_runs("d, A") == ["d", "a"]
