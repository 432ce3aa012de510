"""The preseed: rendered from the default image config, checked with d-i's rules and the real debconf parser."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder.config import ImageConfig, install_packages, load_config
from builder.errors import ConfigError, MediaError
from builder.image import ESP_TYPE
from builder.installer import preseed as ps
from builder.installer.preseed import (
    PreseedContext,
    check_preseed_syntax,
    installer_cmdline,
    lint_preseed,
    render_preseed,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "images" / "cloud-gpu-worker.yaml"
needs_debconf = pytest.mark.skipif(shutil.which("debconf-set-selections") is None, reason="debconf not installed")


def _keypair(comment: str = "") -> tuple[str, str]:
    k = Ed25519PrivateKey.generate()
    pem = k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    pub = k.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return pem, (pub + " " + comment).strip()


@pytest.fixture(scope="module")
def config() -> ImageConfig:
    return load_config(IMAGE, ["provision.enabled=false"])


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    host_priv, host_pub = _keypair("builder-host")
    _client_priv, client_pub = _keypair("builder@build")
    return {"host_key_private": host_priv, "host_key_public": host_pub, "authorized_key": client_pub}


@pytest.fixture(scope="module")
def ctx(config: ImageConfig, keys: dict[str, str]) -> PreseedContext:
    return PreseedContext(config=config, mirror_host="10.0.2.2:38123", security_host="10.0.2.2:38123",
                          udeb_suite="builder-0123abcd", **keys)


@pytest.fixture(scope="module")
def text(ctx: PreseedContext) -> str:
    return render_preseed(ctx)


def settings(text: str) -> dict[str, tuple[str, str]]:
    """'owner question' → (type, value), read the way d-i reads the file."""
    out = {}
    for _no, line in ps._logical_lines(text):
        owner, question, qtype, *rest = line.split(None, 3)
        out[f"{owner} {question}"] = (qtype, rest[0] if rest else "")
    return out


def value(text: str, question: str, owner: str = "d-i") -> str:
    return settings(text)[f"{owner} {question}"][1]


def test_renders_the_important_answers(text: str, config: ImageConfig) -> None:
    s = settings(text)
    expect = {
        "d-i debian-installer/locale": ("string", "en_US.UTF-8"),
        "d-i debian-installer/language": ("string", "en"),
        "d-i debian-installer/country": ("string", "US"),
        "d-i keyboard-configuration/xkb-keymap": ("select", "us"),
        "d-i time/zone": ("string", "UTC"),
        "d-i netcfg/choose_interface": ("select", "auto"),
        "d-i netcfg/get_hostname": ("string", "gpu-worker"),
        "d-i netcfg/hostname": ("string", "gpu-worker"),
        "d-i netcfg/get_domain": ("string", ""),
        "d-i netcfg/target_network_config": ("select", "loopback"),
        "d-i mirror/country": ("string", "manual"),
        "d-i mirror/protocol": ("string", "http"),
        "d-i mirror/http/hostname": ("string", "10.0.2.2:38123"),
        "d-i mirror/http/directory": ("string", "/debian"),
        "d-i mirror/http/proxy": ("string", ""),
        "d-i mirror/suite": ("string", "trixie"),
        "d-i mirror/udeb/suite": ("string", "builder-0123abcd"),
        "d-i apt-setup/contrib": ("boolean", "true"),
        "d-i apt-setup/non-free": ("boolean", "true"),
        "d-i apt-setup/non-free-firmware": ("boolean", "true"),
        "d-i apt-setup/services-select": ("multiselect", "security, updates"),
        "d-i apt-setup/security_host": ("string", "10.0.2.2:38123"),
        "d-i apt-setup/enable-source-repositories": ("boolean", "false"),
        "popularity-contest popularity-contest/participate": ("boolean", "false"),
        "d-i passwd/root-login": ("boolean", "false"),
        "d-i passwd/make-user": ("boolean", "true"),
        "d-i passwd/username": ("string", "builder"),
        "d-i passwd/user-password-crypted": ("password", "!"),
        "d-i partman-auto/disk": ("string", "/dev/vda"),
        "d-i partman-auto/method": ("string", "regular"),
        "d-i partman-partitioning/confirm_write_new_label": ("boolean", "true"),
        "d-i partman-basicfilesystems/no_swap": ("boolean", "false"),
        "d-i partman/choose_partition": ("select", "finish"),
        "d-i partman/confirm": ("boolean", "true"),
        "d-i partman/confirm_nooverwrite": ("boolean", "true"),
        "d-i grub-installer/bootdev": ("string", "/dev/vda"),
        "d-i base-installer/kernel/image": ("string", "linux-image-amd64"),
        "d-i base-installer/install-recommends": ("boolean", "false"),
        "d-i pkgsel/run_tasksel": ("boolean", "false"),
        "tasksel tasksel/first": ("multiselect", ""),
        "d-i pkgsel/upgrade": ("select", "full-upgrade"),
        "d-i pkgsel/install-language-support": ("boolean", "false"),
        "d-i finish-install/reboot_in_progress": ("note", ""),
        "d-i debian-installer/exit/poweroff": ("boolean", "true"),
    }
    for key, want in expect.items():
        assert s.get(key) == want, key
    assert value(text, "pkgsel/include").split() == list(install_packages(config))
    assert "openssh-server" in value(text, "pkgsel/include").split()
    assert "d-i passwd/root-password" not in s and "d-i passwd/user-password" not in s


@pytest.mark.parametrize("boot", ["hybrid", "uefi", "bios"])
def test_partitioning_per_boot_mode(boot: str, keys: dict[str, str]) -> None:
    """Each disk.boot renders its layout, passes d-i's syntax check, and keeps one ext4 root last, no swap."""
    cfg = load_config(IMAGE, ["provision.enabled=false", f"disk.boot={boot}"])
    text = render_preseed(PreseedContext(config=cfg, mirror_host="10.0.2.2:38123", security_host="10.0.2.2:38123",
                                         udeb_suite="builder-0123abcd", **keys))
    ps.check_preseed_syntax(text)
    recipe = value(text, "partman-auto/expert_recipe")
    parts = [p.strip() for p in recipe.split(" . ") if p.strip()]
    assert "filesystem{ ext4 }" in parts[-1] and "mountpoint{ / }" in parts[-1] and " -1 ext4 " in parts[-1]
    assert "swap" not in recipe
    assert sum("mountpoint{ / }" in p for p in parts) == 1
    label = value(text, "partman-partitioning/choose_label")
    late = value(text, "preseed/late_command")
    biosgrub = [p for p in parts if "method{ biosgrub }" in p]
    esp = [p for p in parts if "method{ efi }" in p]
    if boot == "bios":
        assert label == "msdos" and not esp
        assert len(biosgrub) == 1 and "$iflabel{ gpt }" in biosgrub[0]  # only on disks above 2 TiB
        assert "boot-loader" not in late and "grub2/force_efi_extra_removable" not in text
    else:
        assert label == "gpt" and len(esp) == 1 and f"{ps.ESP_MB} {ps.ESP_MB} {ps.ESP_MB} fat32" in esp[0]
        assert value(text, "partman-efi/non_efi_system") == "true"
        assert value(text, "grub-installer/force-efi-extra-removable") == "true"
        assert value(text, "grub2/force_efi_extra_removable", owner="grub-efi-amd64") == "true"
        assert value(text, "grub2/update_nvram", owner="grub-efi-amd64") == "false"
        assert "test -s /target/boot/efi/EFI/BOOT/BOOTX64.EFI" in late
        # fsck.vfat for the ESP (fstab pass 1): partman installs dosfstools only when it formats the FAT itself
        assert re.search(r"apt-get [^;]* install [^;]*\bdosfstools\b", late)
        if boot == "hybrid":  # BIOS boot partition first, then the ESP, the root last
            assert len(biosgrub) == 1 and parts.index(biosgrub[0]) < parts.index(esp[0])
            assert "grub-cloud-amd64" in late and "/target/etc/grub.d/enable_cloud" in late
        else:
            assert not biosgrub and "--force-extra-removable" in late and "grub-cloud-amd64" not in late
    assert late.index("step boot-loader" if boot != "bios" else "step grub") <= late.index("step grub")


