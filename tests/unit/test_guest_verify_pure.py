import io
import subprocess

import pycdlib
import yaml

from builder.guest import apt_sources, hygiene_script, repoint_apt
from builder.ssh import generate_keypair
from builder.verify import Check, VerifyReport, checks_for, nocloud_seed, nocloud_user_data


def test_apt_sources_use_config_mirrors(default_config):
    text = apt_sources(default_config)
    assert default_config.debian.mirror in text and default_config.debian.security_mirror in text
    assert "trixie-security" in text and "non-free-firmware" in text and "10.0.2.2" not in text


def test_hygiene_script_is_valid_shell_and_complete(default_config):
    script = hygiene_script(default_config)
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)
    for must in ("truncate -s 0 /etc/machine-id", "rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*",
                 "cloud-init clean", "userdel -f -r builder", "fstrim", "/etc/cloud/cloud-init.disabled",
                 "ssh-keygen -A", "/var/lib/dkms/mok.key"):
        assert must in script


def test_repoint_apt_rewrites_port(tmp_path):
    f = tmp_path / "sources.list"
    f.write_text("deb http://10.0.2.2:4711/debian trixie main\ndeb http://10.0.2.2:4711/debian-security x main\n")
    cmd = repoint_apt(9999).replace("/etc/apt/sources.list /etc/apt/sources.list.d/*", str(f))
    subprocess.run(["sh", "-c", cmd], check=True)
    assert f.read_text().count("10.0.2.2:9999/") == 2 and "4711" not in f.read_text()


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
    from builder.pipeline import _redact_private_keys

    text = ("late_command ( echo '-----BEGIN OPENSSH PRIVATE KEY-----'; echo 'b3BlbnNzaC1rZXk'; "
            "echo '-----END OPENSSH PRIVATE KEY-----' ) > /target/etc/ssh/ssh_host_ed25519_key")
    out = _redact_private_keys(text)
    assert "b3BlbnNzaC1rZXk" not in out and "<private key removed>" in out


def test_sweep_stale_workdirs(tmp_path):
    import os

    from builder.pipeline import _sweep_stale_workdirs

    dead = tmp_path / "img-pid999999999-abc"
    alive = tmp_path / f"img-pid{os.getpid()}-def"
    kept = tmp_path / "img-pid999999998-ghi"
    for d in (dead, alive, kept):
        d.mkdir()
    (kept / "KEEP").touch()
    _sweep_stale_workdirs(tmp_path)
    assert not dead.exists() and alive.exists() and kept.exists()
