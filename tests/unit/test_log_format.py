"""Log output when stderr is not a terminal: plain lines, each with its time; and --log-format json lines that
validate against the documented schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema

from builder.events import Emitter, Event
from builder.logformat import SCHEMA, JsonLines

REPO = Path(__file__).resolve().parents[2]
STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_plain_lines_each_have_their_time():
    p = _run("validate", "images/cloud-gpu-worker.yaml", "--var", "installer.locale=nope",
             "--var", "installer.hostname=x[/b]", "--var", "debian.components=[main, bogus]")
    assert p.returncode == 2
    lines = p.stderr.splitlines()
    assert len(lines) >= 4  # the error, then one line per problem
    for line in lines:
        assert STAMP.match(line), f"a line without its time (a continuation?): {line!r}"
    assert "installer.hostname" in p.stderr and "x[/b]" in p.stderr


def test_json_lines_validate_against_the_schema():
    for args, code in ((["validate", "images/cloud-gpu-worker.yaml"], 0),
                       (["validate", "images/cloud-gpu-worker.yaml", "--var", "installer.locale=nope"], 2)):
        p = _run("--log-format", "json", *args)
        assert p.returncode == code
        objs = [json.loads(line) for line in p.stderr.splitlines()]
        for obj in objs:
            jsonschema.validate(obj, SCHEMA)
        assert objs[-1]["type"] == "result" and objs[-1]["exit_code"] == code
        if code:
            assert objs[-1]["error"]["type"] == "ConfigError" and "installer.locale" in objs[-1]["error"]["message"]


def test_every_event_on_event_gets_is_a_json_line(tmp_path):
    out = tmp_path / "log.jsonl"
    with out.open("w") as f:
        js = JsonLines(f)
        seen: list[Event] = []
        em = Emitter(lambda ev: (seen.append(ev), js.event(ev)))
        with em.stage("fetch"):
            em.info("hello", step="x")
            em.progress("compress", 50, 100, unit="percent")
        js.result(0)
    objs = [json.loads(line) for line in out.read_text().splitlines()]
    for obj in objs:
        jsonschema.validate(obj, SCHEMA)
    assert [o["event"] for o in objs[:-1]] == [ev.kind for ev in seen]
    assert objs[1]["fields"] == {"step": "x"} and objs[2]["current"] == 50
