"""A diffusion stage killed with SIGKILL and resumed: the log holds each step once and parses, and the
resumed run continues exactly where the straight run would have been (the task stage, warm-started from a
foundation; tests/test_train.py covers the autoencoder)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from allpet_jax.training.metrics import MetricsWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, cache, *overrides, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/base.py:smoke"),
           "--workdir", str(workdir), f"--config.data.cache_dir={cache}", *overrides]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def kill_past_a_checkpoint(proc, stage_dir) -> None:
    """SIGKILL `proc` once `stage_dir` holds a finished checkpoint and its log a training line past it."""
    log = os.path.join(stage_dir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        saved = latest_checkpoint(stage_dir) if os.path.isdir(os.path.join(stage_dir, "checkpoints")) else 0
        if saved and os.path.exists(log) and any(r["split"] == "train" and r["step"] > saved for r in read_metrics(log)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # frozen at once: no step or save lands between the check and the kill
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def latest_checkpoint(stage_dir) -> int:
    """The step of the latest finished checkpoint in `stage_dir` (Orbax renames a step's directory to its
    number only once the save is complete), 0 for none."""
    return max((int(p) for p in os.listdir(os.path.join(stage_dir, "checkpoints")) if p.isdigit()), default=0)


def check_clean_log(log) -> list[dict]:
    """Every line of `log` whole JSON, and the steps of each split strictly increasing."""
    lines = [json.loads(line) for line in open(log)]  # raises on a cut or merged line
    for split in {r["split"] for r in lines}:
        steps = [r["step"] for r in lines if r["split"] == split]
        assert steps == sorted(set(steps)), (split, steps)
    return lines


def params_at(stage_dir, step):
    state = ocp.StandardCheckpointer().restore(os.path.join(stage_dir, "checkpoints", str(step), "state"))
    leaves = {}

    def walk(tree, prefix):
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(v, f"{prefix}/{k}")
        else:
            leaves[prefix] = np.asarray(tree)

    walk(state["params"], "")
    return leaves


def test_metrics_writer_keeps_the_log_up_to_the_restored_step(tmp_path):
    """Resuming from step 4 keeps the lines up to 4 and drops the rest, the cut last line included; starting
    from 0 starts a new log. `read_metrics` skips a cut line, and the line a resume once appended to it."""
    log = tmp_path / "metrics.jsonl"
    whole = [{"step": s, "split": "train", "loss": 1.0 / (s + 1)} for s in range(1, 9)] + [
        {"step": 0, "split": "val", "val_psnr": 20.0}, {"step": 4, "split": "val", "val_psnr": 21.0},
        {"step": 8, "split": "val", "val_psnr": 22.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 9, "split": "tr')
    assert read_metrics(log) == whole

    writer = MetricsWriter(str(tmp_path), start_step=4)
    assert read_metrics(log) == [r for r in whole if r["step"] <= 4]
    writer.write(5, {"loss": 0.5})
    writer.close()
    assert [json.loads(line) for line in open(log)] == [r for r in whole if r["step"] <= 4] + [
        {"step": 5, "split": "train", "loss": 0.5}]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # rewritten atomically, nothing left behind

    MetricsWriter(str(tmp_path), start_step=0).close()
    assert log.read_text() == ""

    merged = '{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl{"step": 2, "split": "train", "loss": 0.5}\n'
    log.write_text(merged + "[3]\n")  # as logs written before resumes truncated could hold
    assert read_metrics(log) == [{"step": 1, "split": "train", "loss": 1.0}]


@pytest.mark.slow
def test_task_stage_killed_and_resumed_logs_each_step_once_and_continues_exactly(tmp_path):
    cache, pre = tmp_path / "cache", tmp_path / "pre"
    # The cheapest autoencoder and foundation a task can start from: one step each.
    _train(pre, cache, "--config.train.stages=autoencoder,foundation", "--config.train.steps.autoencoder=1",
           "--config.train.steps.foundation=1")
    args = ("--config.train.stages=task", "--config.train.steps.task=8", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=4",
            f"--config.train.autoencoder_dir={pre / 'autoencoder'}",
            f"--config.train.foundation_dir={pre / 'foundation'}")
    _train(tmp_path / "straight", cache, *args)
    straight = check_clean_log(tmp_path / "straight" / "task" / "metrics.jsonl")

    stage = tmp_path / "killed" / "task"
    log = stage / "metrics.jsonl"
    kill_past_a_checkpoint(_train(tmp_path / "killed", cache, *args, wait=False), stage)
    restored = latest_checkpoint(stage)
    assert 0 < restored < 8
    before = read_metrics(log)
    with open(log, "a") as f:  # what a kill in the middle of a write leaves (the kill above rarely lands there)
        f.write('{"step": 7, "split": "tra')
    out = _train(tmp_path / "killed", cache, *args)
    assert f"resumed from step {restored}" in out

    lines = check_clean_log(log)
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in lines if r["split"] == "val"] == [0, 4, 8]
    assert [r for r in lines if r["step"] <= restored] == [r for r in before if r["step"] <= restored]  # kept
    # The resumed run continues the straight run exactly: the same losses and validation after the restore
    # (speed and timing fields aside), the same final parameters.
    for a, b in zip(lines, straight, strict=True):
        assert (a["step"], a["split"]) == (b["step"], b["split"]) and a.keys() == b.keys()
        for key in set(a) - {"step", "split", "samples_per_s"}:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at step {a['step']}")
    resumed, reference = params_at(stage, 8), params_at(tmp_path / "straight" / "task", 8)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
