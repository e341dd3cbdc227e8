"""Score a trained task on the simulator's held-out test split against baselines; Markdown table + JSON.

    python -m allpet_jax.evaluate --workdir workdir --task low_dose [--n 16] [--steps 50] [--num_samples 1]

The test split is simulated with the checkpoint's data config; its keys branch off the seed on a
different `fold_in` than training and validation, so no test sample is ever a training sample
(`data/sources.py`).

Paired tasks, one row per method (all in target units: the source enters as `source * target_scale /
source_scale`, which is how the model sees it):

- `identity`: the source itself (matched to the target's channels);
- `FBP + Gaussian`, `OSEM + Gaussian`: the source reconstructed and post-filtered with the Gaussian
  whose width maximised image PSNR on the validation split (image-space only);
- `regressor`: the deterministic U-Net of `WORKDIR/regressor`, trained on the same pairs (if trained);
- `ALL-PET (<sampler>)`: the task model, sampled `--num_samples` times (metrics of the first sample
  and, for K > 1, of the mean); with `--guidance` also with the Poisson data-consistency step
  (`diffusion/physics_guidance.py`, low_dose) at each listed scale;
- `target (reference)`: the full-dose target itself, scored in image space against the truth.

Sinogram space: PSNR, SSIM, NRMSE against the target. Image space: FBP and OSEM of each sinogram,
divided by the simulator's `count_scale` (counts per kBq/mL x mm), against the true activity `image`;
plus lesion contrast recovery and lesion-ROI error from the phantom labels.
Synthesis: the range residual, Helgason-Ludwig moment residual, negative fraction and a Frechet
distance of summary statistics to the held-out test sinograms, for the generated and the real sets.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging
from scipy import ndimage

from allpet_jax import metrics, sampling
from allpet_jax.training import checkpointing, runs, stages

SIGMAS_PX = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Gaussian post-filter widths (pixels) tried on the validation split."""


def image_space(sino, sample: dict, geom) -> dict:
    """FBP and OSEM of sinograms `(N, C, A, B)` in counts, in activity units (divided by `count_scale`)."""
    recon = sampling.reconstruct(sino, geom)
    scale = np.asarray(sample["count_scale"], np.float32).reshape(sino.shape[0], -1, 1, 1)
    return {k: v / scale for k, v in recon.items()}


def score_sinograms(pred, target) -> dict:
    n = pred.shape[0]
    p, t = pred.reshape((n, -1) + pred.shape[-2:]), target.reshape((n, -1) + target.shape[-2:])
    return {"sino_psnr": metrics.psnr(p, t), "sino_ssim": metrics.ssim(p, t), "sino_nrmse": metrics.nrmse(p, t)}


def score_images(images: dict, sample: dict) -> dict:
    truth = np.asarray(sample["image"], np.float32)
    labels = np.asarray(sample["labels"])
    out = {}
    for method, img in images.items():
        out[f"{method}_psnr"] = metrics.psnr(img, truth)
        out[f"{method}_ssim"] = metrics.ssim(img, truth)
        out[f"{method}_nrmse"] = metrics.nrmse(img, truth)
        cr = metrics.contrast_recovery(img[:, 0], truth[:, 0], labels)
        out[f"{method}_cr_hot"] = cr["hot"]
        out[f"{method}_cr_cold"] = cr["cold"]
        out[f"{method}_lesion_err"] = metrics.lesion_roi_error(img[:, 0], truth[:, 0], labels)
    return out


def gaussian(images, sigma_px: float):
    if sigma_px <= 0:
        return images
    return ndimage.gaussian_filter(images, sigma=(0,) * (images.ndim - 2) + (sigma_px, sigma_px))


def tune_post_filter(images: dict, sample: dict) -> dict:
    """The Gaussian width (pixels) per reconstruction method with the best mean image PSNR."""
    truth = np.asarray(sample["image"], np.float32)
    return {method: max(SIGMAS_PX, key=lambda s: float(np.nanmean(metrics.psnr(gaussian(img, s), truth))))
            for method, img in images.items()}


