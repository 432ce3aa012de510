"""The progress events behind the live display and the JSON lines: Ansible's n-th task of the playbook's count
(what ``on_event`` gets from a provision run), and the count itself from ``ansible-playbook --list-tasks``."""

from __future__ import annotations

from pathlib import Path

from builder.events import Emitter, Event
from builder.provision import TASK_COUNT_EVENT, build_envvars, count_listed_tasks, list_task_count
from builder.stages.provision import ansible_progress

ROOT = Path(__file__).resolve().parents[2]

LISTING = """
playbook: playbooks/cloud-gpu-worker.yml

  play #1 (all): Provision a Debian 13 cloud GPU worker\tTAGS: []
    tasks:
      base : Refresh the apt package lists\tTAGS: [base_packages]
      base : Install the base packages\tTAGS: [base_packages]
      nvidia-gpu-drivers : Pin the driver to branch {{ nvidia_driver_branch }}\tTAGS: [nvidia_repo]

  play #2 (all): Nothing to do\tTAGS: []
    tasks:

  play #3 (all): Finalize\tTAGS: []
    tasks:
      finalize : Discard freed blocks\tTAGS: []
"""


def _start(task: str, role: str = "base", action: str = "ansible.builtin.apt",
           kind: str = "playbook_on_task_start") -> dict:
    return {"event": kind, "event_data": {"task": task, "role": role, "task_action": action}}


def test_count_listed_tasks():
    assert count_listed_tasks(LISTING) == 4
    assert count_listed_tasks("") == 0


def test_ansible_progress_gives_the_nth_task_of_the_total():
    seen: list[Event] = []
    current: dict[str, str] = {}
    on_event = ansible_progress(Emitter(seen.append), current)
    for ev in ({"event": TASK_COUNT_EVENT, "event_data": {"tasks": 2}},
               {"event": "playbook_on_start", "event_data": {}},
               _start("Gathering Facts", role="", action="gather_facts"),
               _start("Refresh the apt package lists"),
               {"event": "runner_on_ok", "event_data": {"task": "Refresh the apt package lists"}},
               _start("Install the base packages"),
               _start("Rebuild initramfs", role="nvidia", kind="playbook_on_handler_task_start")):
        on_event(ev)
    progress = [(ev.current, ev.total, ev.data["task"]) for ev in seen if ev.kind == "progress"]
    assert progress == [(0, 2, "Gathering Facts"), (1, 2, "Refresh the apt package lists"),
                        (2, 2, "Install the base packages"), (3, 3, "Rebuild initramfs")]  # a handler: total grows
    assert all(ev.data["unit"] == "tasks" for ev in seen if ev.kind == "progress")
    infos = [ev.message for ev in seen if ev.kind == "info"]  # the plain log lines, as before
    assert infos == ["ansible: Gathering Facts", "ansible: Refresh the apt package lists",
                     "ansible: Install the base packages", "ansible: Rebuild initramfs"]
    assert current["task"] == "nvidia : Rebuild initramfs"


def test_ansible_progress_without_a_count():
    seen: list[Event] = []
    on_event = ansible_progress(Emitter(seen.append))
    on_event(_start("One"))
    on_event(_start("Two"))
    assert [(ev.current, ev.total) for ev in seen if ev.kind == "progress"] == [(1, None), (2, None)]


def test_list_task_count_of_the_real_playbooks(tmp_path):
    """``ansible-playbook --list-tasks`` (about a second each; no host is contacted)."""
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    env = build_envvars(roles_path=[ROOT / "roles"], private_data_dir=tmp_path, control_path_dir=tmp_path,
                        task_timeout=60)
    book = ROOT / "playbooks" / "cloud-gpu-worker.yml"
    n = list_task_count(book, envvars=env, extra_vars={"x": 1}, scratch=tmp_path)
    assert n is not None and n > 20
    tagged = list_task_count(book, envvars=env, extra_vars={}, scratch=tmp_path, tags="base_sshd")
    assert tagged is not None and 5 <= tagged < n  # base_sshd's 5 and the roles' "always" tasks
    assert list(tmp_path.glob("list-vars-*")) == []  # the variables file is removed
    # no ansible-playbook: no count (and no error)
    assert list_task_count(book, envvars={**env, "PATH": str(tmp_path)}, extra_vars={}, scratch=tmp_path) is None
