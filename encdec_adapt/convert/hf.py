"""`import-hf` / `export-hf`: HF model directories <-> params checkpoints of this project.

An importer or exporter is registered per model type; Gemma 2 / Gemma 3 causal LMs map to
`DecoderOnly` ("decoder_only" in model.json), T5Gemma and T5Gemma 2 to `EncoderDecoder`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from encdec_adapt.convert import gemma, hf_files, t5gemma, t5gemma2
from encdec_adapt.errors import CheckpointError
from encdec_adapt.nn.config import GemmaConfig
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import outputs, params_io

DECODER_ONLY = "decoder_only"


def abstract_shapes(factory: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """Flat parameter shapes of the model `factory` builds, without allocating it."""
    state = nnx.state(nnx.eval_shape(factory), nnx.Param)
    return {k: tuple(v.shape) for k, v in params_io.flatten(nnx.to_pure_dict(state)).items()}


def _import_decoder_only(hf_config: dict, tensors: dict, source: str) -> tuple[str, dict, Any]:
    cfg = gemma.config_from_hf(hf_config, source)
    shapes = abstract_shapes(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): ignore it.
    ignore = ["lm_head.weight"] if cfg.tie_embeddings else []
    params = gemma.import_tensors(gemma.decoder_only_rules(cfg), tensors, shapes, source, ignore)
    return DECODER_ONLY, cfg.to_dict(), params


def _export_decoder_only(config: dict, params: Any) -> tuple[dict, dict]:
    cfg = GemmaConfig.from_dict(config)
    tensors = gemma.export_tensors(gemma.decoder_only_rules(cfg), params_io.flatten(params))
    return gemma.config_to_hf(cfg), tensors


# HF model_type -> importer(hf_config, tensors, source) -> (our model_type, config dict, params)
IMPORTERS: dict[str, Callable[[dict, dict, str], tuple[str, dict, Any]]] = {
    "gemma2": _import_decoder_only,
    "gemma3_text": _import_decoder_only,
    t5gemma.HF_MODEL_TYPE: t5gemma.import_encoder_decoder,
    t5gemma2.HF_MODEL_TYPE: t5gemma2.import_encoder_decoder,
}
# our model_type -> exporter(config dict, params) -> (HF config dict, HF tensors); an
# encoder-decoder goes to T5Gemma 2 when it has merged attention, else to T5Gemma.
EXPORTERS: dict[str, Callable[[dict, Any], tuple[dict, dict]]] = {
    DECODER_ONLY: _export_decoder_only,
    t5gemma.ENCODER_DECODER: t5gemma2.export_any_encoder_decoder,
}


def read_hf(hf_dir: str) -> tuple[str, dict, Any]:
    """(our model_type, config dict, params) of an HF directory, checked and converted."""
    hf_config = hf_files.read_config(hf_dir)
    model_type = hf_config.get("model_type")
    if model_type not in IMPORTERS:
        raise gemma.UnsupportedArchitecture(
            f"{os.path.join(hf_dir, hf_files.CONFIG_JSON)}: model_type {model_type!r} "
            f"(architectures {hf_config.get('architectures')}) is not supported; "
            f"supported: {sorted(IMPORTERS)}"
        )
    tensors = hf_files.read_tensors(hf_dir)
    return IMPORTERS[model_type](hf_config, tensors, hf_dir)


def import_hf(hf_dir: str, output: str, *, overwrite: bool = False) -> str:
    """Converts an HF model directory into a params checkpoint at `output`; returns model_type."""
    outputs.check_not_input(output, hf_dir)
    params_io.check_writable(output, overwrite)
    model_type, config, params = read_hf(hf_dir)
    params_io.save(output, params, model_type, config, overwrite=overwrite)
    return model_type


def export_hf(ckpt_dir: str, output: str, *, overwrite: bool = False) -> str:
    """Writes the params checkpoint `ckpt_dir` as an HF directory; returns the HF architecture."""
    outputs.check_not_input(output, ckpt_dir)
    outputs.check_target(outputs.absolute(output), overwrite, hf_files.HF_DIR)
    model_type, config = params_io.read_model_json(ckpt_dir)
    if model_type not in EXPORTERS:
        raise CheckpointError(
            f"{ckpt_dir}: model_type {model_type!r} has no HF export; "
            f"exportable: {sorted(EXPORTERS)}"
        )
    params = jax.tree.map(lambda x: jax.device_get(x), params_io.load(ckpt_dir))
    hf_config, tensors = EXPORTERS[model_type](config, params)
    hf_files.write(output, hf_config, tensors, overwrite=overwrite)
    return hf_config["architectures"][0]


def load_hf_decoder(hf_dir: str) -> DecoderOnly:
    """A `DecoderOnly` model with the weights of an HF Gemma 2 / Gemma 3 causal-LM directory."""
    model_type, config, params = read_hf(hf_dir)
    if model_type != DECODER_ONLY:
        raise CheckpointError(f"{hf_dir} holds a {model_type!r} model, not a decoder-only LM")
    model = DecoderOnly(GemmaConfig.from_dict(config), rngs=nnx.Rngs(0))
    params_io.assign(model, params, hf_dir)
    return model
