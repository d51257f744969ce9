#!/usr/bin/env bash
# One command on a fresh machine: creates .venv, installs the project, then runs the main job on
# the embedded default data (experiments/quickstart.py): pretrain a tiny Gemma-2-style decoder,
# adapt it to a T5Gemma encoder-decoder with UL2 and with PrefixLM + KD, train a dual encoder from
# it, evaluate, decode, plot, and print a summary table with the paths of the results.
#
# Interrupted (Ctrl-C, kill)? Run it again: finished stages are skipped and the current one
# resumes from its last checkpoint.
#   QUICKSTART_DIR    output directory (default runs/quickstart)
#   QUICKSTART_SCALE  multiplies every stage's steps (default 1; 0.02 is a smoke run)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
export QUICKSTART_DIR="${QUICKSTART_DIR:-$ROOT/runs/quickstart}"
exec python -m experiments.quickstart "$@"
