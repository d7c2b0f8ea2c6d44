#!/usr/bin/env bash
# Install the Debian packages a one-node localhost Slurm cluster needs.
# Idempotent: a fast no-op when everything is already installed.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

missing=()
for p in "${PACKAGES[@]}"; do
    # dpkg-query answers "install ok installed" only for fully installed packages.
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: missing packages (${missing[*]}) and not root; cannot install" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null; then
    echo "install.sh: missing packages (${missing[*]}) and no apt-get; cannot install" >&2
    exit 2
fi

echo "install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Without systemd, package postinst scripts may try to start services; policy-rc.d
# exit 101 forbids that so that only start.sh ever starts daemons.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
