"""builder.provision against a real sshd on 127.0.0.1: success, a failing task, a wrong host key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from builder.errors import ProvisionError
from builder.provision import TASK_COUNT_EVENT, Target, run_playbook
from builder.ssh import generate_keypair, known_hosts_line

try:
    from trixie_target import local_sshd
except ImportError:  # tests/ made a package
    from .trixie_target import local_sshd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PLAY_OK = """\
- name: smoke
  hosts: all
  gather_facts: false
  tasks:
    - name: write a file
      ansible.builtin.copy:
        dest: "{{ out }}"
        content: "hello\\n"
    - name: read it back
      ansible.builtin.command: cat {{ out }}
      changed_when: false
"""

PLAY_FAIL = """\
- name: failing
  hosts: all
  gather_facts: false
  tasks:
    - name: fine
      ansible.builtin.command: /bin/true
      changed_when: false
    - name: deliberate failure
      ansible.builtin.command: /bin/false
    - name: never reached
      ansible.builtin.command: /bin/true
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    wd = tmp_path_factory.mktemp("prov")
    client, host = generate_keypair("builder-test-client"), generate_keypair("builder-test-host")
    priv, _ = client.write(wd / "keys", "id_ed25519")
    with local_sshd(wd, host.private_openssh, client.public_openssh) as port:
        kh = wd / "keys" / "known_hosts"
        kh.write_text(known_hosts_line("127.0.0.1", port, host.public_openssh) + "\n")
        target = Target("127.0.0.1", port, "root", priv, kh, become=False)
        yield {"wd": wd, "target": target, "port": port}


def _book(wd: Path, name: str, text: str) -> Path:
    p = wd / name
    p.write_text(text)
    return p


def test_successful_run_and_events(env, tmp_path):
    out = tmp_path / "out.txt"
    seen = []
    res = run_playbook(_book(tmp_path, "ok.yml", PLAY_OK), env["target"], roles_path=[], extra_vars={"out": str(out)},
                       workdir=tmp_path / "w", task_timeout=60, timeout=120, on_event=seen.append)
    assert res.status == "successful" and res.rc == 0
    assert res.changed == 1 and res.failed_tasks == []
    assert out.read_text() == "hello\n"
    # first the playbook's task count (for the progress display), then ansible-runner's events, all logged
    assert seen[0] == {"event": TASK_COUNT_EVENT, "event_data": {"tasks": 2}}
    assert sum(e.get("event") == "playbook_on_task_start" for e in seen) == 2
    lines = (tmp_path / "w" / "ansible-events.jsonl").read_text().splitlines()
    assert len(lines) == len(seen) - 1 and json.loads(lines[-1])["event"] == "playbook_on_stats"
    # G2: the file holding the environment is gone; the data dir is private
    assert not (res.artifact_dir / "command").exists()
    assert (res.artifact_dir / "status").read_text() == "successful"
    assert stat.S_IMODE((tmp_path / "w" / "ansible").stat().st_mode) == 0o700
    # nothing learned into the pinned known_hosts file
    assert env["target"].known_hosts_path.read_text().count("\n") == 1
    # second run: nothing changes, and a fresh ident (no mixed-in events, G5)
    res2 = run_playbook(_book(tmp_path, "ok.yml", PLAY_OK), env["target"], roles_path=[],
                        extra_vars={"out": str(out)}, workdir=tmp_path / "w", task_timeout=60, timeout=120)
    assert res2.changed == 0 and res2.artifact_dir != res.artifact_dir


def test_failing_task_is_named(env, tmp_path):
    with pytest.raises(ProvisionError) as ei:
        run_playbook(_book(tmp_path, "fail.yml", PLAY_FAIL), env["target"], roles_path=[], extra_vars={},
                     workdir=tmp_path, task_timeout=60, timeout=120)
    err = ei.value
    assert err.task == "deliberate failure"
    assert err.host == "build-vm"
    assert "deliberate failure" in str(err) and f"127.0.0.1:{env['port']}" in str(err)
    assert "non-zero return code" in str(err)
    assert err.result.failed_tasks[0]["task"] == "deliberate failure"  # type: ignore[attr-defined]
    events = [json.loads(x) for x in (tmp_path / "ansible-events.jsonl").read_text().splitlines()]
    assert not any(e.get("event_data", {}).get("task") == "never reached" for e in events)


def test_task_timeout_is_a_clean_failure(env, tmp_path):
    book = _book(tmp_path, "slow.yml", PLAY_OK.replace("cat {{ out }}", "sleep 30").replace("copy:", "debug:")
                 .replace('dest: "{{ out }}"\n        content: "hello\\n"', "msg: hi"))
    with pytest.raises(ProvisionError, match="Timed out") as ei:
        run_playbook(book, env["target"], roles_path=[], extra_vars={"out": "x"}, workdir=tmp_path,
                     task_timeout=3, timeout=120)
    assert ei.value.task == "read it back"


def test_runner_timeout(env, tmp_path):
    book = _book(tmp_path, "slow.yml", PLAY_OK.replace("cat {{ out }}", "sleep 8").replace("copy:", "debug:")
                 .replace('dest: "{{ out }}"\n        content: "hello\\n"', "msg: hi"))
    with pytest.raises(ProvisionError, match="timed out"):
        run_playbook(book, env["target"], roles_path=[], extra_vars={"out": "x"}, workdir=tmp_path,
                     task_timeout=60, timeout=3)


def test_wrong_host_key_is_unreachable_not_a_silent_connect(env, tmp_path):
    kh = tmp_path / "known_hosts"
    wrong = generate_keypair("someone-else")
    kh.write_text(known_hosts_line("127.0.0.1", env["port"], wrong.public_openssh) + "\n")
    before = kh.read_text()
    target = Target("127.0.0.1", env["port"], "root", env["target"].private_key_path, kh, become=False)
    out = tmp_path / "must-not-exist"
    with pytest.raises(ProvisionError, match="unreachable") as ei:
        run_playbook(_book(tmp_path, "ok.yml", PLAY_OK), target, roles_path=[], extra_vars={"out": str(out)},
                     workdir=tmp_path, task_timeout=60, timeout=120)
    assert "Host key verification failed" in str(ei.value) or "REMOTE HOST IDENTIFICATION" in str(ei.value) + \
        "\n".join(ei.value.log_tail)
    assert not out.exists()
    assert kh.read_text() == before  # ssh learned nothing


def test_empty_known_hosts_is_unreachable(env, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    target = Target("127.0.0.1", env["port"], "root", env["target"].private_key_path, kh, become=False)
    with pytest.raises(ProvisionError, match="unreachable"):
        run_playbook(_book(tmp_path, "ok.yml", PLAY_OK), target, roles_path=[], extra_vars={"out": "/nonexistent/x"},
                     workdir=tmp_path, task_timeout=60, timeout=120)
    assert kh.read_text() == ""


def _mux_masters() -> set[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in ps.splitlines() if "[mux]" in line and "bcp-" in line}


def _control_dirs() -> set[Path]:
    return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("bcp-*"))


def test_no_mux_master_left(env, tmp_path):
    masters, dirs = _mux_masters(), _control_dirs()  # other runs' (e.g. a concurrent test session)
    run_playbook(_book(tmp_path, "ok.yml", PLAY_OK), env["target"], roles_path=[],
                 extra_vars={"out": str(tmp_path / "o")}, workdir=tmp_path, task_timeout=60, timeout=120)
    assert _mux_masters() <= masters
    assert _control_dirs() <= dirs
