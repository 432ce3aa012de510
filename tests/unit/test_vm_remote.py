"""Remote libvirt hosts, the pure parts: URI parsing, host choice, volume names and the stale-volume sweep,
the files a domain needs, the spec as the remote host runs it, the remote domain XML, the config."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from builder.config import dump_config, load_config
from builder.errors import ConfigError, VmError
from builder.stages.install import install_spec
from builder.vm.firmware import Firmware
from builder.vm.guestnet import gateway_service
from builder.vm.libvirt import QEMU_NS, domain_xml
from builder.vm.remote import (
    RemoteHost,
    assign_uris,
    is_local,
    local_files,
    parse_remote_uri,
    pick_uri,
    public_uri,
    remote_spec,
    stale_volumes,
    volume_name,
    volume_prefix,
)
from builder.vm.spec import Drive, VmSpec


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu:///session", "qemu+unix:///system", "qemu+ssh:///system"])
def test_local_uris_have_no_remote_host(uri: str) -> None:
    assert parse_remote_uri(uri) is None and is_local(uri)


def test_ssh_uri_with_everything() -> None:
    uri = "qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k/id_ed25519&no_verify=1"
    h = parse_remote_uri(uri)
    assert h == RemoteHost(uri=uri, host="127.0.0.1", port=2222, user="root", keyfile="/k/id_ed25519",
                           no_verify=True, known_hosts=None, path="/system")
    assert h.label == "root@127.0.0.1:2222" and not is_local(uri)
    assert h.domain_log("inst") == "/var/log/libvirt/qemu/inst.log"


def test_ssh_uri_defaults_and_session() -> None:
    h = parse_remote_uri("qemu+ssh://gpu1.example/session?known_hosts=/kh&no_verify=0")
    assert h is not None
    assert (h.host, h.port, h.user, h.keyfile, h.no_verify, h.known_hosts) == ("gpu1.example", None, None, None,
                                                                               False, "/kh")
    assert h.label == "gpu1.example:22"
    assert h.domain_log("p") == "~/.cache/libvirt/qemu/log/p.log"
    v6 = parse_remote_uri("qemu+libssh2://me@[::1]:22/system")
    assert v6 is not None and (v6.host, v6.user) == ("::1", "me")


@pytest.mark.parametrize("uri", ["qemu+tcp://gpu1/system", "qemu+tls://gpu1/system", "qemu://gpu1/system",
                                 "xen+ssh://gpu1/system"])
def test_remote_uris_other_than_ssh_are_refused(uri: str) -> None:
    with pytest.raises(VmError, match="over SSH only") as info:
        parse_remote_uri(uri)
    assert "qemu+ssh://" in (info.value.hint or "")


def test_pick_uri_is_stable_and_spreads() -> None:
    hosts = ["qemu+ssh://a/system", "qemu+ssh://b/system", "qemu+ssh://c/system"]
    assert pick_uri(hosts[:1], "x") == hosts[0]
    picks = {name: pick_uri(hosts, name) for name in (f"variant-{i}" for i in range(12))}
    assert picks == {name: pick_uri(hosts, name) for name in picks}  # the same image, the same host
    assert len(set(picks.values())) > 1
    with pytest.raises(VmError):
        pick_uri([], "x")


def test_assign_uris_spreads_variants_in_sorted_order_around_pins() -> None:
    hosts = ["qemu+ssh://a/system", "qemu+ssh://b/system"]
    a, b = hosts
    free = dict.fromkeys(["z", "y", "x"])
    assert assign_uris(hosts, free) == {"z": a, "y": b, "x": a}  # x, y, z round-robin
    assert list(assign_uris(hosts, free)) == ["z", "y", "x"]  # the caller's order back
    assert assign_uris(hosts, {**free, "z": (b,)}) == {"z": b, "y": a, "x": a}  # pinned first, then fewest
    # a choice of its own: the least loaded of those
    assert assign_uris(hosts, {"x": None, "y": (a, b)}) == {"x": a, "y": b}
    assert assign_uris(hosts[:1], free) == dict.fromkeys(free, a)
    with pytest.raises(VmError):
        assign_uris([], free)


@pytest.mark.parametrize(("uri", "shown"), [
    ("qemu+ssh://root@gpu1.example/system?keyfile=/home/me/.ssh/id&no_verify=1", "qemu+ssh://root@gpu1.example/system"),
    ("qemu+ssh://me:secret@[::1]:2222/system", "qemu+ssh://me@[::1]:2222/system"),
    ("qemu+ssh://gpu1/session?known_hosts=/kh", "qemu+ssh://gpu1/session"),
    ("qemu:///system", "qemu:///system"),
])
def test_public_uri_drops_the_query_and_any_password(uri: str, shown: str) -> None:
    assert public_uri(uri) == shown


def test_vm_names_are_the_images_and_fit_a_spec() -> None:
    from builder.vm.spec import vm_name

    assert vm_name("cloud-gpu-worker-open", "verify") == "cloud-gpu-worker-open-verify"
    image = "w" * 60
    long_a, long_b = vm_name(f"{image}-a", "provision"), vm_name(f"{image}-b", "provision")
    assert len(long_a) == 63 and long_a != long_b and long_a.startswith("www") and long_a.endswith("-provision")
    VmSpec(name=long_a, memory_mib=512, cpus=1, accel="tcg")  # valid


def test_volume_names() -> None:
    prefix = volume_prefix("cgw-install", "ab12cd", pid=4242, tag="0123abcd")
    assert prefix == "builder-0123abcd-4242-ab12cd-cgw-install"
    assert volume_name(prefix, 3, Path("/w/my disk+1.qcow2")) == f"{prefix}-3-my_disk_1.qcow2"


def test_stale_volume_sweep_only_takes_dead_runs_of_this_machine() -> None:
    names = [
        "builder-0123abcd-100-aa-x-0-disk.qcow2",  # this machine, dead
        "builder-0123abcd-200-bb-x-0-disk.qcow2",  # this machine, alive
        "builder-99999999-100-cc-x-0-disk.qcow2",  # another machine: its PIDs mean nothing here
        "debian13.qcow2",                          # not builder's
    ]
    assert stale_volumes(names, tag="0123abcd", alive={100: False, 200: True}) == [names[0]]


def test_the_sweep_spares_every_variant_of_the_running_build() -> None:
    """Parallel variants are threads of one process: one variant's sweep never takes another's volumes."""
    import os

    mine = [f"{volume_prefix(f'cgw-{v}-provision', tok, tag='0123abcd')}-0-disk.qcow2"
            for v, tok in (("open", "aa11bb"), ("current", "cc22dd"))]
    assert stale_volumes(mine, tag="0123abcd", alive={os.getpid(): False}) == []


def _uefi(tmp: Path) -> Firmware:
    return Firmware("uefi", tmp / "OVMF_CODE.fd", tmp / "vm.vars.fd")


def test_local_files_of_a_spec(tmp_path: Path) -> None:
    spec = VmSpec(name="p", memory_mib=1024, cpus=1, accel="tcg", firmware=_uefi(tmp_path),
                  kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd",
                  drives=(Drive(tmp_path / "disk.qcow2"), Drive.cdrom(tmp_path / "seed.iso"),
                          Drive(tmp_path / "disk.qcow2", readonly=True)))
    assert local_files(spec) == [tmp_path / n for n in ("OVMF_CODE.fd", "vm.vars.fd", "vmlinuz", "initrd",
                                                        "disk.qcow2", "seed.iso")]


def test_remote_spec_rewrites_paths_and_ports(tmp_path: Path) -> None:
    spec = VmSpec(name="p", memory_mib=1024, cpus=1, accel="tcg", firmware=_uefi(tmp_path),
                  drives=(Drive(tmp_path / "disk.qcow2", cache="unsafe"), Drive.cdrom(tmp_path / "i.iso")),
                  serial_log=tmp_path / "serial.log", ssh_forward=2222, extra_forwards=((8080, 80),),
                  guest_services=(gateway_service(40123),), udp_to_host=(5140,))
    pool = "/var/lib/libvirt/images"
    paths = {f: f"{pool}/v-{f.name}" for f in local_files(spec)}
    r = remote_spec(spec, paths, forwards={2222: 41001, 8080: 41002}, services={40123: 42000})
    assert [d.path for d in r.drives] == [Path(f"{pool}/v-disk.qcow2"), Path(f"{pool}/v-i.iso")]
    assert r.drives[0].cache == "unsafe" and r.drives[1].readonly
    assert (r.firmware.code, r.firmware.vars) == (Path(f"{pool}/v-OVMF_CODE.fd"), Path(f"{pool}/v-vm.vars.fd"))
    assert r.serial_log is None and r.ssh_forward == 41001 and r.extra_forwards == ((41002, 80),)
    assert r.guest_services == (gateway_service(42000),) and r.udp_to_host == (5140,)
    assert r.user_netdev("n") == ("user,id=n,hostfwd=tcp:127.0.0.1:41001-:22,hostfwd=tcp:127.0.0.1:41002-:80,"
                                  "guestfwd=tcp:10.0.2.100:80-cmd:socat STDIO TCP:127.0.0.1:42000")
    with pytest.raises(VmError, match="has no volume"):
        remote_spec(spec, {}, forwards={2222: 1, 8080: 2}, services={40123: 3})
    with pytest.raises(VmError, match="no tunnel"):
        remote_spec(spec, paths, forwards={}, services={40123: 3})


def test_remote_domain_xml_serial_goes_to_a_tunnel() -> None:
    spec = VmSpec(name="p", memory_mib=1024, cpus=1, accel="tcg", drives=(Drive(Path("/pool/d.qcow2")),),
                  ssh_forward=41001)
    root = ET.fromstring(domain_xml(spec, uri="qemu+ssh://root@h/system", serial_port=43210))
    devices = root.find("devices")
    assert devices is not None and devices.find("emulator") is None
    serial = devices.find("serial")
    assert serial is not None and serial.get("type") == "tcp"
    assert serial.find("source").attrib == {"mode": "connect", "host": "127.0.0.1",  # type: ignore[union-attr]
                                            "service": "43210"}
    assert serial.find("protocol").get("type") == "raw"  # type: ignore[union-attr]
    assert devices.find("disk/source").get("file") == "/pool/d.qcow2"  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert "hostfwd=tcp:127.0.0.1:41001-:22" in args[1]


def test_install_spec_names_the_syslog_port(tmp_path: Path) -> None:
    spec = install_spec(name="i", iso=tmp_path / "i.iso", disk=tmp_path / "d.qcow2", accel="tcg", cpus=1,
                        memory=2 << 30, workdir=tmp_path, gateway_port=4000, syslog_port=5140)
    assert spec.udp_to_host == (5140,)
    assert "5140" not in spec.user_netdev("n")  # slirp forwards it without being told
    with pytest.raises(VmError, match="out of range"):
        VmSpec(name="x", memory_mib=512, cpus=1, accel="tcg", udp_to_host=(70000,))


def test_config_hosts_pool_and_choice(repo: Path) -> None:
    image = repo / "images/cloud-gpu-worker.yaml"
    cfg = load_config(image)
    assert cfg.vm.libvirt_uris == ("qemu:///system",) and cfg.vm.libvirt_pool == "default"
    assert cfg.vm.machine_options(cfg.name) == {"backend": "qemu", "libvirt_uri": "qemu:///system",
                                                "libvirt_pool": "default", "libvirt_pool_dir": None}
    hosts = '["qemu+ssh://root@gpu1/system", "qemu+ssh://root@gpu2/system?keyfile=/k"]'
    two = load_config(image, ["vm.backend=libvirt", f"vm.libvirt_uri={hosts}", "vm.libvirt_pool_dir=/srv/b"])
    assert len(two.vm.libvirt_uris) == 2 and two.vm.libvirt_pool_dir == "/srv/b"
    opts = two.vm.machine_options(two.name)
    assert opts["libvirt_uri"] == pick_uri(two.vm.libvirt_uris, two.name) and opts["libvirt_pool_dir"] == "/srv/b"
    assert "gpu2" in dump_config(two)
    with pytest.raises(ConfigError, match="over SSH only"):
        load_config(image, ["vm.libvirt_uri=qemu+tcp://gpu1/system"])
    with pytest.raises(ConfigError, match="absolute"):
        load_config(image, ["vm.libvirt_pool_dir=relative/dir"])


def test_ssh_login_takes_the_uri_then_ssh_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.vm.tunnel import SshTunnel

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    key = tmp_path / ".ssh" / "gpu_key"
    key.write_text("not read here")
    (tmp_path / ".ssh" / "config").write_text(
        f"Host gpu1\n  HostName gpu1.internal.example\n  User builder\n  Port 2200\n  IdentityFile {key}\n")
    h = parse_remote_uri("qemu+ssh://gpu1/system")
    assert h is not None
    args = SshTunnel(h)._login()
    assert (args["hostname"], args["port"], args["username"]) == ("gpu1.internal.example", 2200, "builder")
    assert args["key_filename"] == [str(key)] and args["allow_agent"] and args["look_for_keys"]
    explicit = parse_remote_uri(f"qemu+ssh://root@gpu1:22/system?keyfile={tmp_path}/missing")
    assert explicit is not None
    args = SshTunnel(explicit)._login()
    assert (args["port"], args["username"], args["key_filename"]) == (22, "root", [str(key)])  # missing: skipped
