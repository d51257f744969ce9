"""Compiled memory of the train step at long lengths: the materialising path next to the new one.

    python scripts/bench_memory.py                                   # the default table
    python scripts/bench_memory.py --presets t5gemma_270m_270m --lengths 4096 --remat full

For each preset, length (tokens per side: encoder inputs = decoder targets = L), remat policy and
path, builds the project's `runtime.trainer.Trainer` step (EncoderDecoderModel loss + grad +
AdamW update, donated state) from abstract shapes only (`jax.eval_shape`), lowers and compiles it
(`Trainer.compile_step`, nothing is allocated) and prints what XLA's `memory_analysis()` of its
executables adds up to (`CompiledStep.memory`): temporaries (the most the step holds beyond its
inputs at once: activations, workspace, gradients) and arguments (parameters + optimizer state +
batch). Paths:
  xla   today's materialising path: attention_impl "xla", loss_chunk_tokens 0
  auto  the defaults: attention_impl "auto" (blockwise above 1024 x 1024 logits), loss
        chunked when B * T * V > 2**28
Compile times are printed too: big presets at 8,192 tokens take minutes on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from encdec_adapt.models import generative as models
from encdec_adapt.nn import blockwise
from encdec_adapt.nn.config import load_encdec_preset
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim, trainer

GIB = 2**30


def compiled_memory(
    preset: str, length: int, batch: int, remat: str, path: str, scan: bool = False
) -> dict:
    cfg = load_encdec_preset(preset)
    model = models.EncoderDecoderModel(
        config=cfg,
        remat=remat,
        scan_layers=scan,
        loss_chunk_tokens=0 if path == "xla" else None,
    )
    rules = sharding.MeshRules(mesh_shape=(1, -1, 1))
    mesh = rules.make_mesh()
    t = trainer.Trainer(model, optim.OptimizerConfig(name="adamw", learning_rate=1e-4), mesh, rules)
    state = t.abstract_state()
    names = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
    spec = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32) for k in names}
    spec["decoder_loss_weights"] = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    old = os.environ.get(blockwise.ENV_VAR)
    if path == "xla":
        os.environ[blockwise.ENV_VAR] = "xla"
    else:
        os.environ.pop(blockwise.ENV_VAR, None)
    try:
        start = time.perf_counter()
        compiled = t.compile_step(state, spec)
        seconds = time.perf_counter() - start
    finally:
        if old is None:
            os.environ.pop(blockwise.ENV_VAR, None)
        else:
            os.environ[blockwise.ENV_VAR] = old
    mem = compiled.memory()
    return {
        "temp": mem["temporaries"] / GIB,
        "args": mem["state_and_batch"] / GIB,
        "seconds": seconds,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["t5gemma_270m_270m", "t5gemma_2b_2b"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096, 8192])
    p.add_argument("--remat", nargs="+", default=["none", "full"])
    p.add_argument("--paths", nargs="+", default=["xla", "auto"], choices=["xla", "auto"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--scan_layers", action="store_true", help="EncoderDecoderModel.scan_layers")
    args = p.parse_args(argv)
    print(
        f"batch {args.batch}, scan_layers {args.scan_layers}, {jax.devices()[0].platform}; "
        "GiB from memory_analysis()"
    )
    print("| preset | tokens/side | remat | path | temporaries GiB | arguments GiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for length in args.lengths:
            for remat in args.remat:
                for path in args.paths:
                    r = compiled_memory(preset, length, args.batch, remat, path, args.scan_layers)
                    print(
                        f"| {preset} | {length} | {remat} | {path} | {r['temp']:.2f} | "
                        f"{r['args']:.2f} | {r['seconds']:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