def summarise(rows: dict) -> dict:
    """Mean and standard deviation over samples of every metric of every row (NaN-aware)."""
    out = {}
    for name, values in rows.items():
        out[name] = {}
        for k, v in values.items():
            v = np.asarray(v, np.float64)
            finite = v[np.isfinite(v)]
            out[name][k] = {"mean": float(finite.mean()) if finite.size else None,
                            "std": float(finite.std()) if finite.size else None, "n": int(finite.size)}
    return out


COLUMNS = [("sino_psnr", "sino PSNR dB"), ("sino_ssim", "sino SSIM"), ("sino_nrmse", "sino NRMSE"),
           ("fbp_psnr", "FBP PSNR dB"), ("fbp_ssim", "FBP SSIM"), ("osem_psnr", "OSEM PSNR dB"),
           ("osem_ssim", "OSEM SSIM"), ("osem_nrmse", "OSEM NRMSE"), ("osem_cr_hot", "OSEM CR hot"),
           ("osem_cr_cold", "OSEM CR cold"), ("osem_lesion_err", "OSEM lesion err")]
SYNTHESIS_COLUMNS = [("range_residual", "range residual"), ("hl_residual", "HL moment residual"),
                     ("negative_fraction", "negative fraction"), ("stats_distance", "Frechet dist. to test")]


def markdown(summary: dict, columns) -> str:
    def cell(entry):
        if entry is None or entry["mean"] is None:
            return "-"
        return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if abs(entry["mean"]) < 10 else \
            f"{entry['mean']:.2f} ± {entry['std']:.2f}"

    used = [(k, title) for k, title in columns if any(k in row for row in summary.values())]
    lines = ["| method | " + " | ".join(t for _, t in used) + " |", "|---|" + "---|" * len(used)]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(k)) for k, _ in used) + " |")
    return "\n".join(lines)


def evaluate_paired(trained, workdir: str, n: int, sampler, steps: int, num_samples: int, seed: int,
                    guidance=()) -> dict:
    geom = sampling.geometry_of(trained)
    test = sampling.simulated_inputs(trained, n)
    val = sampling.simulated_inputs(trained, min(n, sampling.pipeline.split_size(trained.config.data, "val")), "val")
    norm = trained.normalisation
    channels = trained.meta.get("channels", {}).get("target", 1)
    to_target = np.float32(norm.target_scale / norm.source_scale)

    def identity(sample):
        return np.asarray(stages.match_channels(np.asarray(sample["source"]) * to_target, channels))

    rows, timings = {}, {}
    target = np.asarray(test["target"], np.float32)
    rows["identity"] = {**score_sinograms(identity(test), target), **score_images(image_space(identity(test), test, geom), test)}
    sigmas = tune_post_filter(image_space(identity(val), val, geom), val)
    source_images = image_space(identity(test), test, geom)
    filtered = {m: gaussian(img, sigmas[m]) for m, img in source_images.items()}
    rows["FBP/OSEM + Gaussian (val-tuned)"] = score_images(filtered, test)

    models = [("ALL-PET", trained, 0.0)] + [(f"ALL-PET + Poisson guidance {g:g}", trained, g) for g in guidance]
    regressor_dir = os.path.join(workdir, "regressor") if workdir else ""
    if regressor_dir and checkpointing.has_checkpoint(regressor_dir):
        models.insert(0, ("U-Net regressor", runs.load_trained(regressor_dir), 0.0))
    else:
        logging.warning("no regressor in %s: its row is left out (train.py --config.train.stages=regressor)",
                        regressor_dir)
    for name, model, g in models:
        k = 1 if model.name == "regressor" else num_samples
        batch = sampling.model_batch(model, test)
        if g:
            batch = sampling.add_poisson_data(model, batch, test)
        t0 = time.perf_counter()
        out = sampling.generate(model, batch, jax.random.key(seed), sampler=None if model.name == "regressor" else sampler,
                                num_steps=steps, num_samples=k, guidance=g)
        timings[name] = time.perf_counter() - t0
        label = name if model.name == "regressor" else f"{name} ({sampler or 'ddim'} {steps})"
        rows[label] = {**score_sinograms(out[0], target), **score_images(image_space(out[0], test, geom), test)}
        if k > 1:
            mean = out.mean(axis=0)
            rows[f"{label}, mean of {k}"] = {**score_sinograms(mean, target),
                                             **score_images(image_space(mean, test, geom), test)}
    rows["target (reference)"] = score_images(image_space(target, test, geom), test)
    return {"rows": rows, "post_filter_sigma_px": sigmas, "generate_s": timings}


