"""Hostile text through the command line: whatever a user, a file, a mirror or a tool wrote is printed as it is
(never parsed as Rich markup, emoji codes or wrapped), and the exit code still says what happened."""

import subprocess
import sys
import textwrap

import pytest

HOSTILE = ("x[/b]", "[none]", "[/x]", "[bold red]loud[/]", ":smile:x", "[link=file:///etc/passwd]y[/link]")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def run_script(script):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=60)


def image(tmp_path, body, name="img.yaml"):
    p = tmp_path / name
    p.write_text("provision: {enabled: false}\n"
                 "debian: {mirror: 'http://127.0.0.1:9/debian', security_mirror: 'http://127.0.0.1:9/security'}\n"
                 + body)
    return p


def test_bracketed_hostname_in_yaml_is_a_clean_exit_2(tmp_path):
    p = run("validate", str(image(tmp_path, 'installer: {hostname: "x[/b]"}\n')))
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out and "MarkupError" not in out
    assert "installer.hostname" in out and "'x[/b]'" in out


@pytest.mark.parametrize("value", HOSTILE)
def test_bracketed_var_values_are_printed_verbatim(tmp_path, value):
    p = run("validate", str(image(tmp_path, "")), "--var", f"installer.hostname=a{value}",
            "--var", f"debian.mirror=ftp://h/{value}")
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out
    assert f"'a{value}'" in out and f"'ftp://h/{value}'" in out


def test_bracketed_var_key_is_printed_verbatim(tmp_path):
    p = run("validate", str(image(tmp_path, "")), "--var", "a[/b]=1")
    assert p.returncode == 2 and "a[/b]=1: expected KEY.PATH=VALUE" in p.stderr and "Traceback" not in p.stderr


def test_long_error_lines_are_not_wrapped(tmp_path):
    value = "h" * 60 + "[/x]" + "-" * 150
    p = run("validate", str(image(tmp_path, "")), "--var", f"debian.mirror=ftp://{value}")
    assert p.returncode == 2 and f"'ftp://{value}'" in p.stderr


def test_path_with_brackets_in_the_ok_line(tmp_path):
    d = tmp_path / "[none]dir[red]"
    d.mkdir()
    p = run("validate", str(image(d, "", name="[bold]:smile:.yaml")))
    assert p.returncode == 0, p.stderr
    assert f"{d}/[bold]:smile:.yaml: ok" in p.stdout + p.stderr


def test_tool_output_in_hint_and_log_tail_is_kept():
    """A ToolError whose stderr tail and hint hold markup-like text (as apt, gpg or d-i print it)."""
    p = run_script("""
        import builder.cli as cli
        from builder.errors import ToolError

        def boom(args, console):
            raise ToolError("mkisofs [/x] failed", hint="see [none] and [bold]this[/]",
                            stderr_tail=["E: [none] vanished?", "W: [/b] closing", "I: :smile: ok"])

        cli._dispatch = boom
        raise SystemExit(cli.main(["validate", "unused.yaml"]))
    """)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    for text in ("error: mkisofs [/x] failed", "hint: see [none] and [bold]this[/]", "  | E: [none] vanished?",
                 "  | W: [/b] closing", "  | I: :smile: ok"):
        assert text in p.stderr


def test_clean_and_log_lines_are_verbatim():
    """The clean verb's lines and a log record (e.g. a warning quoting a mirror's answer) are not markup."""
    p = run_script("""
        import builder.cli as cli, builder.pipeline as pipeline, logging

        def clean(all_downloads=False, image=None):
            logging.getLogger("builder.test").warning("mirror said [/x] and [none]")
            return ["removed /tmp/[red]x[/red]", "removed /tmp/[/b]"]

        pipeline.clean = clean
        raise SystemExit(cli.main(["clean"]))
    """)
    assert p.returncode == 0, p.stderr
    for text in ("removed /tmp/[red]x[/red]", "removed /tmp/[/b]", "mirror said [/x] and [none]"):
        assert text in p.stdout + p.stderr


def test_main_restores_the_sigterm_handler(tmp_path):
    """main() used from Python leaves the process's SIGTERM handling as it found it."""
    p = run_script(f"""
        import signal, builder.cli as cli
        before = signal.getsignal(signal.SIGTERM)
        rc = cli.main(["validate", {str(image(tmp_path, ""))!r}])
        assert signal.getsignal(signal.SIGTERM) is before, signal.getsignal(signal.SIGTERM)
        raise SystemExit(rc)
    """)
    assert p.returncode == 0, p.stderr


def test_private_keys_in_an_error_log_tail_are_not_printed():
    """An install failure's log tail is the last d-i syslog lines, which can include the late_command record
    with the build's host key (cut short, so without its END line)."""
    p = run_script("""
        import builder.cli as cli
        from builder.errors import InstallError
        from builder.ssh import generate_keypair

        pem = generate_keypair("h").private_openssh
        record = "preseed: running preseed command preseed/late_command: ( echo '" + "'; echo '".join(
            pem.splitlines())
        body = pem.splitlines()[1]
        print(body)

        def boom(args, console):
            raise InstallError("late_command failed", log_tail=["main-menu: INFO: Menu item 'x' selected",
                                                                 record[:200]])

        cli._dispatch = boom
        raise SystemExit(cli.main(["validate", "unused.yaml"]))
    """)
    body = p.stdout.strip()
    assert p.returncode == 1 and len(body) > 40, p.stderr
    assert "  | main-menu: INFO: Menu item 'x' selected" in p.stderr
    assert "<private key removed" in p.stderr
    assert body[:30] not in p.stderr and body[-30:] not in p.stderr


def test_private_keys_in_a_log_record_are_not_printed():
    p = run_script("""
        import builder.cli as cli, builder.pipeline as pipeline, logging
        from builder.ssh import generate_keypair

        pem = generate_keypair("h").private_openssh
        print(pem.splitlines()[1])

        def clean(all_downloads=False, image=None):
            logging.getLogger("builder.test").warning("ansible said: %s", pem)
            return []

        pipeline.clean = clean
        raise SystemExit(cli.main(["clean"]))
    """)
    body = p.stdout.strip()
    assert p.returncode == 0 and len(body) > 40, p.stderr
    assert "ansible said: <private key removed>" in p.stderr and body[:30] not in p.stderr
