"""The `import-hf`, `import-gguf`, `import-gemma` and `export-hf` commands.

Errors (a missing or malformed input, an existing output, a checkpoint that does not fit) are
errors.EncdecError: the dispatcher exits 2 with the message.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from encdec_adapt.cli import args as args_lib
from encdec_adapt.convert import gemma
from encdec_adapt.convert.gguf import import_gguf
from encdec_adapt.convert.hf import DECODER_ONLY, abstract_shapes, export_hf, import_hf
from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import outputs, params_io


def _parser(prog: str, description: str) -> args_lib.ArgumentParser:
    p = args_lib.parser(prog, description)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def _convert(command: str, description: str, convert, argv: list[str]) -> int:
    """Parses --input/--output/--overwrite, runs `convert`, reports one line."""
    args = _parser(command, description).parse_args(argv)
    what = convert(args.input, args.output, overwrite=args.overwrite)
    print(f"{command}: wrote {what} to {args.output}")
    return 0


def import_hf_main(argv: list[str]) -> int:
    return _convert(
        "import-hf",
        "Convert an HF Gemma2/Gemma3 causal-LM (or T5Gemma, T5Gemma 2 text) directory, config.json "
        "plus safetensors, into a params checkpoint (Orbax + model.json).",
        import_hf,
        argv,
    )


def import_gguf_main(argv: list[str]) -> int:
    return _convert(
        "import-gguf",
        "Convert a llama.cpp GGUF file of a Gemma 2 / Gemma 3 causal LM (F32, F16, BF16, Q8_0, "
        "Q5_0, Q4_K, Q6_K tensors) into a params checkpoint, with its tokenizer as "
        "tokenizer.model (SentencePiece) inside the output directory.",
        import_gguf,
        argv,
    )


def export_hf_main(argv: list[str]) -> int:
    return _convert(
        "export-hf",
        "Write a params checkpoint as an HF directory (config.json + model.safetensors) that "
        "transformers loads with from_pretrained.",
        export_hf,
        argv,
    )


def import_gemma_main(argv: list[str]) -> int:
    p = _parser(
        "import-gemma",
        "Convert a gemma-library (Kaggle Flax / Orbax) checkpoint into a params checkpoint. The "
        "architecture comes from a preset in models/.",
    )
    p.add_argument("--preset", required=True, help="e.g. gemma2_2b, gemma3_1b")
    p.add_argument(
        "--vocab_rows",
        choices=["exact", "slice", "pad"],
        default="exact",
        help="reconcile embedding rows with the preset's vocab_size: Gemma 2 Kaggle checkpoints "
        "carry 256128 rows, HF and the presets 256000 ('slice' drops the extra rows)",
    )
    args = p.parse_args(argv)
    outputs.check_not_input(args.output, args.input)
    params_io.check_writable(args.output, args.overwrite)
    cfg = load_preset(args.preset)
    tree = gemma.read_gemma_library(args.input)
    params = gemma.from_gemma_library(tree, cfg, vocab_rows=args.vocab_rows, source=args.input)
    shapes = abstract_shapes(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    expected = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
    params_io.check_compatible(
        params_io.unflatten(expected), params, f"{args.input} (preset {args.preset})"
    )
    params_io.save(args.output, params, DECODER_ONLY, cfg.to_dict(), overwrite=args.overwrite)
    print(f"import-gemma: wrote {DECODER_ONLY} checkpoint to {args.output}")
    return 0
