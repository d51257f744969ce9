# Sourced by the scripts: creates or reuses .venv and installs the project into it.
# Usage: source scripts/env.sh [extra]   (extra: "test" installs the test dependencies too)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRA="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Re-install only when setup.py changed since the last install into this venv.
STAMP="$VENV/.encdec_adapt_installed${EXTRA:+_$EXTRA}"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT${EXTRA:+[$EXTRA]}"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=3
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