@pytest.mark.parametrize(("boot", "firmware"), [("uefi", "bios"), ("bios", "uefi")])
def test_firmware_that_cannot_install_the_disk_is_refused(boot: str, firmware: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(IMAGE, [f"disk.boot={boot}", f"vm.firmware={firmware}"])
    assert "vm.firmware" in str(exc.value) and boot in str(exc.value)


def _bios_hybrid(keys: dict[str, str]) -> str:
    cfg = load_config(IMAGE, ["provision.enabled=false", "disk.boot=hybrid", "vm.firmware=bios"])
    assert cfg.build_firmware == "bios"
    return render_preseed(PreseedContext(config=cfg, mirror_host="10.0.2.2:38123", security_host="10.0.2.2:38123",
                                         udeb_suite="builder-0123abcd", **keys))


def test_hybrid_disk_from_a_bios_installer(keys: dict[str, str]) -> None:
    """Under BIOS partman makes no ESP: a FAT32 /boot/efi partition is made instead and late_command gives it the
    ESP's type, name and fstab options, and swaps grub-pc for grub-efi-amd64 before grub-cloud-amd64 runs."""
    text = _bios_hybrid(keys)
    ps.check_preseed_syntax(text)
    parts = [p.strip() for p in value(text, "partman-auto/expert_recipe").split(" . ") if p.strip()]
    assert "method{ efi }" not in text
    assert "method{ biosgrub }" in parts[0] and "mountpoint{ / }" in parts[2]
    esp = parts[1]
    assert f"{ps.ESP_MB} {ps.ESP_MB} {ps.ESP_MB} fat32" in esp
    assert "filesystem{ fat32 }" in esp and "mountpoint{ /boot/efi }" in esp and "format{ }" in esp
    assert value(text, "partman-partitioning/choose_label") == "gpt"
    late = value(text, "preseed/late_command")
    assert f"sfdisk --no-reread --no-tell-kernel --part-type /dev/vda 2 {ESP_TYPE}" in late
    assert "--part-label /dev/vda 2 'EFI System Partition'" in late
    assert "dpkg --purge grub-pc" in late and "install grub-efi-amd64 gdisk mokutil" in late
    order = [late.index(k) for k in ("step kernel", "step esp", "step grub-efi", "step boot-loader", "step grub;")]
    assert order == sorted(order)
    # the UEFI installer's preseed has none of it
    uefi = value(render_preseed(PreseedContext(
        config=load_config(IMAGE, ["provision.enabled=false"]), mirror_host="10.0.2.2:38123",
        security_host="10.0.2.2:38123", udeb_suite="builder-0123abcd", **keys)), "preseed/late_command")
    assert "step esp" not in uefi and "grub-pc" not in uefi and "sfdisk" not in uefi


def test_bios_installer_fstab_rewrite(keys: dict[str, str], tmp_path: Path) -> None:
    """The fstab step of the BIOS path, run by a real shell and awk on an fstab as partman writes it: the /boot/efi
    line becomes partman-efi's, in the same columns, and nothing else changes."""
    late = value(_bios_hybrid(keys), "preseed/late_command")
    segment = late[late.index("step esp;") + len("step esp;"):late.index("step grub-efi;")]
    assert segment.count("/target/etc/fstab") == 3
    fstab = tmp_path / "fstab"
    head = ("# /etc/fstab: static file system information.\n"
            "# / was on /dev/vda3 during installation\n"
            "UUID=71e9fd68-ae86-4391-b428-a67e1bc11bc3 /               ext4    errors=remount-ro 0       1\n"
            "# /boot/efi was on /dev/vda2 during installation\n")
    fstab.write_text(head + "UUID=04BC-127A  /boot/efi       vfat    defaults        0       2\n"
                     "/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto     0       0\n")
    calls = tmp_path / "in-target.log"
    # in-target (d-i's chroot wrapper) only records its arguments here: there is no /target to run sfdisk in
    script = (f"in-target() {{ echo \"$*\" >> {calls}; }}; " + segment.replace("/target/etc/fstab", str(fstab))
              .replace("/tmp/builder.fstab", str(tmp_path / "new")))
    subprocess.run(["bash", "-ec", script], check=True)
    assert calls.read_text().splitlines() == [
        f"sfdisk --no-reread --no-tell-kernel --part-type /dev/vda 2 {ESP_TYPE}",
        "sfdisk --no-reread --no-tell-kernel --part-label /dev/vda 2 EFI System Partition"]
    assert fstab.read_text() == head + (
        "UUID=04BC-127A  /boot/efi       vfat    umask=0077      0       1\n"
        "/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto     0       0\n")
    # an fstab without the ESP fails the check (set -e ends late_command there)
    fstab.write_text(head)
    assert subprocess.run(["bash", "-ec", script]).returncode != 0


def test_auto_firmware_follows_the_disk() -> None:
    assert load_config(IMAGE).build_firmware == "uefi"
    assert load_config(IMAGE, ["disk.boot=bios"]).build_firmware == "bios"
    assert load_config(IMAGE, ["disk.boot=uefi", "vm.firmware=uefi"]).build_firmware == "uefi"


def test_never_unauthenticated(text: str) -> None:
    assert "allow_unauthenticated" not in text
    assert "no-check-gpg" not in text
    assert "trusted=yes" not in text


def test_early_commands_write_milestones(text: str) -> None:
    early = value(text, "preseed/early_command")
    assert "> /dev/ttyS0" in early and "logger -t builder" in early and "preseed loaded" in early
    # d-i logs a command's text before running it: that log line must not contain the marker itself
    assert "BUILDER" not in early and "MARK=B''UILDER" in early
    assert "&" not in early  # nothing in the background (it would have to close its fds)
    assert "BUILDER" not in value(text, "partman/early_command")


def test_late_command(text: str, keys: dict[str, str]) -> None:
    late = value(text, "preseed/late_command")
    assert late.startswith("set -e;")
    assert "BUILDER" not in late and 'M late_command "done"' in late
    assert late.rstrip().endswith('M late_command "done"')
    # the pinned host key is the only one
    assert "rm -f /target/etc/ssh/ssh_host_*_key /target/etc/ssh/ssh_host_*_key.pub" in late
    for line in keys["host_key_private"].strip().splitlines():
        assert f"echo '{line}'" in late
    assert f"echo '{keys['host_key_public']}' ) > /target/etc/ssh/ssh_host_ed25519_key.pub" in late
    assert "chmod 0600 /target/etc/ssh/ssh_host_ed25519_key;" in late
    # the build user's key, its modes and owner
    assert f"echo '{keys['authorized_key']}' ) > /target/home/builder/.ssh/authorized_keys" in late
    assert "chmod 0600 /target/home/builder/.ssh/authorized_keys" in late
    assert "chmod 0700 /target/home/builder/.ssh" in late
    assert "in-target chown -R builder: /home/builder/.ssh" in late
    # sudo, cloud-init kept off, kernel, grub: only what the build needs to reach SSH
    assert "echo 'builder ALL=(ALL:ALL) NOPASSWD: ALL' ) > /target/etc/sudoers.d/90-builder" in late
    assert "chmod 0440 /target/etc/sudoers.d/90-builder" in late and "visudo -cf" in late
    assert f"touch /target{ps.CLOUD_INIT_DISABLED}" in late
    # what shapes the image is the roles': sshd, cloud-init, networking are not written here
    for owned_by_roles in ("sshd_config", "PermitRootLogin", "PasswordAuthentication", "manage_etc_hosts",
                           "datasource_list", "/etc/network/interfaces", "cloud.cfg.d"):
        assert owned_by_roles not in late, owned_by_roles
    assert "linux-version sort" in late and "apt-get -y purge" in late
    assert "/usr/lib/modules/$v/build" in late  # headers checked: linux-headers-amd64 is in the packages
    assert """echo 'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"'""" in late
    assert """echo 'GRUB_TERMINAL="console serial"'""" in late
    assert "in-target update-grub" in late
    assert "grep -qF -- 'console=tty0 console=ttyS0,115200' /target/boot/grub/grub.cfg" in late
    # no backslashes in values (only line continuations), no printf escapes
    assert "\\" not in late


def test_lint_is_clean(text: str) -> None:
    assert lint_preseed(text) == []


@pytest.mark.integration
@needs_debconf
def test_debconf_set_selections_accepts_it(text: str) -> None:
    check_preseed_syntax(text)


@pytest.mark.integration
@needs_debconf
def test_a_broken_line_names_the_line(text: str) -> None:
    lines = text.split("\n")
    no = next(i for i, ln in enumerate(lines) if ln.startswith("d-i time/zone"))
    lines[no] = "d-i time/zone"  # no type
    with pytest.raises(MediaError, match=rf"preseed line {no + 1}\b.*time/zone"):
        check_preseed_syntax("\n".join(lines))


@needs_debconf
@pytest.mark.integration
def test_debconf_finds_what_the_lint_cannot_see(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bypass the lint to show the real parser's error path.
    monkeypatch.setattr(ps, "lint_preseed", lambda _t: [])
    with pytest.raises(MediaError, match=r"preseed line 2: debconf-set-selections: parse error"):
        check_preseed_syntax("d-i time/zone string UTC\nd-i broken\n")


@needs_debconf
@pytest.mark.integration
def test_debconf_warnings_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # debconf-set-selections only warns about an unknown type, and skips the line: for us that is fatal.
    monkeypatch.setattr(ps, "lint_preseed", lambda _t: [])
    with pytest.raises(MediaError, match=r"preseed line 2: .*Unknown type strng"):
        check_preseed_syntax("d-i time/zone string UTC\nd-i clock-setup/utc strng true\n")


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        (["d-i time/zone string UTC", "  # indented comment"], "indented comment"),
        (["d-i preseed/late_command string \\", "", "  true"], "followed by a blank"),
        (["d-i preseed/late_command string \\", "# c", "  true"], "followed by a blank or comment"),
        (["d-i time/zone strng UTC"], "unknown type"),
        (["d-i clock-setup/utc boolean yes"], "true or false"),
        (["d-i time/zone string UTC", "d-i time/zone string CET"], "set twice"),
        (["d-i debian-installer/allow_unauthenticated boolean true"], "never allowed"),
        (["d-i time/zone"], "expected"),
    ],
)
def test_lint_catches(lines: list[str], why: str) -> None:
    problems = lint_preseed("\n".join(lines) + "\n")
    assert problems and why in problems[0][1]
    with pytest.raises(MediaError, match=why):
        check_preseed_syntax("\n".join(lines) + "\n")


