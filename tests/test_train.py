"""train.py, sample.py and the evaluation end to end on the smoke preset: every stage, exact resume after
SIGKILL, sampling with uncertainty maps, the scored table, and bad input refused with nothing written."""

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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """All four stages of the smoke preset, trained once for the tests of this module."""
    root = tmp_path_factory.mktemp("smoke")
    out = _train(root / "run", root / "cache")
    return root / "run", json.loads(out[out.index("{"):])


def _run(script, *args, expect_ok=True):
    cmd = [sys.executable] + (["-m", script] if "." in script and not script.endswith(".py") else
                              [os.path.join(ROOT, script)]) + [str(a) for a in args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT,
                         timeout=900)
    if expect_ok:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_stages_run_and_write_metrics(smoke_run):
    workdir, results = smoke_run
    assert set(results) == {"autoencoder", "foundation", "task", "regressor"}
    assert np.isfinite(results["task"]["val_psnr_source"]) and results["task"]["wall_s"] > 0
    for stage in results:
        lines = [json.loads(line) for line in open(workdir / stage / "metrics.jsonl")]
        train = [r for r in lines if r["split"] == "train"]
        assert train and all(np.isfinite(r["loss"]) for r in train)
        assert {"lr", "grad_norm", "samples_per_s", "memory_gib"} <= set(train[-1])
        metric = "val_loss" if stage == "foundation" else "val_psnr"
        val = [r for r in lines if r["split"] == "val" and metric in r]
        assert val[0]["step"] == 0 and len(val) >= 2  # the untrained model's numbers come first
        assert (workdir / stage / f"samples_{stage}.png").stat().st_size > 1000
        assert os.listdir(workdir / stage / "tensorboard")


@pytest.mark.slow
def test_sample_writes_outputs_reconstructions_and_uncertainty(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out = tmp_path / "low_dose"
    _run("sample.py", "--workdir", workdir, "--task", "low_dose", "--n", 3, "--num_samples", 2, "--steps", 3,
         "--out", out, "--mat")
    with np.load(out / "outputs.npz", allow_pickle=False) as f:
        arrays = dict(f)
    assert arrays["output"].shape == (2, 3, 1, 32, 32) and arrays["source"].shape == (3, 1, 32, 32)
    assert arrays["target"].shape == (3, 1, 32, 32) and np.all(np.isfinite(arrays["output"]))
    np.testing.assert_allclose(arrays["mean"], arrays["output"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["std"], arrays["output"].std(0), rtol=1e-5, atol=1e-6)
    assert float(arrays["std"].mean()) > 0  # two samples from different noise differ
    for name in ("output_fbp", "output_osem", "source_fbp", "target_osem"):
        assert arrays[name].shape[-2:] == (32, 32), name
    assert (out / "outputs.mat").stat().st_size > 0
    for png in ("sinograms.png", "fbp.png", "osem.png"):
        assert (out / png).stat().st_size > 1000, png
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary directory left behind

    syn = tmp_path / "synthesis"
    _run("sample.py", "--workdir", workdir, "--task", "synthesis", "--prompt", "tracer=FDG,region=brain", "--n", 2,
         "--steps", 3, "--n_bins", 40, "--out", syn)
    with np.load(syn / "outputs.npz", allow_pickle=False) as f:
        assert f["output"].shape == (1, 2, 1, 32, 40) and f["output_fbp"].shape[-2:] == (32, 32)
        assert f["prompt"].tolist() == [[0, 0, 0]] * 2


@pytest.mark.slow
def test_evaluate_scores_every_method(smoke_run, tmp_path):
    workdir, _ = smoke_run
    _run("allpet_jax.evaluate", "--workdir", workdir, "--task", "low_dose", "--n", 4, "--steps", 3, "--out", tmp_path)
    record = json.load(open(tmp_path / "results.json"))
    rows = record["summary"]
    assert set(rows) == {"identity", "FBP/OSEM + Gaussian (val-tuned)", "U-Net regressor", "ALL-PET (ddim 3)",
                         "target (reference)"}
    assert rows["identity"]["sino_psnr"]["n"] == 4 and np.isfinite(rows["identity"]["sino_psnr"]["mean"])
    assert np.isfinite(rows["ALL-PET (ddim 3)"]["osem_ssim"]["mean"])
    assert "sino_psnr" not in rows["target (reference)"]  # the reference is scored in image space only
    assert "| identity |" in open(tmp_path / "results.md").read()

    _run("allpet_jax.evaluate", "--workdir", workdir, "--task", "synthesis", "--n", 4, "--steps", 3,
         "--out", tmp_path / "synthesis")
    rows = json.load(open(tmp_path / "synthesis" / "results.json"))["summary"]
    real = rows["validation sinograms (real, reference)"]
    assert set(rows) == {"ALL-PET (ddim 3)", "validation sinograms (real, reference)"}
    assert 0 <= real["range_residual"]["mean"] < rows["ALL-PET (ddim 3)"]["range_residual"]["mean"]


@pytest.mark.slow
def test_bad_input_is_refused_and_nothing_is_written(smoke_run, tmp_path):
    workdir, _ = smoke_run
    cases = {
        "missing checkpoint": (["--workdir", tmp_path / "nowhere", "--task", "low_dose"], "no finished checkpoint"),
        "another task": (["--workdir", workdir, "--task", "delayed_frame"], "trained for task 'low_dose'"),
    }
    good = np.ones((1, 32, 32), np.float32)
    for name, array, message in [("wrong shape", np.ones((1, 30, 32), np.float32), "expected (n_angles, n_bins)"),
                                 ("NaN", np.where(np.eye(32, dtype=bool), np.nan, good), "finite"),
                                 ("negative", good - 2.0, "negative")]:
        path = tmp_path / f"{name.replace(' ', '_')}.npy"
        np.save(path, array)
        cases[name] = (["--workdir", workdir, "--task", "low_dose", "--input", path], message)
    for name, (args, message) in cases.items():
        out = tmp_path / "out"
        result = _run("sample.py", *args, "--out", out, "--steps", 2, expect_ok=False)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert message in result.stderr, (name, result.stderr[-2000:])
        assert not out.exists(), name


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

    # Resuming under another recipe (here the seed) would mix two runs: refused, checkpoint untouched.
    other = _train(tmp_path / "killed", cache, *args, "--config.seed=1", wait=False)
    text = other.communicate(timeout=900)[0]
    assert other.returncode == 2, text[-3000:]
    assert "train: error:" in text and "recipe" in text and "'seed': 0" in text, text[-3000:]
    after = _params_at(tmp_path / "killed", 8)
    for name in reference:
        np.testing.assert_array_equal(after[name], resumed[name], err_msg=name)
