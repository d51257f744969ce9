"""Checkpoint conversion between HF transformers / gemma-library formats and this project's."""

from encdec_adapt.convert.hf import export_hf, import_hf, load_hf_decoder

__all__ = ["export_hf", "import_hf", "load_hf_decoder"]
