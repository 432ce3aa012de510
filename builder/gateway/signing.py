"""A per-build ephemeral OpenPGP key that signs the installer suite the gateway generates.

The key lives in a private, temporary GNUPGHOME and dies with the build. Only that build's installer trusts
it: its public part is appended to the Debian archive keyring that goes into the installer initrd as
``/usr/share/keyrings/archive.gpg`` (see BUILD-HOST-FACTS.md: d-i only creates that file when it is absent).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from ..errors import GatewayError, ToolError, VerificationError
from ..run import run, which

log = logging.getLogger(__name__)


class EphemeralKey:
    """``with EphemeralKey("builder build 1234") as key: key.detach_sign(data)``."""

    def __init__(self, uid: str = "builder ephemeral installer key", *, algo: str = "ed25519") -> None:
        self.uid = uid
        self.algo = algo
        self._home: Path | None = None
        self.fingerprint = ""

    # -- lifecycle
    def __enter__(self) -> EphemeralKey:
        self.create()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def create(self) -> None:
        self._gpg = which("gpg", package="gpg")
        self._home = Path(tempfile.mkdtemp(prefix="builder-gnupg-"))
        os.chmod(self._home, 0o700)
        self._call(
            ["--quick-generate-key", "--passphrase", "", self.uid, self.algo, "sign", "1d"],
            what="generate the ephemeral signing key",
        )
        out = self._call(["--list-keys", "--with-colons"], what="list the ephemeral key").stdout.decode()
        fprs = re.findall(r"^fpr:(?:[^:]*:){8}([0-9A-F]{40}):", out, re.MULTILINE)
        if not fprs:
            raise GatewayError("could not read the fingerprint of the ephemeral key")
        self.fingerprint = fprs[0]
        log.debug("ephemeral installer key %s", self.fingerprint)

    def close(self) -> None:
        if self._home is not None:
            agent = shutil.which("gpgconf")
            if agent:
                run([agent, "--kill", "gpg-agent"], env={"GNUPGHOME": str(self._home)}, check=False)
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    # -- operations
    def _call(self, args: list[str], *, what: str, data: bytes | None = None):  # type: ignore[no-untyped-def]
        if self._home is None:
            raise GatewayError("ephemeral key used outside its with-block")
        argv = [self._gpg, "--homedir", str(self._home), "--batch", "--yes", "--no-tty", "--pinentry-mode",
                "loopback", "--quiet", *args]
        try:
            return run(argv, input=data, env={"GNUPGHOME": str(self._home)}, timeout=60)
        except ToolError as exc:
            raise GatewayError(f"gpg could not {what}: {exc}", log_tail=exc.log_tail) from exc

    def public_key(self) -> bytes:
        """The public key, binary (a keyring gpgv reads when concatenated with others)."""
        return self._call(["--export", self.fingerprint], what="export the public key").stdout

    def public_key_armored(self) -> str:
        return self._call(["--armor", "--export", self.fingerprint], what="export the public key").stdout.decode()

    def detach_sign(self, data: bytes) -> bytes:
        """An ASCII-armored detached signature (``Release.gpg``)."""
        return self._call(["--local-user", self.fingerprint, "--armor", "--detach-sign", "--digest-algo", "SHA512",
                           "--output", "-"], data=data, what="sign").stdout

    def clearsign(self, data: bytes) -> bytes:
        """A clear-signed copy (``InRelease``)."""
        return self._call(["--local-user", self.fingerprint, "--clearsign", "--digest-algo", "SHA512",
                           "--output", "-"], data=data, what="clear-sign").stdout


def combined_keyring(debian_keyring: Path, *extra_public_keys: bytes) -> bytes:
    """The Debian archive keyring with extra binary public keys appended (gpgv reads the concatenation)."""
    try:
        base = Path(debian_keyring).read_bytes()
    except OSError as exc:
        raise GatewayError(f"cannot read the Debian archive keyring {debian_keyring}: {exc.strerror}",
                           hint="apt-get install debian-archive-keyring") from exc
    if base[:1] in (b"-",):
        raise GatewayError(f"{debian_keyring} is armored; a binary keyring is needed")
    return base + b"".join(extra_public_keys)


def gpgv_verify_detached(keyring: Path, signature: bytes, data: bytes) -> list[str]:
    """Check a detached signature with gpgv the way net-retriever does; return the VALIDSIG fingerprints."""
    gpgv = which("gpgv", package="gpgv")
    with tempfile.TemporaryDirectory(prefix="builder-gpgv-") as td:
        sig, body = Path(td, "Release.gpg"), Path(td, "Release")
        sig.write_bytes(signature)
        body.write_bytes(data)
        proc = run([gpgv, "--status-fd", "1", "--keyring", str(keyring), str(sig), str(body)], check=False)
    out = proc.stdout.decode(errors="replace")
    fprs = [line.split()[2] for line in out.splitlines() if line.startswith("[GNUPG:] VALIDSIG ")]
    if proc.returncode != 0 or not fprs:
        raise VerificationError(
            f"gpgv rejected the signature with keyring {keyring}",
            log_tail=(proc.stderr or b"").decode(errors="replace").splitlines()[-5:],
        )
    return fprs
