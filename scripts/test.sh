#!/usr/bin/env bash
# Install, lint, type-check and test Limen: the one command CI runs.
#
# Usage: scripts/test.sh [pytest args...]
# Every step runs even when an earlier one fails, so one CI run reports everything;
# the script exits non-zero if any step failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=()

step() {
  local name=$1
  shift
  echo
  echo "==> ${name}: $*"
  "$@"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "==> ${name} FAILED (exit ${rc})"
    failed+=("$name")
  fi
  return 0
}

# Without the tools nothing else can run meaningfully: stop here.
echo "==> install: scripts/install.sh"
if ! bash scripts/install.sh; then
  echo "==> install FAILED"
  exit 1
fi

step "ruff check" .venv/bin/ruff check src tests benchmarks
step "ruff format" .venv/bin/ruff format --check src tests benchmarks
step "mypy" .venv/bin/mypy
# The benchmarks are not in [tool.mypy] files; hold them to the same strictness.
step "mypy benchmarks" .venv/bin/mypy benchmarks

echo
echo "==> pytest: .venv/bin/pytest $*"
.venv/bin/pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "==> pytest collected no tests: treated as a failure"
  failed+=("pytest (no tests)")
elif [[ $rc -ne 0 ]]; then
  failed+=("pytest (exit ${rc})")
fi

echo
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "==> FAILED steps: ${failed[*]}"
  exit 1
fi
echo "==> all steps passed"
