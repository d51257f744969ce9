"""`encdec-adapt tasks`: list registered seqio tasks / mixtures, or show preprocessed examples.

encdec-adapt tasks                                  # names of tasks and mixtures
encdec-adapt tasks --show stdlib_ul2 -n 3           # 3 examples, decoded to text
encdec-adapt tasks --show stdlib_code_search --lengths query=64,positive=256
"""

from __future__ import annotations

import importlib
import os

from encdec_adapt.cli import args as args_lib
from encdec_adapt.errors import InputError

DEFAULT_LENGTHS = "inputs=512,targets=128,query=64,positive=256,negatives=256"


def _parse_lengths(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise InputError(f"--lengths: expected FEATURE=INT[,...], got {item!r}")
        out[key.strip()] = int(value)
    return out


def _show(name: str, num: int, split: str, seed: int, lengths: dict[str, int]) -> None:
    import numpy as np

    from encdec_adapt.data import counters as counters_lib
    from encdec_adapt.data import registry

    provider = registry.get_task_or_mixture(name)
    features = provider.output_features
    lengths = {k: v for k, v in lengths.items() if k in features}
    ds = registry.get_dataset(name, lengths, split=split, seed=seed)
    for i, ex in enumerate(ds.take(num).as_numpy_iterator()):
        print(f"--- {name} [{split}] example {i}")
        for key in sorted(ex):
            value = ex[key]
            if key in features and np.ndim(value) >= 1:
                vocab, rank = features[key].vocabulary, features[key].rank
                rows = list(value) if rank == 2 else [value]
                for j, row in enumerate(rows):
                    ids = np.asarray(row).tolist()
                    label = key if rank == 1 else f"{key}[{j}]"
                    print(f"{label} ({len(ids)} ids): {vocab.decode(ids)!r}")
            else:
                print(f"{key}: {value}")
    counts = {k: v for k, v in counters_lib.COUNTERS.result().items() if v}
    if counts:
        print(f"--- counters: {counts}")


def tasks_main(argv: list[str]) -> int:
    parser = args_lib.parser("tasks", __doc__.split("\n")[0])
    parser.add_argument("--show", metavar="NAME", help="print preprocessed examples of NAME")
    parser.add_argument("-n", "--num", type=int, default=2, help="examples to show")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="FEATURE=INT,... lengths")
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        help="extra module registering tasks (importable name), e.g. my_project.tasks",
    )
    parser.add_argument("--data-dir", help="embedded corpus TFDS dir ($ENCDEC_ADAPT_TFDS_DIR)")
    args = parser.parse_args(argv)
    lengths = _parse_lengths(args.lengths)
    if args.data_dir:
        os.environ["ENCDEC_ADAPT_TFDS_DIR"] = args.data_dir

    import encdec_adapt.tasks  # noqa: F401  (registers the default tasks)
    from encdec_adapt.data import registry

    for module in args.module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise InputError(f"--module {module}: cannot import it ({e})") from e
    if args.show:
        _show(args.show, args.num, args.split, args.seed, lengths)
        return 0
    tasks, mixtures = registry.registered()
    print(f"tasks ({len(tasks)}):")
    print("\n".join(f"  {t}" for t in tasks))
    print(f"mixtures ({len(mixtures)}):")
    print("\n".join(f"  {m}" for m in mixtures))
    return 0
