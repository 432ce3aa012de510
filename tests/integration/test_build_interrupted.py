"""Killing a real ``python -m builder build`` midway (while the installer VM runs) leaves no QEMU process, no
work directory and no half-published output, whether it gets SIGTERM, SIGINT (Ctrl-C) or SIGKILL."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.archive.cache import cache_base
from builder.run import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.vm]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _qemu_child(pid: int) -> int | None:
    for c in _children(pid):
        try:
            if Path(f"/proc/{c}/comm").read_text().startswith("qemu-system"):
                return c
        except OSError:
            pass
    return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_build_leaves_nothing(repo, tmp_path, sig):
    out = tmp_path / "out"
    work = cache_base() / "work"
    before = set(work.glob("cloud-gpu-worker-*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", "build", str(repo / "images/cloud-gpu-worker.yaml"), "--no-cache",
         "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo,
    )
    qemu = None
    deadline = time.monotonic() + 240
    while qemu is None and time.monotonic() < deadline and proc.poll() is None:
        qemu = _qemu_child(proc.pid)
        time.sleep(0.5)
    if qemu is None:
        proc.kill()
        pytest.fail("the build never started its installer VM:\n" + (proc.communicate()[0] or "")[-3000:])
    time.sleep(3)  # let the installer boot a little
    mine = set(work.glob("cloud-gpu-worker-*")) - before
    assert mine, "the build made no work directory"
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    for _ in range(100):  # SIGKILL: QEMU dies through PR_SET_PDEATHSIG, reaped by init
        if not pid_alive(qemu):
            break
        time.sleep(0.1)
    assert not pid_alive(qemu), f"QEMU {qemu} outlived the build (signal {sig.name})"
    assert not (out / "cloud-gpu-worker.qcow2").exists()
    if sig != signal.SIGKILL:
        assert proc.returncode == 130, output[-2000:]
        assert "interrupted" in output
        assert not any(p.exists() for p in mine), f"work directory left behind: {mine}"
    else:  # nothing could clean up after SIGKILL: the next build sweeps the dead build's work directory
        from builder.pipeline import sweep_stale_workdirs

        sweep_stale_workdirs(work)
        assert not any(p.exists() for p in mine), f"stale work directory not swept: {mine}"
