"""Removing private keys from text that is kept or shown: published logs, error log tails.

Every PEM private key block goes — OpenSSH, PKCS#1/#8, EC, DSA, encrypted, OpenPGP — from its BEGIN line through
the END line of the same kind. A block whose END is missing (a log record cut short, as busybox syslogd in
debian-installer does with the long late_command line, or a log that stops mid-key) is removed to the end of the
text: whatever follows may still be key lines, so it is withheld rather than guessed at. Key lines that each carry
their own syslog prefix (``<13>Dec  1 12:00:00 in-target: b3Bl…``) lie between BEGIN and END, so they go with the
block; the prefix of the BEGIN line stays.
"""

from __future__ import annotations

import re

REMOVED = "<private key removed>"
TRUNCATED = "<private key removed: no END line, so the rest of the text is withheld>"

_BEGIN = re.compile(r"-----BEGIN (?P<label>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----")


def redact_private_keys(text: str) -> str:
    """``text`` with every private key block replaced by :data:`REMOVED` (by :data:`TRUNCATED`, and everything
    after it dropped, when the block has no END)."""
    out: list[str] = []
    pos = 0
    while (m := _BEGIN.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        end_marker = f"-----END {m['label']}-----"
        end = text.find(end_marker, m.end())
        if end < 0:
            out.append(TRUNCATED)
            return "".join(out)
        out.append(REMOVED)
        pos = end + len(end_marker)
    out.append(text[pos:])
    return "".join(out)


__all__ = ["REMOVED", "TRUNCATED", "redact_private_keys"]
