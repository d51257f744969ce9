"""The gin commands (`train`, `eval`, `infer`, `embed`): flags and gin bindings -> a call of
the command's gin entry point.

    encdec-adapt train --gin_file=models/gemma_tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=1000

Errors are raised, not reported: cli/main.py maps them to exit codes. A gin file or binding gin
cannot parse, and a binding gin finds missing when the entry point runs, raise GinConfigError;
`locate_bindings` finds the gin lines that set the fields an error message names.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable

import gin

from encdec_adapt.cli import args as args_lib
from encdec_adapt.errors import ConfigError

GIN_DIR = os.path.dirname(gin.__file__)


def _tolerant(exists: Callable[[str], bool]) -> Callable[[str], bool]:
    """A gin existence check that says False where gin's own raises.

    gin looks an include such as 'runs/adapt_ul2.gin' up as a Python package `runs` too; when
    the working directory (on sys.path under `python -m`) holds a `runs/` folder, e.g. the
    quickstart's default output runs/quickstart, that is a namespace package without a file and
    gin's check raises TypeError instead of moving on to the next search path.
    """

    def check(path: str) -> bool:
        try:
            return exists(path)
        except TypeError:
            return False

    check.tolerant = True
    return check


def _make_file_checks_tolerant() -> None:
    # gin has no public API to replace a registered reader's existence check.
    readers = gin.config._FILE_READERS
    for i, (reader, exists) in enumerate(readers):
        if not getattr(exists, "tolerant", False):
            readers[i] = (reader, _tolerant(exists))


_make_file_checks_tolerant()


class GinConfigError(ConfigError):
    """gin rejected the configuration: a file or binding it cannot parse (the message has gin's
    file and line), or a required binding missing when the entry point runs."""


def gin_value(text: str) -> str:
    """A `--gin.KEY=VALUE` value as gin syntax: Python literals, @references, %macros and
    quoted strings pass through; anything else (e.g. a bare path) becomes a string."""
    stripped = text.strip()
    if stripped[:1] in ("@", "%", "'", '"', "(", "[", "{"):
        return text
    try:
        ast.literal_eval(stripped)
        return text
    except (ValueError, SyntaxError):
        return repr(text)


def parse_flags(argv: list[str], command: str, entry: str = "the command's entry point"):
    """(argparse namespace, gin bindings) of a command line."""
    parser = args_lib.parser(
        command,
        f"Runs the gin entry point `{entry}`. Bindings are given as --gin.KEY=VALUE "
        "(repeatable), e.g. --gin.MODEL_DIR=/tmp/run --gin.train.num_steps=100.",
    )
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument(
        "--gin_search_path", action="append", default=[], help="where gin files are looked up"
    )
    parser.add_argument("--coordinator_address", help="host:port of process 0 (multi-process)")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument(
        "--distributed_auto",
        action="store_true",
        help="let JAX discover the cluster (TPU pods, SLURM)",
    )
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin.") :].split("=", 1)
            bindings.append(f"{key} = {gin_value(value)}")
        elif arg.startswith("--gin."):
            parser.error(f"{arg}: expected --gin.KEY=VALUE")
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("at least one --gin_file is required")
    return args, bindings


def locate_bindings(message: str, files: list[str], bindings: list[str]) -> list[str]:
    """'file:line: text' of the gin bindings a config error message names.

    Config classes name their fields as `Class.field=value` or `Invalid Class: field=value`.
    """
    names = set(re.findall(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)=", message))
    invalid = re.search(r"Invalid ([A-Za-z_]\w*): (.*)", message)
    if invalid:
        names |= {(invalid.group(1), f) for f in re.findall(r"\b(\w+)=", invalid.group(2))}
    found = []
    sources = [(f, _read_gin(f)) for f in files] + [("--gin", "\n".join(bindings))]
    for path, text in sources:
        for i, line in enumerate(text.splitlines(), 1):
            for cls, field in names:
                if re.match(rf"\s*([\w./]*/)?{cls}\.{field}\s*=", line):
                    found.append(f"{path}:{i}: {line.strip()}")
    return found


def _read_gin(path: str) -> str:
    for root in ["", *gin.config._LOCATION_PREFIXES]:  # gin has no public search-path getter
        full = os.path.join(root, path)
        if os.path.exists(full):
            with open(full) as f:
                return f.read()
    return ""


def _raised_by_gin(e: BaseException) -> bool:
    """True when gin itself raised `e` (its innermost frame is in gin), e.g. a required binding
    missing when a configurable is called; False for an error of the configured code."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(GIN_DIR + os.sep)


class GinRun:
    """One gin command: its gin files and bindings (for locating the culprit of an error)."""

    def __init__(self, command: str):
        self.command = command
        self.files: list[str] = []
        self.bindings: list[str] = []

    def locate(self, message: str) -> list[str]:
        return locate_bindings(message, self.files, self.bindings)

    def __call__(self, argv: list[str], load_entry: Callable[[], Callable], name: str) -> int:
        """Parses flags, starts jax.distributed, loads the gin entry point `name` (importing its
        module registers the configurables), parses gin, then calls the entry; returns 0."""
        from encdec_adapt.parallel import distributed

        args, bindings = parse_flags(argv, self.command, name)
        self.files, self.bindings = list(args.gin_file), bindings
        distributed.initialize(
            args.coordinator_address,
            args.num_processes,
            args.process_id,
            auto=args.distributed_auto,
        )
        from encdec_adapt.nn import config as config_lib

        config_lib.add_gin_search_path(*args.gin_file, extra=args.gin_search_path)
        entry = load_entry()
        # Every configurable under its stable name, also for user gin files that import none.
        import encdec_adapt.configurables  # noqa: F401

        _make_file_checks_tolerant()  # readers registered since import, too
        try:
            gin.parse_config_files_and_bindings(args.gin_file, bindings)
        except Exception as e:  # gin's parse errors carry the file and line in their message
            raise GinConfigError(f"bad gin config: {type(e).__name__}: {e}") from e
        try:
            entry()
        except Exception as e:
            if _raised_by_gin(e) and not isinstance(e, ConfigError):
                # e.g. "Required bindings for `train` not provided in config: ['model_dir']"
                raise GinConfigError(f"bad gin config: {e}") from e
            raise
        return 0
