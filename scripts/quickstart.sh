#!/usr/bin/env bash
# One command on a fresh machine: creates .venv, installs the project, runs the main job on the
# embedded default data and prints where the results are.
#
# Today the main job is the foundation's smoke run: build the tiny Gemma-2-style preset, run a
# forward pass and a cached decode, save a params checkpoint and export it to an HF directory that
# transformers can load. Later stages (adaptation, training, embedding) are added as they land.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
OUT="${QUICKSTART_DIR:-$ROOT/runs/quickstart}"
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt import DecoderOnly, init_cache, load_preset, params_io
from encdec_adapt.convert import export_hf

out = sys.argv[1]
cfg = load_preset("gemma_tiny")
model = DecoderOnly(cfg, rngs=nnx.Rngs(0))
n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
tokens = jax.random.randint(jax.random.key(0), (2, 16), 2, cfg.vocab_size)
logits, _ = model(tokens)
cache = init_cache(cfg, batch_size=2, max_length=16)
_, cache = model(tokens[:, :8], cache=cache)
step, _ = model(tokens[:, 8:9], positions=jnp.full((2, 1), 8), cache=cache)
ckpt = os.path.join(out, "gemma_tiny_init")
params_io.save(ckpt, params_io.model_params(model), "decoder_only", cfg.to_dict(), overwrite=True)
hf_dir = os.path.join(out, "gemma_tiny_hf")
export_hf(ckpt, hf_dir, overwrite=True)
print(f"gemma_tiny: {n_params:,} parameters, logits {tuple(logits.shape)}")
print(f"cached decode step matches full forward: max |diff| = "
      f"{float(jnp.abs(step[:, 0] - logits[:, 8]).max()):.2e}")
print(f"params checkpoint: {ckpt}")
print(f"HF export (transformers.AutoModelForCausalLM.from_pretrained): {hf_dir}")
PY
