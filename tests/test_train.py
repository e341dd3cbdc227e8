"""train.py, sample.py and the evaluation end to end on the smoke preset: every stage, exact resume after
SIGKILL, sampling with uncertainty maps, the scored table, and bad input refused with nothing written."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_resume import _train, check_clean_log, latest_checkpoint

from allpet_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """All five stages of the smoke preset, trained once for the tests of this module."""
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
    assert set(results) == {"autoencoder", "foundation", "task", "regressor", "pixel_regressor"}
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
    found = [json.loads(line) for line in open(workdir / "foundation" / "metrics.jsonl")]
    assert any("consistency_share" in r for r in found)  # the foundation's decoded term logs its share
    task = [json.loads(line) for line in open(workdir / "task" / "metrics.jsonl")]
    first = next(r for r in task if r["split"] == "val")
    # warm-started from the foundation with the skip closed, the task's first sample is D(E(source)): no
    # worse than the identity (the bar; the smoke autoencoder even smooths some of the noise away)
    assert first["step"] == 0 and first["val_psnr"] >= first["val_psnr_source"] - 0.1
    gate = [r["skip_variance"] for r in task if "skip_variance" in r]
    assert gate and gate[-1] > 0.0  # and training opens the learned skip


def _first_val(workdir, stage):
    return next(r for r in read_metrics(workdir / stage / "metrics.jsonl") if r["split"] == "val")


@pytest.mark.slow
def test_training_learns(smoke_run):
    """Training moves the models where it should, not only to finite numbers: each assertion fails in the
    same run at a learning rate of 1e-9. The step-0 validation line and the final numbers (results.json)
    use the same validation keys (`train.validate` with `config.seed`), so each comparison is paired: the
    same batches, diffusion times and noise. The numbers in the comments were measured."""
    workdir, results = smoke_run
    task = _first_val(workdir, "task")
    # 1.408 -> 1.382 (-1.9%). The learned skip opens at a rate of 1 / learning_rate (stages.skip_rate), so
    # at lr 1e-9 it still opens and this alone gives -1.35%: the next test checks the U-Net without it.
    assert results["task"]["val_loss"] < 0.995 * task["val_loss"]
    pixel = _first_val(workdir, "pixel_regressor")
    assert pixel["val_psnr"] == pytest.approx(pixel["val_psnr_source"], abs=1e-4)  # it starts as the identity
    assert results["pixel_regressor"]["val_psnr"] > pixel["val_psnr_source"] + 0.1  # 22.99 -> 23.51 dB
    latent = _first_val(workdir, "regressor")  # starts at D(E(source)), above the identity already
    assert results["regressor"]["val_psnr"] > latent["val_psnr"] + 0.05  # 24.91 -> 25.09 dB (identity 22.99)


@pytest.mark.slow
def test_task_unet_learns_without_the_learned_skip(smoke_run, tmp_path):
    """The task stage's U-Net learns on its own: the smoke run's task again, from the same autoencoder and
    foundation, with the learned skip off (`diffusion.task_skip_open_steps=0`), whose opening does not
    scale with the learning rate. Measured: validation loss 1.2531 -> 1.2459 (-0.57%); at lr 1e-9 it
    stays 1.2531 to every digit."""
    workdir, _ = smoke_run
    _train(tmp_path / "run", workdir.parent / "cache", "--config.train.stages=task",
           f"--config.train.autoencoder_dir={workdir / 'autoencoder'}",
           f"--config.train.foundation_dir={workdir / 'foundation'}", "--config.diffusion.task_skip_open_steps=0")
    first = _first_val(tmp_path / "run", "task")
    final = json.load(open(tmp_path / "run" / "results.json"))["task"]  # the same validation as step 0
    assert final["val_loss"] < 0.998 * first["val_loss"]


@pytest.mark.slow
def test_autoencoder_improves_on_its_patch_pca_start(tmp_path):
    """The autoencoder starts as the whitened patch PCA of its training sinograms, the best linear code of
    its size in mean squared error, so PSNR has little room: the smoke run's 6 steps lower it (27.01 ->
    26.21 dB, Adam's first steps at lr 1e-3 disturb the start). 100 steps of the smoke preset raise it
    (measured 27.01 -> 27.10 dB) and lower the L1 error it trains on (-2.0%); at lr 1e-9 neither moves."""
    _train(tmp_path / "run", tmp_path / "cache", "--config.train.stages=autoencoder",
           "--config.train.steps.autoencoder=100", "--config.train.eval_every=100", "--config.train.log_every=50",
           "--config.train.checkpoint_every=100")
    first = _first_val(tmp_path / "run", "autoencoder")
    final = json.load(open(tmp_path / "run" / "results.json"))["autoencoder"]  # the same validation as step 0
    assert final["val_psnr"] > first["val_psnr"] + 0.03
    assert final["val_l1"] < 0.99 * first["val_l1"]


@pytest.mark.slow
def test_pixel_regressor_checkpoint_reproduces_its_validation(smoke_run):
    """The pixel regressor's checkpoint, loaded by `runs.load_trained` and run the way sample.py and the
    evaluation run it (simulated inputs, `model_batch`, `generate` in counts), gives the validation PSNR
    that train.py computed with the in-memory stage at the end of training."""
    import jax

    from allpet_jax import sampling
    from allpet_jax.training import runs, stages

    workdir, results = smoke_run
    trained = runs.load_trained(str(workdir / "pixel_regressor"))
    assert trained.name == "pixel_regressor" and trained.step == 4 and trained.state.frozen == {}
    val = sampling.simulated_inputs(trained, 8, "val")  # the smoke preset's two validation batches of 4
    out = sampling.generate(trained, sampling.model_batch(trained, val), jax.random.key(0))[0]
    norm = trained.normalisation
    target = np.asarray(val["target"], np.float32)
    identity = np.asarray(val["source"], np.float32) * np.float32(norm.target_scale / norm.source_scale)
    found = results["pixel_regressor"]
    # PSNR uses the target's own peak, so it is the same in counts and in normalised units.
    np.testing.assert_allclose(float(np.mean(stages.psnr(out, target))), found["val_psnr"], atol=1e-3)
    np.testing.assert_allclose(float(np.mean(stages.psnr(identity, target))), found["val_psnr_source"], atol=1e-3)
    assert abs(found["val_psnr"] - found["val_psnr_source"]) > 1e-2  # trained weights, not the untrained identity


@pytest.mark.slow
def test_sample_writes_outputs_reconstructions_and_uncertainty(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out = tmp_path / "low_dose"
    _run("sample.py", "--workdir", workdir, "--task", "low_dose", "--num_inputs", 3, "--num_samples", 2, "--steps", 3,
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
    _run("sample.py", "--workdir", workdir, "--task", "synthesis", "--prompt", "tracer=FDG,region=brain",
         "--num_inputs", 2,
         "--steps", 3, "--n_bins", 40, "--out", syn)
    with np.load(syn / "outputs.npz", allow_pickle=False) as f:
        assert f["output"].shape == (1, 2, 1, 32, 40) and f["output_fbp"].shape[-2:] == (32, 32)
        assert f["prompt"].tolist() == [[0, 0, 0]] * 2


@pytest.mark.slow
def test_evaluate_scores_every_method(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out = _run("allpet_jax.evaluate", "--workdir", workdir, "--task", "low_dose", "--num_inputs", 4, "--steps", 3,
               "--num_samples", 3, "--guidance", 0.5, "--out", tmp_path)
    record = json.load(open(tmp_path / "results.json"))
    rows = record["summary"]
    model, guided = "ALL-PET (ddim 3)", "ALL-PET + Poisson guidance 0.5 (ddim 3)"
    assert set(rows) == {
        "ceiling: noisy target (a perfect single sample)", "ceiling: autoencoder D(E(clean target))", "identity",
        "source: FBP / clinical OSEM + Gaussian (val-tuned)", "pixel U-Net regressor", "latent U-Net regressor",
        f"{model}, one sample", f"{model}, mean of 3", f"{guided}, one sample", f"{guided}, mean of 3",
        "zero-pair: foundation + Poisson guidance 0.5 (ddim 3), one sample",
        "zero-pair: foundation + Poisson guidance 0.5 (ddim 3), mean of 3", "full-dose clinical OSEM (reference)"}
    assert rows["identity"]["sino_psnr"]["n"] == 4 and np.isfinite(rows["identity"]["sino_psnr"]["mean"])
    assert np.isfinite(rows[f"{model}, one sample"]["osem_ssim"]["mean"])
    assert "sino_psnr" not in rows["full-dose clinical OSEM (reference)"]  # image space only
    assert 0 <= rows[f"{model}, mean of 3"]["coverage90"]["mean"] <= 1
    # One rank histogram (K + 1 = 4 ranks, shares summing to 1) per posterior row, none for the regressors.
    histograms = record["rank_histograms"]
    assert set(histograms) == {name for name in rows if name.endswith("mean of 3")}
    assert all(len(h) == 4 and sum(h) == pytest.approx(1.0) for h in histograms.values())
    # Scored against the clean target: the noisy target is then no longer a perfect score, but the clean
    # target's own autoencoder round trip is the better ceiling whenever the autoencoder beats the noise.
    assert np.isfinite(rows["ceiling: noisy target (a perfect single sample)"]["sino_psnr"]["mean"])
    # Deltas against the pixel regressor, paired per sample, with intervals around their means.
    assert record["reference"] == "pixel U-Net regressor"
    d = record["deltas"]["identity"]["sino_psnr"]
    assert d["lo"] <= d["mean"] <= d["hi"] and d["n"] == 4
    per = record["per_sample"]["identity"]["sino_psnr"]
    ref = record["per_sample"]["pixel U-Net regressor"]["sino_psnr"]
    assert d["mean"] == pytest.approx(np.mean(np.subtract(per, ref)), rel=1e-9)
    report = open(tmp_path / "results.md").read()
    assert "| identity |" in report and "95 % bootstrap interval" in report
    assert report.count("| ceiling: autoencoder D(E(clean target)) |") == 4  # on every table
    assert "%|" in out.stderr  # the sampling progress bar
    assert (tmp_path / "grid.png").stat().st_size > 5000  # the OSEM images of the first test slices, as scored

    _run("allpet_jax.evaluate", "--workdir", workdir, "--task", "synthesis", "--num_inputs", 4, "--steps", 3,
         "--cfg_scale", 2, "--out", tmp_path / "synthesis")
    rows = json.load(open(tmp_path / "synthesis" / "results.json"))["summary"]
    real = rows["validation sinograms (real, reference)"]
    assert set(rows) == {"ALL-PET (ddim 3)", "ALL-PET (ddim 3), cfg 2", "validation sinograms (real, reference)"}
    assert 0 <= real["range_residual"]["mean"] < rows["ALL-PET (ddim 3)"]["range_residual"]["mean"]
    # region match: scored where the 4 test prompts hold a real sinogram of the region (NaN elsewhere)
    assert all(0 <= r["region_match"]["mean"] <= 1 for r in rows.values() if r["region_match"]["n"])


@pytest.mark.slow
def test_bad_input_is_refused_and_nothing_is_written(smoke_run, tmp_path):
    workdir, _ = smoke_run
    cases = {
        "missing checkpoint": (["--workdir", tmp_path / "nowhere", "--task", "low_dose"], "no finished checkpoint"),
        "another task": (["--workdir", workdir, "--task", "delayed_frame"], "trained for task 'low_dose'"),
    }
    good = np.ones((1, 32, 32), np.float32)
    for name, array, message in [("wrong shape", np.ones((1, 30, 32), np.float32), "expected (n_angles, n_bins)"),
                                 ("NaN", np.where(np.eye(32, dtype=bool), np.nan, good), "finite")]:
        # (negative bins are accepted: the smoke model was trained on the simulator's corrected sinograms;
        # tests/test_input_safety.py covers a model trained on raw files refusing them)
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
            "--config.train.checkpoint_every=2", "--config.train.eval_every=100", "--config.train.log_every=1")
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
    log = tmp_path / "killed" / "autoencoder" / "metrics.jsonl"
    restored, before = latest_checkpoint(log.parent), read_metrics(log)
    with open(log, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"step": 6, "split": "tr')
    out = _train(tmp_path / "killed", cache, *args)
    assert f"resumed from step {restored}" in out
    resumed = _params_at(tmp_path / "killed", 8)
    assert reference.keys() == resumed.keys()
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # The log holds each step once, every line whole, the lines up to the restored step as they were.
    lines = check_clean_log(log)
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 9))
    assert [r for r in lines if r["step"] <= restored] == [r for r in before if r["step"] <= restored]
    assert json.load(open(tmp_path / "killed" / "results.json"))["autoencoder"]["wall_s"] > 0

    # Resuming under another recipe (here the seed) would mix two runs: refused, checkpoint untouched.
    other = _train(tmp_path / "killed", cache, *args, "--config.seed=1", wait=False)
    text = other.communicate(timeout=900)[0]
    assert other.returncode == 2, text[-3000:]
    assert "train: error:" in text and "recipe" in text and "'seed': 0" in text, text[-3000:]
    after = _params_at(tmp_path / "killed", 8)
    for name in reference:
        np.testing.assert_array_equal(after[name], resumed[name], err_msg=name)
    assert check_clean_log(log) == lines  # the refused run wrote nothing


@pytest.mark.parametrize("override, message", [
    ("--config.train.steps.autoencoder=-1",
     "config.train.steps.autoencoder must be a positive number of steps; got -1"),
    ("--config.train.stages=autoencoder,denoiser", "config.train.stages must be a comma-separated list"),
    ("--config.data.n_angles=30", "must be divisible by the autoencoder's downsampling factor 4"),
    ("--config.masks.grid=64", "config.masks.grid must be at most the image's 32 pixels per side"),
    ("--config.train.n_devices=2", "config.train.n_devices must be 0 (every device) or a count up to the 1"),
    ("--config.train.stepz=3", "unknown config field 'stepz'. Did you mean \"steps\""),
    ("--config.train.log_every=abc", "flag --config.train.log_every=abc: invalid literal for int()"),
])
def test_bad_config_is_one_error_line_before_any_work(tmp_path, override, message):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/base.py:smoke"),
           "--workdir", str(tmp_path / "run"), override]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr[-3000:]  # one line, no traceback
    assert out.stderr.startswith("train: error: ") and message in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()  # refused before any work: nothing written


def test_check_config_names_the_field():
    """`runs.check_config` accepts every preset and refuses each bad value with the field's name."""
    sys.path.insert(0, ROOT)
    from allpet_jax.training import runs
    from configs import base

    for preset in base.PRESETS:
        runs.check_config(base.get_config(preset), device_count=1)
    cases = [("train.steps.task", 0, "train.steps.task"), ("train.eval_every", -5, "train.eval_every"),
             ("train.learning_rate", float("nan"), "train.learning_rate"), ("data.batch_size", 6, "data.batch_size"),
             ("data.n_train", 2, "data.n_train"), ("data.task", "denoising", "data.task"),
             ("model.factor", 3, "factor must be 4 or 8"),
             ("model.unet_channels", (16, 32, 64, 64, 64), "unet_channels"),
             ("model.attention_levels", (4,), "attention_levels [4]"), ("diffusion.schedule", "quadratic", "schedule"),
             ("diffusion.val_steps", 101, "diffusion.val_steps"), ("masks.count", "many", "MaskConfig.count"),
             ("data.pretrain_seed", 0, "data.pretrain_seed must be a seed other than data.seed=0"),
             ("tma.map", "guess", "tma.map must be 'segmented' or 'oracle'"),
             ("train.sinogram_loss", "l1", "train.sinogram_loss"),
             ("diffusion.task_min_snr", -1.0, "diffusion.task_min_snr must be >= 0")]
    for field, value, message in cases:
        config = base.get_config("smoke")
        *path, name = field.split(".")
        section = config
        for part in path:
            section = section[part]
        section[name] = value
        with pytest.raises(runs.ConfigError, match=re.escape(message)):
            runs.check_config(config, device_count=4)
    paired = base.get_config("smoke")
    paired.data.task = "synthesis"  # the task and regressor stages learn source -> target
    with pytest.raises(runs.ConfigError, match="a paired task"):
        runs.check_config(paired, device_count=1)
