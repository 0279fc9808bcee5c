#!/usr/bin/env bash
# Install Limen and start the all-in-one service with a demo tenant, on a fresh Debian machine.
#
# Runs scripts/install.sh (Debian packages + .venv with `pip install -e '.[dev]'`), then
# `limen up`: identity, admin API, edge, a demo connector and a demo private app, on SQLite in
# the data directory. `limen up` prints what to try next; stop it with Ctrl-C.
#
# Usage: sudo ./scripts/quickstart.sh [limen up options...]
#   e.g. sudo ./scripts/quickstart.sh --api-port 9444 --edge-port 8444
# Environment:
#   LIMEN_DATA_DIR   where state lives (default: ./limen-data in the repository)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-}" in
  -h | --help)
    sed -n '2,11p' "$0"
    exit 0
    ;;
esac

bash scripts/install.sh

# Absolute, so the printed instructions work from any directory. Not created here: `limen up`
# creates it with mode 0700 (it holds the database, with the CA key, and the admin token).
data_dir=$(realpath -m "${LIMEN_DATA_DIR:-$PWD/limen-data}")
export LIMEN_DATA_DIR=$data_dir

echo "quickstart: starting \`limen up\` with data in $data_dir (Ctrl-C stops it)"
exec .venv/bin/limen up --data-dir "$data_dir" "$@"
