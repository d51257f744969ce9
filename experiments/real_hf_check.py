"""Serves the real quickstart's adapted T5Gemma 2 in transformers and compares the logits.

    python -m experiments.real_hf_check runs/quickstart_real            # adapt_prefixlm_params
    python -m experiments.real_hf_check runs/quickstart_real adapt_ul2_params

`export-hf` writes the params checkpoint as a `T5Gemma2ForConditionalGeneration` directory
(RUN/hf/NAME); transformers loads it (eager attention, float32) and both sides score the same
validation rows of `gemma_prefix_lm_kd` (real text in Gemma's tokenizer, encoder rows padded).
Prints the largest absolute logit difference and whether greedy argmaxes agree. Needs the [test]
extra (torch, transformers).
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from encdec_adapt.cli import main as cli
from encdec_adapt.nn.config import EncoderDecoderConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import params_io
from experiments import real_compare


def _ours(ckpt: str) -> EncoderDecoder:
    _, config = params_io.read_model_json(ckpt)
    model = nnx.eval_shape(lambda: EncoderDecoder(EncoderDecoderConfig.from_dict(config),
                                                  rngs=nnx.Rngs(0)))  # fmt: skip
    params_io.load_into(model, ckpt)
    return model


def check(run_dir: str, name: str = "adapt_prefixlm_params") -> dict:
    import torch
    import transformers

    os.environ.setdefault(
        "ENCDEC_ADAPT_GEMMA_TOKENIZER", os.path.join(run_dir, "gemma3_270m", "tokenizer.model")
    )
    from encdec_adapt.tasks import embedded

    embedded.register_corpus_tasks(os.environ["ENCDEC_ADAPT_GEMMA_TOKENIZER"], "gemma")
    ckpt, out = os.path.join(run_dir, name), os.path.join(run_dir, "hf", name)
    if not os.path.exists(os.path.join(out, "config.json")):
        assert cli.main(["export-hf", f"--input={ckpt}", f"--output={out}"]) == 0
    rows = next(
        iter(
            real_compare.validation_batches(
                "gemma_prefix_lm_kd", {"inputs": 64, "targets": 32}, 1, 4
            )
        )
    )
    enc, dec = rows["encoder_input_tokens"], rows["decoder_input_tokens"]
    model = _ours(ckpt)
    ours = np.asarray(nnx.jit(lambda m, e, d: m(e, d))(model, jnp.asarray(enc), jnp.asarray(dec)))
    hf = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = (
            hf(
                input_ids=torch.from_numpy(np.asarray(enc, np.int64)),
                attention_mask=torch.from_numpy((np.asarray(enc) > 0).astype(np.int64)),
                decoder_input_ids=torch.from_numpy(np.asarray(dec, np.int64)),
            )
            .logits.float()
            .numpy()
        )
    weights = np.asarray(rows["decoder_loss_weights"]) > 0
    diff = np.abs(theirs - ours)[weights]
    same = (theirs.argmax(-1) == ours.argmax(-1))[weights]
    result = {
        "checkpoint": ckpt,
        "hf_dir": out,
        "target_positions": int(weights.sum()),
        "max_abs_logit_diff": float(diff.max()),
        "logit_range": float(np.ptp(ours[weights])),
        "argmax_agreement": float(same.mean()),
    }
    print(result)
    return result


if __name__ == "__main__":
    check(*sys.argv[1:])
