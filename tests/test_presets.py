"""Full-size presets: eval_shape parameter counts match the published sizes, no allocation."""

import os
import re

import jax
import pytest
from flax import nnx

from encdec_adapt.nn.config import ENCDEC_PRESETS, PRESETS, load_encdec_preset, load_preset
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly

# Published totals (HF model cards / papers), with the digits they are published to.
PUBLISHED = {
    "gemma2_2b": (2.61e9, 0.005e9),
    "gemma2_9b": (9.24e9, 0.005e9),
    "gemma2_27b": (27.2e9, 0.05e9),
    "gemma3_270m": (268e6, 0.5e6),
    "gemma3_1b": (1.00e9, 0.005e9),
    "gemma3_4b": (3.88e9, 0.005e9),  # language model only (the 4.3B total includes vision)
}


def count(name: str) -> int:
    cfg = load_preset(name)
    abstract = nnx.eval_shape(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), "eval_shape allocated"
    return sum(x.size for x in leaves)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    published, tolerance = PUBLISHED[name]
    assert abs(count(name) - published) <= tolerance, count(name)


def test_every_preset_loads():
    for name in PRESETS:
        cfg = load_preset(name)
        assert len(cfg.layer_types) == cfg.num_layers


def test_loading_a_preset_logs_no_errors(caplog, tmp_path, monkeypatch):
    """gin tries the working directory before the shipped configs and logs an ERROR per miss;
    a preset that loads must not print them."""
    import logging

    monkeypatch.chdir(tmp_path)  # no models/ here: every include misses the first location
    with caplog.at_level(logging.INFO):
        load_encdec_preset("t5gemma2_270m_270m")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_unknown_preset():
    with pytest.raises(FileNotFoundError, match="No model preset 'gemma9_1b'"):
        load_preset("gemma9_1b")


# ---- the encoder-decoder parameter table of README.md ------------------------------------------

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ENCDEC_HEADER = (
    "| preset (models/) | total | encoder | decoder | cross-attn (incl. norms) | embeddings |"
)
# Tracing a 9B model's initialisers takes tens of seconds on 2 cores: the 1B+ presets
# run with -m slow (test_encdec.py builds 9B-2B abstractly anyway); the 270M pairs and the tiny
# ones always run.
BIG_ENCDEC = ("t5gemma_2b_2b", "t5gemma_9b_9b", "t5gemma_9b_2b", "t5gemma_1b_1b")
UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}


def readme_encdec_table() -> dict[str, list[str]]:
    """preset -> its cells (total, encoder, decoder, cross-attn, embeddings) as printed."""
    with open(README) as f:
        lines = f.read().splitlines()
    start = lines.index(ENCDEC_HEADER) + 2  # below the alignment row
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split()[0]] = cells[1:]  # "t5gemma2_270m_270m (tied, merged)" -> name
    return rows


def parse_rounded(cell: str) -> tuple[float, float]:
    """'5.60B' -> (5.60e9, 0.005e9): the value and half a unit of its last printed digit."""
    m = re.fullmatch(r"([0-9]+)(?:\.([0-9]+))?([KMB]?)", cell)
    assert m, f"README cell {cell!r} is not a rounded count"
    unit = UNITS[m.group(3)]
    decimals = len(m.group(2) or "")
    value = float(m.group(1) + "." + (m.group(2) or "0")) * unit
    return value, 0.5 * 10.0**-decimals * unit


def encdec_counts(name: str) -> list[int]:
    """(total, encoder, decoder, cross-attention incl. its norms, embedding tables) of a preset,
    from the shapes of `EncoderDecoder` under jax.eval_shape."""
    cfg = load_encdec_preset(name)
    abstract = nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    sizes = {}
    for path, leaf in flat[0]:
        assert isinstance(leaf, jax.ShapeDtypeStruct), "eval_shape allocated"
        sizes["/".join(str(getattr(k, "key", k)) for k in path)] = leaf.size
    part = lambda keep: sum(n for k, n in sizes.items() if keep(k))
    return [
        part(lambda k: True),
        part(lambda k: k.startswith("encoder/")),
        part(lambda k: k.startswith("decoder/")),
        part(lambda k: k.startswith("decoder/") and any("cross" in p for p in k.split("/"))),
        part(lambda k: k.endswith("embedder/embedding")),
    ]


def test_readme_encdec_table_lists_every_preset():
    assert sorted(readme_encdec_table()) == sorted(ENCDEC_PRESETS)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in BIG_ENCDEC else n for n in ENCDEC_PRESETS],
)
def test_readme_encdec_parameter_counts(name):
    cells = readme_encdec_table()[name]
    counts = encdec_counts(name)
    assert counts[0] == counts[1] + counts[2]
    for column, cell, computed in zip(
        ("total", "encoder", "decoder", "cross", "embed"), cells, counts
    ):
        value, tolerance = parse_rounded(cell)
        assert abs(computed - value) <= tolerance, (name, column, cell, computed)
