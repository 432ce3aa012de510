"""Module signing for Secure Boot: ``keygen`` (a MOK pair for kernel modules), the ``secure_boot`` section's
checks, what the provision/finalize/publish stages make of it, and the nvidia role's shape (key removed in
``always``)."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from builder.config import load_config
from builder.errors import ConfigError
from builder.secureboot import (
    SigningError,
    der_bytes,
    fingerprint,
    generate_pair,
    load_cert,
    load_pair,
    serial_hex,
    write_pair,
)

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


# ------------------------------------------------------------------------------------------------- keygen


def test_keygen_round_trip(tmp_path):
    out = tmp_path / "keys"
    p = cli("keygen", "--out", str(out), "--name", "Example GPU", "--days", "30")
    assert p.returncode == 0, p.stderr
    key_file, pem_file, der_file = out / "mok.key", out / "mok.pem", out / "mok.der"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    assert der_file.read_bytes() == cert.public_bytes(serialization.Encoding.DER)
    assert x509.load_der_x509_certificate(der_file.read_bytes()) == cert
    # what a MOK for module signing looks like
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Example GPU module signing"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    # the key is the certificate's, and the loader agrees
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    pair = load_pair(key_file, der_file)
    assert pair.fingerprint == fingerprint(cert) == ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    # it prints the fingerprint and a config snippet that is the secure_boot section
    assert pair.fingerprint in p.stderr
    snippet = yaml.safe_load(p.stdout)
    assert snippet == {"secure_boot": {"signing_key": str(key_file), "signing_cert": str(der_file)}}


def test_keygen_refuses_to_overwrite_a_key(tmp_path):
    assert cli("keygen", "--out", str(tmp_path)).returncode == 0
    before = (tmp_path / "mok.key").read_bytes()
    p = cli("keygen", "--out", str(tmp_path))
    assert p.returncode == 2 and "exists" in p.stderr and "--force" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "mok.key").read_bytes() == before
    assert cli("keygen", "--out", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "mok.key").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "mok.key").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*tmp"))


def test_keygen_bad_days_is_a_usage_error(tmp_path):
    p = cli("keygen", "--out", str(tmp_path), "--days", "0")
    assert p.returncode == 2 and "at least one day" in p.stderr and not (tmp_path / "mok.key").exists()


def test_keygen_is_completed(tmp_path):
    p = cli("completion", "bash")
    assert "keygen) opts=" in p.stdout and "--out" in p.stdout


# ------------------------------------------------------------------------------------------------ loading


def _write_key(path: Path, key, password: bytes | None = None) -> Path:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return path


@pytest.fixture()
def pair(tmp_path):
    return write_pair(tmp_path / "a", "a")


def test_load_pair_takes_pem_or_der(pair):
    assert load_pair(pair.key_path, pair.key_path.parent / "mok.der").cert == pair.cert
    assert load_pair(pair.key_path, pair.key_path.parent / "mok.pem").cert == pair.cert
    assert serial_hex(pair.cert) == f"{pair.cert.serial_number:X}" and not serial_hex(pair.cert).startswith("0")


@pytest.mark.parametrize("case,match", [
    ("missing_key", r"signing key .*nope\.key: not found"),
    ("missing_cert", r"signing certificate .*nope\.der: not found"),
    ("mismatch", r"signing certificate .*b/mok\.der: not the certificate of the key .*a/mok\.key"),
    ("garbage_cert", r"not an X\.509 certificate in PEM or DER"),
    ("der_key", r"not a PEM private key"),
    ("encrypted_key", r"encrypted"),
    ("ec_key", r"not an RSA key"),
    ("small_key", r"RSA-1024; at least RSA-2048"),
    ("dir_key", r"not a file"),
])
def test_load_pair_problems_are_one_line_naming_the_file(tmp_path, pair, case, match):
    key, cert = pair.key_path, pair.key_path.parent / "mok.der"
    if case == "missing_key":
        key = tmp_path / "nope.key"
    elif case == "missing_cert":
        cert = tmp_path / "nope.der"
    elif case == "mismatch":
        cert = write_pair(tmp_path / "b", "b").cert_path.with_name("mok.der")
    elif case == "garbage_cert":
        cert = tmp_path / "x.der"
        cert.write_bytes(b"\x30\x03\x02\x01\x01")
    elif case == "der_key":
        key = tmp_path / "k.der"
        key.write_bytes(serialization.load_pem_private_key(pair.key_path.read_bytes(), None).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif case == "encrypted_key":
        key = _write_key(tmp_path / "e.key", serialization.load_pem_private_key(pair.key_path.read_bytes(), None),
                         b"secret")
    elif case == "ec_key":
        key = _write_key(tmp_path / "ec.key", ec.generate_private_key(ec.SECP256R1()))
    elif case == "small_key":
        key = _write_key(tmp_path / "s.key", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    elif case == "dir_key":
        key = tmp_path
    with pytest.raises(SigningError, match=match) as ei:
        load_pair(key, cert)
    assert "\n" not in str(ei.value)
    assert ei.value.part == ("cert" if case in ("missing_cert", "mismatch", "garbage_cert") else "key")


# ------------------------------------------------------------------------------------------------- config


def image(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "img" / "image.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


def test_secure_boot_paths_are_relative_to_the_image_file(tmp_path, pair):
    p = image(tmp_path, "secure_boot: {signing_key: ../a/mok.key, signing_cert: ../a/mok.pem}\n")
    cfg = load_config(p)
    assert cfg.signing_paths == (pair.key_path.resolve(), (pair.key_path.parent / "mok.pem").resolve())
    assert load_config(ROOT / "images/cloud-gpu-worker.yaml").signing_paths is None


@pytest.mark.parametrize("text,where,match", [
    ("secure_boot: {signing_key: ../a/mok.key}", "secure_boot", "signing_key is given without signing_cert"),
    ("secure_boot: {signing_cert: ../a/mok.der}", "secure_boot", "signing_cert is given without signing_key"),
    ("secure_boot: {signing_key: missing.key, signing_cert: ../a/mok.der}", "secure_boot.signing_key",
     r"signing key .*/img/missing\.key: not found"),
    ("secure_boot: {signing_key: ../a/mok.key, signing_cert: ../b/mok.der}", "secure_boot.signing_cert",
     r"signing certificate .*/b/mok\.der: not the certificate of the key .*/a/mok\.key"),
    ("secure_boot: {signing_key: ../a/mok.key, signing_cert: ../a/mok.der, extra: 1}", "secure_boot.extra",
     "Extra inputs"),
    ("provision: {extra_vars: {nvidia_module_signing_key: /k}}", "provision.extra_vars",
     "nvidia_module_signing_key is set by secure_boot"),
])
def test_secure_boot_problems(tmp_path, pair, text, where, match):
    write_pair(tmp_path / "b", "b")
    with pytest.raises(ConfigError) as ei:
        load_config(image(tmp_path, text + "\n"))
    problems = dict(ei.value.problems)
    assert where in problems, ei.value.problems
    assert len(ei.value.problems) == 1
    assert re.search(match, problems[where]), problems[where]


def test_validate_mismatched_pair_is_one_clear_message(tmp_path, pair):
    write_pair(tmp_path / "b", "b")
    p = cli("validate", str(image(tmp_path, "secure_boot: {signing_key: ../a/mok.key, signing_cert: ../b/mok.der}\n")))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "secure_boot" in ln]
    assert len(lines) == 1 and "b/mok.der: not the certificate of the key" in lines[0], p.stderr


# ------------------------------------------------------------------------------------------------- stages


def test_playbook_vars_pass_the_pair_and_the_der(tmp_path, pair):
    from builder.stages.provision import SIGNING_CERT, playbook_vars

    cfg = load_config(image(tmp_path, "secure_boot: {signing_key: ../a/mok.key, signing_cert: ../a/mok.pem}\n"
                                      "provision: {extra_vars: {nvidia_driver_flavor: open}}\n"))
    work = tmp_path / "work"
    work.mkdir()
    v = playbook_vars(cfg, work)
    assert v["nvidia_driver_flavor"] == "open"
    assert v["nvidia_module_signing_key"] == str(pair.key_path.resolve())
    assert v["nvidia_module_signing_cert"] == str(work / SIGNING_CERT)
    assert (work / SIGNING_CERT).read_bytes() == der_bytes(pair.cert)
    plain = playbook_vars(load_config(ROOT / "images/cloud-gpu-worker.yaml"), work)
    assert not {"nvidia_module_signing_key", "nvidia_module_signing_cert"} & set(plain)


def test_finalize_vars_follow_the_nvidia_roles_paths(tmp_path):
    from builder.stages.finalize import finalize_vars

    cfg = load_config(image(tmp_path, "provision: {extra_vars: {nvidia_module_signing_key_dest: /root/k.pem}}\n"))
    assert finalize_vars(cfg)["finalize_module_signing_key"] == "/root/k.pem"
    assert "finalize_module_signing_key" not in finalize_vars(load_config(ROOT / "images/cloud-gpu-worker.yaml"))
    nv = yaml.safe_load((ROOT / "roles/nvidia-gpu-drivers/defaults/main.yml").read_text())
    fin = yaml.safe_load((ROOT / "roles/finalize/defaults/main.yml").read_text())
    assert fin["finalize_module_signing_key"] == nv["nvidia_module_signing_key_dest"]
    assert fin["finalize_module_signing_cert"] == nv["nvidia_module_signing_cert_dest"]


def test_publish_ships_the_certificate(tmp_path, pair):
    from builder.stages.publish import _signing_cert

    staging = tmp_path / "staging"
    staging.mkdir()
    assert _signing_cert(tmp_path / "absent.der", staging, "img") == ({}, [])
    entry, files = _signing_cert(pair.cert_path.with_name("mok.der"), staging, "img")
    assert files == ["img.mok.der", "img.mok.pem"]
    assert load_cert(staging / "img.mok.der") == load_cert(staging / "img.mok.pem") == pair.cert
    assert (staging / "img.mok.der").read_bytes() == der_bytes(pair.cert)
    assert entry == {"signing_cert": "img.mok.der", "signing_cert_pem": "img.mok.pem",
                     "sha256_fingerprint": pair.fingerprint, "subject": "CN=a module signing",
                     "serial": serial_hex(pair.cert)}


# ------------------------------------------------------------------------------------------------ the role


def test_nvidia_role_removes_the_key_in_always():
    """main.yml: the signing setup, the install and the check in one block whose ``always`` removes the key."""
    tasks = yaml.safe_load((ROOT / "roles/nvidia-gpu-drivers/tasks/main.yml").read_text())
    (blk,) = [t for t in tasks if "block" in t]
    imports = [t.get("ansible.builtin.import_tasks") for t in blk["block"]]
    assert imports == ["signing.yml", "install.yml", "signing_verify.yml"]
    assert [t.get("ansible.builtin.import_tasks") for t in blk["always"]] == ["signing_cleanup.yml"]
    assert not [t for t in tasks if t.get("ansible.builtin.import_tasks") == "install.yml"]
    copy = next(t for t in yaml.safe_load((ROOT / "roles/nvidia-gpu-drivers/tasks/signing.yml").read_text())
                if t.get("ansible.builtin.copy", {}).get("src") == "{{ nvidia_module_signing_key }}")
    assert copy["ansible.builtin.copy"]["mode"] == "0600" and copy["diff"] is False


def test_a_name_that_already_says_module_signing_is_not_doubled():
    _, cert = generate_pair("fleet A module signing", days=30)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fleet A module signing"
