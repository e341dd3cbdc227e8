"""What kind of sinogram error costs the image: the clean full-dose target plus errors of several kinds, each
scaled to the same sinogram PSNR, reconstructed as `evaluate` reconstructs a model's output (OSEM of the
non-negative part, each row post-filtered with its validation-tuned Gaussian) and scored against the true
activity, paired against tuned clinical OSEM of the low-dose prompts.

    python -m allpet_jax.error_structure --preset workstation --dose 0.05 --num_inputs 256   # -> a Markdown table

Why: the task models and the pixel regressor gain far less image PSNR than their sinogram PSNR promises
(docs/RESULTS.md, "Why sinogram PSNR buys little image PSNR"). The errors:

- `poisson`: the noisy target's own noise (Poisson counts through the corrections), scaled;
- `white`: independent Gaussian noise with the clean counts' variance;
- `correlated`: the same, smoothed over 2 bins and 2 views;
- `blur`: the clean target blurred along its bins minus itself, the error of an estimate that loses
  resolution (the Radon transform of a blurred image: an error consistent with some image);
- `scale`: a global gain error.

Everything is simulated from explicit keys (`sampling.simulated_inputs`; noise from `--seed`), no model.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags
from scipy import ndimage

from allpet_jax import cli, evaluate, metrics, sampling
from allpet_jax.experiments import preset_config
from allpet_jax.training import runs

TOOL = "allpet_jax.error_structure"
KINDS = ("poisson", "white", "correlated", "blur", "scale")


def errors(sample: dict, key) -> dict:
    """Unscaled sinogram errors `(N, C, A, B)` of each of `KINDS` for the clean targets of `sample`."""
    clean = np.asarray(sample["target_clean"], np.float32)
    std = np.sqrt(np.maximum(clean, 1e-3))
    white, smooth = (np.asarray(jax.random.normal(k, clean.shape)) for k in jax.random.split(key))
    return {"poisson": np.asarray(sample["target"], np.float32) - clean, "white": white * std,
            "correlated": ndimage.gaussian_filter(smooth, (0, 0, 2, 2)) * std,
            "blur": ndimage.gaussian_filter(clean, (0, 0, 0, 1.0)) - clean, "scale": 0.02 * clean}


def at_psnr(clean, err, psnr_db: float):
    """`clean + c err` with `c` per sample such that its PSNR against `clean` (`metrics.psnr`) is `psnr_db`."""
    now = np.asarray(metrics.psnr(clean + err, clean))
    c = 10.0 ** ((now - psnr_db) / 20.0)
    return clean + err * c.reshape((-1,) + (1,) * (err.ndim - 1)).astype(np.float32)


def run(config, dose: float, n: int, psnrs=(24.5, 27.3, 29.0, 32.0), seed: int = 0, n_val: int = 32,
        kinds=KINDS) -> dict:
    """Per row (the noisy and clean targets, then `"<kind> @ <psnr>"`): sinogram PSNR, image PSNR and its
    paired 95% interval against tuned clinical OSEM, with the post-filter width used."""
    trained = evaluate.at_dose(runs.TrainedStage("task", config, {}, None, None, 0, ""), dose)
    geom = sampling.geometry_of(trained)
    splits = {"val": sampling.simulated_inputs(trained, n_val, "val", physics=True),
              "test": sampling.simulated_inputs(trained, n, physics=True)}
    clinical = {s: evaluate.clinical_image(x, geom) for s, x in splits.items()}
    sigma = evaluate.tune_post_filter({"osem": clinical["val"]}, splits["val"])
    reference = evaluate.score_images(evaluate.post_filter({"osem": clinical["test"]}, sigma), splits["test"])

    clean = {s: np.asarray(x["target_clean"], np.float32) for s, x in splits.items()}
    made = {s: errors(x, jax.random.fold_in(jax.random.key(seed), i)) for i, (s, x) in enumerate(splits.items())}
    rows = {"noisy target": {s: np.asarray(x["target"], np.float32) for s, x in splits.items()},
            "clean target": clean}
    for p in psnrs:
        for kind in kinds:
            rows[f"{kind} @ {p:g}"] = {s: at_psnr(clean[s], made[s][kind], p) for s in splits}
    out = {"clinical_osem_psnr": float(np.mean(reference["osem_psnr"])), "clinical_sigma_px": sigma["osem"], "rows": {}}
    for i, (name, pred) in enumerate(rows.items()):
        sig = evaluate.tune_post_filter(evaluate.image_space(pred["val"], splits["val"], geom), splits["val"])
        scores = evaluate.score_prediction(pred["test"], splits["test"], geom, sig)
        gain = metrics.paired_bootstrap_ci(scores["osem_psnr"], reference["osem_psnr"], jax.random.key(i))
        out["rows"][name] = {"sino_psnr": float(np.mean(scores["sino_psnr"])),
                             "osem_psnr": float(np.mean(scores["osem_psnr"])), "gain": gain, "sigma_px": sig["osem"]}
    return out


def markdown(result: dict) -> str:
    lines = [f"Clinical OSEM + Gaussian ({result['clinical_sigma_px']} px): {result['clinical_osem_psnr']:.2f} dB", "",
             "| sinogram | sinogram PSNR dB | OSEM PSNR dB | vs clinical OSEM, dB [95% CI] | post-filter px |",
             "|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        g = r["gain"]
        lines.append(f"| {name} | {r['sino_psnr']:.2f} | {r['osem_psnr']:.2f} | {g['mean']:+.2f} "
                     f"[{g['lo']:+.2f}, {g['hi']:+.2f}] | {r['sigma_px']} |")
    return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    into = {"flag_values": flag_values}
    flags.DEFINE_string("preset", "workstation", "configs/base.py preset whose simulator makes the data", **into)
    flags.DEFINE_float("dose", 0.05, "dose fraction of the low-dose prompts (0.05: DRF 20)", **into)
    flags.DEFINE_integer("num_inputs", 256, "test samples", **into)
    flags.DEFINE_integer("seed", 0, "key of the added noise", **into)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    del argv
    if not 0 < flag_values.dose <= 1 or flag_values.num_inputs < 2:
        raise ValueError(f"expected --dose in (0, 1] and --num_inputs >= 2; got {flag_values.dose} and "
                         f"{flag_values.num_inputs}")
    print(markdown(run(preset_config(flag_values.preset), flag_values.dose, flag_values.num_inputs,
                       seed=flag_values.seed)))


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, errors=(ValueError,))
