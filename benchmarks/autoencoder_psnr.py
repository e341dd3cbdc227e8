"""Can the sinogram autoencoder's latent hold what the tasks need? PSNR and hot-lesion contrast, 4 vs 8 channels.

    python benchmarks/autoencoder_psnr.py                                 # 64 and 128, 4 and 8 channels
    python benchmarks/autoencoder_psnr.py --sizes 64 --channels 4,8,16 --steps 150 --views-steps 0
    python benchmarks/autoencoder_psnr.py --quick                         # tiny shapes (compiles: ~2 min)

Model and data are the `cpu` preset's (`configs/base.py:cpu`): `stages.autoencoder_stage` (factor 4,
widths 16-32-32, `--channels` latent channels per sinogram) on the `low_dose` task's **noise-free**
full-dose sinograms `target_clean` from the simulator (`pipeline.make_source`, keys
`sources.sample_key(seed, split, i)`), normalised as the pipeline does (divided by the 99.5th percentile of
the first 64 training targets). `--sizes` sets `data.image_size = n_angles = n_bins` (64 is the preset;
the simulator's physical pixel is `phantoms.FOV_MM[region] / size`: 4 mm brain, 9.4 mm body at 64).
The autoencoder is fitted on the `train` split (`--n-train` sinograms, the preset's 64) and scored on
`--n-test` sinograms of the `test` split, whose keys are disjoint from the training ones.

Arms, per size and latent channel count:

- `PCA start`: `autoencoder_stage(..., init_batch=train)`, untrained: its patch shortcut is the whitened
  PCA of the training split's `f x f` patches (`SinogramAutoencoder.init_patch_pca`) and the
  convolutions start as a zero residual, so this row *is* the best linear patch code of that latent size
  (the linear peer of the trained rows, measured in the same run).
- `trained on S`: from the PCA start, `--steps` steps of the stage's own `loss_fn` through the repo's
  train step (`training/step.py::device_step` on one device: AdamW with the preset's learning rate,
  warm-up (shortened to a third of the steps when longer), cosine decay, clipping, EMA) on batches of
  `data.batch_size` full clean sinograms; scored with the EMA parameters, which is what `train.py`
  hands to the later stages.
- `trained on S/P/N`: the same, but each sinogram of a batch is replaced by its positive or negative
  RMAS view (below) with probability 1/3 each, new masks every step: the views the foundation stage
  encodes, at the same sinograms per step (and cost) as `trained on S`. `--views-steps` sets its steps
  per size (0 skips it).

Metrics on the held-out sinograms (means over sinograms unless said otherwise):

- `PSNR S`: `stages.psnr` (peak = the sinogram's own maximum) of `D(E(S))` against the clean `S`.
- `PSNR P`, `PSNR N`: the same for the RMAS views `P = M * S` and `N = (1 - M) * S`, each encoded and
  decoded on its own, with the preset's masks (`masks.make_rmas`, `MaskConfig.from_config(config.masks)`
  in `mask` mode: 8 x 8 grid, 1-4 cells), one fixed mask per held-out sinogram.
- `MSE views / S`: mean MSE over both views divided by the mean MSE of the full sinograms (the issue's
  "masked views reconstruct ~3x worse"; > 1 means the views are harder).
- hot-lesion contrast kept: FBP (`radon.fbp`, with each of `--fbp-filters`: the ramp filter, which
  keeps every frequency the sinogram has, and the Hann window the project's TMA and RMAS read images
  with) of `D(E(S))` and of `S`.
  A lesion is one 8-connected component of the `lesion_hot` label; its contrast is the mean of the FBP
  over the lesion's pixels minus the mean over its local background ring, the pixels 2 to
  `1 + --ring-px` pixels (Chebyshev distance) from the lesion, leaving out one guard pixel against the
  FBP's blur, other lesions (hot or cold) and air (label `background`). The kept fraction is
  `contrast(FBP(D(E(S)))) / contrast(FBP(S))` per lesion; the table gives the median and the
  interquartile range over lesions whose clean contrast is at least `--min-contrast` times their ring
  mean (fainter ones make the ratio a quotient of two small numbers), and how many lesions that is.
- `PSNR S without EMA`: `PSNR S` of the trained rows' raw parameters (the EMA of a short run still holds
  part of the PCA start: 0.99^150 = 22 % at the preset's decay).

The defaults took 892 s on 2 CPU cores shared with another job (most of it the 128 x 128 train steps and
one compile per latent size); the wall time is printed. Nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import radon  # noqa: E402
from allpet_jax import masks  # noqa: E402
from allpet_jax.data import phantoms, pipeline  # noqa: E402
from allpet_jax.training import runs, stages  # noqa: E402
from allpet_jax.training import step as train_step  # noqa: E402
from configs import base  # noqa: E402

QUICK = dict(sizes="32", channels="4,8", steps="2", views_steps="2", n_train=8, n_test=4, batch=4)


# --- data -----------------------------------------------------------------------------------------------


def preset_config(size: int, n_train: int, n_test: int, batch: int | None):
    """The `cpu` preset at `size` x `size` pixels, `size` angles and bins."""
    cfg = base.get_config("cpu")
    cfg.data.image_size = cfg.data.n_angles = cfg.data.n_bins = size
    cfg.data.n_train, cfg.data.n_test = n_train, n_test
    if batch:
        cfg.data.batch_size = batch
    return cfg


def clean_split(data, split: str, normalisation=None):
    """`(fields, normalisation)`: every sample of `split`, normalised (with `normalisation`, or one
    estimated from this split). Fields: `clean` `(n, 1, A, Bn)`, `labels` `(n, H, W)`, `index` `(n,)`."""
    source = pipeline.make_source(data, split)
    if normalisation is None:
        normalisation = pipeline.estimate_normalisation(source)  # what normalisation_from_config does
    batch = normalisation(source.read_batch(np.arange(len(source))))
    return {"clean": batch["target_clean"], "labels": batch["labels"], "index": batch["index"]}, normalisation


def rmas_views(rmas, key, sino, index, mask_seed):
    """`(positive, negative)` views `(n, 1, A, Bn)` of `sino` with the RMAS masks of `(key, index, mask_seed)`."""
    out = rmas(key, {"target": jnp.asarray(sino), "index": jnp.asarray(index),
                     "mask_seed": jnp.full(len(index), mask_seed, jnp.int32)})
    return out["positive"], out["negative"]


# --- hot-lesion contrast ----------------------------------------------------------------------------------


def hot_lesion_rings(labels, ring_px: int = 2, guard_px: int = 1):
    """Every hot lesion of label maps `labels` `(n, H, W)` as `(sample, lesion pixels, ring pixels)`,
    pixels as flat indices into `H * W`; lesions whose ring is empty are left out (module docstring)."""
    hot, cold, air = (phantoms.LABEL_IDS[k] for k in ("lesion_hot", "lesion_cold", "background"))
    box = np.ones((3, 3), bool)
    lesions = []
    for n, lab in enumerate(np.asarray(labels)):
        comp, count = ndimage.label(lab == hot, box)  # 8-connected components
        excluded = (lab == hot) | (lab == cold) | (lab == air)
        for i in range(1, count + 1):
            lesion = comp == i
            inner = ndimage.binary_dilation(lesion, box, iterations=guard_px)
            outer = ndimage.binary_dilation(lesion, box, iterations=guard_px + ring_px)
            ring = outer & ~inner & ~excluded
            if ring.any():
                lesions.append((n, np.flatnonzero(lesion), np.flatnonzero(ring)))
    return lesions


def lesion_contrast(images, lesions):
    """`(mean over lesion - mean over ring, mean over ring)` per lesion, each `(n_lesions,)`, of images `(n, H, W)`."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    lesion = np.array([flat[n, px].mean() for n, px, _ in lesions])
    ring = np.array([flat[n, px].mean() for n, _, px in lesions])
    return lesion - ring, ring


