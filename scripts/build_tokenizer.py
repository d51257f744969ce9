"""Re-trains the embedded SentencePiece model (4000 pieces + 96 extra ids) reproducibly.

    python scripts/build_tokenizer.py [--out PATH]

The default path is the committed asset, encdec_adapt/data/assets/stdlib_spm_4000.model. The model
depends only on the running Python's standard library (identical per Python version) and on
sentencepiece's trainer, run single-threaded: two runs give byte-identical pieces.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encdec_adapt.data import vocab


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=vocab.EMBEDDED_MODEL, help="where to write the .model")
    args = parser.parse_args()
    start = time.time()
    path = vocab.train_embedded(args.out)
    print(f"wrote {path} ({os.path.getsize(path)} bytes) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
