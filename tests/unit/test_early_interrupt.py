"""Ctrl-C at any moment of ``python -m builder`` — while its imports run (pydantic, yaml, rich: the first
~0.15 s), while argparse and logging are set up, or later — exits 130 with the one line ``interrupted`` and never
a KeyboardInterrupt traceback.

What "from the first instruction on" means here: from the first line of ``builder/__init__.py``, which is the
first code of builder that ``python -m builder`` runs. Before it the interpreter starts up and imports ``site``
(~10-20 ms): a SIGINT there is Python's own business (it dies of the signal, or prints "Fatal Python error:
init_import_site") and no package can intercept it. So these tests do not send signals at fixed delays from the
spawn, which would land in that window at 0.01 s: a ``sitecustomize`` on the child's path (the test's, not
builder's) either sends the SIGINT itself at the moment a named module starts importing, or reports when
builder's package begins importing so the timed sweep starts from there.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SITECUSTOMIZE = textwrap.dedent("""
    import os, signal, sys

    _AT = os.environ.get("BUILDER_TEST_SIGINT_AT")
    _MARK = os.environ.get("BUILDER_TEST_MARK_AT")

    class _Trap:
        def find_spec(self, name, path=None, target=None):
            if name == _MARK:
                os.write(2, b"@started\\n")
            if name == _AT:
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, _Trap())
""")


@pytest.fixture()
def child_env(tmp_path, repo):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(repo)])
    env["BUILDER_CACHE_DIR"] = str(tmp_path / "cache")
    return env


@pytest.fixture()
def fifo(tmp_path):
    """An image definition nobody writes: ``validate`` blocks reading it until it is interrupted."""
    p = tmp_path / "image.yaml"
    os.mkfifo(p)
    return p


def spawn(env, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "builder", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def plain(text: str) -> str:
    """Output without the ``[HH:MM:SS] LEVEL`` of plain (non-terminal) log lines."""
    return re.sub(r"(?m)^\[\d\d:\d\d:\d\d\] [A-Z]+ +", "", text)


def finish(p, timeout=30):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s: {err}")
    return p.returncode, out, plain(err.replace("@started\n", ""))


# modules imported, in this order, by builder/__init__.py (errors, config → yaml, pydantic), __main__.py (cli →
# argparse) and main() (rich, inside _setup_logging)
@pytest.mark.parametrize("module", ["builder.errors", "yaml", "pydantic", "builder.config", "builder.events",
                                    "builder.cli", "argparse", "rich.console", "rich.text"])
def test_sigint_while_a_module_imports(child_env, fifo, module):
    rc, out, err = finish(spawn(dict(child_env, BUILDER_TEST_SIGINT_AT=module), "validate", str(fifo)))
    assert (rc, err) == (130, "interrupted\n"), err
    assert out == ""


@pytest.mark.parametrize("delay", [0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3])
def test_sigint_at_any_delay_after_builder_starts(child_env, fifo, delay):
    p = spawn(dict(child_env, BUILDER_TEST_MARK_AT="builder.errors"), "validate", str(fifo))
    first = p.stderr.readline()
    assert first == "@started\n", first + p.stderr.read()
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p)
    assert (rc, err, out) == (130, "interrupted\n", ""), err


def test_sigterm_while_blocked_is_130_too(child_env, fifo):
    p = spawn(dict(child_env, BUILDER_TEST_MARK_AT="rich.text"), "validate", str(fifo))
    assert p.stderr.readline() == "@started\n"
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    assert finish(p)[:3:2] == (130, "interrupted\n")


def test_an_ignored_sigint_stays_ignored(child_env, fifo):
    """Started with SIGINT ignored (nohup, a background job of a script): builder does not take it back."""
    p = spawn(child_env, "validate", str(fifo), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    assert finish(p)[:3:2] == (130, "interrupted\n")


@pytest.mark.parametrize("how", ["import", "-m other"])
def test_importing_builder_leaves_sigint_alone(child_env, tmp_path, how):
    """Only ``python -m builder`` takes SIGINT over during startup; a program that imports builder (even one run
    with ``-m``) keeps Python's KeyboardInterrupt."""
    (tmp_path / "site" / "other.py").write_text(
        "import signal, builder\nassert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "print('default')\n")
    argv = ["-c", "import other"] if how == "import" else ["-m", "other"]
    p = subprocess.run([sys.executable, *argv], env=child_env, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "default\n"), p.stderr


def test_normal_run_is_unchanged(child_env, repo):
    p = subprocess.run([sys.executable, "-m", "builder", "validate", "--var", "vm.cpus=0",
                        str(repo / "images/cloud-gpu-worker.yaml")], env=child_env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "vm.cpus" in p.stderr and "Traceback" not in p.stderr