# --- scoring ----------------------------------------------------------------------------------------------


def mean_psnr(rec, sino) -> float:
    """`stages.psnr` (the sinogram's own peak as the data range), averaged over sinograms, in dB."""
    return float(np.mean(np.asarray(stages.psnr(jnp.asarray(rec), jnp.asarray(sino)))))


class HeldOut:
    """The held-out sinograms, their RMAS views and clean FBP contrasts, and how to score a model on them."""

    def __init__(self, test, views, geom, lesions, fbp_filters, min_contrast: float, chunk: int = 32):
        self.full = test["clean"]
        self.positive, self.negative = (np.asarray(v) for v in views)
        self.geom, self.lesions, self.chunk, self.fbp_filters = geom, lesions, chunk, tuple(fbp_filters)
        self.fbp = jax.jit(lambda s, f: radon.fbp(s[:, 0], geom, f), static_argnums=1)
        clean = [lesion_contrast(self._fbp_all(self.full, f), lesions) for f in self.fbp_filters]
        # One set of lesions for every filter: those faint in any of them are left out of all.
        self.scored = np.all([c >= min_contrast * np.abs(ring) for c, ring in clean], axis=0)
        self.clean_contrast = [c[self.scored] for c, _ in clean]

    def _fbp_all(self, sino, fbp_filter: str):
        return np.concatenate([np.asarray(self.fbp(sino[i:i + self.chunk], fbp_filter))
                               for i in range(0, len(sino), self.chunk)])

    def _run(self, reconstruct, params, sino):
        parts = [reconstruct(params, jnp.asarray(sino[i:i + self.chunk])) for i in range(0, len(sino), self.chunk)]
        return np.concatenate([np.asarray(p) for p in parts])

    def psnr_full(self, reconstruct, params) -> float:
        """Mean `stages.psnr` of the full sinograms alone."""
        return mean_psnr(self._run(reconstruct, params, self.full), self.full)

    def score(self, reconstruct, params) -> dict:
        def mse(rec, sino):
            return float(np.mean((np.asarray(rec, np.float64) - sino) ** 2))

        rec = {name: self._run(reconstruct, params, getattr(self, name)) for name in ("full", "positive", "negative")}
        kept = [lesion_contrast(self._fbp_all(rec["full"], f), self.lesions)[0][self.scored] / clean
                for f, clean in zip(self.fbp_filters, self.clean_contrast)]
        return {
            "psnr_full": mean_psnr(rec["full"], self.full),
            "psnr_positive": mean_psnr(rec["positive"], self.positive),
            "psnr_negative": mean_psnr(rec["negative"], self.negative),
            "mse_ratio": 0.5 * (mse(rec["positive"], self.positive) + mse(rec["negative"], self.negative))
            / mse(rec["full"], self.full),
            "kept": [np.percentile(k, [25, 50, 75]) if k.size else np.full(3, np.nan) for k in kept],
            "n_lesions": int(self.scored.sum()),
        }


