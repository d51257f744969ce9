"""The `encdec-adapt` command line: `encdec-adapt COMMAND [ARGS...]`.

Also runnable as `python -m encdec_adapt.cli.main`. Each command lives in the module that owns its
work and is imported only when used, so that `import-hf` does not pay for TensorFlow and `train`
does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv without the command, returning an exit code, and a
# one-line summary).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "import-hf": ("encdec_adapt.cli.convert", "import_hf_main", "HF checkpoint dir -> Orbax"),
    "import-gemma": (
        "encdec_adapt.cli.convert",
        "import_gemma_main",
        "gemma-library (Kaggle Flax) checkpoint -> Orbax",
    ),
    "export-hf": ("encdec_adapt.cli.convert", "export_hf_main", "Orbax checkpoint -> HF dir"),
    "adapt": (
        "encdec_adapt.models.warm_start",
        "adapt_main",
        "decoder-only ckpt(s) -> T5Gemma enc-dec",
    ),
    "export-params": (
        "encdec_adapt.runtime.export_params",
        "export_params_main",
        "training run's checkpoint -> params checkpoint",
    ),
    "tasks": ("encdec_adapt.cli.tasks", "tasks_main", "list seqio tasks / show examples"),
    "train": ("encdec_adapt.runtime.train", "train_main", "train with gin files (resumes)"),
    "eval": (
        "encdec_adapt.runtime.train",
        "eval_main",
        "evaluate a checkpoint (loss, task metrics)",
    ),
    "infer": (
        "encdec_adapt.runtime.train",
        "infer_main",
        "score / decode a seqio task or JSONL file",
    ),
    "embed": (
        "encdec_adapt.runtime.embed",
        "embed_main",
        "texts / task split -> embeddings, report",
    ),
}


def usage() -> str:
    lines = ["usage: encdec-adapt COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "`encdec-adapt COMMAND --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"encdec-adapt: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    return int(getattr(importlib.import_module(module), function)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
