"""The bash completion script is valid bash and completes verbs and a verb's options, run by a real bash."""

from __future__ import annotations

import subprocess
import sys


def _complete(script: str, words: list[str]) -> list[str]:
    line = " ".join(words)
    prog = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _builder_complete; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()


def test_bash_completion_completes_verbs_and_options():
    p = subprocess.run([sys.executable, "-m", "builder", "completion", "bash"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "complete -F _builder_complete builder" in p.stdout
    subprocess.run(["bash", "-n"], input=p.stdout, text=True, check=True)
    assert {"build", "validate", "inspect", "gateway", "verify"} <= set(_complete(p.stdout, ["builder", ""]))
    assert _complete(p.stdout, ["builder", "bu"]) == ["build"]
    build_opts = _complete(p.stdout, ["builder", "build", "x.yaml", "--"])
    assert {"--on-error", "--var-file", "--var", "--force", "--no-cache"} <= set(build_opts)
    assert _complete(p.stdout, ["builder", "build", "--on-error", ""]) == ["cleanup", "abort"]
