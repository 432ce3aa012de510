"""Secrets out of published and diagnostic logs: the build's throw-away private keys."""

from __future__ import annotations

import re

_BLOCK = re.compile(
    r"-----BEGIN (?P<kind>[A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END (?P=kind)-----|\Z)", re.DOTALL)


def redact_private_keys(text: str) -> str:
    """Every PEM private key block replaced by a marker, from BEGIN to its END or, when the text was cut
    short, to the end of the text (a truncated log keeps no key body)."""
    return _BLOCK.sub("<private key removed>", text)
