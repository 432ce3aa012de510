#!/usr/bin/env bash
# Install what builder needs on a Debian 12/13 build host, then builder itself (with every optional backend)
# into ./.venv. Run it as root, or as a user who may use sudo (only the apt step needs root).
#   scripts/setup-host.sh              # host packages + .venv with builder
#   scripts/setup-host.sh --no-apt     # only the venv (packages already there)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" != "--no-apt" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "setup-host.sh: the apt step needs root: run it as root, or install sudo" >&2
    exit 1
  fi
  # shellcheck disable=SC2046
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2046
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $(grep -v '^#' "$here/scripts/host-packages.txt") >/dev/null
fi
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
"$here/.venv/bin/pip" install -q -e "$here[test,libvirt,dev]"  # dev: tox, ruff, mypy (the tests, the checks)
echo "builder installed in $here/.venv; run: $here/.venv/bin/python -m builder build images/cloud-gpu-worker.yaml"
