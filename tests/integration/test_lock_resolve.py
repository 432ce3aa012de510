"""``builder lock`` against the real mirror: it finds a netboot build whose kernel has served module udebs, a
signed Release that vouches for the served udeb index, and a served replacement for every udeb it overrides."""

import pytest

from builder.archive.cache import ContentCache
from builder.archive.http import FetchStats
from builder.installer import netboot
from builder.lock import Lock, lock_differences, read_lock, resolve_lock
from builder.stages.fetch import make_archive

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_resolve_lock_live(default_config, tmp_path, capsys):
    cfg = default_config
    stats = FetchStats()
    main = make_archive(cfg, ContentCache(), stats)
    messages: list[str] = []
    lock = resolve_lock(cfg, main, report=messages.append)
    # every module udeb of the chosen kernel ABI is served; every override points at a served file
    assert lock.kernel_abi
    assert all(netboot.abi_of_module_udeb(r.package) not in (None, lock.kernel_abi) for r in lock.removed
               if netboot.abi_of_module_udeb(r.package))
    for o in lock.overrides:
        assert main.exists(o.filename), o
        assert o.version != o.index_version
    assert main.exists(lock.netboot.filename)
    # round trip through JSON
    assert Lock.from_json(lock.to_json()) == lock
    committed = read_lock(cfg.lock_path)
    diffs = lock_differences(committed, lock)
    with capsys.disabled():
        print(f"\nlock resolved: netboot {lock.netboot.version} ({lock.kernel_abi}), udeb index from "
              f"dists/{lock.udeb_index.release_suite}, {len(lock.overrides)} overrides, {len(lock.removed)} removed; "
              f"{stats.bytes_fetched} bytes fetched; differences to the committed lock: {diffs or 'none'}")
