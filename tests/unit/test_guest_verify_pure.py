import io
import json
import os
import subprocess
from pathlib import Path

import pycdlib
import yaml

from builder.redact import redact_private_keys
from builder.ssh import generate_keypair
from builder.stages.finalize import finalize_vars
from builder.verify import Check, VerifyReport, checks_for, nocloud_seed, nocloud_user_data
from builder.vm import guestnet

REPO = Path(__file__).resolve().parents[2]


def test_finalize_vars_point_apt_at_the_config_mirrors(default_config):
    v = finalize_vars(default_config)
    assert v["finalize_apt_mirror"] == default_config.debian.mirror
    assert v["finalize_apt_security_mirror"] == default_config.debian.security_mirror
    assert v["finalize_apt_components"] == ["main", "contrib", "non-free", "non-free-firmware"]
    assert v["finalize_build_user"] == "builder" and v["finalize_apt_suite"] == "trixie"
    # the role checks that no apt file names the build's own services afterwards
    assert set(v["finalize_build_hosts"]) == {guestnet.GATEWAY_IP, guestnet.HOST}
    defaults = yaml.safe_load((REPO / "roles/finalize/defaults/main.yml").read_text())
    assert set(v) <= set(defaults), "every variable builder passes is a documented role default"


def test_nocloud_seed_reads_back(tmp_path):
    c, h = generate_keypair("c"), generate_keypair("h")
    ud = nocloud_user_data("verify", c, h, "node1")
    data = yaml.safe_load(ud)
    assert ud.startswith("#cloud-config\n") and data["users"][0]["ssh_authorized_keys"] == [c.public_openssh]
    assert data["ssh_keys"]["ed25519_public"] == h.public_openssh
    seed = nocloud_seed(tmp_path / "seed.iso", ud, "i-1", "node1")
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "CIDATA"
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path="/meta-data")
        assert b"instance-id: i-1" in buf.getvalue()
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path="/user-data")
        assert buf.getvalue().decode() == ud
    finally:
        iso.close()


def test_checks_cover_the_seed(default_config):
    names = {n for n, _, _ in checks_for(default_config)}
    assert {"debian 13", "nvidia module", "nouveau blacklisted", "no CUDA toolkit", "ssh key-only"} <= names
    for _, cmd, _ in checks_for(default_config):
        subprocess.run(["sh", "-n", "-c", cmd], check=True)


def test_report_junit(tmp_path):
    r = VerifyReport(tmp_path / "x.qcow2", [Check("a", True, "fine"), Check("b", False, "broken")], 12.0)
    assert not r.ok and "[FAIL] b" in r.text()
    xml = r.junit()
    assert 'tests="2"' in xml and 'failures="1"' in xml and "broken" in xml


def test_published_logs_lose_private_keys():
    text = ("late_command ( echo '-----BEGIN OPENSSH PRIVATE KEY-----'; echo 'b3BlbnNzaC1rZXk'; "
            "echo '-----END OPENSSH PRIVATE KEY-----' ) > /target/etc/ssh/ssh_host_ed25519_key")
    out = redact_private_keys(text)
    assert "b3BlbnNzaC1rZXk" not in out and "<private key removed>" in out
    cut = "echo '-----BEGIN OPENSSH PRIVATE KEY-----'; echo 'b3BlbnNzaC1rZXk'; echo 'c2Vjb25k"  # log cut short
    assert "b3BlbnNzaC1rZXk" not in redact_private_keys(cut) and "c2Vjb25k" not in redact_private_keys(cut)


def test_sweep_stale_workdirs(tmp_path):
    from builder.pipeline import sweep_stale_workdirs

    dead = tmp_path / "img-pid999999999-abc"
    alive = tmp_path / f"img-pid{os.getpid()}-def"
    kept = tmp_path / "img-pid999999998-ghi"
    for d in (dead, alive, kept):
        d.mkdir()
    (kept / "KEEP").touch()
    sweep_stale_workdirs(tmp_path)
    assert not dead.exists() and alive.exists() and kept.exists()


def test_clean_spares_a_live_build_and_its_base(tmp_path, monkeypatch):
    from builder.pipeline import clean

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path))
    live = tmp_path / "work" / f"img-pid{os.getpid()}-live"
    dead = tmp_path / "work" / "img-pid999999999-dead"
    used, unused = tmp_path / "installed" / "k1", tmp_path / "installed" / "k2"
    for d in (live, dead, used, unused):
        d.mkdir(parents=True)
    (used / "disk.qcow2").write_bytes(b"q")
    (live / "BASE").write_text(f"{used / 'disk.qcow2'}\n")
    (tmp_path / "blobs").mkdir()
    lines = clean(all_downloads=True)
    assert live.exists() and used.exists() and (tmp_path / "blobs").exists()
    assert not dead.exists() and not unused.exists()
    assert any(line.startswith("skipped") and str(os.getpid()) in line for line in lines)
    assert any("base disk of a running build" in line for line in lines)
    assert "skipped the download cache (a build is running)" in lines


