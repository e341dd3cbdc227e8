"""A small runner for the notebooks' experiments: train a configuration, score it, tabulate over seeds.

Each run is `train.py` and `python -m allpet_jax.evaluate` in subprocesses (absl flags parse once per
process, and a fresh process per run keeps compiled programs and memory from piling up), so a notebook
cell reads like the commands a user would type, and every number in a table can be reproduced from the
command recorded next to it (`Run.commands`).

As a command, the per-task table (every paired task against the baselines, one seed):

    python -m allpet_jax.experiments --preset cpu --runs notebook_runs/tasks_cpu [--tasks low_dose,delayed_frame]
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from allpet_jax import cli
from allpet_jax.atomic_write import claim_output_dir, write_text
from allpet_jax.tasks import LOW_DOSE, PAIRED_TASKS, SYNTHESIS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = "allpet_jax.experiments"  # the program in error lines and the owner named in --runs' owner file


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


def _up_to_date(result: str, workdir: str, cmd: list, log_path: str) -> bool:
    """Whether `result` was written by `cmd` after every checkpoint of `workdir` (so a re-run experiment,
    whose finished stages train nothing, need not score them again)."""
    if not os.path.exists(result) or not os.path.exists(log_path):
        return False
    with open(log_path) as f:
        if "$ " + " ".join(cmd) + "\n" not in f.readlines():  # scored with other arguments
            return False
    newest = max((os.path.getmtime(os.path.join(d, name)) for d, _, names in os.walk(workdir)
                  if f"{os.sep}checkpoints" in d for name in names), default=0.0)
    return os.path.getmtime(result) > newest


def preset_config(preset: str):
    """`configs/base.py`'s config of `preset`, read from this checkout (a config file, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_allpet_base_config", os.path.join(ROOT, "configs", "base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def check_overrides(preset: str, overrides) -> None:
    """Raise ValueError unless every `--config.a.b=value` in `overrides` names a field of the preset's config
    and its value parses as that field's type, so a typo in an arm fails before anything trains."""
    config = preset_config(preset)
    for flag in overrides:
        match = re.fullmatch(r"--config\.([\w.]+)=(.*)", flag)
        if not match:
            raise ValueError(f"expected an override --config.<field>=<value>, got {flag!r}")
        path, value = match.groups()
        node = config
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise ValueError(f"{flag!r}: the {preset} config has no field {path!r}")
            node = node[part]
        kind = type(node)
        ok = (value.lower() in ("true", "false")) if kind is bool else _parses(kind, value)
        if not ok:
            raise ValueError(f"{flag!r}: field {path!r} expects a {kind.__name__}, got {value!r}")


def _parses(kind: type, value: str) -> bool:
    if kind not in (int, float):
        return True
    try:
        kind(value)
    except ValueError:
        return False
    return True


