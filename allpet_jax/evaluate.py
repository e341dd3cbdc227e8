"""Score a trained task on the simulator's held-out test split: against the truth, with ceilings, strong
baselines, paired confidence intervals and posterior quality; Markdown tables + JSON.

    python -m allpet_jax.evaluate --workdir workdir --task low_dose [--num_inputs 256] [--steps 50]
                                  [--num_samples 16] [--guidance 0.2,0.5]

The test split is simulated with the checkpoint's data config; its keys branch off the seed on a
different `fold_in` than training and validation, so no test sample is ever a training sample
(`data/sources.py`), and its size is not bound to the training config's `n_test`: sample `i` is a pure
function of `(seed, 'test', i)`.

**What is scored against what** (DESIGN.md 2.7). Sinograms against `target_clean`, the noise-free
expectation of the target that the simulator knows; images (FBP and OSEM of each sinogram, divided by the
simulator's `count_scale`) against the true activity `image`. Against the *noisy* target, which is kept
as a secondary column, even a perfect single posterior sample (the clean sinogram plus an independent
noise draw) loses about 3 dB to any mean estimate. Two ceilings head every table:

- `ceiling: noisy target`: the full-dose target itself, i.e. what a perfect single sample can reach;
- `ceiling: autoencoder D(E(clean))`: the clean target through the task model's autoencoder, the best
  any latent model can do.

**Methods** (all in target units; baselines tuned on the validation split only):

- `identity`: the source itself (matched to the target's channels);
- `source: FBP / clinical OSEM + Gaussian (val-tuned)` (image space only): the source
  reconstructed, and post-filtered with the Gaussian width that maximised image PSNR on validation;
  clinical OSEM runs on the raw prompts with the full model (normalisation, attenuation, randoms and
  scatter: `sampling.clinical_osem`; for `attenuation_correction` it therefore uses the CT attenuation
  the task is meant to do without, and is a reference rather than a competitor);
- `pixel U-Net regressor` (`WORKDIR/pixel_regressor`): source sinogram -> target sinogram, no autoencoder;
- `latent U-Net regressor` (`WORKDIR/regressor`): the same pairs through the autoencoder;
- `ALL-PET (<sampler> <steps>)`: the task model, `--num_samples` K samples per input: one sample, and
  the mean of K, with the posterior scores; with `--guidance` the same with the Poisson likelihood of the
  raw low-dose prompts at each scale (`diffusion/physics_guidance.py`);
- `zero-pair: foundation + guidance g` (low_dose, with `--guidance`): the foundation prior (no paired
  training at all) steered by the same likelihood, the paper's use without pairs;
- `full-dose clinical OSEM` (image space): the reference image a full-dose scan gives.

**Post-filter, for every row alike.** Each row's FBP and OSEM images are smoothed with the Gaussian width
(`SIGMAS_PX`, 0 included) that maximised that row's own mean image PSNR on the validation split, which
every method is therefore also run on: the clinical baseline is not the only image a clinic would
filter. `OSEM PSNR dB, no post-filter` keeps the unfiltered number; `post_filter_sigma_px` in
results.json the widths.

Every trained model is scored at its checkpoint with the best validation metric (`runs.load_trained(...,
best=True)`; `checkpoint_steps` in results.json), so no method is picked on the test split.

**Posterior quality** (K samples against the clean target, per bin): CRPS (the fair ensemble estimator;
for a deterministic prediction it is the absolute error, so every row has one), divided by the mean
clean count of the sample; coverage of the clean target by the central 90 % interval of the samples (a
calibrated K-member ensemble scores `metrics.calibrated_coverage(K)`, 0.882 at K = 16); the
correlation of the per-bin standard deviation with the absolute error of the mean; and one sample's
sinogram PSNR against what a calibrated sampler would give it, `10 log10(2K / (K + 1))` dB below the
mean of K (`calibration_gap`; 0 is calibrated). results.json also keeps each posterior row's rank
histogram (`rank_histograms`: the share of bins whose clean truth has rank 0..K among the K samples,
`metrics.rank_histogram`, averaged over the test samples; flat at 1/(K+1) when calibrated).

**Differences**: every method minus the reference baseline (the pixel regressor when trained, else the
identity), per test sample, as the mean with its 95 % paired bootstrap interval.

Synthesis: the range residual, Helgason-Ludwig moment residual, negative fraction and a Frechet
distance of summary statistics to the held-out test sinograms, for the generated and the real sets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from scipy import ndimage

import radon
from allpet_jax import cli, metrics, sampling, tasks
from allpet_jax.atomic_write import write_text
from allpet_jax.models import latent
from allpet_jax.training import checkpointing, objectives, runs, stages

SIGMAS_PX = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Gaussian post-filter widths (pixels) tried on the validation split."""
COVERAGE_LEVEL = 0.9
CEILING_NOISY = "ceiling: noisy target (a perfect single sample)"
CEILING_AE = "ceiling: autoencoder D(E(clean target))"
SOURCE_CLINICAL = "source: FBP / clinical OSEM + Gaussian (val-tuned)"
FULL_DOSE = "full-dose clinical OSEM (reference)"


