"""Input-pipeline throughput: on-the-fly simulation vs cached shards (samples/s, median of repeats).

    python benchmarks/pipeline_bench.py                      # 128 x 128, 128 angles, batch 32, low_dose
    python benchmarks/pipeline_bench.py --size 64 --batches 4 --repeats 3

Rows:
- `simulate, vmap per batch`: the peer design, one jitted `vmap(simulate_pair)` call per batch;
- `SimulatedSource.read_batch`: what the source does, one jitted call per sample, no pipeline, cache off;
- `pipeline, on the fly (cold)`: the Grain pipeline over `SimulatedSource` with its cache off, i.e. the
  first epoch, for a few Grain thread counts;
- `pipeline, on the fly (cached)`: the same after one epoch, samples served from the in-memory cache;
- `pipeline, shards`: over `ShardSource` (shards made outside the timing, and read once so they are in
  memory, as after the first epoch of training).
The pipeline target is >= 200 samples/s at 128 x 128 / 128 angles on a 2-core CPU. Never fails on timing.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time

import jax
import numpy as np

from allpet_jax.data import pipeline, sources
from radon import Geometry


def rate(fn, samples_per_call: int, calls: int, repeats: int) -> float:
    """Median samples/s of `calls` calls of `fn`, over `repeats` timed repeats (after one warm-up call)."""
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(samples_per_call * calls / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="low_dose")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n_angles", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=256, help="samples in the benchmark split")
    p.add_argument("--batches", type=int, default=6, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="comma-separated Grain thread counts")
    p.add_argument("--simulate", default="allpet_jax.data.simulate:simulate_pair", help="module:function")
    args = p.parse_args(argv)

    module, name = args.simulate.split(":")
    simulate = getattr(importlib.import_module(module), name)
    geom = Geometry(
        image_shape=(args.size, args.size), n_angles=args.n_angles or args.size, n_bins=args.size,
        pixel_size=512.0 / args.size, bin_spacing=512.0 / args.size,
    )
    B = args.batch
    cold = sources.SimulatedSource(args.task, geom, args.n, seed=0, split="train", simulate=simulate, cache_bytes=0)
    norm = pipeline.estimate_normalisation(cold)
    rows = []

    batched = jax.jit(jax.vmap(lambda key: simulate(key, args.task, geom)))
    keys = sources.sample_key(0, "train", np.arange(B))
    rows.append(("simulate, vmap per batch", "-", rate(lambda: jax.block_until_ready(batched(keys)), B, 1, args.repeats)))
    counter = iter(range(10**9))
    rows.append((
        "SimulatedSource.read_batch", "-",
        rate(lambda: cold.read_batch((np.arange(B) + B * next(counter)) % args.n), B, args.batches, args.repeats),
    ))

    def pipeline_rate(source, threads):
        it = iter(pipeline.make_pipeline(source, batch_size=B, normalisation=norm, seed=0, num_threads=threads, prefetch=2 * max(threads, 1)))
        return rate(lambda: next(it), B, args.batches, args.repeats)

    thread_counts = [int(t) for t in args.threads.split(",")]
    for threads in thread_counts:
        rows.append(("pipeline, on the fly (cold)", threads, pipeline_rate(cold, threads)))
    cached = sources.SimulatedSource(args.task, geom, args.n, seed=0, split="train", simulate=simulate)
    cached.read_batch(np.arange(args.n))  # one epoch fills the cache
    for threads in thread_counts:
        rows.append(("pipeline, on the fly (cached)", threads, pipeline_rate(cached, threads)))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sources.write_shards(tmp, cold, shard_size=64, progress=False)
        make_s = time.perf_counter() - t0
        shards = sources.ShardSource(tmp)
        shards.read_batch(np.arange(len(shards)))  # one pass: every shard in memory
        for threads in thread_counts:
            rows.append(("pipeline, shards", threads, pipeline_rate(shards, threads)))

    print(f"\n{args.task}, {args.size}x{args.size} image, {geom.n_angles} angles x {geom.n_bins} bins, batch {B}, "
          f"{jax.devices()[0].platform}, median of {args.repeats}")
    print(f"{'reader':<30} {'threads':>7} {'samples/s':>10}")
    for name, threads, r in rows:
        print(f"{name:<30} {threads!s:>7} {r:>10.1f}")
    print(f"(making {args.n} samples of shards took {make_s:.1f} s: {args.n / make_s:.1f} samples/s)")


if __name__ == "__main__":
    main()
