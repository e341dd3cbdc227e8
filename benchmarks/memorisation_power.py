"""Could the memorisation ratio see copying at the model's own error? A power check of `generation`'s test.

    python benchmarks/memorisation_power.py --workdir RUN [--scoring generation_last]

`python -m allpet_jax.generation` scores each generated sinogram by the ratio of its nearest-neighbour
distance to the training set over that to an equal-size held-out set (about 1: no copying). A model whose
samples are far from every real sinogram could copy and still score about 1, since its own error would hide
the copy. This script reads a scoring's `samples.npz` (RUN/eval/<scoring>/), simulates the same training,
held-out and fresh real sets as `generation` did, and prints:
- the generated and the fresh real sinograms' median nearest-neighbour distance to the training set (both
  scaled to unit total counts, as `generation` compares them);
- the ratio a *copier* would score: training sinograms drawn at random, plus white error whose norm is a
  multiple of the generated samples' median distance. Where the copier at 1x scores well below the model,
  the test would have seen copying at the model's error.

White error is nearly orthogonal to the differences between sinograms, so it is the copier's most
favourable error for detection; an error along the data's own directions could hide a copy better.
Randomness from `--seed` (a `jax.random` key). Nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

import allpet_jax  # noqa: F401  (XLA:CPU settings before jax is used)
from allpet_jax import generation, sampling, tasks

FRACTIONS = (0.0, 0.25, 0.5, 1.0, 2.0)


def copier_ratios(train, held_out, error_norm: float, n: int, key) -> np.ndarray:
    """Memorisation ratios of `n` copies of random training sinograms (scaled to unit total counts) plus
    white error of norm `error_norm` each."""
    unit = generation._unit_total(train)
    k_pick, k_noise = jax.random.split(key)
    picks = np.asarray(jax.random.randint(k_pick, (n,), 0, len(unit)))
    noise = np.asarray(jax.random.normal(k_noise, (n, unit.shape[1])), np.float64)
    noise *= error_norm / np.linalg.norm(noise, axis=1, keepdims=True)
    return generation.memorisation_ratio(unit[picks] + noise, train, held_out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a foundation run scored by `python -m allpet_jax.generation`")
    p.add_argument("--scoring", default="generation", help="its eval/ subdirectory holding samples.npz")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    path = os.path.join(args.workdir, "eval", args.scoring, "samples.npz")
    if not os.path.exists(path):
        raise SystemExit(f"memorisation_power: expected {path} (run `python -m allpet_jax.generation` first); not found")
    generated = np.load(path, allow_pickle=False)["generated"]
    trained = sampling.load_for_task(tasks.SYNTHESIS, args.workdir, best=True)  # for its data config only
    n, n_train = len(generated), int(trained.config.data.n_train)
    held, train, fresh = generation.real_sets(trained, n)  # the sets generation scored against
    held, fresh = held["target"][:n_train, 0], fresh[:, 0]
    d_gen = float(np.median(generation.nearest_distance(generated, train)))
    d_real = float(np.median(generation.nearest_distance(fresh, train)))
    print(f"{args.workdir} ({args.scoring}; {n} generated, {n_train} training sinograms)")
    print(f"median nearest-neighbour distance to the training set: generated {d_gen:.4g}, fresh real {d_real:.4g} "
          f"({d_gen / d_real:.2f}x)")
    print("| set | memorisation ratio (median) | share with ratio < 0.8 |\n|---|---|---|")
    for name, ratio in (("generated", generation.memorisation_ratio(generated, train, held)),
                        ("fresh real", generation.memorisation_ratio(fresh, train, held))):
        print(f"| {name} | {np.median(ratio):.3f} | {np.mean(ratio < 0.8):.2f} |")
    key = jax.random.key(args.seed)
    for i, fraction in enumerate(FRACTIONS):
        ratio = copier_ratios(train, held, fraction * d_gen, n, jax.random.fold_in(key, i))
        print(f"| copier + white error of {fraction:g}x the generated distance | {np.median(ratio):.3f} | "
              f"{np.mean(ratio < 0.8):.2f} |")


if __name__ == "__main__":
    main()
