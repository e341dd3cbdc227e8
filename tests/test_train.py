"""train.py end to end on the smoke preset: all three stages, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

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


def _params_at(workdir, step):
    path = os.path.join(workdir, "autoencoder", "checkpoints", str(step), "state")
    state = ocp.StandardCheckpointer().restore(path)
    return {k: np.asarray(v) for k, v in _flatten(state["params"]).items()}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree}


@pytest.mark.slow
def test_three_stages_run_and_write_metrics(tmp_path):
    out = _train(tmp_path / "run", tmp_path / "cache")
    results = json.loads(out[out.index("{"):])
    assert set(results) == {"autoencoder", "foundation", "task"}
    assert np.isfinite(results["task"]["val_psnr_source"])
    for stage in results:
        lines = [json.loads(line) for line in open(tmp_path / "run" / stage / "metrics.jsonl")]
        train = [r for r in lines if r["split"] == "train"]
        assert train and all(np.isfinite(r["loss"]) for r in train)
        assert {"lr", "grad_norm", "samples_per_s", "memory_gib"} <= set(train[-1])
        assert any(r["split"] == "val" and "val_psnr" in r for r in lines)
        assert (tmp_path / "run" / stage / f"samples_{stage}.png").stat().st_size > 1000
        assert os.listdir(tmp_path / "run" / stage / "tensorboard")


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_parameters(tmp_path):
    cache = tmp_path / "cache"
    args = ("--config.train.stages=autoencoder", "--config.train.steps.autoencoder=8",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=100")
    _train(tmp_path / "straight", cache, *args)
    reference = _params_at(tmp_path / "straight", 8)

    proc = _train(tmp_path / "killed", cache, *args, wait=False)
    ckpt = tmp_path / "killed" / "autoencoder" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpt / "4").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt / "8").exists()
    out = _train(tmp_path / "killed", cache, *args)
    assert "resumed from step" in out
    resumed = _params_at(tmp_path / "killed", 8)
    assert reference.keys() == resumed.keys()
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
