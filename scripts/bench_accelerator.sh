#!/usr/bin/env bash
# Accelerator benchmark: MFU of a T5Gemma 2B-2B train step (bf16 compute, fp32 master weights,
# the longest sequences that fit) and greedy decode tokens/s next to transformers on the same
# GPU; details in scripts/bench_accelerator.py. Meant for one H200, under 8 minutes in all.
#
#   bash scripts/bench_accelerator.sh                  # installs the pinned GPU wheels, runs
#   bash scripts/bench_accelerator.sh --no-install     # uses $PYTHON (default: python3) as is
#   bash scripts/bench_accelerator.sh --tiny           # tiny float32 run on CPU (< 60 s; tests)
#
# Other arguments go to bench_accelerator.py (e.g. --lengths 4096 2048 --decode_batches 1 8).
# Installing needs the network: a venv in $VENV (default .venv_accel) with this package and the
# pins below. --tiny never installs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_PIN="jax[cuda12]==0.10.2"
TORCH_PIN="torch==2.13.0"
TRANSFORMERS_PIN="transformers==5.23.0"

install=1
args=()
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    --tiny) install=0; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done

PY="${PYTHON:-python3}"
if [ "$install" = 1 ]; then
  VENV="${VENV:-$ROOT/.venv_accel}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT" "$JAX_PIN" "$TORCH_PIN" "$TRANSFORMERS_PIN"
  PY="$VENV/bin/python"
fi
if [ "${args[*]:-}" != "${args[*]/--tiny/}" ]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi
export TF_CPP_MIN_LOG_LEVEL=3
# Stay inside the 8-minute budget whatever happens; partial results are printed as they come.
exec timeout "${BENCH_TIMEOUT_S:-470}" "$PY" "$ROOT/scripts/bench_accelerator.py" "${args[@]}"
