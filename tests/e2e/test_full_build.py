"""The full build and the boot test of what it emits (about an hour under TCG; not in CI).

Run it with ``tox -e e2e``. ``BUILDER_E2E_IMAGE=/path/to.qcow2`` skips the build and only boot-tests that image
(e.g. one built with ``python -m builder build``)."""

import os
from pathlib import Path

import pytest

from builder.verify import verify_image

pytestmark = [pytest.mark.e2e, pytest.mark.vm]


@pytest.fixture(scope="module")
def built_image(default_config, tmp_path_factory):
    given = os.environ.get("BUILDER_E2E_IMAGE")
    if given:
        return Path(given)
    from builder.pipeline import build

    out = tmp_path_factory.mktemp("e2e-out")
    result = build(default_config, output=out, force=True)
    assert result.image.is_file() and result.sha256
    assert (out / "SHA256SUMS").read_text().split()[0] == result.sha256
    assert (out / "manifest.json").is_file() and (out / "packages.txt").is_file()
    return result.image


@pytest.mark.timeout(7200)
def test_built_image_boots_and_passes_checks(default_config, built_image, tmp_path):
    report = verify_image(default_config, built_image, tmp_path)
    print("\n" + report.text())
    assert report.ok, report.text()
    names = {c.name for c in report.checks if c.ok}
    assert {"debian 13", "seed packages", "one root filesystem", "disk size", "ssh key-only"} <= names
