"""Metrics of a run: one JSON object per line in `metrics.jsonl`, and TensorBoard event files.

JSON lines are for grep and pandas; the event files (written with tensorboardX) for `tensorboard
--logdir WORKDIR`. Only process 0 writes.

A resumed run logs each step once: `MetricsWriter` first drops the lines past the restored checkpoint
(the killed run logged them, the resumed run logs them again), rewriting the file atomically, and tells
TensorBoard to hide the events past it. A SIGKILL can still cut the last line short; `read_metrics`, the
one reader, skips such a line.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from allpet_jax.atomic_write import write_text

FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends to `workdir/metrics.jsonl` (and TensorBoard) a run that starts at `start_step`: 0 for a fresh
    run, which starts a new log, or the step of the checkpoint it resumed from, whose lines up to that
    step are kept."""

    def __init__(self, workdir: str, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, FILE)
            keep_through(path, start_step if start_step > 0 else -1)
            self._jsonl = open(path, "a", buffering=1)
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the earlier events at and past it (the killed run's)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step else 0)

    def write(self, step: int, scalars: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")  # one write per line
        for name, value in values.items():
            self._tb.add_scalar(f"{split}/{name}", value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def keep_through(path: str, step: int) -> None:
    """Rewrite the log at `path` (atomically) to its records of steps up to `step` (-1: none), dropping the
    lines `read_metrics` skips too. A missing file, or one with nothing to drop, is left alone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    new = "".join(json.dumps(r) + "\n" for r in kept)
    if new != text:
        write_text(path, new)


def read_metrics(path: str) -> list[dict]:
    """The records of a `metrics.jsonl`, in file order. A line that is not a whole JSON record with a
    `step` is skipped: the last line, cut short when a run is killed mid-write, and (in logs written
    before resumes truncated the log) the line a resumed run then appended to such a cut line."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records
