"""The stage runner of the experiment workflows (quickstart, reproduce, code_search).

A workflow is a sequence of stages over one output directory. `Stages.run` runs one stage:

- skip it when it is finished: its result JSON exists (the stage's numbers, written once,
  complete), and / or its `finished` check holds (outputs that are not a JSON file: a training
  run whose newest checkpoint is its last step, a params checkpoint with its model.json);
- resume it when it was interrupted: the stage's own command resumes (`encdec-adapt train`
  restarts from its newest checkpoint); partial outputs of a stage that cannot resume
  (`restart`) are removed before it runs again;
- write its result JSON atomically (a temporary name, then os.replace): a result file exists
  only when complete, so a kill at any point leaves the stage unfinished, never half-written;
- check that it finished: a `finished` check that fails after the stage ran (a preempted
  `train` saves a checkpoint and exits cleanly) raises StageError ("run again to resume");
- add its wall time to a StageTimes file (seconds per stage, summed over invocations, so the
  time of a stage that was interrupted and resumed is the sum of its parts).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any


class StageError(RuntimeError):
    """A stage failed or stopped before it finished; the message names the stage."""


def write_json(path: str, value: Any, indent: int = 1) -> None:
    """Written under a temporary name and renamed: the file exists only when complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=indent)
    os.replace(tmp, path)


def read_json(path: str) -> Any | None:
    """The JSON value in `path`, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class StageTimes:
    """Wall seconds per stage in a JSON file, summed over the invocations of each stage."""

    def __init__(self, path: str):
        self.path = path

    def get(self) -> dict[str, float]:
        return read_json(self.path) or {}

    def add(self, stage: str, seconds: float) -> None:
        times = self.get()
        times[stage] = times.get(stage, 0.0) + seconds
        write_json(self.path, times)


class Stages:
    """Runs the stages of one workflow.

    Args:
      echo: where the skip messages go (e.g. print, or a prefixed print).
      times: where the stages' wall times are summed (None: not recorded).
    """

    def __init__(self, echo: Callable[[str], Any] = print, times: StageTimes | None = None):
        self.echo = echo
        self.times = times

    def run(
        self,
        name: str,
        work: Callable[[], Any],
        *,
        result: str | None = None,
        finished: Callable[[], bool] | None = None,
        restart: Iterable[str] = (),
        done: str = "",
    ) -> Any:
        """Runs stage `name` (`work()`) unless it is finished; returns its result.

        Args:
          name: the stage's name (messages, errors and the StageTimes key).
          work: runs the stage; its return value is the result (written to `result`).
          result: the result JSON: present means finished (and is returned as the result);
            written atomically when `work` returns.
          finished: the finished check of outputs that are not a JSON result; checked again
            after `work` (False: StageError, the stage stopped early and can resume).
          restart: partial outputs removed before `work` runs (a stage that cannot resume).
          done: what the skip message adds after "NAME: finished", e.g. " (400 steps in DIR)".
        """
        if result is None and finished is None:
            raise ValueError(f"stage {name}: give a result file or a finished check")
        previous = read_json(result) if result is not None else None
        if (result is None or previous is not None) and (finished is None or finished()):
            self.echo(f"{name}: finished{done}, skipping")
            return previous
        for path in restart:
            if os.path.exists(path):
                os.remove(path)
        t0 = time.perf_counter()
        try:
            value = work()
        finally:
            if self.times is not None:
                self.times.add(name, time.perf_counter() - t0)
        if finished is not None and not finished():
            raise StageError(
                f"stage {name} stopped before it finished (preempted?); run again to resume it"
            )
        if result is not None:
            write_json(result, value)
        return value
