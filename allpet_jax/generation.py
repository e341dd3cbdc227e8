"""Score a foundation model's generation the way the paper's low-shot claim needs: how close its sinograms are
to real ones (a Frechet distance on physics features), whether they are physically consistent, and whether it
copies its training set (memorisation).

    python -m allpet_jax.generation --workdir RUN [--num_inputs 512] [--steps 50] [--out RUN/eval/generation]

**Features** (`generation_features`, one vector per sinogram; each is a property a PET physicist reads off a
sinogram or its image, and none needs a network trained on natural images, which would download weights
and know nothing of PET):
- the sinogram's summary statistics (`metrics.sinogram_features`): counts, angular variation of the
  projection totals (0 for consistent data), radial centre and width, peak-to-mean, roughness along bins and
  angles, negative mass;
- the sinogram's and its FBP image's radially averaged log power in `BANDS` frequency bands, relative to the
  lowest band: blur removes the high bands, noise and the autoencoder's 4x4 blocks add power at 1/4 of the
  sampling rate;
- the FBP image's intensity distribution inside the body (quantiles over the body's mean: lesion and organ
  contrast), the body's size, elongation and centring (`metrics.body_shape_features`), and the image's
  negative fraction (streaks from inconsistent sinograms).
`frechet(generated, reference)` is `metrics.frechet_distance` between Gaussians fitted to the two sets of
feature vectors, each feature divided by the root mean of its two within-set variances (unit-free).
`validate_features` checks that it separates real sinograms from slightly degraded ones (RESULTS.md).

Two reference rows come with every score: fresh real sinograms (the floor: what a perfect generator scores) and
the same sinograms through the model's autoencoder, `D(E(x))` (the ceiling of a latent model: its decoder's
artefacts, such as 4x4 blocks, are in every sample it can draw).

**Latents** (`latent_statistics`, results.json's "latents"): the sampled latents against the encoded real
ones, by standard deviation and by power in radial frequency bands. A latent model's samples can only be as
good as the latents it draws; ratios below 1 mean samples shrunk towards the mean, off the decoder's manifold.

**Memorisation** (`memorisation_ratio`): for each generated sinogram, the distance to its nearest neighbour
in the training set over the distance to its nearest neighbour in a held-out set of the same size (both
simulated with the model's own data config; sinograms compared after division by their total counts, so the
dose does not count). About 1: the model is no nearer its training data than to new data; well below 1:
it reproduces training sinograms.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import radon
from allpet_jax import cli, metrics, sampling, tasks
from allpet_jax.atomic_write import claim_output_dir, write_text

TOOL = "allpet_jax.generation"
BANDS = 6  # radial frequency bands of the power spectra
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def band_means(x) -> np.ndarray:
    """Mean power `|FFT|^2 / (H W)` of each mean-free image `(N, H, W)` in `BANDS` equal bands of radial
    frequency up to Nyquist (corners in the last) -> `(N, BANDS)`; white noise of variance `s^2` has `s^2`
    in every band but the lowest, whose zero frequency (the mean) is removed (Parseval)."""
    x = np.asarray(x, np.float64)
    n, h, w = x.shape
    power = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True))) ** 2 / (h * w)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    band = np.minimum((np.hypot(fy, fx) / 0.5 * BANDS).astype(int), BANDS - 1)
    return np.stack([power[:, band == b].mean(axis=1) for b in range(BANDS)], axis=1)


def band_power(x) -> np.ndarray:
    """Radially averaged power of each image `(N, H, W)` in `BANDS` equal bands of radial frequency up to
    Nyquist, as log10 of each band's power over the lowest band's -> `(N, BANDS - 1)`."""
    sums = band_means(x) + 1e-30
    return np.log10(sums[:, 1:] / sums[:, :1])


def latent_statistics(generated, real, clip: float | None) -> dict:
    """The sampled latents `(N, h, w, Z)` against the real sinograms' latents (the same stage's encoding): a
    sampler that draws the real distribution has ratios of 1; below 1, its samples are shrunk towards the
    mean, off the decoder's manifold, which the decoder renders as blocks. With the real latents' tails
    against the sampler's clip of predicted clean latents (`diffusion.clip_x0`, None for none)."""
    g, r = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    channels = lambda z: np.moveaxis(z, -1, 1).reshape((-1,) + z.shape[1:3])
    bands = band_means(channels(g)).mean(axis=0) / band_means(channels(r)).mean(axis=0)
    out = {"std_ratio": float(g.std() / r.std()), "band_power_ratio": [float(b) for b in bands],
           "real_std": float(r.std()), "real_abs_q99": float(np.quantile(np.abs(r), 0.99)),
           "generated_abs_q99": float(np.quantile(np.abs(g), 0.99)), "real_abs_max": float(np.abs(r).max())}
    if clip:
        out["real_share_beyond_clip"] = float(np.mean(np.abs(r) > clip))
        out["real_samples_beyond_clip"] = float(np.mean(np.abs(r).reshape(len(r), -1).max(axis=1) > clip))
    return out


