"""Where training metrics go: TensorBoard event files, a JSON-lines log, and a terminal line.

Only process 0 writes. Files: MODEL_DIR/metrics.jsonl (one {"step", "split", name: value}
object per line) and MODEL_DIR/tb/<split>/events.* (TensorBoard scalars). `read_metrics` reads
the JSON-lines log back.

MODEL_DIR may be a URL (gs://): the log is then rewritten whole at each flush (an object store
cannot append), and TensorBoard writes to a local directory that is copied into MODEL_DIR/tb
after each flush (`paths.MirroredDirectory`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from encdec_adapt.storage import paths

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str, split: str = "train") -> list[dict]:
    """The records of `split` ("train", "eval") in a metrics.jsonl (`path`: the file, or the
    MODEL_DIR holding it), one per step, sorted by step; [] when there is no file.

    A resumed run logs again the steps after its checkpoint: the last record of a step wins.
    Blank lines and a last line cut by a kill are skipped.
    """
    if paths.isdir(path):
        path = paths.join(path, METRICS_FILE)
    if not paths.exists(path):
        return []
    by_step: dict[int, dict] = {}
    with paths.open_file(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("split") == split:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes scalars per step and shows progress with an ETA.

    Args:
      model_dir: output directory.
      total_steps: the step the run ends at (for the progress bar and ETA).
      tensorboard: also write TensorBoard event files (needs TensorFlow).
    """

    def __init__(self, model_dir: str, total_steps: int, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.model_dir = model_dir
        self._writers = {}
        self._tensorboard = tensorboard and self.enabled
        self._jsonl = None
        self._tb = None
        self._t0 = None
        self._step0 = None
        if self.enabled:
            paths.makedirs(model_dir)
            self._jsonl = paths.AppendFile(paths.join(model_dir, METRICS_FILE))
            self._tb = paths.MirroredDirectory(paths.join(model_dir, "tb"))

    def _writer(self, split: str):
        if split not in self._writers:
            import tensorflow as tf

            self._writers[split] = tf.summary.create_file_writer(
                os.path.join(self._tb.local, split)
            )
        return self._writers[split]

    def write(self, step: int, scalars: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard:
            import tensorflow as tf

            with self._writer(split).as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(name, float(value), step=int(step))
            self._writer(split).flush()
            self._tb.sync()

    def start(self, step: int) -> None:
        """Marks the step the rate / ETA are measured from (after the first compiled step)."""
        self._t0, self._step0 = time.perf_counter(), step

    def progress(self, step: int, scalars: dict[str, float]) -> None:
        """One status line: step/total, bar, loss, tokens/s, ETA."""
        if not self.enabled:
            return
        width = 20
        frac = min(step / max(self.total_steps, 1), 1.0)
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        eta = ""
        if self._t0 is not None and step > self._step0:
            rate = (step - self._step0) / (time.perf_counter() - self._t0)
            eta = f" | ETA {format_duration((self.total_steps - step) / rate)}"
        shown = " | ".join(
            f"{k} {scalars[k]:.4g}"
            for k in ("loss", "kd_loss", "accuracy", "learning_rate", "tokens_per_s", "mfu")
            if k in scalars
        )
        end = "\r" if sys.stderr.isatty() and step < self.total_steps else "\n"
        sys.stderr.write(f"step {step}/{self.total_steps} [{bar}] {shown}{eta}{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for w in self._writers.values():
            w.close()
        if self._writers:
            self._tb.sync()
