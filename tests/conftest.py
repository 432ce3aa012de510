import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "images" / "cloud-gpu-worker.yaml"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def default_config():
    from builder.config import load_config

    return load_config(DEFAULT_IMAGE)


@pytest.fixture(scope="session")
def shared_cache_dir() -> Path:
    """The real content cache (XDG) shared by integration tests, so the mirror is hit once per machine."""
    from builder.archive.cache import cache_base

    d = cache_base() / "blobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pytest_report_header(config):
    return [f"builder cache: {os.environ.get('BUILDER_CACHE_DIR', '~/.cache/builder')}"]
