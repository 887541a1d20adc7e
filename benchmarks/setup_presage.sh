#!/usr/bin/env bash
# Install Debian's presage (library, headers, text2ngram, English database) and a C++ compiler
# for benchmarks/peer_presage.py. Not part of `make test`. Needs root (or sudo).
set -euo pipefail

packages=(presage libpresage-dev libpresage-data g++)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "presage: already installed ($(dpkg-query -W -f='${Version}' presage))"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
fi
if ! apt-cache show presage >/dev/null 2>&1; then
    $sudo apt-get update -q
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "presage: installed $(dpkg-query -W -f='${Version}' presage)"
