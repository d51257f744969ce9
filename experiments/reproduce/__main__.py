"""`python -m experiments.reproduce ...` (see experiments/reproduce/__init__.py)."""

import sys

from experiments.reproduce import main

sys.exit(main())