def test_clean_all_removes_the_host_built_modules(tmp_path, monkeypatch):
    from builder.pipeline import clean

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path))
    (tmp_path / "modules" / "k").mkdir(parents=True)
    assert clean() == ["nothing to clean"] and (tmp_path / "modules").exists()
    assert clean(all_downloads=True) == [f"removed {tmp_path / 'modules'}"]


def test_clean_one_image_only(tmp_path, monkeypatch):
    import json

    from builder.pipeline import clean

    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path))
    mine, other = tmp_path / "work" / "a-pid999999999-x", tmp_path / "work" / "b-pid999999999-y"
    disk_a, disk_b = tmp_path / "installed" / "ka", tmp_path / "installed" / "kb"
    for d in (mine, other, disk_a, disk_b):
        d.mkdir(parents=True)
    (disk_a / "meta.json").write_text(json.dumps({"image": "a"}))
    (disk_b / "meta.json").write_text(json.dumps({"image": "b"}))
    clean(image="a")
    assert not mine.exists() and not disk_a.exists() and other.exists() and disk_b.exists()


def test_boot_checks_follow_the_disk_layout(default_config):
    from builder.verify import BIOS_BOOT_TYPE, ESP_TYPE, boot_checks, default_firmwares

    names = {b: [n for n, _c, _e in boot_checks(b)] for b in ("hybrid", "uefi", "bios")}
    assert names["hybrid"] == ["partition table", "EFI system partition", "removable boot path",
                               "signed boot loader", "BIOS boot partition"]
    assert "BIOS boot partition" not in names["uefi"] and names["bios"] == ["partition table"]
    cmds = " ".join(c for _n, c, _e in boot_checks("hybrid"))
    assert ESP_TYPE in cmds and BIOS_BOOT_TYPE in cmds and "label: gpt" in cmds
    assert "root partition last" in [n for n, _c, _e in checks_for(default_config)]
    assert default_firmwares(default_config) == ("bios", "uefi")


def test_firmware_checks(tmp_path):
    from builder.verify import EFIVAR_SECURE_BOOT, cert_signer, firmware_checks

    assert [n for n, _c, _e in firmware_checks("bios", None)] == ["booted by BIOS"]
    assert [n for n, _c, _e in firmware_checks("uefi", "X")] == ["booted by UEFI", "nvidia module signer"]
    secure = dict((n, c) for n, c, _e in firmware_checks("uefi-secure", "Org module signing"))
    assert list(secure) == ["booted by UEFI", "secure boot on", "nvidia module signer", "nvidia signature accepted"]
    assert EFIVAR_SECURE_BOOT in secure["secure boot on"]
    assert "grep -Fx 'Org module signing'" in secure["nvidia module signer"]
    assert "No such device" in secure["nvidia signature accepted"] and "key was rejected" in \
        secure["nvidia signature accepted"]
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Org module signing")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    assert cert_signer(tmp_path / "c.pem") == cert_signer(tmp_path / "c.der") == "Org module signing"


def test_verify_refuses_a_firmware_the_disk_cannot_boot(tmp_path):
    import pytest

    from builder.config import load_config
    from builder.errors import VerifyError
    from builder.verify import verify_image

    img = tmp_path / "x.qcow2"
    img.write_bytes(b"")
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "images/cloud-gpu-worker.yaml", ["disk.boot=bios"])
    with pytest.raises(VerifyError, match="cannot boot under uefi"):
        verify_image(cfg, img, tmp_path / "r", firmware="uefi")


def test_report_names_the_image_by_its_label(tmp_path):
    """A build verifies the image in its staging directory, which is gone once published: the reports name the
    published file (the label), not the staging path; a standalone verify names the path it was given."""
    staged = tmp_path / ".staging-123" / "img-current.qcow2"
    r = VerifyReport(staged, [Check("a", True, "fine")], 3.0, label="img-current.qcow2")
    assert r.as_dict()["image"] == "img-current.qcow2" and str(tmp_path) not in json.dumps(r.as_dict())
    assert VerifyReport(staged, [Check("a", True, "fine")]).as_dict()["image"] == str(staged)
