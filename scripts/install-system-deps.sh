#!/usr/bin/env bash
# Install the servers and browser the test suite needs but this machine may lack:
# etcd (Debian's etcd-server + etcd-client), Chromium, and iproute2 (the chaos tests
# partition agents with network namespaces). PostgreSQL, Redis and NATS are
# expected to be running already (see README). Idempotent: installs only what is missing.
set -euo pipefail
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]} == 0)); then
  exit 0
fi
echo "installing system packages: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts etcd as a service on install; the tests run their own on free ports.
if [[ " ${need[*]} " == *" etcd-server "* ]]; then
  $sudo systemctl disable --now etcd >/dev/null 2>&1 || $sudo pkill -x etcd || true
fi
