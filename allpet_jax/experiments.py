"""A small runner for the notebooks' experiments: train a configuration, score it, tabulate over seeds.

Each run is `train.py` and `python -m allpet_jax.evaluate` in subprocesses (absl flags parse once per
process, and a fresh process per run keeps compiled programs and memory from piling up), so a notebook
cell reads like the commands a user would type, and every number in a table can be reproduced from the
command recorded next to it (`Run.commands`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Run:
    workdir: str
    commands: list
    wall_s: float
    summary: dict  # evaluate's summary: {method: {metric: {"mean", "std", "n"}}}, {} when not evaluated


CACHE_DIR = os.environ.get("ALLPET_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "allpet_jax", "xla"))
"""JAX's persistent compilation cache for the runs: arms of an experiment compile the same simulator and
models, so every process after the first loads them from disk instead of compiling again."""


def _call(cmd: list, log_path: str) -> None:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if done.returncode:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); end of {log_path}:\n{tail}")


def run(workdir: str, preset: str, overrides=(), *, task: str = "low_dose", evaluate: bool = True,
        eval_args=("--steps", "20")) -> Run:
    """`train.py --config configs/base.py:<preset> --workdir <workdir> --config.data.task=<task> <overrides>`,
    then (with `evaluate`) the evaluation of `task` on the test split into `workdir/eval`."""
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "run.log")
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, f"configs/base.py:{preset}"),
             "--workdir", workdir, f"--config.data.task={task}", *overrides]
    commands = [train]
    t0 = time.perf_counter()
    _call(train, log)
    summary = {}
    if evaluate:
        out = os.path.join(workdir, "eval")
        score = [sys.executable, "-m", "allpet_jax.evaluate", "--workdir", workdir, "--task", task, "--out", out,
                 *eval_args]
        commands.append(score)
        _call(score, log)
        with open(os.path.join(out, "results.json")) as f:
            summary = json.load(f)["summary"]
    return Run(workdir, commands, time.perf_counter() - t0, summary)


def metric(run_: Run, method_prefix: str, name: str) -> float:
    """The mean of metric `name` for the first method whose row starts with `method_prefix`."""
    for method, row in run_.summary.items():
        if method.startswith(method_prefix) and name in row:
            return row[name]["mean"]
    raise KeyError(f"no method starting with {method_prefix!r} has {name!r}; methods: {list(run_.summary)}")


def seed_table(runs_by_arm: dict, metrics, method_prefix: str = "ALL-PET") -> str:
    """Markdown: one row per arm, each metric as mean ± std over the arm's runs (seeds), and the
    difference of the means to the first arm."""
    arms = list(runs_by_arm)
    header = ["arm", "seeds"] + [f"{m}" for m in metrics] + [f"Δ {m} vs {arms[0]}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    means = {}
    for arm in arms:
        values = {m: np.array([metric(r, method_prefix, m) for r in runs_by_arm[arm]], float) for m in metrics}
        means[arm] = {m: float(np.nanmean(v)) for m, v in values.items()}
        cells = [f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" for v in values.values()]
        deltas = [f"{means[arm][m] - means[arms[0]][m]:+.3f}" for m in metrics]
        lines.append(f"| {arm} | {len(runs_by_arm[arm])} | " + " | ".join(cells + deltas) + " |")
    return "\n".join(lines)
