"""Private keys never reach a published log: complete PEM blocks, blocks cut off by a truncated log line, and
blocks whose every line carries a syslog prefix.

What d-i logs (checked against the preseed the builder renders): the late_command is one preseed value whose
continuation lines debconf joins into one line, and d-i's preseed runner logs it before running it —
``<13>Dec  1 12:00:00 preseed: running preseed command preseed/late_command: set -e; … ( echo '-----BEGIN OPENSSH
PRIVATE KEY-----';       echo 'b3Bl…'; … echo '-----END OPENSSH PRIVATE KEY-----' ) > /target/etc/ssh/…`` —
and busybox syslogd cuts long records, so the END (and part of the body) may be missing. Output that a command
prints line by line (log-output, in-target) becomes one syslog record per line, each with its own prefix.
"""

import json
from pathlib import Path

import pytest

from builder.redact import REMOVED, TRUNCATED, redact_private_keys
from builder.ssh import generate_keypair

PREFIX = "<13>Dec  1 12:00:0{i} in-target: "


@pytest.fixture(scope="module")
def pem():
    return generate_keypair("root@gpu-worker").private_openssh


def body_lines(pem):
    return [ln for ln in pem.strip().splitlines() if not ln.startswith("-----")]


def assert_no_key_material(out, pem):
    for line in body_lines(pem):
        for piece in (line, line[:20], line[-20:]):
            if len(piece) >= 12:
                assert piece not in out, f"key material {piece!r} left in:\n{out}"
    assert "PRIVATE KEY-----" not in out.replace(REMOVED, "").replace(TRUNCATED, "")


def late_command_record(pem, *, cut: int | None = None):
    """The syslog record of d-i's log of the late_command, optionally cut ``cut`` characters after BEGIN."""
    echoes = ";       ".join(f"echo '{ln}'" for ln in pem.strip().splitlines())
    line = ("<13>Dec  1 12:00:00 preseed: running preseed command preseed/late_command: set -e;     MARK=B''UILDER; "
            "    step ssh-host-key;     rm -f /target/etc/ssh/ssh_host_*_key;     ( " + echoes
            + " ) > /target/etc/ssh/ssh_host_ed25519_key;     chmod 0600 /target/etc/ssh/ssh_host_ed25519_key")
    if cut is not None:
        line = line[:line.index("-----BEGIN") + cut]
    return line


def test_complete_block_in_a_file(pem):
    text = f"d-i preseed/late_command string \\\n{pem}echo done\n"
    out = redact_private_keys(text)
    assert out == f"d-i preseed/late_command string \\\n{REMOVED}\necho done\n"
    assert_no_key_material(out, pem)


def test_complete_block_in_the_late_command_record(pem):
    text = late_command_record(pem) + "\n<13>Dec  1 12:00:01 builder: BUILDER late_command step authorized-keys\n"
    out = redact_private_keys(text)
    assert_no_key_material(out, pem)
    assert f"( echo '{REMOVED}' ) > /target/etc/ssh/ssh_host_ed25519_key;" in out
    assert out.endswith("BUILDER late_command step authorized-keys\n")


@pytest.mark.parametrize("cut", [len("-----BEGIN OPENSSH PRIVATE KEY-----"), 60, 150, 300])
def test_record_cut_inside_the_block(pem, cut):
    """The regression: BEGIN without END kept the key body (the old BEGIN…END pattern did not match)."""
    text = ("<13>Dec  1 11:59:59 preseed: running preseed command preseed/early_command: true\n"
            + late_command_record(pem, cut=cut) + "\n"
            + "<13>Dec  1 12:00:01 builder: BUILDER late_command step authorized-keys\n")
    out = redact_private_keys(text)
    assert_no_key_material(out, pem)
    assert out.startswith("<13>Dec  1 11:59:59 preseed: running preseed command preseed/early_command: true\n")
    # the rest of the cut record goes; the installer's later lines stay readable
    assert out.endswith(f"{TRUNCATED}\n<13>Dec  1 12:00:01 builder: BUILDER late_command step authorized-keys\n")


def test_prefixed_lines_with_end(pem):
    lines = [PREFIX.format(i=i) + ln for i, ln in enumerate(pem.strip().splitlines())]
    text = "<13>Dec  1 11:59:59 in-target: before\n" + "\n".join(lines) + "\n<13>Dec  1 12:00:09 in-target: after\n"
    out = redact_private_keys(text)
    assert_no_key_material(out, pem)
    assert out == (f"<13>Dec  1 11:59:59 in-target: before\n{PREFIX.format(i=0)}{REMOVED}\n"
                   "<13>Dec  1 12:00:09 in-target: after\n")


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_prefixed_lines_cut_before_end(pem, keep):
    lines = [PREFIX.format(i=i) + ln for i, ln in enumerate(pem.strip().splitlines()[:keep])]
    text = "<13>Dec  1 11:59:59 in-target: before\n" + "\n".join(lines) + "\n"
    out = redact_private_keys(text)
    assert_no_key_material(out, pem)
    assert out == f"<13>Dec  1 11:59:59 in-target: before\n{PREFIX.format(i=0)}{TRUNCATED}\n"