def evaluate_synthesis(trained, n: int, sampler, steps: int, seed: int) -> dict:
    geom = sampling.geometry_of(trained)
    test = sampling.simulated_inputs(trained, n)
    val = sampling.simulated_inputs(trained, min(n, sampling.pipeline.split_size(trained.config.data, "val")), "val")
    batch = sampling.model_batch(trained, {"prompt": test["prompt"],
                                           "geometry_only": np.zeros_like(np.asarray(test["target"], np.float32))})
    t0 = time.perf_counter()
    out = sampling.generate(trained, batch, jax.random.key(seed), sampler=sampler, num_steps=steps)[0]
    timings = {"ALL-PET": time.perf_counter() - t0}
    real = np.asarray(test["target"], np.float32)

    def physics(sino, reference):
        s = sino[:, 0]
        return {"range_residual": metrics.range_residual(s, geom), "hl_residual": metrics.helgason_ludwig_residual(s, geom)["mean"],
                "negative_fraction": metrics.negative_fraction(s),
                "stats_distance": [metrics.sample_statistics_distance(s, reference[:, 0])]}

    rows = {f"ALL-PET ({sampler or 'ddim'} {steps})": physics(out, real),
            "validation sinograms (real, reference)": physics(np.asarray(val["target"], np.float32), real)}
    return {"rows": rows, "generate_s": timings}


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "training run directory")
flags.DEFINE_string("checkpoint", "", "a stage directory instead of --workdir (no regressor row then)")
flags.DEFINE_string("task", "low_dose", "the task to score")
flags.DEFINE_integer("n", 0, "test samples (default: the whole test split of the run's config)")
flags.DEFINE_string("sampler", "", "ddim, ddpm or ddbm (default: the model's objective's first)")
flags.DEFINE_integer("steps", 50, "sampler steps")
flags.DEFINE_integer("num_samples", 1, "samples per input (K > 1 adds the mean of K as a row)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("out", "", "where results.md and results.json go (default WORKDIR/eval/<task>)")
flags.DEFINE_list("guidance", [], "low_dose: Poisson guidance scales to add as rows, e.g. 0.05,0.1,0.2")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    trained = sampling.load_for_task(FLAGS.task, FLAGS.workdir, FLAGS.checkpoint)
    n = FLAGS.n or sampling.pipeline.split_size(trained.config.data, "test")
    t0 = time.perf_counter()
    if FLAGS.task == "synthesis":
        result = evaluate_synthesis(trained, n, FLAGS.sampler or None, FLAGS.steps, FLAGS.seed)
        columns = SYNTHESIS_COLUMNS
    else:
        result = evaluate_paired(trained, FLAGS.workdir, n, FLAGS.sampler or None, FLAGS.steps, FLAGS.num_samples,
                                 FLAGS.seed, guidance=[float(g) for g in FLAGS.guidance])
        columns = COLUMNS
    summary = summarise(result.pop("rows"))
    table = markdown(summary, columns)
    header = (f"Task `{FLAGS.task}`, {n} test samples, checkpoint {trained.directory} (step {trained.step}); "
              f"mean ± std over samples; {time.perf_counter() - t0:.0f} s.")
    out = FLAGS.out or os.path.join(FLAGS.workdir or os.path.dirname(trained.directory), "eval", FLAGS.task)
    os.makedirs(out, exist_ok=True)
    record = {"task": FLAGS.task, "n": n, "checkpoint": trained.directory, "step": trained.step,
              "summary": summary, **result}
    for name, text in (("results.md", header + "\n\n" + table + "\n"), ("results.json", json.dumps(record, indent=2))):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=name + ".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    print(header + "\n\n" + table + f"\n\nwrote {out}/results.md and results.json", flush=True)


if __name__ == "__main__":
    try:
        app.run(main)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
