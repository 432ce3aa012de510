"""builder.provision: the pure parts (inventory, environment, failure reports) and the roles' shape."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from builder.errors import ProvisionError
from builder.provision import (
    Target,
    build_envvars,
    failures_from_events,
    inventory,
    provision_error,
    ssh_common_args,
)

ROOT = Path(__file__).resolve().parents[2]
T = Target("127.0.0.1", 2222, "builder", Path("/w/keys/id"), Path("/w/keys/known_hosts"))


def test_inventory():
    inv = inventory(T)
    assert inv == {"all": {"hosts": {"build-vm": {
        "ansible_host": "127.0.0.1",
        "ansible_port": 2222,
        "ansible_user": "builder",
        "ansible_ssh_private_key_file": "/w/keys/id",
        "ansible_ssh_common_args": ssh_common_args(T),
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_connection": "ssh",
        "ansible_become": True,
        "ansible_become_method": "sudo",
    }}}}
    no_become = Target("h", 22, "root", Path("k"), Path("kh"), python="/usr/bin/python3.13", become=False)
    host = inventory(no_become, name="x")["all"]["hosts"]["x"]
    assert "ansible_become" not in host
    assert host["ansible_python_interpreter"] == "/usr/bin/python3.13"


def test_ssh_common_args_pin_the_host_key():
    args = shlex.split(ssh_common_args(T))
    opts = [args[i + 1] for i in range(0, len(args), 2)]
    assert all(args[i] == "-o" for i in range(0, len(args), 2))
    assert "UserKnownHostsFile=/w/keys/known_hosts" in opts
    assert "StrictHostKeyChecking=yes" in opts
    assert "GlobalKnownHostsFile=/dev/null" in opts
    assert not any("StrictHostKeyChecking=no" in o or "accept-new" in o for o in opts)


def test_envvars(tmp_path):
    env = build_envvars(roles_path=[Path("/r1"), Path("/r2")], private_data_dir=Path("/w/ansible"),
                        control_path_dir=Path("/tmp/bcp-x"), task_timeout=900, path="/usr/bin:/venv/bin:/bin",
                        bin_dir="/venv/bin")
    assert env["PATH"] == "/venv/bin:/usr/bin:/bin"  # G1: the venv first, once
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"  # G3
    assert "ControlPersist=15s" in env["ANSIBLE_SSH_ARGS"]
    assert "ControlPersist=60s" not in env["ANSIBLE_SSH_ARGS"]
    assert env["ANSIBLE_SSH_CONTROL_PATH_DIR"] == "/tmp/bcp-x"
    assert env["ANSIBLE_TASK_TIMEOUT"] == "900"  # G4
    assert env["ANSIBLE_ROLES_PATH"] == "/r1:/r2"  # G6: a string
    assert env["ANSIBLE_RETRY_FILES_ENABLED"] == "False"
    assert env["ANSIBLE_NOCOLOR"] == "1"
    assert env["ANSIBLE_PIPELINING"] == "True"
    assert env["ANSIBLE_LOCAL_TEMP"] == "/w/ansible/tmp"
    assert env["ANSIBLE_REMOTE_TEMP"].startswith("/tmp/")
    assert env["ANSIBLE_CONFIG"] == "/w/ansible/ansible.cfg"
    assert "ANSIBLE_DIFF_ALWAYS" not in env
    assert all(isinstance(v, str) for v in env.values())
    assert build_envvars(roles_path=[], private_data_dir=Path("/p"), control_path_dir=Path("/c"), task_timeout=1,
                         diff=True)["ANSIBLE_DIFF_ALWAYS"] == "True"


def test_envvars_default_bin_dir_is_this_interpreters():
    import sys

    env = build_envvars(roles_path=[], private_data_dir=Path("/p"), control_path_dir=Path("/c"), task_timeout=1,
                        path="/bin")
    assert env["PATH"] == f"{Path(sys.executable).parent}:/bin"


def _ev(event, task, res, host="build-vm", **extra):
    return {"event": event, "event_data": {"host": host, "task": task, "res": res, "task_action": "command",
                                           **extra}}


EVENTS = [
    {"event": "playbook_on_start", "event_data": {}},
    _ev("runner_on_ok", "Gathering Facts", {"changed": False}),
    _ev("runner_on_failed", "ignored one", {"msg": "nope"}, ignore_errors=True),
    _ev("runner_on_failed", "deliberate failure",
        {"msg": "non-zero return code", "rc": 1, "stderr": "line1\nline2", "stdout": ""}, role="demo"),
]


def test_failures_from_events():
    assert failures_from_events(EVENTS) == [{
        "event": "runner_on_failed", "unreachable": False, "host": "build-vm", "task": "deliberate failure",
        "action": "command", "role": "demo", "msg": "non-zero return code", "output_tail": ["line1", "line2"],
    }]


def test_failures_look_into_loop_items():
    res = {"msg": "One or more items failed", "results": [
        {"item": "a", "failed": False},
        {"item": "6.12.117+deb13-amd64", "failed": True, "msg": "non-zero return code", "stderr": "modinfo: ERROR"},
    ]}
    (f,) = failures_from_events([_ev("runner_on_failed", "modinfo", res)])
    assert f["msg"] == "non-zero return code (item: 6.12.117+deb13-amd64)"
    assert f["output_tail"] == ["modinfo: ERROR"]


def test_provision_error_names_task_and_host():
    err = provision_error(failures_from_events(EVENTS), status="failed", rc=2, address="root@127.0.0.1:2222")
    assert isinstance(err, ProvisionError)
    assert str(err) == ("task 'demo : deliberate failure' failed on host build-vm (root@127.0.0.1:2222): "
                        "non-zero return code")
    assert (err.host, err.task, err.stage) == ("build-vm", "deliberate failure", "provision")
    assert err.log_tail == ["line1", "line2"]
    assert "deliberate failure" in err.describe()


def test_provision_error_unreachable():
    ev = {"event": "runner_on_unreachable", "event_data": {
        "host": "build-vm", "task": "Gathering Facts",
        "res": {"msg": "Failed to connect to the host via ssh: Host key verification failed.", "unreachable": True}}}
    err = provision_error(failures_from_events([ev]), status="failed", rc=4, address="root@127.0.0.1:2222")
    assert str(err).startswith("host build-vm (root@127.0.0.1:2222) unreachable in task 'Gathering Facts': ")
    assert "Host key verification failed" in str(err)
    assert err.hint


def test_provision_error_without_task_events():
    err = provision_error([], status="timeout", rc=254, output_tail=["x"])
    assert "timed out" in str(err)
    err = provision_error([], status="failed", rc=4, output_tail=["ERROR! the playbook could not be found"])
    assert "exit code 4" in str(err)
    assert err.log_tail == ["ERROR! the playbook could not be found"]


# ---------------------------------------------------------------------------------------- roles' shape


@pytest.mark.parametrize("role", ["nvidia-gpu-drivers", "base", "finalize"])
def test_readme_documents_every_default(role):
    d = ROOT / "roles" / role
    defaults = yaml.safe_load((d / "defaults/main.yml").read_text())
    readme = (d / "README.md").read_text()
    missing = [k for k in defaults if not re.search(rf"`{re.escape(k)}`", readme)]
    assert not missing, f"{role}/README.md does not document {missing}"


def test_roles_and_playbook_parse():
    for f in [*(ROOT / "roles").rglob("*.yml"), ROOT / "playbooks/cloud-gpu-worker.yml"]:
        yaml.safe_load(f.read_text())



@pytest.mark.parametrize("role", ["nvidia-gpu-drivers", "base", "finalize"])
def test_argument_specs_cover_every_default(role):
    """Ansible validates the role's variables against meta/argument_specs.yml: it must know every one."""
    d = ROOT / "roles" / role
    defaults = yaml.safe_load((d / "defaults/main.yml").read_text())
    spec = yaml.safe_load((d / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert set(spec) == set(defaults)
    for name, opt in spec.items():
        assert opt.get("type") in ("str", "bool", "int", "list", "path", "dict"), name
        assert opt.get("description"), name
        if "default" in opt and "{{" not in str(defaults[name]):
            assert opt["default"] == defaults[name], name
