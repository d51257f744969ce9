"""The `encdec-adapt` command line: `encdec-adapt COMMAND [ARGS...]`, the one dispatcher.

Also runnable as `python -m encdec_adapt` or `python -m encdec_adapt.cli.main`. COMMANDS is the
one table of commands; each is imported only when used, so that `import-hf` does not pay for
TensorFlow and `train` does not pay for torch.

Exit codes, by exception type (here and nowhere else):
  0  done (a preempted `train` too: it saved a checkpoint)
  2  bad input or configuration: an errors.EncdecError (ConfigError, InputError,
     CheckpointError, MissingFileError; a flag argparse rejects; a gin file or binding gin
     rejects). One line `encdec-adapt COMMAND: MESSAGE` naming the culprit, plus `set at
     FILE:LINE` lines for the gin bindings it names.
  1  `train` diverged (TrainingDiverged: one line naming the last good checkpoint), or an
     internal error (any other exception: its traceback).
  130 `train` stopped by SIGINT (Ctrl-C) after saving a checkpoint (StoppedBySignal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import sys
import tempfile
import traceback

from encdec_adapt import signals


@dataclasses.dataclass(frozen=True)
class Command:
    """A command: `function(argv) -> exit code` of `module`, or with `gin` the gin entry point
    `function()` of `module`, run by cli/gin_runner.py from --gin_file / --gin.KEY=VALUE flags.
    `tensorflow`: the command imports TensorFlow (the dispatcher imports it first, quietly)."""

    module: str
    function: str
    summary: str
    gin: bool = False
    tensorflow: bool = False


COMMANDS: dict[str, Command] = {
    "import-hf": Command(
        "encdec_adapt.cli.convert", "import_hf_main", "HF checkpoint dir -> Orbax"
    ),
    "import-gguf": Command(
        "encdec_adapt.cli.convert", "import_gguf_main", "GGUF file (llama.cpp) -> Orbax + tokenizer"
    ),
    "import-gemma": Command(
        "encdec_adapt.cli.convert",
        "import_gemma_main",
        "gemma-library (Kaggle Flax) checkpoint -> Orbax",
    ),
    "export-hf": Command(
        "encdec_adapt.cli.convert", "export_hf_main", "Orbax checkpoint -> HF dir"
    ),
    "adapt": Command(
        "encdec_adapt.cli.adapt", "adapt_main", "decoder-only ckpt(s) -> T5Gemma enc-dec"
    ),
    "export-params": Command(
        "encdec_adapt.cli.export_params",
        "export_params_main",
        "training run's checkpoint -> params checkpoint",
        tensorflow=True,
    ),
    "tasks": Command(
        "encdec_adapt.cli.tasks", "tasks_main", "list seqio tasks / show examples", tensorflow=True
    ),
    "train": Command(
        "encdec_adapt.runtime.train",
        "train",
        "train with gin files (resumes)",
        gin=True,
        tensorflow=True,
    ),
    "eval": Command(
        "encdec_adapt.runtime.infer",
        "evaluate",
        "evaluate a checkpoint (loss, task metrics)",
        gin=True,
        tensorflow=True,
    ),
    "infer": Command(
        "encdec_adapt.runtime.infer",
        "infer",
        "score / decode a seqio task or JSONL file",
        gin=True,
        tensorflow=True,
    ),
    "embed": Command(
        "encdec_adapt.runtime.embed",
        "embed",
        "texts / task split -> embeddings, report",
        gin=True,
        tensorflow=True,
    ),
}

# Lines TensorFlow writes to stderr while it loads, before its log level applies (static
# initialisers; TF_CPP_MIN_LOG_LEVEL silences the rest). Dropped from the start-up output only.
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
)


def usage() -> str:
    lines = ["usage: encdec-adapt COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {c.summary}" for name, c in COMMANDS.items()]
    lines += [
        "",
        "`encdec-adapt COMMAND --help` describes a command. Exit codes: 0 done, 2 bad input or "
        "configuration, 1 diverged training or an internal error.",
    ]
    return "\n".join(lines)


def _not_gin_path_probe(record: logging.LogRecord) -> bool:
    """gin logs an ERROR for every search-path prefix under which a gin file is *not* found,
    also when it then finds the file under the next one."""
    return not (
        record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
        and record.levelno == logging.ERROR
    )


def quiet_environment() -> None:
    """Log defaults for the libraries the commands load (a value already set wins). Numerics
    are untouched: oneDNN stays as TensorFlow sets it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = logging.getLogger()
    if _not_gin_path_probe not in root.filters:
        root.addFilter(_not_gin_path_probe)


@contextlib.contextmanager
def _without_startup_noise():
    """Runs the block with stderr (fd 2) captured, then writes it back without STARTUP_NOISE."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to capture
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [
                line
                for line in text.splitlines(keepends=True)
                if not any(noise in line for noise in STARTUP_NOISE)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and absl logging) without its start-up lines on stderr."""
    if "tensorflow" in sys.modules:
        return
    with _without_startup_noise():
        import tensorflow  # noqa: F401

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def _message(command: str, e: BaseException) -> str:
    """The message of `e` without the call context gin appends to errors of configurables (and
    without a repeated `COMMAND: ` prefix)."""
    lines = str(e).splitlines() or [type(e).__name__]
    text = "\n".join(line for line in lines if not line.startswith("  In call to configurable"))
    return text.removeprefix(f"{command}: ")


_URL_LIKE = re.compile(r"""^['"]?([A-Za-z][A-Za-z0-9+.-]+:/[^'"]*)['"]?$""")


def check_path_arguments(argv: list[str]) -> None:
    """Refuses, before anything starts, every argument value that is a URL this installation
    cannot open or a malformed one (gs:/bucket): such a path would otherwise be taken as a
    local directory named "gs:". Raises ConfigError naming it."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        m = _URL_LIKE.match(value)
        if m:
            from encdec_adapt.storage import paths

            paths.check(m.group(1), arg.split("=", 1)[0] if "=" in arg else "argument")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"encdec-adapt: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    quiet_environment()
    spec = COMMANDS[command]
    if command == "train":  # a stop signal during start-up ends in an orderly stop too
        signals.record()
    gin_run = None
    try:
        check_path_arguments(rest)
        if spec.tensorflow:
            import_tensorflow_quietly()
        load = lambda: getattr(importlib.import_module(spec.module), spec.function)
        if not spec.gin:
            return int(load()(rest) or 0)
        from encdec_adapt.cli.gin_runner import GinRun

        gin_run = GinRun(command)
        return gin_run(rest, load, spec.function)  # loads after jax.distributed starts
    except SystemExit as e:  # --help (0); a command's own exit code
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(f"encdec-adapt {command}: {e.code}", file=sys.stderr)
        return 1
    except Exception as e:
        from encdec_adapt.errors import EncdecError, StoppedBySignal, TrainingDiverged

        if isinstance(e, EncdecError):
            print(f"encdec-adapt {command}: {_message(command, e)}", file=sys.stderr)
            for where in gin_run.locate(str(e)) if gin_run is not None else []:
                print(f"  set at {where}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingDiverged):
            print(f"encdec-adapt {command}: {e}", file=sys.stderr)
            return 1
        if isinstance(e, StoppedBySignal):
            print(f"encdec-adapt {command}: {e}", file=sys.stderr)
            return e.exit_code
        traceback.print_exc()
        print(f"encdec-adapt {command}: internal error: {type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        signals.restore()


if __name__ == "__main__":
    sys.exit(main())
