"""A per-build ephemeral OpenPGP key that signs the installer suite the gateway generates.

The key lives in a private, temporary GNUPGHOME and dies with the build. Only that build's installer trusts
it: its public part is appended to the Debian archive keyring that goes into the installer initrd as
``/usr/share/keyrings/archive.gpg`` (d-i only creates that file when it is absent: see docs/trust-and-mirrors.md).

The GNUPGHOME is named ``builder-gnupg-<pid>-…``: when a build is SIGKILLed, its home (private key and all)
and its gpg-agent outlive it, and :func:`sweep_stale_homes` removes those of dead PIDs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from types import TracebackType

from ..errors import GatewayError, ToolError, VerificationError
from ..run import pid_alive, run, which

log = logging.getLogger(__name__)

HOME_PREFIX = "builder-gnupg-"
_HOME_RE = re.compile(re.escape(HOME_PREFIX) + r"(\d+)-.+")


class EphemeralKey:
    """``with EphemeralKey("builder build 1234") as key: key.detach_sign(data)``."""

    def __init__(self, uid: str = "builder ephemeral installer key", *, algo: str = "ed25519",
                 home_parent: Path | None = None) -> None:
        self.uid = uid
        self.algo = algo
        self.home_parent = home_parent  # where the GNUPGHOME is made; None: the system temp dir
        self._home: Path | None = None
        self._real_home: Path | None = None
        self.fingerprint = ""

    # -- lifecycle
    def __enter__(self) -> EphemeralKey:
        self.create()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def create(self) -> None:
        self._gpg = which("gpg", package="gpg")
        self._real_home = None
        if self.home_parent is not None:
            # The key lives under home_parent (a build's work directory: removed with it). gpg-agent puts its
            # sockets in the home, and a socket path has at most 107 bytes: gpg gets a short alias for it, a
            # symlink in the temp dir named like the homes sweep_stale_homes() knows.
            parent = Path(self.home_parent)
            parent.mkdir(parents=True, exist_ok=True)
            self._real_home = Path(tempfile.mkdtemp(prefix="gnupg-", dir=parent))
            os.chmod(self._real_home, 0o700)
            alias = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-"))
            alias.rmdir()
            alias.symlink_to(self._real_home)
            self._home = alias
        else:
            self._home = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-"))
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
            _remove_home(self._home)
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


def _remove_home(home: Path) -> None:
    """Stop the gpg-agent of ``home`` (by its home directory, never by process name), then remove it."""
    gpgconf = shutil.which("gpgconf")
    if gpgconf:
        try:
            run([gpgconf, "--homedir", str(home), "--kill", "gpg-agent"], check=False, timeout=30)
        except ToolError as exc:
            log.warning("could not stop the gpg-agent of %s: %s", home, exc)
    if home.is_symlink():  # an alias of a home inside a work directory: remove both
        target = Path(os.readlink(home))
        home.unlink()
        shutil.rmtree(target, ignore_errors=True)
    else:
        shutil.rmtree(home, ignore_errors=True)


def sweep_stale_homes(parent: Path | None = None) -> list[Path]:
    """Remove the ephemeral GNUPGHOMEs under ``parent`` (default: the system temp dir) whose creating
    process is dead, stopping their gpg-agent first. Homes of live processes, directories of other users and
    names without a PID are left alone. Returns the homes removed."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    removed = []
    for home in entries:
        m = _HOME_RE.fullmatch(home.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            st = home.lstat()
        except OSError:
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)) or st.st_uid != os.getuid():
            continue
        log.info("removing the signing key home %s left by process %s, which is gone", home, m.group(1))
        _remove_home(home)
        removed.append(home)
    return removed


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
