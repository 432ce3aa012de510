#!/usr/bin/env bash
# Start or stop a libvirtd (+ virtlogd) for builder's libvirt backend tests on a host without systemd.
#   scripts/libvirtd.sh start     # idempotent; qemu:///system answers afterwards
#   scripts/libvirtd.sh stop      # stops the daemons this script started (by their PID files)
set -euo pipefail
run=/run/builder-libvirt
case "${1:-}" in
start)
  if virsh -c qemu:///system version >/dev/null 2>&1; then echo "libvirtd already answers"; exit 0; fi
  getent passwd libvirt-qemu >/dev/null || useradd -r -U -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt /run/libvirt "$run"
  if ! grep -q '^# builder' /etc/libvirt/qemu.conf 2>/dev/null; then
    cat > /etc/libvirt/qemu.conf <<'CONF'
# builder: QEMU runs as root without a security driver (a throw-away build/CI host without systemd)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
CONF
  fi
  # builder's VMs reach its gateway through QEMU guestfwd, which spawns a relay per connection: no spawn=deny
  grep -q '^seccomp_sandbox' /etc/libvirt/qemu.conf || echo 'seccomp_sandbox = 0' >> /etc/libvirt/qemu.conf
  virtlogd -d -p "$run/virtlogd.pid"
  libvirtd -d -p "$run/libvirtd.pid"
  for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null
  echo "libvirtd started"
  ;;
stop)
  for d in libvirtd virtlogd; do
    if [ -s "$run/$d.pid" ]; then kill "$(cat "$run/$d.pid")" 2>/dev/null || true; rm -f "$run/$d.pid"; fi
  done
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
