"""Fixtures of the hermetic archive tests: a throwaway signing key, a fake signed archive, and it served on
127.0.0.1 (archive_testlib)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_testlib import ArchiveServer, FakeArchive, GpgKey, gpg_key, make_archive, serve


@pytest.fixture(scope="module")
def key() -> Iterator[GpgKey]:
    with gpg_key("builder test archive key") as k:
        yield k


@pytest.fixture
def fake(tmp_path: Path, key: GpgKey) -> FakeArchive:
    return make_archive(tmp_path / "mirror", key)


@pytest.fixture
def server(fake: FakeArchive) -> Iterator[ArchiveServer]:
    with serve(fake.root) as srv:
        yield srv
