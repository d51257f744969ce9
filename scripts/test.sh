#!/usr/bin/env bash
# Creates or reuses .venv, installs the project with its test extra, runs ruff and the fast test suite.
# Extra pytest arguments pass through, e.g. `bash scripts/test.sh -m slow` for the heavy tests.
set -euo pipefail
source "$(dirname "$0")/env.sh" test
cd "$ROOT"
ruff format --check .
ruff check .
python -m pytest -q "$@"
