"""Stop signals that arrive while `train` starts up (imports, tracing), before its loop handles
them: `encdec-adapt train` calls `record` first thing, and runtime.run_guard.StopSignals takes
over what was recorded, so a SIGTERM / SIGINT during start-up also ends in an orderly stop
instead of killing the process halfway through opening its run directory."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: signal numbers received before the training loop took over, in order
received: list[int] = []
#: the handlers `record` replaced (what `restore` puts back)
originals: dict[int, object] = {}


def on_signal(signum, frame) -> None:
    received.append(signum)


def record() -> None:
    """Records SIGTERM and SIGINT in `received` from now on (main thread only)."""
    for sig in STOP_SIGNALS:
        originals[sig] = signal.signal(sig, on_signal)


def restore() -> None:
    """Puts back the handlers `record` replaced and forgets what was received."""
    for sig, handler in originals.items():
        signal.signal(sig, handler)
    originals.clear()
    received.clear()


def original(sig: int, handler: object) -> object:
    """`handler`, or the handler `record` replaced when `handler` is the recorder itself."""
    return originals.get(sig, signal.SIG_DFL) if handler == on_signal else handler