# --- scoring -------------------------------------------------------------------------------------------


def image_space(sino, sample: dict, geom) -> dict:
    """FBP and OSEM of sinograms `(N, C, A, B)` in counts, in activity units (divided by `count_scale`)."""
    recon = sampling.reconstruct(sino, geom)
    scale = np.asarray(sample["count_scale"], np.float32).reshape(sino.shape[0], -1, 1, 1)
    return {k: v / scale for k, v in recon.items()}


def score_sinograms(pred, sample: dict) -> dict:
    """Per-sample sinogram scores `(N,)` of `pred` `(N, C, A, B)` against the clean target (and, as a
    secondary column, PSNR against the noisy target), plus the CRPS of the point prediction (its
    absolute error) relative to the mean clean count."""
    clean = np.asarray(sample["target_clean"], np.float32)
    noisy = np.asarray(sample["target"], np.float32)
    n = pred.shape[0]
    p, t = pred.reshape((n, -1) + pred.shape[-2:]), clean.reshape((n, -1) + clean.shape[-2:])
    return {"sino_psnr": np.asarray(metrics.psnr(p, t)), "sino_ssim": np.asarray(metrics.ssim(p, t)),
            "sino_nrmse": np.asarray(metrics.nrmse(p, t)),
            "sino_psnr_noisy": np.asarray(metrics.psnr(p, noisy.reshape(p.shape))),
            "crps": metrics.crps_ensemble(pred[None], clean, fair=False) / mean_counts(clean)}


def score_posterior(samples, sample: dict) -> dict:
    """Posterior scores `(N,)` of K samples `(K, N, C, A, B)` against the clean target."""
    clean = np.asarray(sample["target_clean"], np.float32)
    return {"crps": metrics.crps_ensemble(samples, clean) / mean_counts(clean),
            "coverage90": metrics.interval_coverage(samples, clean, COVERAGE_LEVEL),
            "spread_error_corr": metrics.spread_error_correlation(samples, clean)}


def mean_counts(sino):
    """Mean absolute count per bin of each sinogram `(N, ...)` -> `(N,)`: the unit that makes CRPS
    comparable across samples whose count levels differ tenfold."""
    return np.abs(np.asarray(sino, np.float64)).reshape(sino.shape[0], -1).mean(axis=1)


def score_images(images: dict, sample: dict) -> dict:
    truth = np.asarray(sample["image"], np.float32)
    labels = np.asarray(sample["labels"])
    out = {}
    for method, img in images.items():
        out[f"{method}_psnr"] = np.asarray(metrics.psnr(img, truth))
        out[f"{method}_ssim"] = np.asarray(metrics.ssim(img, truth))
        out[f"{method}_nrmse"] = np.asarray(metrics.nrmse(img, truth))
        cr = metrics.contrast_recovery(img[:, 0], truth[:, 0], labels)
        out[f"{method}_cr_hot"] = np.asarray(cr["hot"])
        out[f"{method}_cr_cold"] = np.asarray(cr["cold"])
        out[f"{method}_lesion_err"] = np.asarray(metrics.lesion_roi_error(img[:, 0], truth[:, 0], labels))
    return out


def score_prediction(pred, sample: dict, geom, sigmas=None) -> dict:
    """Sinogram and image scores of one prediction `(N, C, A, B)` in counts, its images post-filtered with
    `sigmas` (pixels per reconstruction, `tune_post_filter`; none by default). `osem_psnr_unfiltered`
    keeps the OSEM PSNR before the filter."""
    images = image_space(pred, sample, geom)
    unfiltered = np.asarray(metrics.psnr(images["osem"], np.asarray(sample["image"], np.float32)))
    return {**score_sinograms(pred, sample), **score_images(post_filter(images, sigmas), sample),
            "osem_psnr_unfiltered": unfiltered}


def post_filter(images: dict, sigmas=None) -> dict:
    return {m: gaussian(img, (sigmas or {}).get(m, 0.0)) for m, img in images.items()}


