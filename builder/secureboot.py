"""Module signing for Secure Boot: the Machine Owner Key (MOK) pair DKMS signs the NVIDIA module with.

``generate_pair`` makes what ``python -m builder keygen`` writes: an RSA-2048 key and a self-signed X.509
certificate as the kernel and shim take one for module signing (CN "NAME module signing", CA:FALSE,
keyUsage digitalSignature, extendedKeyUsage codeSigning, a subjectKeyIdentifier). ``load_pair`` reads and
checks the pair an image definition names (``secure_boot.signing_key`` / ``signing_cert``): the key is an
unencrypted PEM RSA key (what the kernel's ``sign-file`` reads), the certificate X.509 in PEM or DER, and the
two belong together. Every problem is a :class:`SigningError` with one line naming the file.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_FILE, PEM_FILE, DER_FILE = "mok.key", "mok.pem", "mok.der"
KEY_BITS = 2048
MIN_KEY_BITS = 2048
MAX_FILE_BYTES = 1 << 20  # a key or certificate is a few KiB
DEFAULT_DAYS = 3650


class SigningError(ValueError):
    """A key or certificate that cannot be used; the message is one line and names the file. ``part`` is
    ``key`` or ``cert``: which of the two it is about."""

    def __init__(self, message: str, *, part: str = "key") -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class SigningPair:
    """A checked key pair: the private key (PEM, as given) and the certificate."""

    key_path: Path
    cert_path: Path
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return der_bytes(self.cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def subject(self) -> str:
        return subject(self.cert)


def der_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject(cert: x509.Certificate) -> str:
    """The subject as RFC 4514 text, e.g. ``CN=builder module signing``."""
    return cert.subject.rfc4514_string()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, colon-separated upper-case hex (as ``mokutil --list-enrolled`` and
    ``openssl x509 -fingerprint -sha256`` show it)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def serial_hex(cert: x509.Certificate) -> str:
    """The serial number as upper-case hex without leading zeros (``modinfo -F sig_key``, colons removed)."""
    return f"{cert.serial_number:X}"


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def generate_pair(name: str, days: int = DEFAULT_DAYS) -> tuple[bytes, x509.Certificate]:
    """A new (private key PEM, self-signed certificate) for signing kernel modules as ``NAME module signing``."""
    if not name.strip():
        raise SigningError("the certificate's name must not be empty")
    if days < 1:
        raise SigningError(f"the certificate must be valid for at least one day, not {days}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    common = name.strip()
    if not common.lower().endswith("module signing"):  # --name "fleet module signing" stays as given
        common += " module signing"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert


def write_pair(out: Path, name: str, days: int = DEFAULT_DAYS, *, force: bool = False) -> SigningPair:
    """Generate a pair into ``out``: ``mok.key`` (0600, PEM), ``mok.pem`` and ``mok.der``. An existing key is
    never replaced unless ``force``."""
    key_path = out / KEY_FILE
    if (key_path.exists() or key_path.is_symlink()) and not force:
        raise SigningError(f"{key_path} exists; not replacing a signing key (--force replaces it; a module "
                           "signed by the old key then no longer matches the new certificate)")
    key_pem, cert = generate_pair(name, days)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{KEY_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        os.chmod(tmp, 0o600)  # whatever the umask
        os.replace(tmp, key_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    (out / PEM_FILE).write_bytes(pem_bytes(cert))
    (out / DER_FILE).write_bytes(der_bytes(cert))
    return SigningPair(key_path, out / PEM_FILE, cert)


def _read(path: Path, what: str) -> bytes:
    part = "cert" if what.endswith("certificate") else "key"
    try:
        if not path.is_file():
            raise SigningError(f"{what} {path}: not found" if not path.exists() else f"{what} {path}: not a file",
                               part=part)
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except PermissionError as exc:
        raise SigningError(f"{what} {path}: not readable ({exc.strerror})", part=part) from exc
    except OSError as exc:
        raise SigningError(f"{what} {path}: cannot be read ({exc.strerror})", part=part) from exc
    if len(data) > MAX_FILE_BYTES:
        raise SigningError(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes", part=part)
    return data


def load_cert(path: Path) -> x509.Certificate:
    """An X.509 certificate in PEM or DER."""
    data = _read(path, "signing certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise SigningError(f"signing certificate {path}: not an X.509 certificate in PEM or DER",
                           part="cert") from exc


def load_pair(key_path: Path, cert_path: Path) -> SigningPair:
    """The pair an image definition names, checked: readable, the key an unencrypted PEM RSA key of at least
    2048 bits (what ``sign-file`` reads), the certificate X.509 (PEM or DER) of that key."""
    data = _read(key_path, "signing key")
    if b"-----BEGIN" not in data:
        raise SigningError(f"signing key {key_path}: not a PEM private key (the kernel's sign-file reads PEM)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted, and no password given
        raise SigningError(f"signing key {key_path}: encrypted; DKMS signs unattended with an unencrypted "
                           "key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"signing key {key_path}: not a PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError(f"signing key {key_path}: not an RSA key (shim and the kernel take RSA MOKs)")
    if key.key_size < MIN_KEY_BITS:
        raise SigningError(f"signing key {key_path}: RSA-{key.key_size}; at least RSA-{MIN_KEY_BITS}")
    cert = load_cert(cert_path)
    pub = cert.public_key()
    if not isinstance(pub, rsa.RSAPublicKey) or pub.public_numbers() != key.public_key().public_numbers():
        raise SigningError(f"signing certificate {cert_path}: not the certificate of the key {key_path}",
                           part="cert")
    return SigningPair(key_path, cert_path, cert)

