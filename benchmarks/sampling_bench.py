"""Sampling speed: DDIM (and DDBM, regressor) for 1 and 16 sinograms at 128 x 128, whole pipeline.

    python benchmarks/sampling_bench.py                      # the cpu preset's model sizes
    python benchmarks/sampling_bench.py --models default --samplers ddim --batches 1 --repeats 1  # paper-size U-Net
    python benchmarks/sampling_bench.py --models cpu --batches 1,16 --steps 50

Each row times `Stage.generate` jitted as `sample.py` runs it: encode the source, `--steps` sampler
steps of the task U-Net (conditioned on the source latent), decode. Models are freshly initialised at the
preset's sizes (speed does not depend on the weights) for the `low_dose` task on 128 x 128 sinograms
(128 angles x 128 bins). Reported: compile time, and the median wall time of `--repeats` runs after it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from allpet_jax.training import stages  # noqa: E402
from configs import base  # noqa: E402


def bench(model_preset: str, batch_size: int, sampler: str, steps: int, repeats: int) -> dict:
    cfg = base.get_config(model_preset)
    cfg.data.n_angles = cfg.data.n_bins = cfg.data.image_size = 128
    name = "regressor" if sampler == "direct" else "task"
    if sampler == "ddbm":
        cfg.diffusion.task_objective = "bridge"
    ae = stages.autoencoder_stage(cfg, 0)
    stage = stages.diffusion_stage(name, cfg, ae.graphdef, ae.params, 1.0, 1, 1, seed=1)
    batch = {k: jax.numpy.asarray(v) for k, v in stages.random_batch(cfg, name, batch_size).items()
             if k in ("source", "target", "prompt")}
    fn = jax.jit(lambda p, fz, b, k: stage.generate(p, fz, b, k, sampler, steps))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(stage.params, stage.frozen, batch, jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(stage.params, stage.frozen, batch, jax.random.key(r + 1)))
        times.append(time.perf_counter() - t0)
    params = sum(int(np.size(x)) for x in jax.tree.leaves(stage.params))
    return {"compile_s": compile_s, "median_s": float(np.median(times)), "params": params}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cpu", help="config presets whose model sizes to time")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--samplers", default="ddim,ddbm,direct")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), 128 x 128 sinograms, "
          f"{os.cpu_count()} CPUs visible\n")
    print("| model preset | U-Net params | sampler | steps | sinograms | compile s | wall s (median) | s / sinogram |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        for sampler in args.samplers.split(","):
            steps = 1 if sampler == "direct" else args.steps
            for b in (int(x) for x in args.batches.split(",")):
                r = bench(preset, b, sampler, steps, args.repeats)
                print(f"| {preset} | {r['params']:,} | {sampler} | {steps} | {b} | {r['compile_s']:.1f} | "
                      f"{r['median_s']:.2f} | {r['median_s'] / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
