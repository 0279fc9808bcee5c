#!/usr/bin/env bash
# Install everything Limen's test suite and benchmarks need, on a fresh Debian 12 machine.
#
# Idempotent: system packages are installed only when one is missing (checked with dpkg),
# the virtualenv is created only when absent, and `pip install -e` is cheap when satisfied.
#
# Usage: scripts/install.sh [--no-apt]
#   --no-apt   skip system packages (e.g. on a developer machine without root)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

with_apt=1
for arg in "$@"; do
  case "$arg" in
    --no-apt) with_apt=0 ;;
    -h | --help)
      sed -n '2,9p' "$0"
      exit 0
      ;;
    *)
      echo "install.sh: unknown option: $arg" >&2
      exit 2
      ;;
  esac
done

# Third-party servers and clients the e2e tests and benchmarks drive for real.
packages=(
  openssh-server openssh-client nginx-light iperf3 dnsutils dnsmasq-base stunnel4
  nftables tinyproxy socat curl iproute2 procps ca-certificates netcat-openbsd
)

is_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

if [[ $with_apt -eq 1 ]]; then
  # The interpreter itself: needed only when python3 or its venv module is missing.
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    packages+=(python3 python3-venv)
  fi
  missing=()
  for pkg in "${packages[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) -ne 0 ]]; then
      echo "install.sh: missing packages (${missing[*]}) and not root; rerun as root or with --no-apt" >&2
      exit 1
    fi
    echo "install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting sshd, nginx, tinyproxy...: the tests start their own
    # private instances. policy-rc.d exit 101 means "action forbidden" to invoke-rc.d.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      created_policy=1
    fi
    cleanup_policy() {
      if [[ $created_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    }
    trap cleanup_policy EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
    cleanup_policy
    trap - EXIT
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  if ! python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "install.sh: python3 >= 3.11 is required (found $(python3 --version 2>&1))" >&2
    exit 1
  fi
  echo "install.sh: creating .venv"
  python3 -m venv .venv
fi

.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "install.sh: done"
