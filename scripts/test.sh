#!/usr/bin/env bash
# The whole test suite, from a clean clone: set up .venv (idempotent), lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check discover tests scripts
.venv/bin/ruff format --check discover tests scripts
.venv/bin/python -m pytest -q "$@"
