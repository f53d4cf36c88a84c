#!/usr/bin/env bash
# Install the Debian packages a development host (or CI) needs, only those missing.
# Usage: hw/setup_host.sh [extra packages...]
set -euo pipefail
PKGS=(python3 python3-venv python3-dev gcc make qemu-system-x86 iproute2 nftables systemd cpio libiscsi-bin tgt "$@")
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# apt-get download (used to build the QEMU guest image) needs package lists.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
    SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -q
fi
