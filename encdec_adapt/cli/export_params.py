"""`encdec-adapt export-params`: a training run's checkpoint -> a params checkpoint.

    encdec-adapt export-params --model_dir runs/pretrain --output ckpt/pretrained
    encdec-adapt export-params --model_dir runs/kd --output ckpt/student --step 2000

The work is runtime/export_params.py's; errors (no run, no checkpoint, unknown step, an existing
output) are errors.EncdecError: exit 2 from the dispatcher.
"""

from __future__ import annotations

from encdec_adapt.cli import args as args_lib


def export_params_main(argv: list[str]) -> int:
    p = args_lib.parser(
        "export-params",
        "Write the parameters of a training run's checkpoint (the newest, or --step) as a "
        "params checkpoint: what warm starts, `adapt`, KD teachers, `eval` / `infer` "
        "(params_from) and `export-hf` read. A distillation run exports its student.",
    )
    p.add_argument("--model_dir", required=True, help="MODEL_DIR of an `encdec-adapt train` run")
    p.add_argument("--output", required=True, help="params checkpoint directory to write")
    p.add_argument("--step", type=int, help="checkpointed step (default: the newest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    from encdec_adapt.runtime.export_params import export_params

    step = export_params(args.model_dir, args.output, args.step, overwrite=args.overwrite)
    print(f"export-params: step {step} of {args.model_dir} -> {args.output}")
    return 0
