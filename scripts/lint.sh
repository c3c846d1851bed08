#!/usr/bin/env bash
# Static checks: ruff (lint rules and formatting) and mypy, configured in pyproject.toml.
#   scripts/lint.sh            run all three, report each, exit 1 if any has findings
#   scripts/lint.sh --fix      apply ruff's safe fixes and the formatter first, then check
# Needs the lint extra: pip install -e ".[lint]"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ "${1:-}" == "--fix" ]]; then
    "$PY" -m ruff check --fix --quiet . || true
    "$PY" -m ruff format --quiet .
fi
status=0
step() {
    local name=$1; shift
    if "$@"; then echo "lint: $name ok"; else echo "lint: $name FAILED"; status=1; fi
}
step "ruff check" "$PY" -m ruff check --statistics .
step "ruff format" "$PY" -m ruff format --check .
step "mypy" "$PY" -m mypy
exit $status
