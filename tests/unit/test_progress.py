from builder.installer.progress import InstallTracker, console_question, parse_syslog_line


def test_parse_syslog_line():
    r = parse_syslog_line("<13>Nov 30 08:50:01 anna[1234]: DEBUG: retrieving nic-modules")
    assert r.program == "anna" and r.message == "DEBUG: retrieving nic-modules"
    r = parse_syslog_line("<14>Nov  3 08:50:01 main-menu[300]: INFO: Menu item 'partman-base' selected")
    assert r.program == "main-menu" and "partman-base" in r.message
    assert parse_syslog_line("garbage").program == ""


def test_tracker_steps_and_failure():
    steps = []
    t = InstallTracker(on_step=steps.append)
    for line in ("<14>Nov 30 08:50:01 main-menu[3]: INFO: Menu item 'download-installer' selected",
                 "<13>Nov 30 08:50:02 anna[9]: DEBUG: retrieving e2fsprogs-udeb 1.47",
                 "<14>Nov 30 08:51:00 main-menu[3]: INFO: Menu item 'bootstrap-base' selected",
                 "<13>Nov 30 08:52:00 in-target: Setting up curl (8.14.1-2) ...",
                 "<13>Nov 30 08:53:00 main-menu[3]: WARNING **: Configuring 'pkgsel' failed with error code 1"):
        t.feed(parse_syslog_line(line))
    assert steps == ["download installer components", "install base system"]
    assert t.udebs == 1 and t.packages == 1
    assert t.failed_step == "pkgsel" and not t.finished


def test_tracker_finish_marker():
    t = InstallTracker()
    t.feed(parse_syslog_line("<13>Nov 30 09:00:00 log-output: BUILDER late_command done"))
    assert t.finished and t.milestones == ["late_command done"]


def test_console_question():
    serial = ("junk\n  [!!] Configure the package manager\n\n  The installer failed to access the mirror.\n"
              "Go back? [yes/no]\nPrompt: '?' for help, default=yes> ")
    q = console_question(serial)
    assert q is not None and "Configure the package manager" in q and "failed to access the mirror" in q
    assert console_question("booting...\n") is None


def test_console_error_note():
    serial = ("!! ERROR: Architecture not supported\nThe specified Debian archive mirror does not seem to support "
              "your architecture.\nPlease try a different mirror.\n[Press enter to continue] ")
    q = console_question(serial)
    assert q is not None and "Architecture not supported" in q
