#!/usr/bin/env bash
# Install what builder needs on a Debian/Ubuntu build host, then builder itself into ./.venv.
#   sudo scripts/setup-host.sh            # host packages + .venv with builder
#   scripts/setup-host.sh --no-apt        # only the venv (packages already there)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" != "--no-apt" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2046
  apt-get install -y -qq --no-install-recommends $(grep -v '^#' "$here/scripts/host-packages.txt") >/dev/null
fi
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
"$here/.venv/bin/pip" install -q -e "$here[test]"
echo "builder installed in $here/.venv; run: $here/.venv/bin/python -m builder build images/cloud-gpu-worker.yaml"
