"""Comparison (a) of the real quickstart: the adapted encoder-decoders vs the source Gemma 3.

Every model scores the same validation examples of a PrefixLM + KD task (`gemma_prefix_lm_kd`:
each row keeps the PrefixLM split of its chunk, `full` and `split`):
  - an encoder-decoder reads the prefix (+ EOS) in its encoder and predicts the targets (+ EOS);
  - the decoder-only Gemma 3 reads [<bos>] + prefix + targets and predicts the same target tokens
    (+ EOS) after the same prefix (the KD teacher's view, `EncDecConverter(teacher=True)`);
so the per-token cross-entropy and accuracy are over exactly the same target tokens. Each model
also greedily continues the first rows' prefixes (Gemma 3 from [<bos>] + prefix).

    results = compare(models, task, lengths, batches, batch_size, decode_rows, decode_len, out_dir)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encdec_adapt.data import registry
from encdec_adapt.data.feature_converters import EncDecConverter
from encdec_adapt.models import base, decoding
from encdec_adapt.models.generative import DecoderOnlyModel, EncoderDecoderModel
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.storage import params_io


def validation_batches(task: str, lengths: dict[str, int], batches: int, batch_size: int):
    """The first `batches` validation batches (numpy) of a PrefixLM KD task, with teacher views."""
    ds = registry.get_dataset(
        task,
        lengths,
        converter=EncDecConverter(pack=False, teacher=True),
        split="validation",
        batch_size=batch_size,
        seed=0,
    )
    return [jax.tree.map(np.asarray, b) for b in ds.take(batches).as_numpy_iterator()]


def load_model(path: str):
    """(model API object, module with the checkpoint's parameters) of a params checkpoint."""
    model_type, config = params_io.read_model_json(path)
    if model_type == "decoder_only":
        model = DecoderOnlyModel(config=GemmaConfig.from_dict(config))
    else:
        model = EncoderDecoderModel(config=EncoderDecoderConfig.from_dict(config))
    module = model.build(nnx.Rngs(0))
    params_io.load_into(module, path)
    return model, module


def decoder_only_sums(model: DecoderOnlyModel, module, batch) -> dict:
    """Loss / accuracy sums of the decoder-only model on the teacher view of the targets."""
    logits = model.logits(module, {"decoder_input_tokens": batch["teacher_input_tokens"]}, None)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = batch["teacher_target_tokens"]
    w = batch["teacher_loss_weights"].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
    return {"loss_sum": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "weight": jnp.sum(w)}


def decoder_only_continue(model, module, batch, max_len: int):
    """Greedy continuation of [<bos>] + prefix (up to the first weighted position)."""
    prompts = batch["teacher_input_tokens"]
    lengths = jnp.argmax(batch["teacher_loss_weights"] > 0, axis=1) + 1
    step_fn, init_logits, state = decoding.decoder_only_start(
        module, prompts, lengths.astype(jnp.int32), max_len
    )
    cfg = decoding.DecodeConfig(method="greedy", max_decode_len=max_len)
    return decoding.decode(step_fn, init_logits, state, cfg).tokens


def score(path: str, batches: list, decode_rows: int, decode_len: int) -> tuple[dict, np.ndarray]:
    """(per-token loss / accuracy means over `batches`, greedy tokens [decode_rows, L]) of the
    params checkpoint `path`."""
    model, module = load_model(path)
    decoder_only = isinstance(model, DecoderOnlyModel)
    sums_fn = nnx.jit(
        (lambda m, b: decoder_only_sums(model, m, b))
        if decoder_only
        else (lambda m, b: model.eval_fn(m, b))
    )
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in sums_fn(module, batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    rows = jax.tree.map(lambda x: x[:decode_rows], batches[0])
    cfg = decoding.DecodeConfig(method="greedy", max_decode_len=decode_len)
    if decoder_only:
        tokens = nnx.jit(lambda m, b: decoder_only_continue(model, m, b, decode_len))(module, rows)
    else:
        tokens = nnx.jit(lambda m, b: model.predict_batch(m, b, cfg).tokens)(module, rows)
    return base.summarize(totals), np.asarray(tokens)


def compare(
    models: dict[str, str],
    task: str,
    lengths: dict[str, int],
    batches: int,
    batch_size: int,
    decode_rows: int,
    decode_len: int,
    out_dir: str,
) -> dict:
    """Scores and decodes every params checkpoint of `models` (name -> path) on the same
    validation batches; writes OUT_DIR/NAME.jsonl (inputs, target, prediction per decoded row)
    and returns {name: {loss, accuracy, tokens}} plus the decoded rows."""
    data = validation_batches(task, lengths, batches, batch_size)
    vocab = registry.get_task_or_mixture(task).output_features["targets"].vocabulary
    first = data[0]
    inputs = [vocab.decode(r.tolist()) for r in first["encoder_input_tokens"][:decode_rows]]
    targets = [vocab.decode(r.tolist()) for r in first["decoder_target_tokens"][:decode_rows]]
    results: dict = {"task": task, "lengths": lengths, "batches": batches, "models": {}}
    os.makedirs(out_dir, exist_ok=True)
    for name, path in models.items():
        metrics, tokens = score(path, data, decode_rows, decode_len)
        predictions = [vocab.decode(r.tolist()) for r in tokens]
        results["models"][name] = {**metrics, "predictions": predictions}
        tmp = os.path.join(out_dir, f"{name}.jsonl.tmp")
        with open(tmp, "w") as f:
            for i, t, p in zip(inputs, targets, predictions):
                f.write(json.dumps({"inputs": i, "target": t, "prediction": p}) + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{name}.jsonl"))
    results["inputs"], results["targets"] = inputs, targets
    return results
