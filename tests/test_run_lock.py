"""The writer lock of a run directory on local disk, without starting a trainer (the end-to-end
case with two `train` processes is `slow`, in test_train_resume.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from encdec_adapt.errors import ConfigError
from encdec_adapt.runtime import run_guard


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    run = str(tmp_path / "run")
    with run_guard.RunLock(run):
        record = json.loads((tmp_path / "run" / run_guard.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=f"held by pid {os.getpid()}"):
            run_guard.RunLock(run).acquire()
    assert not (tmp_path / "run" / run_guard.LOCK_FILE).exists()  # released


def test_the_lock_of_a_dead_process_is_taken_over_and_kept_aside(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    run = tmp_path / "run"
    run.mkdir()
    stale = {"host": socket.gethostname(), "pid": pid, "started": "then", "command": "train"}
    (run / run_guard.LOCK_FILE).write_text(json.dumps(stale))
    with run_guard.RunLock(str(run)):
        assert json.loads((run / run_guard.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in capsys.readouterr().out
    assert json.loads((run / f"{run_guard.LOCK_FILE}.stale-{pid}").read_text()) == stale


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = {"host": socket.gethostname() + "-other", "pid": 1, "started": "x", "command": "c"}
    (run / run_guard.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="another process"):
        run_guard.RunLock(str(run)).acquire()
    assert json.loads((run / run_guard.LOCK_FILE).read_text()) == other
