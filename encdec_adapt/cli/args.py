"""The argument parser of the commands: a bad flag raises errors.InputError (one line naming the
flag, exit 2 from the dispatcher) instead of printing the usage."""

from __future__ import annotations

import argparse

from encdec_adapt.errors import InputError


class UsageError(InputError):
    """A missing, unknown or malformed command-line flag."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (`{self.prog} --help` lists the flags)")


def parser(command: str, description: str) -> ArgumentParser:
    """The parser of `encdec-adapt COMMAND`."""
    return ArgumentParser(prog=f"encdec-adapt {command}", description=description)