def test_json_escaped_newlines(pem):
    """ansible-events.jsonl holds strings with escaped newlines; the block is inside one JSON line."""
    line = json.dumps({"task": "write key", "content": pem, "after": "kept"})
    out = redact_private_keys(line + "\n" + json.dumps({"next": 1}) + "\n")
    assert_no_key_material(out, pem)
    assert json.loads(out.splitlines()[0]) == {"task": "write key", "content": REMOVED + "\n", "after": "kept"}
    assert out.splitlines()[1] == '{"next": 1}'


@pytest.mark.parametrize("label", ["RSA PRIVATE KEY", "EC PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY",
                                   "DSA PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
def test_other_private_key_kinds(label):
    body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
    text = f"a\n-----BEGIN {label}-----\n{body}\n-----END {label}-----\nb\n"
    assert redact_private_keys(text) == f"a\n{REMOVED}\nb\n"
    assert body not in redact_private_keys(text[:text.index("-----END")])


def test_an_end_of_another_kind_does_not_close_the_block():
    text = "-----BEGIN RSA PRIVATE KEY-----\nSECRETSECRETSECRET\n-----END OPENSSH PRIVATE KEY-----\ntail\n"
    assert redact_private_keys(text) == TRUNCATED + "\n-----END OPENSSH PRIVATE KEY-----\ntail\n"


def test_two_blocks_and_a_cut_one(pem):
    other = generate_keypair("second").private_openssh
    text = f"one\n{pem}between\n{other}two\n" + late_command_record(pem, cut=80)
    out = redact_private_keys(text)
    assert_no_key_material(out, pem)
    assert_no_key_material(out, other)
    assert out.startswith(f"one\n{REMOVED}\nbetween\n{REMOVED}\ntwo\n")
    assert out.endswith(TRUNCATED)


def test_a_cut_block_followed_by_a_complete_one_is_removed_up_to_its_end(pem):
    """A block without its END runs into the next block of the same kind; everything up to that END goes."""
    text = late_command_record(pem, cut=90) + "\n" + pem + "after\n"
    out = redact_private_keys(text)
    assert_no_key_material(out, pem)
    assert out.endswith(f"{REMOVED}\nafter\n")


def test_public_material_and_plain_logs_are_untouched(pem):
    pub = generate_keypair("x").public_openssh
    text = (f"{pub}\n-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
            "-----BEGIN PGP SIGNATURE-----\niHUEARYKAB0WIQ\n-----END PGP SIGNATURE-----\n"
            "<13>Dec  1 12:00:00 main-menu[300]: INFO: Menu item 'finish-install' selected\n"
            "the word PRIVATE KEY and -----BEGIN alone\n")
    assert redact_private_keys(text) == text
    assert redact_private_keys("") == ""


def test_idempotent(pem):
    for text in (pem, late_command_record(pem, cut=70), late_command_record(pem)):
        once = redact_private_keys(text)
        assert redact_private_keys(once) == once


def test_large_log_without_an_end_is_fast(pem):
    text = late_command_record(pem, cut=70) + "\n" + ("<13>Dec  1 12:00:00 anna[1]: retrieving x\n" * 200_000)
    out = redact_private_keys(text)
    assert TRUNCATED in out and out.endswith("retrieving x\n") and out.count("\n") == 200_001


@pytest.mark.parametrize("cut", [200, 400, 1024, None])
def test_the_real_preseeds_late_command_as_d_i_logs_it(cut):
    """The late_command of the rendered default preseed, logged the way d-i's preseed does it (one record,
    continuation lines joined) and cut where busybox syslogd cuts records (1024 bytes) or earlier."""
    from builder.config import load_config
    from builder.installer.preseed import _logical_lines, render_preseed
    from builder.stages.media import preseed_context

    cfg = load_config(Path(__file__).resolve().parents[2] / "images/cloud-gpu-worker.yaml")
    client, host = generate_keypair("c"), generate_keypair("h")
    text = render_preseed(preseed_context(cfg, client, host))
    late = next(line for _, line in _logical_lines(text) if line.startswith("d-i preseed/late_command"))
    record = "<13>Dec  1 22:58:08 preseed: running preseed command preseed/late_command: " + late.split(None, 3)[3]
    if cut is not None:
        record = record[:cut]
    log = (record + "\n<13>Dec  1 22:58:08 builder: BUILDER late_command started\n"
           "<13>Dec  1 22:58:14 builder: BUILDER late_command failed at step sudo\n")
    out = redact_private_keys(log)
    assert_no_key_material(out, host.private_openssh)
    assert out.endswith("BUILDER late_command started\n<13>Dec  1 22:58:14 builder: BUILDER late_command failed "
                        "at step sudo\n")
    # the preseed file itself (one echo per key line) loses the key too
    assert_no_key_material(redact_private_keys(text), host.private_openssh)
