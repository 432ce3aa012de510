"""Removing private keys from text that is kept or shown: published logs, error log tails.

Every PEM private key block goes — OpenSSH, PKCS#1/#8, EC, DSA, encrypted, OpenPGP — from its BEGIN line through
the END line of the same kind. Key lines that each carry their own syslog prefix (``<13>Dec  1 12:00:00
in-target: b3Bl…``) lie between BEGIN and END, so they go with the block; the prefix of the BEGIN line stays.

A block whose END is missing (a log record cut short, as busybox syslogd in debian-installer cuts records at
1024 bytes, or a file that stops mid-key) is removed to the end of its line, and so is every following line that
holds nothing but key data (base64, perhaps behind a syslog prefix or in an ``echo '…'``), up to the first line
that holds anything else: the key's remaining lines, if the text has them, go too, and the rest of the log (the
installer's later steps, a failure marker) stays readable.
"""

from __future__ import annotations

import re

REMOVED = "<private key removed>"
TRUNCATED = "<private key removed: the text was cut before its END line>"

_BEGIN = re.compile(r"-----BEGIN (?P<label>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----")


# a line of key data: base64 only, perhaps behind a syslog prefix, in an echo '…', with shell punctuation
_KEYLINE = re.compile(r"(?:<\d+>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d [^:]*: )?[\s'\"();\\]*(?:echo\s+')?"
                      r"[A-Za-z0-9+/]{4,}=*['\"();\\\s]*")


def redact_private_keys(text: str) -> str:
    """``text`` with every private key block replaced by :data:`REMOVED` (by :data:`TRUNCATED` when the block
    has no END: then the rest of its line and the key-like lines after it go)."""
    out: list[str] = []
    pos = 0
    while (m := _BEGIN.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        end_marker = f"-----END {m['label']}-----"
        end = text.find(end_marker, m.end())
        next_begin = _BEGIN.search(text, m.end())
        if end >= 0 and (next_begin is None or end < next_begin.start()):
            out.append(REMOVED)
            pos = end + len(end_marker)
            continue
        out.append(TRUNCATED)
        eol = text.find("\n", m.end())
        pos = len(text) if eol < 0 else eol
        while pos < len(text):  # following lines that still carry key data
            nxt = text.find("\n", pos + 1)
            line = text[pos + 1: len(text) if nxt < 0 else nxt]
            if not _KEYLINE.fullmatch(line) or _BEGIN.search(line):
                break
            pos = len(text) if nxt < 0 else nxt
    out.append(text[pos:])
    return "".join(out)


__all__ = ["REMOVED", "TRUNCATED", "redact_private_keys"]
