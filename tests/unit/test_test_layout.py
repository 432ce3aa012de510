"""The test tree itself: pytest's default import mode (rootdir, no __init__.py) imports every test file as a
top-level module by its basename, so two files of one name in tests/unit and tests/integration stop the whole
collection of `pytest -m "not e2e"` (the README's and CI's command) with "import file mismatch"."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_basename_is_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name == "conftest.py" or "__pycache__" in path.parts:
            continue
        seen[path.name].append(str(path.relative_to(TESTS)))
    assert len(seen) > 50, "the walk found the test tree"
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test modules sharing a basename (rename one): {clashes}"
