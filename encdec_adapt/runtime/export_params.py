"""A training run's checkpoint -> a params checkpoint (`encdec-adapt export-params`, whose
command line is cli/export_params.py).

    encdec-adapt export-params --model_dir runs/pretrain --output ckpt/pretrained
    encdec-adapt export-params --model_dir runs/kd --output ckpt/student --step 2000

Training checkpoints (MODEL_DIR/checkpoints/<step>) hold the whole train state: parameters,
optimizer moments, step, RNG and data position. Warm starts (`train.warm_start_from`), `adapt`
(`--encoder`), KD teachers (`DistillationModel.teacher_checkpoint`), `eval` / `infer`
(`params_from`) and `export-hf` read params checkpoints (`params_io`: model.json + an Orbax
tree of the parameters only). This command takes the newest (or a given) step of a run to one.

The model is rebuilt from MODEL_DIR/config.gin, the complete gin config that `train` wrote when
the run started, so no gin file or model flag needs repeating. A distillation run exports its
student (the teacher is a frozen copy of an existing checkpoint).
"""

from __future__ import annotations

import gin

from encdec_adapt.errors import InputError
from encdec_adapt.models.base import BaseModel
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, optim
from encdec_adapt.runtime.trainer import Trainer
from encdec_adapt.storage import outputs, params_io, paths

CONFIG_FILE = "config.gin"


class ExportError(InputError):
    """Nothing to export; the message names the directory or step."""


def model_from_run(model_dir: str) -> BaseModel:
    """The model API object (`train.model`) of the run in `model_dir`, from its config.gin."""
    path = paths.join(model_dir, CONFIG_FILE)
    if not paths.exists(path):
        raise ExportError(
            f"{path} does not exist: {model_dir} is not a training run directory (`encdec-adapt "
            "train` writes config.gin into MODEL_DIR when it starts)"
        )
    # config.gin imports the modules it binds; the run's own gin state is not ours to keep.
    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config(paths.read_text(path), skip_unknown=False)
    try:
        ref = gin.query_parameter("train.model")
        return ref.scoped_configurable_fn()
    finally:
        gin.clear_config()


def newest_step(model_dir: str) -> int | None:
    """The newest checkpointed step of a run (None when there is none); reads directory names
    only, so it is cheap enough to poll."""
    directory = paths.join(model_dir, "checkpoints")
    if not paths.isdir(directory):
        return None
    steps = [int(d) for d in paths.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


def export_params(model_dir: str, output: str, step: int | None = None, *, overwrite=False) -> int:
    """Writes the parameters of `step` (default: the newest) of the run in `model_dir` to the
    params checkpoint `output`; returns the step exported.

    Raises ExportError (no run, no checkpoint, unknown step) or params_io.CheckpointError (the
    output exists and `overwrite` is False).
    """
    model_dir = paths.absolute(model_dir)
    outputs.check_not_input(output, model_dir)
    params_io.check_writable(output, overwrite)
    model = model_from_run(model_dir)
    rules = sharding.MeshRules()
    trainer = Trainer(model, optim.OptimizerConfig(), rules.make_mesh(), rules)
    try:
        params, step = checkpoints.restore_run_params(
            model_dir, trainer.abstract_state().params, step
        )
    except checkpoints.MissingCheckpointError as e:
        raise ExportError(str(e)) from None
    model, params = model.export(params)  # distillation: the student, the model trained
    params_io.save(output, params, model.model_type, model.config_dict(), overwrite=overwrite)
    return step