def gaussian(images, sigma_px: float):
    if sigma_px <= 0:
        return images
    return ndimage.gaussian_filter(images, sigma=(0,) * (images.ndim - 2) + (sigma_px, sigma_px))


def calibration_gap(one_psnr, mean_psnr, k: int):
    """Per sample, how far one sample's PSNR lies from what a calibrated sampler gives it, in dB.

    If the K samples and the truth are exchangeable draws of one posterior of variance `V`, one sample's
    expected squared error is `2 V` and the mean of K's `V (1 + 1 / K)`: one sample sits
    `10 log10(2 K / (K + 1))` dB below the mean of K (2.75 dB at K = 16). The gap is 0 for such a sampler
    and negative when single samples are worse than their spread explains (e.g. artefacts the mean
    averages away)."""
    return np.asarray(one_psnr) - np.asarray(mean_psnr) + 10.0 * np.log10(2.0 * k / (k + 1.0))


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


DELTA_METRICS = (("sino_psnr", "sino PSNR dB"), ("osem_psnr", "OSEM PSNR dB"), ("crps", "rel. CRPS"))


def paired_deltas(rows: dict, reference: str, key) -> dict:
    """Per row and metric of `DELTA_METRICS`: the mean of `row - reference` over the test samples with
    its 95 % paired bootstrap interval (`metrics.paired_bootstrap_ci`)."""
    out = {}
    for i, (name, values) in enumerate(rows.items()):
        if name == reference:
            continue
        out[name] = {m: metrics.paired_bootstrap_ci(values[m], rows[reference][m], jax.random.fold_in(key, i))
                     for m, _ in DELTA_METRICS if m in values and m in rows[reference]}
    return out


# --- tables --------------------------------------------------------------------------------------------

SINOGRAM_COLUMNS = [("sino_psnr", "PSNR dB"), ("sino_ssim", "SSIM"), ("sino_nrmse", "NRMSE"),
                    ("sino_psnr_noisy", "PSNR dB vs noisy target (secondary)")]
IMAGE_COLUMNS = [("fbp_psnr", "FBP PSNR dB"), ("osem_psnr", "OSEM PSNR dB"),
                 ("osem_psnr_unfiltered", "OSEM PSNR dB, no post-filter"), ("osem_ssim", "OSEM SSIM"),
                 ("osem_nrmse", "OSEM NRMSE"), ("osem_cr_hot", "OSEM CR hot"), ("osem_cr_cold", "OSEM CR cold"),
                 ("osem_lesion_err", "OSEM lesion err")]
POSTERIOR_COLUMNS = [("crps", "rel. CRPS"), ("coverage90", "90% coverage"), ("spread_error_corr", "corr(std, |err|)"),
                     ("calibration_gap", "one sample vs calibrated, dB")]
SYNTHESIS_COLUMNS = [("range_residual", "range residual"), ("hl_residual", "HL moment residual"),
                     ("negative_fraction", "negative fraction"), ("stats_distance", "Frechet dist. to test"),
                     ("region_match", "region match")]
COLUMNS = SINOGRAM_COLUMNS + IMAGE_COLUMNS + POSTERIOR_COLUMNS


def markdown(summary: dict, columns) -> str:
    def cell(entry):
        if entry is None or entry["mean"] is None:
            return "-"
        return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if abs(entry["mean"]) < 10 else \
            f"{entry['mean']:.2f} ± {entry['std']:.2f}"

    used = [(k, title) for k, title in columns if any(k in row for row in summary.values())]
    rows = {name: row for name, row in summary.items() if any(k in row for k, _ in used)}
    lines = ["| method | " + " | ".join(t for _, t in used) + " |", "|---|" + "---|" * len(used)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(k)) for k, _ in used) + " |")
    return "\n".join(lines)