# --- training ---------------------------------------------------------------------------------------------


def make_train_step(cfg, stage, steps: int):
    """`(tx, step)`: the preset's optimiser for a run of `steps` steps (`runs.make_tx`, warm-up capped at a
    third of them) and `training/step.py::device_step` with the stage's loss on one device, jitted."""
    cfg = cfg.copy_and_resolve_references()
    cfg.train.steps["autoencoder"] = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 3)
    tx = runs.make_tx(cfg, "autoencoder")
    step = jax.jit(functools.partial(train_step.device_step, loss_fn=stage.loss_fn, tx=tx, n_micro=1,
                                     ema_decay=cfg.train.ema_decay, axis_name=None), donate_argnums=0)
    return tx, step


def train_autoencoder(tx, step_fn, params, clean, steps: int, batch_size: int, rmas, key, with_views: bool):
    """`(EMA parameters, parameters, last reconstruction loss, timing)` after `steps` steps of `step_fn`
    from `params`, on batches of `batch_size` of the training sinograms `clean` `(n, 1, A, Bn)` drawn with
    `key`; with `with_views` each sinogram of a batch is replaced by its positive or negative RMAS view
    with probability 1/3 each (new masks every step)."""
    k_state, k_batch, k_masks = jax.random.split(key, 3)
    state = train_step.init_state(jax.tree.map(jnp.copy, params), tx, int(jax.random.randint(k_state, (), 0, 2**31 - 1)))
    clean = jnp.asarray(clean)
    t0 = t1 = time.perf_counter()
    for step in range(steps):
        if step == 1:  # the first step compiles (unless an earlier arm compiled it)
            jax.block_until_ready(state)
            t1 = time.perf_counter()
        index = jax.random.choice(jax.random.fold_in(k_batch, step), len(clean), (batch_size,), replace=False)
        sino = clean[index]
        if with_views:
            positive, negative = rmas_views(rmas, k_masks, sino, index, step)
            view = jax.random.randint(jax.random.fold_in(k_masks, step), (len(sino), 1, 1, 1), 0, 3)
            sino = jnp.where(view == 1, positive, jnp.where(view == 2, negative, sino))
        state, metrics = step_fn(state, {"target": sino, "index": index})
    jax.block_until_ready(state)
    timing = f"first step {t1 - t0:.0f} s, then {(time.perf_counter() - t1) / max(steps - 1, 1):.2f} s/step"
    return state.ema, state.params, float(metrics["reconstruction"]), timing


