#!/usr/bin/env bash
# Sets up .venv and runs every test that needs no GPU (the slow end-to-end ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -m "not gpu" "$@"