def test_without_keys_the_key_steps_are_left_out(config: ImageConfig) -> None:
    text = render_preseed(PreseedContext(config=config, mirror_host="10.0.2.2:8000"))
    late = value(text, "preseed/late_command")
    assert "ssh_host_ed25519_key" not in late and "authorized_keys" not in late
    assert "mirror/udeb/suite" not in text  # "" = the suite itself
    assert value(text, "apt-setup/security_host") == "10.0.2.2:8000"  # defaults to the mirror host
    assert lint_preseed(text) == []


def test_config_values_follow(config: ImageConfig) -> None:
    cfg = config.model_copy(update={
        "installer": config.installer.model_copy(update={
            "locale": "de_DE.UTF-8", "keymap": "de(nodeadkeys)", "timezone": "Europe/Berlin",
            "domain": "example.org", "install_recommends": True, "build_user": "bob",
            "kernel_cmdline": ("console=ttyS1,38400", "nvidia-drm.modeset=1"),
        }),
        "debian": config.debian.model_copy(update={"components": ("main", "non-free-firmware")}),
    })
    text = render_preseed(PreseedContext(config=cfg, mirror_host="gw.example:80", mirror_dir="/mirror/debian/"))
    s = settings(text)
    assert s["d-i debian-installer/language"] == ("string", "de")
    assert s["d-i debian-installer/country"] == ("string", "DE")
    assert s["d-i keyboard-configuration/xkb-keymap"] == ("select", "de(nodeadkeys)")
    assert s["d-i time/zone"] == ("string", "Europe/Berlin")
    assert s["d-i netcfg/get_domain"] == ("string", "example.org")
    assert s["d-i base-installer/install-recommends"] == ("boolean", "true")
    assert s["d-i apt-setup/contrib"] == ("boolean", "false")
    assert s["d-i apt-setup/non-free"] == ("boolean", "false")
    assert s["d-i apt-setup/non-free-firmware"] == ("boolean", "true")
    assert s["d-i mirror/http/directory"] == ("string", "/mirror/debian")
    assert s["d-i passwd/username"] == ("string", "bob")
    late = s["d-i preseed/late_command"][1]
    assert "bob ALL=(ALL:ALL) NOPASSWD: ALL" in late
    assert 'GRUB_SERIAL_COMMAND="serial --unit=1 --speed=38400"' in late
    assert 'GRUB_CMDLINE_LINUX="console=ttyS1,38400 nvidia-drm.modeset=1"' in late
    assert lint_preseed(text) == []


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("mirror_host", "10.0.2.2:80/x"),
        ("mirror_host", "host name"),
        ("security_dir", "/security"),
        ("udeb_suite", "a b"),
        ("log_marker", "B"),
        ("log_marker", "A B"),
        ("authorized_key", "ssh-ed25519 notbase64!"),
        ("authorized_key", "ssh-dss AAAAB3NzaC1kc3M="),
    ],
)
def test_bad_context_values_are_config_errors(ctx: PreseedContext, field: str, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        render_preseed(replace(ctx, **{field: bad}))
    assert any(p.startswith("preseed.") for p, _m in err.value.problems)


def test_host_key_pair_is_checked(ctx: PreseedContext) -> None:
    _other_priv, other_pub = _keypair()
    with pytest.raises(ConfigError, match="does not belong"):
        render_preseed(replace(ctx, host_key_public=other_pub))
    with pytest.raises(ConfigError, match="both"):
        render_preseed(replace(ctx, host_key_public=""))
    with pytest.raises(ConfigError, match="OpenSSH private key"):
        rsa = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----"
        render_preseed(replace(ctx, host_key_private=rsa))


def test_a_quote_in_a_key_comment_is_refused(ctx: PreseedContext) -> None:
    with pytest.raises(ConfigError, match="comment"):
        render_preseed(replace(ctx, authorized_key=ctx.authorized_key + " it's"))


def test_render_is_pure_and_deterministic(ctx: PreseedContext) -> None:
    assert render_preseed(ctx) == render_preseed(ctx)


def test_template_errors_are_config_errors(tmp_path: Path, ctx: PreseedContext) -> None:
    (tmp_path / "preseed.cfg.j2").write_text("d-i time/zone string {{ no_such_value }}\n")
    with pytest.raises(ConfigError, match="template error"):
        render_preseed(ctx, template_dir=tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        render_preseed(ctx, template_dir=tmp_path / "missing")


def test_installer_cmdline(ctx: PreseedContext, config: ImageConfig) -> None:
    line = installer_cmdline(ctx, log_port=40514)
    assert line == (
        "auto=true priority=critical DEBIAN_FRONTEND=text console=ttyS0,115200n8 "
        "log_host=10.0.2.2 log_port=40514 --- console=tty0 console=ttyS0,115200"
    )
    assert installer_cmdline(config, log_port=1, extra=["netcfg/dhcp_timeout=60"]).split(" --- ")[0].endswith(
        "log_port=1 netcfg/dhcp_timeout=60")
    for bad in (0, 70000, True):
        with pytest.raises(ConfigError):
            installer_cmdline(ctx, log_port=bad)
    with pytest.raises(ConfigError):
        installer_cmdline(ctx, log_port=9, extra=["a b"])
