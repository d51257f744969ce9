#!/usr/bin/env bash
# Creates or reuses .venv, installs the project with its test extra, runs ruff, lint-imports and
# the fast test suite.
# Extra pytest arguments pass through, e.g. `bash scripts/test.sh -m slow` for the heavy tests.
set -euo pipefail
source "$(dirname "$0")/env.sh" test
cd "$ROOT"
ruff format --check .
ruff check .
# The layer rules (pyproject.toml [tool.importlinter]): no upward imports, no cycles.
lint-imports
# Two worker processes (pytest-xdist), one file per worker at a time so that a file's module
# fixtures are built once, in the order of tests/conftest.py (heaviest files first): XLA compiles
# on one core, so this uses both CPU cores of a CI runner.
# PYTEST_WORKERS=0 runs in one process (e.g. for pdb).
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
