"""The package surface: light imports, and every CLI command resolves to a real function."""

import importlib
import subprocess
import sys

from encdec_adapt.cli import main


def test_model_api_imports_without_tensorflow_or_torch():
    code = (
        "import sys, encdec_adapt, encdec_adapt.convert;"
        "print(sorted(m for m in ('tensorflow', 'torch', 'seqio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_command_resolves():
    for name, command in main.COMMANDS.items():
        assert callable(getattr(importlib.import_module(command.module), command.function)), name
        assert command.summary


def test_usage_and_unknown_command(capsys):
    assert main.main([]) == 0
    assert "import-hf" in capsys.readouterr().out
    assert main.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
