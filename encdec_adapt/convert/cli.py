"""The `import-hf` and `export-hf` commands."""

from __future__ import annotations

import argparse
import sys

from encdec_adapt.convert.hf import export_hf, import_hf
from encdec_adapt.params_io import CheckpointError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"encdec-adapt {prog}", description=description)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def import_hf_main(argv: list[str]) -> int:
    args = _parser(
        "import-hf",
        "Convert an HF Gemma2/Gemma3 causal-LM (or T5Gemma) directory, config.json plus "
        "safetensors, into a params checkpoint (Orbax + model.json).",
    ).parse_args(argv)
    try:
        model_type = import_hf(args.input, args.output, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"import-hf: error: {e}", file=sys.stderr)
        return 1
    print(f"import-hf: wrote {model_type} checkpoint to {args.output}")
    return 0


def export_hf_main(argv: list[str]) -> int:
    args = _parser(
        "export-hf",
        "Write a params checkpoint as an HF directory (config.json + model.safetensors) that "
        "transformers loads with from_pretrained.",
    ).parse_args(argv)
    try:
        arch = export_hf(args.input, args.output, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"export-hf: error: {e}", file=sys.stderr)
        return 1
    print(f"export-hf: wrote {arch} to {args.output}")
    return 0