def image_features(images) -> np.ndarray:
    """Features of FBP images `(N, H, W)`: band powers, intensity quantiles inside the body over its mean,
    body shape, negative fraction -> `(N, BANDS - 1 + len(QUANTILES) + 3 + 1)`."""
    x = np.asarray(images, np.float64)
    peak = np.maximum(np.percentile(x.reshape(len(x), -1), 99, axis=1), 1e-12)
    quantiles = np.zeros((len(x), len(QUANTILES)))
    for i, (im, p) in enumerate(zip(x, peak)):
        body = im[im > 0.25 * p]
        if body.size:
            quantiles[i] = np.quantile(body, QUANTILES) / body.mean()
    negative = (np.maximum(-x, 0).sum(axis=(1, 2)) / np.maximum(np.abs(x).sum(axis=(1, 2)), 1e-30))[:, None]
    return np.concatenate([band_power(x), quantiles, metrics.body_shape_features(x), negative], axis=1)


def generation_features(sinos, geom: radon.Geometry) -> np.ndarray:
    """One feature vector per sinogram `(N, A, B)` (module doc) -> `(N, F)` float64."""
    s = np.asarray(sinos, np.float32)
    if s.ndim != 3:
        raise ValueError(f"generation_features takes sinograms (N, n_angles, n_bins); got shape {s.shape}")
    images = np.asarray(radon.fbp(jnp.asarray(s), geom, filter="hann"))
    return np.concatenate([metrics.sinogram_features(s), band_power(s), image_features(images)], axis=1)


def frechet(generated_features, reference_features) -> float:
    """Frechet distance of two feature sets (`metrics.feature_frechet_distance`, features scaled to unit
    pooled within-set standard deviation)."""
    return metrics.feature_frechet_distance(generated_features, reference_features)


def frechet_sd(generated_features, reference_features, key, num_resamples: int = 100) -> float:
    """The bootstrap standard deviation of `frechet`: both sets resampled with replacement `num_resamples`
    times. It is the sampling noise of one distance, so two arms' distances differ beyond their sampling
    noise only when they differ by about twice the root sum of squares of their two values."""
    kg, kr = jax.random.split(key)
    ng, nr = len(generated_features), len(reference_features)
    ig = np.asarray(jax.random.randint(kg, (num_resamples, ng), 0, ng))
    ir = np.asarray(jax.random.randint(kr, (num_resamples, nr), 0, nr))
    return float(np.std([frechet(generated_features[a], reference_features[b]) for a, b in zip(ig, ir)], ddof=1))


def _unit_total(x) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.abs(x.sum(axis=1, keepdims=True)), 1e-30)


def nearest_distance(queries, reference, chunk: int = 512) -> np.ndarray:
    """Euclidean distance from each query `(N, ...)` to its nearest row of `reference` `(M, ...)`, both scaled
    to unit total counts -> `(N,)`."""
    q, r = _unit_total(queries), _unit_total(reference)
    r2 = (r * r).sum(axis=1)
    out = []
    for lo in range(0, len(q), chunk):
        part = q[lo:lo + chunk]
        d2 = (part * part).sum(axis=1)[:, None] + r2[None] - 2 * part @ r.T
        out.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return np.concatenate(out)


def memorisation_ratio(generated, train, held_out) -> np.ndarray:
    """Per generated sinogram, nearest-neighbour distance to `train` over that to `held_out` (same size)."""
    if len(train) != len(held_out):
        raise ValueError(f"the training and held-out sets must have the same size; got {len(train)} and {len(held_out)}")
    return nearest_distance(generated, train) / np.maximum(nearest_distance(generated, held_out), 1e-30)


