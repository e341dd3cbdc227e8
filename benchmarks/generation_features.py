"""Does the generation score's Frechet distance (allpet_jax/generation.py) separate real sinograms from slightly
degraded ones? Two disjoint sets of real synthesis sinograms, and the first set blurred, noised, given the
autoencoder's 4x4 blocks, or made inconsistent across angles (`generation.degrade`).

    python benchmarks/generation_features.py                       # workstation geometry (64 x 64), 512 per set
    python benchmarks/generation_features.py --preset smoke --n 128

Prints the distance of each to the second real set, for two random splits of the pool.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from allpet_jax import generation  # noqa: E402
from allpet_jax.data import pipeline  # noqa: E402
from configs import base  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="workstation")
    parser.add_argument("--n", type=int, default=512, help="sinograms per set")
    parser.add_argument("--splits", type=int, default=2)
    args = parser.parse_args()
    data = base.get_config(args.preset).data
    data.task, data.n_test, data.seed = "synthesis", 2 * args.n, 1
    geom = pipeline.geometry_from_config(data)
    t0 = time.perf_counter()
    pool = np.asarray(pipeline.make_source(data, "test", progress=False).read_batch(list(range(2 * args.n)))["target"])[:, 0]
    print(f"{2 * args.n} real sinograms {pool.shape[1:]} ({args.preset}) simulated in {time.perf_counter() - t0:.0f} s\n")
    print("| split | real | " + " | ".join(generation.DEGRADATIONS) + " |")
    print("|" + "---|" * (len(generation.DEGRADATIONS) + 2))
    for split in range(args.splits):
        key = jax.random.key(split)
        order = np.asarray(jax.random.permutation(key, 2 * args.n))
        d = generation.validate_features(pool[order[: args.n]], pool[order[args.n:]], geom, key)
        print(f"| {split} | {d['real']:.2f} | " + " | ".join(f"{d[k]:.2f}" for k in generation.DEGRADATIONS) + " |",
              flush=True)


if __name__ == "__main__":
    main()