def per_size(text: str, sizes: list[int], name: str) -> list[int]:
    """`--steps`-style lists: one value for every size, or one per size."""
    values = [int(v) for v in text.split(",")]
    if len(values) == 1:
        values = values * len(sizes)
    if len(values) != len(sizes):
        raise ValueError(f"--{name.replace('_', '-')} needs one value or one per size ({len(sizes)} sizes: {sizes}); "
                         f"got {text!r}")
    return values


# --- report -----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the arms and metrics.")
    p.add_argument("--sizes", default="64,128", help="sinogram sizes (image_size = n_angles = n_bins)")
    p.add_argument("--channels", default="4,8", help="latent channels per sinogram to compare")
    p.add_argument("--steps", default="150,30", help="training steps per size (one value: every size)")
    p.add_argument("--n-train", type=int, default=64, help="training sinograms (the cpu preset's 64)")
    p.add_argument("--n-test", type=int, default=128, help="held-out sinograms (test split)")
    p.add_argument("--batch", type=int, default=0, help="training batch (0: the preset's 8)")
    p.add_argument("--fbp-filters", default="ramp,hann", help=f"FBP filters for the lesion contrast, of {radon.FILTERS}")
    p.add_argument("--ring-px", type=int, default=2, help="width of the lesions' background ring, pixels")
    p.add_argument("--min-contrast", type=float, default=0.1,
                   help="score lesions whose clean FBP contrast is at least this fraction of their ring mean")
    p.add_argument("--views-steps", default="150,0", help="steps of the arm trained on S/P/N per size (0: none)")
    p.add_argument("--seed", type=int, default=0, help="dataset, mask and training seed")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for a smoke test: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    sizes = [int(s) for s in args.sizes.split(",")]
    fbp_filters = args.fbp_filters.split(",")
    channels = [int(c) for c in args.channels.split(",")]
    steps, views_steps = (per_size(getattr(args, name), sizes, name) for name in ("steps", "views_steps"))
    start = time.perf_counter()
    key = jax.random.key(args.seed)
    rows = []

    for size, n_steps, n_views_steps in zip(sizes, steps, views_steps):
        # --- data: clean sinograms of the train and test splits, masks and lesions of the test split -----
        t0 = time.perf_counter()
        cfg = preset_config(size, args.n_train, args.n_test, args.batch)
        cfg.data.seed = cfg.seed = args.seed
        geom = pipeline.geometry_from_config(cfg.data)
        train, normalisation = clean_split(cfg.data, "train")
        test, _ = clean_split(cfg.data, "test", normalisation)
        rmas = masks.make_rmas(geom, masks.MaskConfig.from_config(cfg.masks))
        k_size = jax.random.fold_in(key, size)
        k_test_masks, k_train = jax.random.split(k_size)
        views = rmas_views(rmas, k_test_masks, test["clean"], test["index"], 0)
        lesions = hot_lesion_rings(test["labels"], args.ring_px)
        held_out = HeldOut(test, views, geom, lesions, fbp_filters, args.min_contrast)
        print(f"[{size}] {len(train['clean'])} train / {len(test['clean'])} test sinograms, {len(lesions)} hot lesions "
              f"with a ring ({int(held_out.scored.sum())} of them scored), in {time.perf_counter() - t0:.0f} s", flush=True)

        for z in channels:
            # --- arm a: the patch-PCA start -------------------------------------------------------------------
            cfg.model.latent_channels = z
            stage = stages.autoencoder_stage(cfg, args.seed, init_batch={"target": train["clean"]})
            reconstruct = jax.jit(lambda prm, x, g=stage.graphdef: nnx.merge(g, prm)(x)[0])
            rows.append((size, z, "PCA start", held_out.score(reconstruct, stage.params)))
            print(f"[{size}] z={z} PCA start: {rows[-1][3]['psnr_full']:.2f} dB", flush=True)

            # --- arms b and c: trained from it ------------------------------------------------------------------
            train_steps = {}  # steps -> (tx, jitted step): both arms share one compiled step when they can
            for name, arm_steps, with_views in (("S", n_steps, False), ("S/P/N", n_views_steps, True)):
                if not arm_steps:
                    continue
                t0 = time.perf_counter()
                if arm_steps not in train_steps:
                    train_steps[arm_steps] = make_train_step(cfg, stage, arm_steps)
                ema, params, loss, timing = train_autoencoder(
                    *train_steps[arm_steps], stage.params, train["clean"], arm_steps, cfg.data.batch_size, rmas,
                    jax.random.fold_in(k_train, z), with_views)  # the same batches and keys in both arms
                label = f"trained on {name}, {arm_steps} x {cfg.data.batch_size}"
                rows.append((size, z, label, held_out.score(reconstruct, ema)))
                rows[-1][3]["psnr_full_raw"] = raw = held_out.psnr_full(reconstruct, params)
                print(f"[{size}] z={z} {label}: {rows[-1][3]['psnr_full']:.2f} dB EMA, {raw:.2f} dB without EMA, "
                      f"last L1 {loss:.4f}, {time.perf_counter() - t0:.0f} s ({timing})", flush=True)

    # --- table --------------------------------------------------------------------------------------------
    print()
    print("command: python benchmarks/autoencoder_psnr.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; held-out: test split, clean sinograms; "
          "PSNR in dB, means over sinograms\n")
    kept_heads = "".join(f" lesion contrast kept, {f} FBP: median [IQR] |" for f in fbp_filters)
    print(f"| size | latent ch | arm | PSNR S | PSNR P | PSNR N | MSE views / S |{kept_heads} n lesions "
          "| PSNR S without EMA |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(fbp_filters) + "---|---|")
    for size, z, arm, r in rows:
        kept = "".join(f" {med:.3f} [{q1:.3f}, {q3:.3f}] |" for q1, med, q3 in r["kept"])
        raw = f"{r['psnr_full_raw']:.2f}" if "psnr_full_raw" in r else "-"
        print(f"| {size} | {z} | {arm} | {r['psnr_full']:.2f} | {r['psnr_positive']:.2f} | {r['psnr_negative']:.2f} | "
              f"{r['mse_ratio']:.2f} |{kept} {r['n_lesions']} | {raw} |")
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