def degrade(sinos, kind: str, key) -> np.ndarray:
    """Slightly degraded copies of real sinograms `(N, A, B)`: 'blur' (Gaussian, 0.7 bins along the detector),
    'noise' (Gaussian, 5% of each sinogram's mean), 'blocks' (a quarter of the 4x4 block average mixed in: the
    autoencoder's patch artefact) or 'inconsistent' (each angle's projection scaled by 1 +- 5%)."""
    s = np.asarray(sinos, np.float64)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter1d

        return gaussian_filter1d(s, 0.7, axis=-1)
    if kind == "noise":
        return s + 0.05 * s.mean(axis=(1, 2), keepdims=True) * np.asarray(jax.random.normal(key, s.shape))
    if kind == "blocks":
        n, a, b = s.shape
        blocks = s[:, : a - a % 4, : b - b % 4].reshape(n, a // 4, 4, b // 4, 4).mean(axis=(2, 4))
        coarse = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)
        out = s.copy()
        out[:, : coarse.shape[1], : coarse.shape[2]] = 0.75 * out[:, : coarse.shape[1], : coarse.shape[2]] + 0.25 * coarse
        return out
    if kind == "inconsistent":
        return s * (1 + 0.05 * np.asarray(jax.random.normal(key, s.shape[:2] + (1,))))
    raise ValueError(f"kind must be 'blur', 'noise', 'blocks' or 'inconsistent'; got {kind!r}")


DEGRADATIONS = ("blur", "noise", "blocks", "inconsistent")


def validate_features(real_a, real_b, geom: radon.Geometry, key) -> dict:
    """Frechet distances of `real_a` and its degraded copies to an independent real set `real_b`: the distance
    separates real from degraded sinograms where each degraded value is well above the real one."""
    fb = generation_features(real_b, geom)
    out = {"real": frechet(generation_features(real_a, geom), fb)}
    for i, kind in enumerate(DEGRADATIONS):
        out[kind] = frechet(generation_features(degrade(real_a, kind, jax.random.fold_in(key, i)), geom), fb)
    return out


def score(generated, real, train, held_out, geom: radon.Geometry) -> dict:
    """Per-set and per-sample scores of `generated` `(N, A, B)` against `real` (held-out, for the distance),
    with memorisation against `train` and an equal-size `held_out`."""
    g = np.asarray(generated, np.float32)
    ratio = memorisation_ratio(g, train, held_out)
    features, real_features = generation_features(g, geom), generation_features(real, geom)
    return {
        "frechet": frechet(features, real_features),
        "frechet_sd": frechet_sd(features, real_features, jax.random.key(0)),
        "hl_residual": float(np.mean(metrics.helgason_ludwig_residual(g, geom)["mean"])),
        "range_residual": float(np.mean(metrics.range_residual(g, geom))),
        "negative_fraction": float(np.mean(metrics.negative_fraction(g))),
        "memorisation_median": float(np.median(ratio)),
        "memorisation_below_0.8": float(np.mean(ratio < 0.8)),
        "memorisation_ratio": [float(r) for r in ratio],
    }


def grid(generated, real, geom: radon.Geometry, path: str, title: str, n: int = 8) -> None:
    """A PNG: `n` generated sinograms and their FBPs above `n` real ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from allpet_jax import plots

    rows = [("generated", np.asarray(generated[:n])), ("real", np.asarray(real[:n]))]
    fig, axes = plt.subplots(4, n, figsize=(1.6 * n, 7))
    for r, (label, sinos) in enumerate(rows):
        images = np.asarray(radon.fbp(jnp.asarray(sinos, jnp.float32), geom, filter="hann"))
        for j in range(n):
            axes[2 * r, j].imshow(sinos[j], cmap="magma", aspect="auto")
            axes[2 * r + 1, j].imshow(np.maximum(images[j], 0), cmap="gray")
        axes[2 * r, 0].set_ylabel(f"{label}\nsinogram")
        axes[2 * r + 1, 0].set_ylabel(f"{label}\nFBP")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    plots.save_figure(fig, path)  # closes the figure


FLAGS = flags.FLAGS


def real_sets(trained, n: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The real sinograms a scoring of `n` generated ones compares with, simulated with the model's data config:
    `held` (test-split inputs [0, max(n, n_train)): [0, n) for the distance, [0, n_train) for memorisation; one
    split, so the two overlap, and neither was trained on), the training targets `(n_train, A, B)`, and `n`
    fresh test-split targets after those `(n, 1, A, B)` (the floor and the autoencoder ceiling)."""
    n_train = int(trained.config.data.n_train)
    held = sampling.simulated_inputs(trained, max(n, n_train))
    train = sampling.simulated_inputs(trained, n_train, "train")["target"][:, 0]
    fresh = sampling.simulated_inputs(trained, n, "test", start=max(n, n_train))["target"]
    return held, train, fresh


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    into = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "training run directory holding foundation/", **into)
    flags.DEFINE_integer("num_inputs", 512, "generated sinograms (and real held-out ones for the distance)", **into)
    flags.DEFINE_integer("steps", 50, "DDIM steps", **into)
    flags.DEFINE_integer("seed", 0, "sampling seed", **into)
    flags.DEFINE_bool("last", False, "score the latest checkpoint instead of the one with the best validation loss "
                      "(a model that memorises does so late, and picking the best checkpoint can hide it)", **into)
    flags.DEFINE_string("out", "", "where results.json, results.md and grid.png go (default WORKDIR/eval/generation)",
                        **into)
    flags.mark_flag_as_required("workdir", flag_values)


