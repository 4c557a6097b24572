#!/usr/bin/env bash
# Install the Debian `prometheus` package (prometheus + promtool) for the tests that start a real
# Prometheus server or run `promtool check`. Idempotent: does nothing when promtool is already there.
#
# Why the policy-rc.d dance: the package's maintainer script calls invoke-rc.d / deb-systemd-invoke to
# start a system-wide Prometheus on :9090. In a container without systemd that either fails the install
# or leaves a stray daemon holding port 9090 for the rest of the CI run. A policy-rc.d that exits 101
# tells invoke-rc.d "do not start services"; we add it only if the machine has none, and remove only
# the one we added.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-prometheus: promtool missing and not root; install the 'prometheus' package by hand" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# added by mfli deploy/scripts/install-prometheus.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
fi
cleanup() { if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends prometheus

# Belt and braces: if some init path started the packaged daemon anyway, stop it so it cannot hold
# :9090 or scrape anything during the tests.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

promtool --version | head -1
