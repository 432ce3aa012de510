"""The real Debian installer (the locked netboot kernel + initrd, verified from the archive) boots from the
pycdlib ISO in QEMU/TCG against the archive gateway, trusts the builder-signed udeb suite through the key
injected into its initrd, and downloads and installs udebs with anna. Read from d-i's own remote syslog.

This is the CI-sized part of the install: it stops once the partitioner has started (a full install is ~25 min
under TCG and is covered by the e2e build)."""

import time
from contextlib import ExitStack

import pytest

from builder import image
from builder.installer.progress import console_question
from builder.run import pid_alive
from builder.stages.install import install_spec
from builder.vm import guestnet
from builder.vm.logs import read_text
from builder.vm.qemu import QemuMachine

try:
    from conftest_vm import installer_context
except ImportError:  # tests/ imported as a package
    from .conftest_vm import installer_context

pytestmark = [pytest.mark.integration, pytest.mark.vm]


@pytest.mark.timeout(1800)
def test_installer_fetches_signed_udebs_and_reaches_partitioner(default_config, tmp_path):
    cfg = default_config
    with ExitStack() as stack:
        ctx, m = installer_context(stack, cfg, tmp_path)
        gw, tracker = ctx.services.gateway, ctx.services.tracker
        preseed = m.preseed
        settings = "\n".join(ln for ln in preseed.splitlines() if not ln.lstrip().startswith("#"))
        assert "allow_unauthenticated" not in settings and "--no-check-gpg" not in settings
        # the guest reaches the gateway at the fixed address (guestfwd), never at a per-build port
        assert f"mirror/http/hostname string {guestnet.GATEWAY}\n" in preseed and str(gw.port) not in settings
        disk = tmp_path / "disk.qcow2"
        image.create(disk, cfg.disk.size)
        assert m.iso is not None
        spec = install_spec(name="t-install", iso=m.iso, disk=disk, accel=ctx.accel, cpus=cfg.vm.cpus,
                            memory=cfg.vm.memory, workdir=tmp_path, gateway_port=gw.port,
                            firmware=ctx.firmware("t-install"))
        assert spec.firmware.kind == "uefi"  # the default image installs under OVMF (the hybrid GPT disk)
        t0 = time.monotonic()
        reached = None
        with QemuMachine(spec, tmp_path) as vm:
            vm.start()
            pid = vm.pid
            while time.monotonic() - t0 < 1700:
                if vm.wait(3) is not None:
                    break
                assert tracker.failed is None, f"d-i failed: {tracker.failed}\n" + "\n".join(tracker.tail)
                q = console_question(read_text(spec.serial_log)[-20000:])
                assert q is None, f"d-i asks a question the preseed does not answer:\n{q}"
                if tracker.step in ("partitioning", "install base system"):
                    reached = tracker.step
                    break
        assert not pid_alive(pid)
        log = (tmp_path / "install.syslog").read_text(errors="replace")
        took = time.monotonic() - t0
    assert reached, f"installer stuck at '{tracker.step}' after {took:.0f} s; last lines:\n" + "\n".join(tracker.tail)
    # net-retriever checked the builder-signed Release of the udeb suite with gpgv, then anna fetched udebs
    assert "Bad signature" not in log and "unauthenticated mode" not in log
    assert tracker.udebs >= 10, f"anna retrieved only {tracker.udebs} udebs"
    assert gw.stats.served_bytes > 1_000_000
    print(f"\ninstaller reached '{reached}' after {took:.0f} s; anna retrieved {tracker.udebs} udebs; "
          f"gateway served {gw.stats.served_bytes} bytes ({gw.stats.cache_hits} cache hits)")