def run(workdir: str, preset: str, overrides=(), *, task: str = LOW_DOSE, evaluate: bool = True,
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
        if not _up_to_date(os.path.join(out, "results.json"), workdir, score, log):
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
    """Markdown: one row per arm, each metric as mean ± std over the arm's runs (seeds), and the change
    against the first arm: paired by seed (the i-th run of each arm shares its seed) as the mean ± std
    of the per-seed differences, which removes the seed-to-seed variation both arms share."""
    arms = list(runs_by_arm)
    header = ["arm", "seeds"] + [f"{m}" for m in metrics] + [f"Δ {m} vs {arms[0]}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    values = {arm: {m: np.array([metric(r, method_prefix, m) for r in runs_by_arm[arm]], float) for m in metrics}
              for arm in arms}
    for arm in arms:
        cells = [f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" for v in values[arm].values()]
        deltas = []
        for m in metrics:
            ours, ref = values[arm][m], values[arms[0]][m]
            if ours.shape == ref.shape:
                deltas.append(f"{np.nanmean(ours - ref):+.3f} ± {np.nanstd(ours - ref):.3f}")
            else:  # unpaired: the difference of the means
                deltas.append(f"{np.nanmean(ours) - np.nanmean(ref):+.3f}")
        lines.append(f"| {arm} | {len(runs_by_arm[arm])} | " + " | ".join(cells + deltas) + " |")
    lines += ["", "Spreads: each run's value is its mean over the test samples; a metric's ± is the standard "
              "deviation of that value over the arm's seeds, and a Δ's ± the standard deviation of the per-seed "
              "differences (not a spread over test samples; the per-sample intervals are in each run's "
              "eval/results.md)."]
    return "\n".join(lines)


def load_run(workdir: str) -> Run:
    """A finished run read back from its `eval/results.json` (to tabulate runs made earlier)."""
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        return Run(workdir, [], float("nan"), json.load(f)["summary"])


def write_results(path: str, title: str, table: str, runs_by_arm: dict, preset: str, overrides=()) -> None:
    """Write `table` as Markdown to `path` (atomically), with what a reader needs to reproduce it: the
    preset and overrides, the machine, each run's wall time and the commands of the first run per arm."""
    walls = [r.wall_s for runs in runs_by_arm.values() for r in runs]
    lines = [f"## {title}", "", table, "",
             f"- preset `{preset}`, overrides `{' '.join(overrides) or '(none)'}`",
             f"- machine: {machine()}",
             f"- {len(walls)} runs, wall time {sum(walls) / 60:.1f} min in total "
             f"(median {np.median(walls) if walls else 0:.0f} s per run, training and evaluation; a re-run "
             "reuses finished stages and evaluations, so it counts only what it redid)", "",
             "Commands (first seed of each arm; other seeds differ in `--config.seed` and the workdir):", ""]
    for arm, runs in runs_by_arm.items():
        if runs:
            lines.append(f"- {arm}:")
            lines += [f"  - `{' '.join(_relative(c))}`" for c in runs[0].commands]
    write_text(path, "\n".join(lines) + "\n")


def machine() -> str:
    """This machine in one line: CPU model, cores, OS, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def _relative(cmd: list) -> list:
    """A command as a user would type it: `python` for this interpreter, paths inside the repository
    relative to it."""
    out = []
    for part in cmd:
        part = "python" if part == sys.executable else part
        out.append(part.replace(ROOT + os.sep, ""))
    return out


def _is_sample(name: str) -> bool:  # one sample of the model without guidance
    return name.startswith("ALL-PET (") and name.endswith(", one sample")


def _is_mean(name: str) -> bool:  # the mean of K samples of the model without guidance
    return name.startswith("ALL-PET (") and "mean of" in name


TASK_COLUMNS = [  # (header, which summary row, metric); sinograms against the clean target, images the truth
    ("sino: AE ceiling", lambda n: n.startswith("ceiling: autoencoder"), "sino_psnr"),
    ("sino: identity", lambda n: n == "identity", "sino_psnr"),
    ("sino: pixel regressor", lambda n: n == "pixel U-Net regressor", "sino_psnr"),
    ("sino: latent regressor", lambda n: n == "latent U-Net regressor", "sino_psnr"),
    ("sino: ALL-PET", _is_sample, "sino_psnr"),
    ("sino: ALL-PET mean", _is_mean, "sino_psnr"),
    ("OSEM: clinical OSEM of source + Gaussian", lambda n: n.startswith("source: FBP / clinical OSEM"), "osem_psnr"),
    ("OSEM: pixel regressor", lambda n: n == "pixel U-Net regressor", "osem_psnr"),
    ("OSEM: ALL-PET mean", _is_mean, "osem_psnr"),
    ("OSEM: full-dose clinical", lambda n: n.startswith("full-dose clinical OSEM"), "osem_psnr"),
    ("rel. CRPS: ALL-PET", _is_mean, "crps"),
    ("90% coverage: ALL-PET", _is_mean, "coverage90"),
]


def task_table(runs_by_task: dict) -> str:
    """Markdown: per task, sinogram and OSEM-image PSNR of the baselines and of the model (means over the
    test samples; each task's full table with spreads is in its eval/results.md)."""
    lines = ["| task | " + " | ".join(h for h, _, _ in TASK_COLUMNS) + " |", "|" + "---|" * (len(TASK_COLUMNS) + 1)]
    for task, run_ in runs_by_task.items():
        cells = []
        for _, pick, name in TASK_COLUMNS:
            means = [row[name]["mean"] for method, row in run_.summary.items() if pick(method) and name in row]
            cells.append(("-" if means[0] is None else f"{means[0]:.3g}" if abs(means[0]) < 1 else f"{means[0]:.2f}")
                         if means else "-")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_tasks(runs_dir: str, preset: str, tasks=PAIRED_TASKS, overrides=(), eval_args=("--steps", "20")):
    """The per-task comparison: train every stage on the first task, then only the task model and the
    regressor for each other task on the same autoencoder and foundation model; score all on the test split."""
    first, others = tasks[0], tasks[1:]
    base = os.path.join(runs_dir, first)
    out = {first: run(base, preset, list(overrides), task=first, eval_args=eval_args)}
    synthesis = [sys.executable, "-m", "allpet_jax.evaluate", "--workdir", base, "--task", SYNTHESIS,
                 "--out", os.path.join(runs_dir, SYNTHESIS), "--steps", "50"]
    log = os.path.join(base, "run.log")
    if not _up_to_date(os.path.join(runs_dir, SYNTHESIS, "results.json"), base, synthesis, log):
        _call(synthesis, log)
    for task in others:
        out[task] = run(os.path.join(runs_dir, task), preset,
                        ["--config.train.stages=task,regressor,pixel_regressor", f"--config.train.autoencoder_dir={base}/autoencoder",
                         f"--config.train.foundation_dir={base}/foundation", *overrides], task=task, eval_args=eval_args)
        print(f"{task}: {out[task].wall_s:.0f} s", flush=True)
    return out


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """This CLI's flags, in `flag_values`: called from `__main__` only, so importing the module (as the
    notebooks do) defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_string("preset", "cpu", "configs/base.py preset of every run", **into)
    flags.DEFINE_string("runs", None, "directory for the runs and results.md: new, empty, or one this command wrote "
                                      "(rerun to resume it)", **into)
    flags.DEFINE_list("tasks", list(PAIRED_TASKS), "comma-separated; the first trains every stage", **into)
    flags.DEFINE_string("overrides", "", "extra train.py flags for every run, space-separated", **into)
    flags.mark_flag_as_required("runs", flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The per-task table the flags in `flag_values` (parsed) ask for, written to `--runs`/results.md."""
    del argv
    tasks = tuple(t for t in flag_values.tasks if t)
    unknown = [t for t in tasks if t not in PAIRED_TASKS]
    if unknown or not tasks:
        raise app.UsageError(f"--tasks must be a non-empty subset of {','.join(PAIRED_TASKS)}; got "
                             f"{','.join(tasks)!r}")
    # Before hours of training: a directory holding anyone else's files is refused (OutputDirectoryError), untouched.
    runs_dir = claim_output_dir(flag_values.runs, TOOL, [*tasks, SYNTHESIS, "results.md"])
    overrides = flag_values.overrides.split()
    runs_by_task = run_tasks(runs_dir, flag_values.preset, tasks, overrides)
    table = task_table(runs_by_task)
    print(table)
    with open(os.path.join(runs_dir, SYNTHESIS, "results.md")) as f:
        table += "\n\nSynthesis (the foundation model, prompts of the test split):\n\n" + f.read()
    write_results(os.path.join(runs_dir, "results.md"), "Tasks", table, {t: [r] for t, r in runs_by_task.items()},
                  flag_values.preset, overrides)


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags)
