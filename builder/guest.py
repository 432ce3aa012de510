"""Stages 5–6: boot the installed disk, reach it over SSH (pinned host key), provision it with Ansible, then
clean it for a cloud image, trim it and power it off. One boot does all of it.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

from .config import ImageConfig
from .errors import SshError, VmError
from .events import Emitter
from .provision import Target, run_playbook
from .ssh import KeyPair, known_hosts_line, run_command, wait_for_ssh
from .vm import open_machine
from .vm.guestnet import gateway_service
from .vm.net import find_free_port
from .vm.spec import Drive, VmSpec

log = logging.getLogger(__name__)

FACTS = ("cat /etc/debian_version; uname -r; findmnt -n -o SOURCE,SIZE,FSTYPE /; "
         "systemctl is-enabled cloud-init-main.service cloud-init-local.service | tr '\\n' ' '")


def apt_sources(cfg: ImageConfig) -> str:
    """The image's final apt sources (deb822): the configured mirrors, not the build's gateway."""
    comps = " ".join(cfg.debian.components)
    s = cfg.debian.suite
    return (
        f"Types: deb\nURIs: {cfg.debian.mirror}\nSuites: {s} {s}-updates\nComponents: {comps}\n"
        f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {cfg.debian.security_mirror}\nSuites: {s}-security\nComponents: {comps}\n"
        f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def repoint_apt(port: int) -> str:
    """Shell: point the guest's apt sources at the gateway on ``port`` (where an earlier build's port is)."""
    return ("for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do [ -f \"$f\" ] && "
            f"sed -i -E 's#http://10[.]0[.]2[.]2:[0-9]+/#http://10.0.2.2:{port}/#g' \"$f\"; done; true")


def hygiene_script(cfg: ImageConfig) -> str:
    """Shell run as root just before power-off: what a published cloud image must not carry."""
    user = shlex.quote(cfg.installer.build_user)
    sources = apt_sources(cfg)
    return f"""set -eu
export DEBIAN_FRONTEND=noninteractive
# apt: point at the real mirrors, not the build's gateway; no proxy; no caches or lists
rm -f /etc/apt/sources.list /etc/apt/apt.conf.d/*proxy* /etc/apt/apt.conf.d/00builder*
cat > /etc/apt/sources.list.d/debian.sources <<'SRC'
{sources}SRC
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# identity: a clone must not share machine-id, SSH host keys or cloud-init state
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
mkdir -p /etc/systemd/system/ssh.service.d
printf '[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/ssh-keygen -A\\nExecStartPre=/usr/sbin/sshd -t\\n' \\
  > /etc/systemd/system/ssh.service.d/10-hostkeys.conf
cloud-init clean --logs --seed || true
rm -f /etc/cloud/cloud-init.disabled   # the build kept cloud-init off; the image runs it on first boot
# DKMS's module-signing key: every clone would share the private key (DKMS makes a new one when needed)
rm -f /var/lib/dkms/mok.key /var/lib/dkms/mok.pub
# logs and shell history
find /var/log -type f \\( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \\) -delete
find /var/log -type f -exec truncate -s 0 {{}} +
rm -rf /var/log/journal/* /var/log/installer /tmp/* /var/tmp/* /root/.bash_history /root/.ansible
# the build user and its sudo rule
rm -f /etc/sudoers.d/*builder*
userdel -f -r {user} 2>/dev/null || true
sync
fstrim -av || true
"""


def provision_spec(cfg: ImageConfig, disk: Path, workdir: Path, accel: str, port: int, gateway_port: int) -> VmSpec:
    return VmSpec(
        name=f"{cfg.name}-provision", memory_mib=cfg.provision.memory >> 20, cpus=cfg.vm.cpus,
        accel=accel,  # type: ignore[arg-type]
        drives=(Drive(disk, discard=True),), boot="disk", serial_log=workdir / "provision.serial.log",
        ssh_forward=port, no_reboot=False, guest_services=(gateway_service(gateway_port),),
    )


def boot_and_provision(
    cfg: ImageConfig, disk: Path, *, workdir: Path, accel: str, client_key: KeyPair, host_key: KeyPair,
    emitter: Emitter, gateway_port: int, ssh_timeout: float = 900,
) -> dict[str, Any]:
    """Boot ``disk``, provision it, clean it, power it off. Returns facts and timings for the manifest."""
    port = find_free_port()
    spec = provision_spec(cfg, disk, workdir, accel, port, gateway_port)
    user = cfg.installer.build_user
    key_path, _ = client_key.write(workdir, "build_key")
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(known_hosts_line("127.0.0.1", port, host_key.public_openssh) + "\n")
    out: dict[str, Any] = {}
    with open_machine(spec, workdir, backend=cfg.vm.backend, libvirt_uri=cfg.vm.libvirt_uri) as vm:
        t0 = time.monotonic()
        vm.start()
        emitter.info("waiting for SSH on the installed system")
        client = wait_for_ssh("127.0.0.1", port, user, client_key, host_key.public_openssh, timeout=ssh_timeout,
                              is_alive=vm.is_running)
        out["ssh_seconds"] = round(time.monotonic() - t0, 1)
        try:
            _, facts, _ = run_command(client, FACTS, check=False)
            out["facts"] = facts.strip().splitlines()
            emitter.info(f"SSH up after {out['ssh_seconds']} s: " + " | ".join(out["facts"]))
            if cfg.provision.enabled:
                t1 = time.monotonic()
                target = Target("127.0.0.1", port, user, key_path, known_hosts)
                res = run_playbook(
                    cfg.resolve(cfg.provision.playbook), target,
                    roles_path=[cfg.resolve(p) for p in cfg.provision.roles_path],
                    extra_vars=cfg.provision.extra_vars, workdir=workdir,
                    task_timeout=cfg.provision.task_timeout, timeout=cfg.provision.timeout,
                    on_event=lambda ev: _ansible_progress(ev, emitter),
                )
                out["ansible"] = {"seconds": round(time.monotonic() - t1, 1), "changed": res.changed,
                                  "status": res.status}
            else:
                emitter.skip("ansible", "provision.enabled is false")
            _, pkgs, _ = run_command(client, "dpkg-query -W -f '${Package} ${Version}\\n'", check=True)
            (workdir / "packages.txt").write_text(pkgs)
            out["packages"] = len(pkgs.splitlines())
            emitter.info("cleaning the image (apt, identity, logs, build user), trimming")
            script = hygiene_script(cfg)
            run_command(client, f"sudo sh -c {shlex.quote(script)}", timeout=900, check=True)
            run_command(client, "sudo systemctl poweroff", timeout=30, check=False)
        except SshError:
            if not vm.is_running():
                raise VmError("the build VM died during provisioning", log_tail=vm.serial_tail(20)) from None
            raise
        finally:
            client.close()
        rc = vm.wait(300)
        if rc is None:
            emitter.warning("the guest did not power off in 300 s; stopping it")
            vm.shutdown(60)
    return out


def _ansible_progress(ev: dict[str, Any], emitter: Emitter) -> None:
    data = ev.get("event_data", {})
    if ev.get("event") == "playbook_on_task_start":
        emitter.info(f"ansible: {data.get('task', '')}")