def main(argv, flag_values: flags.FlagValues = FLAGS) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    if flag_values.num_inputs < 2 or flag_values.steps < 1:
        raise ValueError(f"--num_inputs must be >= 2 and --steps >= 1; got {flag_values.num_inputs}, {flag_values.steps}")
    out = claim_output_dir(flag_values.out or os.path.join(flag_values.workdir, "eval", "generation"), TOOL,
                           ("results.json", "results.md", "grid.png", "samples.npz"))
    trained = sampling.load_for_task(tasks.SYNTHESIS, flag_values.workdir, best=not flag_values.last)
    geom = sampling.geometry_of(trained)
    n, n_train = flag_values.num_inputs, int(trained.config.data.n_train)
    t0 = time.perf_counter()
    held, train, fresh = real_sets(trained, n)
    samples_path = os.path.join(out, "samples.npz")
    batch = sampling.model_batch(trained, {"prompt": held["prompt"][:n],
                                           "geometry_only": np.zeros_like(held["target"][:n], np.float32)})
    z = sampling.generate(trained, batch, jax.random.key(flag_values.seed), num_steps=flag_values.steps,
                          progress="generating", latents=True)[0]
    generated = sampling.decode(trained, z)[:, 0]
    generate_s = time.perf_counter() - t0
    with open(samples_path + ".tmp", "wb") as f:
        np.savez(f, generated=generated)
    os.replace(samples_path + ".tmp", samples_path)
    real = held["target"][:n, 0]
    result = score(generated, real, train, held["target"][:n_train, 0], geom)
    latents = latent_statistics(z, sampling.encode(trained, held["target"][:n]), trained.config.diffusion.clip_x0)
    reference = score(fresh[:, 0], real, train, held["target"][:n_train, 0], geom)  # the floor of each score
    # the ceiling of a latent model: fresh real sinograms through the autoencoder, D(E(x))
    from allpet_jax.evaluate import autoencoder_roundtrip

    ceiling = score(autoencoder_roundtrip(trained, fresh)[:, 0], real, train, held["target"][:n_train, 0], geom)
    grid(generated, real, geom, os.path.join(out, "grid.png"),
         f"{flag_values.workdir}: foundation step {trained.step}, DDIM {flag_values.steps}")
    record = {"workdir": flag_values.workdir, "step": trained.step, "checkpoint": "last" if flag_values.last else "best",
              "n": n, "n_train": n_train,
              "steps": flag_values.steps, "generate_s": generate_s, "wall_s": time.perf_counter() - t0,
              "model": result, "fresh real sinograms": reference, "autoencoder ceiling": ceiling, "latents": latents,
              "command": "python -m allpet_jax.generation " + " ".join(sys.argv[1:])}
    write_text(os.path.join(out, "results.json"), json.dumps(record, indent=1))
    keys = ("frechet", "hl_residual", "range_residual", "negative_fraction", "memorisation_median",
            "memorisation_below_0.8")
    lines = ["| set | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, r in (("generated", result), ("fresh real (floor)", reference),
                    ("autoencoder D(E(fresh real)) (ceiling)", ceiling)):
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    lines.append(f"\nsampled latents against the real ones: std ratio {latents['std_ratio']:.3f}, power ratio by "
                 "radial frequency band (low to high) " + " ".join(f"{b:.2f}" for b in latents["band_power_ratio"])
                 + f"; |z| 99th percentile {latents['generated_abs_q99']:.2f} against {latents['real_abs_q99']:.2f}")
    write_text(os.path.join(out, "results.md"), f"`{record['command']}` (step {trained.step}, {n} samples)\n\n"
               + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, errors=(ValueError, FileNotFoundError))
