"""Registers every gin configurable of the package under its stable name.

Each configurable is registered as `encdec_adapt.NAME` (`@gin.configurable(module=
"encdec_adapt")`), independent of the module that holds it, and run files import only this
module. A run's saved `config.gin` therefore names no module path and keeps parsing after code
moves between modules. Model files (`configs/models/`) import `encdec_adapt.nn`, which holds the
model configs, so presets load without the data stack.
"""

# The imports register the configurables; the names themselves are not used here.
from encdec_adapt.data import input_pipeline, jsonl_inputs, ul2  # noqa: F401
from encdec_adapt.models import (  # noqa: F401
    contrastive,
    decoding,
    embedding,
    generative,
    warm_start,
)
from encdec_adapt.nn import config, dual_encoder  # noqa: F401
from encdec_adapt.parallel import sharding  # noqa: F401
from encdec_adapt.runtime import checkpoints, embed, infer, optim, train  # noqa: F401

#: The module every registered name lives under.
MODULE = "encdec_adapt"
