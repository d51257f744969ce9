"""`python -m encdec_adapt COMMAND ...`: the same as the `encdec-adapt` command."""

import sys

from encdec_adapt.cli.main import main

sys.exit(main())
