"""What keeps a run directory consistent while `train` writes it: one writer at a time (`RunLock`)
and stop signals that end at a step boundary with a checkpoint (`StopSignals`).

The lock is MODEL_DIR/lock.json, created exclusively by process 0: {"host", "pid", "started",
"command"}. A second trainer on the same MODEL_DIR is refused naming the holder. A lock left by a
process that died on this host (its pid is gone) is taken over with a warning; a lock held from
another host is never taken over (its process may be alive): the message says how to remove it.
Readers (eval, infer, export-params, embed) take no lock: they open checkpoints read-only.

On gs:// the lock object is created with the precondition ifGenerationMatch=0 (`paths.
create_exclusive`): two trainers racing for one bucket directory cannot both get it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from encdec_adapt import signals as early_signals
from encdec_adapt.errors import ConfigError
from encdec_adapt.storage import paths

LOCK_FILE = "lock.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: str) -> dict:
    try:
        return json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return {}


class RunLock:
    """The writer lock of a run directory (a context manager; process 0 holds it)."""

    def __init__(self, model_dir: str):
        self.path = paths.join(paths.absolute(model_dir), LOCK_FILE)
        self.held = False

    def _create(self) -> bool:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv),
        }
        return paths.create_exclusive(self.path, json.dumps(record))

    def acquire(self) -> None:
        """Takes the lock, or raises ConfigError naming its holder."""
        if jax.process_index() == 0:
            paths.makedirs(paths.dirname(self.path))
            while not self._create():
                holder = _read(self.path)
                pid = holder.get("pid")
                same_host = holder.get("host") == socket.gethostname()
                if same_host and isinstance(pid, int) and not _alive(pid):
                    print(
                        f"WARNING: taking over the stale lock {self.path} of process {pid} "
                        f"(started {holder.get('started')}), which is no longer running",
                        flush=True,
                    )
                    paths.move(self.path, f"{self.path}.stale-{pid}")
                    continue
                if not holder:  # being written by its holder right now, or damaged
                    time.sleep(0.2)
                    if _read(self.path):
                        continue
                raise ConfigError(
                    f"{paths.dirname(self.path)} is being trained by another process: "
                    f"{self.path} is held by pid {pid} on host {holder.get('host')} since "
                    f"{holder.get('started')} ({holder.get('command')!r}). Use another "
                    "MODEL_DIR, or remove the lock file if that process is gone."
                )
            self.held = True
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("run_lock")

    def release(self) -> None:
        if self.held and _read(self.path).get("pid") == os.getpid():
            paths.remove(self.path)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StopSignals:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a request to stop at the next step
    boundary (a context manager). A second SIGINT interrupts at once (the default handler is back
    after the first). `exit_code`: 0 for SIGTERM (a preempted run saved its work), 130 for
    SIGINT."""

    SIGNALS = early_signals.STOP_SIGNALS

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if early_signals.received:  # arrived during start-up (cli/main.py recorded them)
            self.received = early_signals.received[0]
            early_signals.received.clear()
        for sig in self.SIGNALS:
            # not possible off the main thread (e.g. a test harness thread): then no handler
            with contextlib.suppress(ValueError):
                previous = signal.signal(sig, self._handler)
                # the start-up recorder is not worth restoring: the default action is
                self._previous[sig] = (
                    signal.SIG_DFL if previous == early_signals.on_signal else previous
                )
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_code(self) -> int:
        return 130 if self.received == signal.SIGINT else 0

    def agreed(self) -> bool:
        """True when any process was asked to stop (all processes must save together)."""
        if jax.process_count() == 1:
            return self.received is not None
        flags = multihost_utils.process_allgather(np.asarray(self.received or 0, np.int32))
        got = [int(f) for f in np.ravel(flags) if f]
        if got and self.received is None:
            self.received = got[0]
        return bool(got)
