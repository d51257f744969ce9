"""The `encdec-adapt` command line: one dispatcher (`main.py`, one table of commands, exit codes
by error type) and thin command modules. The gin commands (train, eval, infer, embed) run their
entry points in `encdec_adapt.runtime` through `gin_runner.py`."""
