"""OpenPGP verification of a Debian ``InRelease`` file with ``gpgv``.

Only the text gpgv reports as signed (``--output``) is returned; nothing outside the signature is ever parsed.
A signature counts only when gpgv exits 0 *and* reports a ``VALIDSIG`` whose primary-key fingerprint is one
of the trusted fingerprints (gpgv alone accepts any key in the keyring).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import VerificationError
from ..run import run, tail, which

log = logging.getLogger(__name__)

_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_END_SIG = b"-----END PGP SIGNATURE-----"
GPGV_TIMEOUT = 60


def _normalize(fpr: str) -> str:
    return fpr.replace(" ", "").upper()


def _check_shape(data: bytes, what: str) -> None:
    """Like apt: exactly one clearsigned block, nothing but whitespace around it."""
    stripped = data.strip()
    if not stripped.startswith(_BEGIN):
        raise VerificationError(f"{what} is not a clearsigned OpenPGP message (no '{_BEGIN.decode()}' at the start)")
    if stripped.count(_BEGIN) != 1 or not stripped.endswith(_END_SIG):
        raise VerificationError(f"{what} has data outside its single clearsigned block; refusing it")


def parse_status(status: str) -> tuple[list[str], list[str]]:
    """(primary fingerprints of VALIDSIG lines, other problem lines such as BADSIG/ERRSIG/EXPKEYSIG)."""
    valid: list[str] = []
    problems: list[str] = []
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        parts = line.split()
        kw = parts[1] if len(parts) > 1 else ""
        if kw == "VALIDSIG" and len(parts) >= 3:
            # VALIDSIG <fpr> <date> <ts> <expire> <ver> <rsvd> <pk-algo> <hash-algo> <class> [<primary-fpr>]
            valid.append(_normalize(parts[11] if len(parts) >= 12 else parts[2]))
        elif kw in ("BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY", "NODATA"):
            problems.append(" ".join(parts[1:]))
    return valid, problems


def verify_inrelease(
    data: bytes,
    keyring: Path,
    fingerprints: Iterable[str],
    *,
    name: str = "InRelease",
) -> bytes:
    """Verify a clearsigned InRelease and return only the signed text.

    Raises VerificationError unless gpgv accepts the signature and at least one good signature was made by a
    key whose primary fingerprint is in ``fingerprints``. ``name`` (a URL or path) is used in messages.
    A missing gpgv is a ToolError.
    """
    allowed = {_normalize(f) for f in fingerprints}
    if not allowed:
        raise VerificationError(f"{name}: no trusted fingerprints given; refusing to trust any signature")
    keyring = Path(keyring).absolute()  # gpgv reads a bare name relative to its home directory
    if not keyring.is_file():
        raise VerificationError(
            f"{name}: keyring {keyring} does not exist", hint="apt-get install debian-archive-keyring"
        )
    _check_shape(data, name)
    gpgv = which("gpgv", package="gpgv")
    with tempfile.TemporaryDirectory(prefix="builder-gpgv-") as tmp:
        src = Path(tmp, "InRelease")
        out = Path(tmp, "signed.txt")
        src.write_bytes(data)
        home = Path(tmp, "home")
        home.mkdir(mode=0o700)
        argv: list[str | Path] = [gpgv, "--homedir", home, "--keyring", keyring]
        argv += ["--status-fd", "1", "--output", out, src]
        proc = run(argv, check=False, timeout=GPGV_TIMEOUT, env={"LC_ALL": "C"})
        status = proc.stdout.decode("utf-8", "replace")
        valid, problems = parse_status(status)
        seen = ", ".join(valid) or "none"
        trusted = sorted(set(valid) & allowed)
        if proc.returncode != 0 or not trusted:
            why = f"gpgv exit code {proc.returncode}" if proc.returncode != 0 else "no signature by a trusted key"
            details = f"; problems: {'; '.join(problems)}" if problems else ""
            raise VerificationError(
                f"{name}: signature verification failed ({why}) with keyring {keyring}: "
                f"valid signatures from primary keys [{seen}], trusted [{', '.join(sorted(allowed))}]{details}",
                hint="the mirror may serve a tampered or stale file, or the keyring lacks the archive keys "
                "(apt-get install debian-archive-keyring)",
                log_tail=tail(proc.stderr or b""),
            )
        if not out.is_file():
            raise VerificationError(f"{name}: gpgv reported success but wrote no signed text")
        text = out.read_bytes()
    log.debug("%s: good signatures from %s (trusted: %s)", name, seen, ", ".join(trusted))
    return text


__all__ = ["parse_status", "verify_inrelease"]
