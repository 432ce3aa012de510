#!/usr/bin/env python3
"""Print builder's speed and size figures (no pass/fail: numbers to compare across changes).

    .venv/bin/python scripts/benchmark.py                       # fetch cold+warm, ISO; plus the last build's manifest
    .venv/bin/python scripts/benchmark.py --manifest build/cloud-gpu-worker/manifest.json

Cold fetch uses an empty temporary cache (downloads the ~150 MB netboot package); warm fetch reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{p.stdout}\n{p.stderr}")
    return time.monotonic() - t0, p.stdout + p.stderr


def fetched_bytes(out: str) -> str:
    for line in out.replace("\n", " ").split("verified and cached:")[1:]:
        words = line.split()
        if "bytes" in words:
            return words[words.index("bytes") - 1]
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="images/cloud-gpu-worker.yaml")
    ap.add_argument("--manifest", type=Path, default=REPO / "build/cloud-gpu-worker/manifest.json")
    ap.add_argument("--skip-fetch", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    rows: list[tuple[str, str]] = []
    if not args.skip_fetch:
        with tempfile.TemporaryDirectory(prefix="builder-bench-") as cache:
            env = dict(os.environ, BUILDER_CACHE_DIR=cache, COLUMNS="200")
            for label in ("cold", "warm"):
                dt, out = timed([py, "-m", "builder", "fetch", args.image], env)
                rows.append((f"fetch ({label} cache)", f"{dt:6.1f} s, {fetched_bytes(out)} bytes upstream"))
            iso = Path(cache) / "bench.iso"
            dt, _ = timed([py, "-m", "builder", "iso", args.image, "-o", str(iso)], env)
            rows.append(("iso (warm cache)", f"{dt:6.1f} s, {iso.stat().st_size / 2**20:.1f} MiB"))
    if args.manifest.is_file():
        m = json.loads(args.manifest.read_text())
        rows.append(("build: total", f"{m.get('duration_s', 0) / 60:6.1f} min"))
        for stage, secs in (m.get("stages") or {}).items():
            rows.append((f"build: {stage}", f"{secs / 60:6.1f} min"))
        inst = m.get("install", {})
        if "seconds" in inst:
            rows.append(("install (d-i)", f"{inst['seconds'] / 60:6.1f} min, {inst.get('packages', '?')} packages"))
        prov = m.get("provision", {})
        if "ansible" in prov:
            rows.append(("provision (ansible)", f"{prov['ansible']['seconds'] / 60:6.1f} min"))
        rows.append(("image size (compressed)", f"{m.get('size_bytes', 0) / 2**20:8.0f} MiB"))
        if m.get("raw_disk_bytes"):
            rows.append(("disk before compression", f"{m['raw_disk_bytes'] / 2**20:8.0f} MiB"))
        rows.append(("virtual size", f"{(m.get('virtual_size') or 0) / 2**30:8.0f} GiB"))
        rows.append(("bytes fetched upstream (build)", str(m.get("bytes_fetched_upstream"))))
    else:
        rows.append(("build manifest", f"none at {args.manifest} (build first)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
