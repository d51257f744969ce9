"""Random tiny HF transformers models saved to disk, shared by the conversion and parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Overwrites every parameter (norm scales included, which HF initialises to 0) with noise,
    so that a mapping mistake anywhere changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def gemma2_config(**overrides) -> transformers.Gemma2Config:
    kw = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        sliding_window=4,
        attn_logit_softcapping=2.0,  # small caps so the tanh is far from linear
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return transformers.Gemma2Config(**kw)


def gemma3_config(**overrides) -> transformers.Gemma3TextConfig:
    kw = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=7,  # layers 0-4 local, 5 global, 6 local
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        attn_implementation="eager",
    )
    kw.update(overrides)
    return transformers.Gemma3TextConfig(**kw)


def save_gemma(path: str, family: str, seed: int = 0, **save_kwargs):
    """Saves a random tiny Gemma2ForCausalLM / Gemma3ForCausalLM and returns the torch model."""
    torch.manual_seed(seed)
    if family == "gemma2":
        model = transformers.Gemma2ForCausalLM(gemma2_config())
    else:
        model = transformers.Gemma3ForCausalLM(gemma3_config())
    randomize_(model, seed)
    model.save_pretrained(path, **save_kwargs)
    return model


def padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids [B, T] (no pad id 0 inside) and the 0/1 mask [B, T]."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(2, vocab, size=(len(lengths), t))
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return (tokens * mask).astype(np.int32), mask


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        )
    return out.logits.float().numpy()