def delta_markdown(deltas: dict) -> str:
    used = [(k, t) for k, t in DELTA_METRICS if any(k in row for row in deltas.values())]
    lines = ["| method | " + " | ".join(f"Δ {t} [95% CI]" for _, t in used) + " |", "|---|" + "---|" * len(used)]
    for name, row in deltas.items():
        cells = []
        for k, _ in used:
            d = row.get(k)
            digits = 4 if k == "crps" else 2
            cells.append("-" if d is None or not np.isfinite(d["mean"]) else
                         f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_report(result: dict, summary: dict) -> str:
    """The four tables of a paired-task evaluation, each with a line on how to read it."""
    k = result["num_samples"]
    calibrated = metrics.calibrated_coverage(k, COVERAGE_LEVEL) if k > 1 else float("nan")
    return "\n\n".join([
        "**Sinogram space**, against the clean target (`target_clean`); mean ± std over test samples. Higher "
        "PSNR/SSIM and lower NRMSE are better; the last column scores against the noisy target, which no "
        "estimator can match (its ceiling is the noisy target's own noise).",
        markdown(summary, SINOGRAM_COLUMNS),
        "**Image space**, FBP and OSEM of each sinogram against the true activity `image`, each row post-filtered "
        "with the Gaussian width that maximised its own validation PSNR (the unfiltered OSEM PSNR in its own "
        "column). CR: lesion contrast recovery (1 is perfect); lesion err: relative error of the mean activity "
        "in the lesions.",
        markdown(summary, IMAGE_COLUMNS),
        f"**Posterior quality**, K = {k} samples per input against the clean target. rel. CRPS: per-bin CRPS "
        "over the mean clean count (lower is better; for a point prediction it is the relative absolute "
        f"error, so every row has one). 90% coverage: share of bins whose truth lies in the samples' central "
        f"90 % interval; a calibrated ensemble of {k} scores {calibrated:.3f}, lower means overconfident. "
        "corr(std, |err|): whether the uncertainty map points at the errors of the mean. One sample vs "
        f"calibrated: one sample's PSNR minus what a calibrated sampler gives it ({calibration_gap(0, 0, k):.2f} "
        "dB below the mean of K); 0 is calibrated, negative means single samples are worse than their spread "
        "explains.",
        markdown(summary, POSTERIOR_COLUMNS),
        f"**Differences against `{result['reference']}`**, paired per test sample: mean and 95 % bootstrap "
        "interval (2000 resamples); an interval that excludes 0 is a difference this test set resolves. For "
        "rel. CRPS, negative is better.",
        delta_markdown(result["deltas"]),
    ])


# --- evaluations ---------------------------------------------------------------------------------------


def autoencoder_roundtrip(trained, sino):
    """`decode(encode(sino))` through `trained`'s frozen autoencoder, in counts `(N, C, A, B)`."""
    ae = stages.autoencoder_stage(trained.config, trained.config.seed)
    scale = np.float32(trained.normalisation.target_scale)
    params = trained.state.frozen["ae"]
    x = jax.numpy.asarray(np.asarray(sino, np.float32) / scale)
    roundtrip = jax.jit(lambda p, s: latent.decode(ae.graphdef, p, latent.encode(ae.graphdef, p, s, 1.0), 1.0,
                                                   s.shape[1]))
    return np.concatenate([np.asarray(roundtrip(params, x[i:i + 64])) for i in range(0, x.shape[0], 64)]) * scale


def source_images(trained, sample: dict, geom, channels: int) -> dict:
    """FBP of the (corrected) source and clinical OSEM of its raw prompts, in activity units, matched to
    the target's channels."""
    norm = trained.normalisation
    source = np.asarray(sample["source"], np.float32) * np.float32(norm.target_scale / norm.source_scale)
    scale = np.asarray(sample["count_scale"], np.float32).reshape(source.shape[0], -1, 1, 1)[:, :1]
    fbp = sampling.reconstruct(source, geom)["fbp"] / scale
    return {k: np.asarray(latent.match_channels(v, channels)) for k, v in (("fbp", fbp),
                                                                          ("osem", clinical_image(sample, geom)))}


def clinical_image(sample: dict, geom):
    """Clinical OSEM of the raw low-dose prompts (`sampling.clinical_osem`), in activity units."""
    scale = np.asarray(sample["count_scale"], np.float32).reshape(np.shape(sample["prompts"])[0], -1, 1, 1)[:, :1]
    dose = np.asarray(sample["dose"], np.float32).reshape(-1, 1, 1, 1)
    return sampling.clinical_osem(sample["prompts"], geom, normalisation=sample["normalisation"],
                                  attenuation=sample["attenuation"], scatter=sample["scatter"],
                                  randoms=sample["randoms"]) / (scale * dose)


def evaluate_paired(trained, workdir: str, n: int, sampler, steps: int, num_samples: int, seed: int,
                    guidance=(), zero_pair_guidance=None, progress: bool = True, test_indices=None) -> dict:
    """Every method's per-sample scores on `n` test samples (see the module docstring). `guidance`: the
    Poisson guidance scales of the task model's rows; `zero_pair_guidance` those of the zero-pair arm
    (default: the same). `test_indices`: the test samples scored (default `0 .. n - 1`).

    Every row's FBP and OSEM images are post-filtered with the Gaussian width (`SIGMAS_PX`, 0 included)
    that maximised that row's own mean image PSNR on the validation split, the treatment a clinic gives
    its own reconstruction: so each method is run on validation too (with the same seed)."""
    geom = sampling.geometry_of(trained)
    splits = {"val": sampling.simulated_inputs(trained, min(n, max(sampling.pipeline.split_size(
                  trained.config.data, "val"), 1)), "val", physics=True),
              "test": sampling.simulated_inputs(trained, n, physics=True, indices=test_indices)}
    test = splits["test"]
    norm = trained.normalisation
    channels = trained.meta.get("channels", {}).get("target", 1)
    to_target = np.float32(norm.target_scale / norm.source_scale)
    task = trained.meta["task"]

    # every row's prediction on both splits: sinograms (N, C, A, B) in counts, or images for the clinical rows
    sinograms, images, posterior, timings, steps_used, rank_histograms = {}, {}, {}, {}, {}, {}
    sinograms[CEILING_NOISY] = {s: np.asarray(x["target"], np.float32) for s, x in splits.items()}
    sinograms[CEILING_AE] = {s: autoencoder_roundtrip(trained, x["target_clean"]) for s, x in splits.items()}
    sinograms["identity"] = {s: np.asarray(latent.match_channels(np.asarray(x["source"]) * to_target, channels))
                             for s, x in splits.items()}
    images[SOURCE_CLINICAL] = {s: source_images(trained, x, geom, channels) for s, x in splits.items()}

    models = []
    for stage, label in (("pixel_regressor", "pixel U-Net regressor"), ("regressor", "latent U-Net regressor")):
        directory = os.path.join(workdir, stage) if workdir else ""
        if directory and checkpointing.has_checkpoint(directory):
            models.append((label, runs.load_trained(directory, best=True), 0.0, False))
        else:
            logging.warning("no %s in %s: its row is left out (train.py --config.train.stages=%s)", stage, directory,
                            stage)
    models += [("ALL-PET", trained, 0.0, False)]
    models += [(f"ALL-PET + Poisson guidance {g:g}", trained, g, False) for g in guidance]
    foundation_dir = os.path.join(workdir, tasks.STAGE_OF_TASK[tasks.SYNTHESIS]) if workdir else ""
    zero_pair_guidance = guidance if zero_pair_guidance is None else zero_pair_guidance
    if task == tasks.LOW_DOSE and zero_pair_guidance and foundation_dir and checkpointing.has_checkpoint(foundation_dir):
        foundation = runs.load_trained(foundation_dir, best=True)
        models += [(f"zero-pair: foundation + Poisson guidance {g:g}", foundation, g, True) for g in zero_pair_guidance]
    for name, model, g, zero_pair in models:
        deterministic = objectives.objective_of(model.name, model.config) == "regression"
        k = 1 if deterministic else num_samples
        label = name if deterministic else f"{name} ({sampler or 'ddim'} {steps})"
        steps_used[label] = model.step
        for split, sample in splits.items():
            if zero_pair:  # the foundation generates a full-dose sinogram from the prompt; the data steer it
                prompt = np.asarray(sample["prompt"]).copy()
                prompt[:, 2] = tasks.task_id(tasks.SYNTHESIS)
                batch = sampling.model_batch(model, {"prompt": prompt,
                                                     "geometry_only": np.zeros_like(sample["target"], np.float32)})
            else:
                batch = sampling.model_batch(model, sample)
            if g:
                batch = sampling.add_poisson_data(model, batch, sample)
            t0 = time.perf_counter()
            out = sampling.generate(model, batch, jax.random.key(seed), sampler=None if deterministic else sampler,
                                    num_steps=steps, num_samples=k, guidance=g,
                                    progress=f"{label}, {split}" if progress else "")
            if split == "test":
                timings[label] = time.perf_counter() - t0
            if deterministic:
                sinograms.setdefault(label, {})[split] = out[0]
                continue
            sinograms.setdefault(f"{label}, one sample", {})[split] = out[0]
            if k > 1:
                sinograms.setdefault(f"{label}, mean of {k}", {})[split] = out.mean(axis=0)
                if split == "test":
                    posterior[f"{label}, mean of {k}"] = score_posterior(out, test)
                    rank_histograms[f"{label}, mean of {k}"] = metrics.rank_histogram(
                        out, np.asarray(test["target_clean"], np.float32)).mean(axis=0).tolist()
    images[FULL_DOSE] = {s: {"osem": sampling.clinical_osem(
        x["target_prompts"], geom, normalisation=x["normalisation"], attenuation=x["attenuation"],
        scatter=x["target_scatter"], randoms=x["target_randoms"])
        / np.asarray(x["count_scale"], np.float32).reshape(x["target"].shape[0], -1, 1, 1)} for s, x in splits.items()}

    rows, sigmas = {}, {}
    for name in [CEILING_NOISY, CEILING_AE, "identity", SOURCE_CLINICAL, *sinograms, FULL_DOSE]:
        if name in rows:
            continue
        if name in images:
            sigmas[name] = tune_post_filter(images[name]["val"], splits["val"])
            rows[name] = score_images(post_filter(images[name]["test"], sigmas[name]), test)
            continue
        pred = sinograms[name]
        sigmas[name] = tune_post_filter(image_space(pred["val"], splits["val"], geom), splits["val"])
        rows[name] = {**score_prediction(pred["test"], test, geom, sigmas[name]), **posterior.get(name, {})}
    for name in posterior:
        one = name.rsplit(", mean of", 1)[0] + ", one sample"
        rows[name]["calibration_gap"] = calibration_gap(rows[one]["sino_psnr"], rows[name]["sino_psnr"], num_samples)
    reference = "pixel U-Net regressor" if "pixel U-Net regressor" in rows else "identity"
    return {"rows": rows, "reference": reference, "deltas": paired_deltas(rows, reference, jax.random.key(seed)),
            "num_samples": num_samples, "post_filter_sigma_px": sigmas, "generate_s": timings,
            "checkpoint_steps": steps_used, "rank_histograms": rank_histograms,
            "figure_rows": figure_rows(sinograms, images, sigmas, test, geom)}


FIGURE_SLICES = 4


def figure_rows(sinograms: dict, images: dict, sigmas: dict, test: dict, geom, shown: int = FIGURE_SLICES) -> list:
    """`plots.comparison_figure` rows of the first `shown` test slices, as each row was scored (OSEM,
    post-filtered with its own tuned width): the true activity, clinical OSEM of the low-dose prompts, the
    task model's mean of K, the pixel regressor, full-dose clinical OSEM, and the model's error."""
    def osem(name):
        if name in images:
            img = images[name]["test"]["osem"][:shown]
        else:
            img = image_space(sinograms[name]["test"][:shown], {"count_scale": np.asarray(test["count_scale"])[:shown]},
                              geom)["osem"]
        return gaussian(np.asarray(img), sigmas[name].get("osem", 0.0))[:, 0]

    truth = np.asarray(test["image"], np.float32)[:shown, 0]
    model = next((n for n in sinograms if n.startswith("ALL-PET (") and "mean of" in n), None)
    model = model or next((n for n in sinograms if n.startswith("ALL-PET (")), None)
    rows = [("true activity", truth, "value"), ("clinical OSEM, low dose", osem(SOURCE_CLINICAL), "value")]
    rows += [(name.replace(" (ddim", "\n(ddim"), osem(name), "value") for name in (model, "pixel U-Net regressor")
             if name in sinograms]
    rows.append(("full-dose clinical OSEM", osem(FULL_DOSE), "value"))
    if model:
        rows.append(("model - truth", osem(model) - truth, "error"))
    return rows


def evaluate_synthesis(trained, n: int, sampler, steps: int, seed: int, progress: bool = True,
                       cfg_scales=()) -> dict:
    """Synthesis rows: the foundation's samples for the test split's prompts, plain and with each
    classifier-free guidance scale of `cfg_scales`, next to real validation sinograms. Columns: range
    and Helgason-Ludwig residuals, negative mass, the Frechet distance of summary statistics to the real
    test sinograms, and region match: whether the FBP's body size and shape (`metrics.body_shape_features`)
    is nearest to the real test sinograms of the prompted region (`metrics.prompt_matches`)."""
    geom = sampling.geometry_of(trained)
    test = sampling.simulated_inputs(trained, n)
    val = sampling.simulated_inputs(trained, min(n, sampling.pipeline.split_size(trained.config.data, "val")), "val")
    batch = sampling.model_batch(trained, {"prompt": test["prompt"],
                                           "geometry_only": np.zeros_like(np.asarray(test["target"], np.float32))})
    real = np.asarray(test["target"], np.float32)

    def shape(sino):
        return metrics.body_shape_features(np.asarray(radon.fbp(jnp.asarray(sino[:, 0]), geom, filter="hann")))

    reference = (shape(real), np.asarray(test["prompt"])[:, 1])

    def physics(sino, regions):
        s = sino[:, 0]
        return {"range_residual": metrics.range_residual(s, geom), "hl_residual": metrics.helgason_ludwig_residual(s, geom)["mean"],
                "negative_fraction": metrics.negative_fraction(s),
                "stats_distance": [metrics.sample_statistics_distance(s, real[:, 0])],
                "region_match": region_match(sino, regions)}

    def region_match(sino, regions):  # NaN where the test split holds no real sinogram of that region
        out = np.full(len(regions), np.nan)
        known = np.isin(regions, reference[1])
        if known.any():
            out[known] = metrics.prompt_matches(shape(sino[known]), regions[known], *reference)
        return out

    rows, timings = {}, {}
    for scale in (1.0,) + tuple(s for s in cfg_scales if s != 1.0):
        label = f"ALL-PET ({sampler or 'ddim'} {steps})" + (f", cfg {scale:g}" if scale != 1.0 else "")
        t0 = time.perf_counter()
        out = sampling.generate(trained, batch, jax.random.key(seed), sampler=sampler, num_steps=steps,
                                progress=label if progress else "", cfg_scale=scale)[0]
        timings[label] = time.perf_counter() - t0
        rows[label] = physics(out, np.asarray(test["prompt"])[:, 1])
    rows["validation sinograms (real, reference)"] = physics(np.asarray(val["target"], np.float32),
                                                             np.asarray(val["prompt"])[:, 1])
    return {"rows": rows, "generate_s": timings}


def lesion_rich_indices(trained, n: int, radius_px: float, chunk: int = 256) -> list:
    """The first `n` test-split indices whose phantom holds a lesion (hot or cold) of radius at least
    `radius_px` pixels: a connected lesion region of at least pi r^2 pixels."""
    from scipy import ndimage

    from allpet_jax.data import phantoms

    ids, min_area = [phantoms.LABEL_IDS["lesion_hot"], phantoms.LABEL_IDS["lesion_cold"]], np.pi * radius_px**2
    found, start = [], 0
    while len(found) < n:
        if start >= 50 * n:
            raise ValueError(f"fewer than {n} of the first {start} test samples hold a lesion of radius >= "
                             f"{radius_px:g} px ({len(found)} do); ask for fewer or a smaller radius")
        for i, labels in enumerate(sampling.simulated_inputs(trained, chunk, start=start)["labels"]):
            components, count = ndimage.label(np.isin(labels, ids))
            if count and np.bincount(components.ravel())[1:].max() >= min_area:
                found.append(start + i)
        start += chunk
    return found[:n]


def at_dose(trained, dose: float):
    """`trained` with its splits simulated at one dose fraction (`data.simulation.dose`) instead of the drawn mix."""
    config = trained.config.copy_and_resolve_references()
    config.data.simulation.dose = float(dose)
    return dataclasses.replace(trained, config=config)


def per_sample(rows: dict) -> dict:
    """The per-sample scores as lists (JSON), so later comparisons can pair them."""
    return {name: {k: [None if not np.isfinite(x) else float(x) for x in np.asarray(v, np.float64).ravel()]
                   for k, v in values.items()} for name, values in rows.items()}


FLAGS = flags.FLAGS
TOOL = "allpet_jax.evaluate"  # the program in error lines and the owner named in --out's owner file
RENAMED = {"n": "num_inputs"}  # old flag: new name; the old one is an alias until the next release


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """This CLI's flags, in `flag_values`: called from `__main__` only, so importing the module (beside
    `sample.py`, whose flags share names) defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", "", "training run directory", **into)
    flags.DEFINE_string("checkpoint", "", "a stage directory instead of --workdir (no regressor rows then)", **into)
    flags.DEFINE_string("pretrained", "", "exported weights instead of a run (weights/<name>.npz or a path; no "
                                          "regressor or zero-pair rows then)", **into)
    flags.DEFINE_string("task", tasks.LOW_DOSE, "the task to score", **into)
    flags.DEFINE_integer("num_inputs", 0, "N, the test samples scored (default: the run's data.n_test; 256 in the cpu "
                                          "preset); each gets --num_samples samples", **into)
    flags.DEFINE_string("sampler", "", "ddim, ddpm or ddbm (default: the model's objective's first)", **into)
    flags.DEFINE_integer("steps", 50, "sampler steps", **into)
    flags.DEFINE_integer("num_samples", 16, "samples per input: one sample, the mean of K and the posterior scores",
                         **into)
    flags.DEFINE_integer("seed", 0, "sampling seed", **into)
    flags.DEFINE_string("out", "", "where results.md and results.json go (default WORKDIR/eval/<task>)", **into)
    flags.DEFINE_float("min_lesion_radius_px", 0.0, "paired tasks: score only test samples with a lesion of at least "
                                                    "this radius (a lesion-rich set for TMA); 0 = every sample", **into)
    flags.DEFINE_float("dose", 0.0, "low_dose: simulate the validation and test splits at this dose fraction "
                                    "(0.05 = DRF 20); default: the doses drawn in training", **into)
    flags.DEFINE_list("cfg_scale", [], "synthesis: classifier-free guidance scales to add as rows, e.g. 2,4 (1 = off)",
                      **into)
    flags.DEFINE_list("guidance", [], "low_dose: Poisson guidance scales of the task model to add as rows, e.g. "
                                      "0.2,0.5", **into)
    flags.DEFINE_list("zero_pair_guidance", None, "low_dose: guidance scales of the zero-pair arm (the foundation "
                                                  "model steered by the data, no paired training); default: "
                                                  "--guidance", **into)
    cli.define_renamed(RENAMED, flag_values)


def main(argv, flag_values: flags.FlagValues = FLAGS):
    """Score with the flags in `flag_values` (parsed); `cli.run` turns the errors into one line."""
    del argv
    logging.set_verbosity(logging.WARNING)
    if flag_values.num_samples < 1 or flag_values.steps < 1 or flag_values.num_inputs < 0:
        raise ValueError(f"--num_samples and --steps must be >= 1 and --num_inputs >= 0; got "
                         f"{flag_values.num_samples}, {flag_values.steps}, {flag_values.num_inputs}")
    if flag_values.dose and (flag_values.task != tasks.LOW_DOSE or not 0 < flag_values.dose <= 1):
        raise ValueError(f"--dose must be a dose fraction in (0, 1] for --task {tasks.LOW_DOSE}; got "
                         f"--dose {flag_values.dose:g} for --task {flag_values.task}")
    trained = sampling.load_for_task(flag_values.task, flag_values.workdir, flag_values.checkpoint, best=True,
                                     pretrained=flag_values.pretrained)
    if flag_values.dose:
        trained = at_dose(trained, flag_values.dose)
    run_dir = flag_values.workdir or os.path.dirname(trained.directory)
    if flag_values.pretrained:
        run_dir = os.path.join(sampling.PRETRAINED_OUT, os.path.basename(flag_values.pretrained).removesuffix(".npz"))
    out = flag_values.out or os.path.join(run_dir, "eval", flag_values.task)
    # Before minutes of sampling: a --out holding files evaluate did not write is refused untouched, and an
    # unwritable one fails now.
    from allpet_jax.atomic_write import claim_output_dir

    claim_output_dir(out, TOOL, ("results.md", "results.json", "grid.png"))
    n = flag_values.num_inputs or sampling.pipeline.split_size(trained.config.data, "test")
    t0 = time.perf_counter()
    if not tasks.is_paired(flag_values.task):
        result = evaluate_synthesis(trained, n, flag_values.sampler or None, flag_values.steps, flag_values.seed,
                                    cfg_scales=[float(c) for c in flag_values.cfg_scale])
        summary = summarise(result.pop("rows"))
        tables = markdown(summary, SYNTHESIS_COLUMNS)
        record = {}
    else:
        result = evaluate_paired(trained, flag_values.workdir, n, flag_values.sampler or None, flag_values.steps,
                                 flag_values.num_samples, flag_values.seed,
                                 guidance=[float(g) for g in flag_values.guidance],
                                 zero_pair_guidance=None if flag_values.zero_pair_guidance is None else
                                 [float(g) for g in flag_values.zero_pair_guidance],
                                 test_indices=lesion_rich_indices(trained, n, flag_values.min_lesion_radius_px)
                                 if flag_values.min_lesion_radius_px > 0 else None)
        rows = result.pop("rows")
        from allpet_jax import plots

        plots.comparison_figure(os.path.join(out, "grid.png"), result.pop("figure_rows"),
                                title=f"{flag_values.task}: OSEM images of {FIGURE_SLICES} test slices, each post-filtered "
                                      "as scored")
        summary = summarise(rows)
        tables = paired_report(result, summary)
        record = {"per_sample": per_sample(rows)}
    header = (f"Task `{flag_values.task}`, {n} test samples, checkpoint {trained.directory} (step {trained.step}); "
              f"{time.perf_counter() - t0:.0f} s.\n\n`python -m allpet_jax.evaluate " + " ".join(sys.argv[1:]) + "`")
    record = {"task": flag_values.task, "n": n, "checkpoint": trained.directory, "step": trained.step,
              "summary": summary, **result, **record}
    write_text(os.path.join(out, "results.json"), json.dumps(record, indent=1))
    write_text(os.path.join(out, "results.md"), header + "\n\n" + tables + "\n")
    print(header + "\n\n" + tables + f"\n\nwrote {out}/results.md and results.json", flush=True)


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, renamed=RENAMED, errors=(ValueError, FileNotFoundError))
