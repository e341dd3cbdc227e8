"""One residual block's forward and backward, ours against diffusers' `ResnetBlock2D`, at each U-Net level.

    pip install torch==2.13.0 diffusers      # the `bench` extra; CPU build of torch
    python benchmarks/resblock_bench.py [--batch 8] [--repeats 30] [--threads 2] [--cores 0]

`unet_bench.py` compares whole train steps; this localises a gap to a level of the U-Net. Each row is one
block `(size, in -> out)` of the 64-128-256 U-Net at 32 x 32 latents (the up path's blocks take the skip
concatenation, hence 192, 384, 512 inputs): GroupNorm, SiLU, 3x3 convolution, time embedding, GroupNorm,
SiLU, 3x3 convolution, residual (a 1x1 convolution when the widths differ). Ours is `layers.ResBlock` (the
embedding as a scale and shift, FiLM); diffusers' adds it (its default), a few thousand FLOPs apart. Timed:
the gradient of `sum(block(x, emb) ** 2)` with respect to the input and every parameter, jitted (ours) or
eager autograd (theirs). Each framework runs in its own worker process, torch before and after ours, its
two passes pooled; `--cores N` pins both workers to the first N cores as in `conv_bench.py`. Nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from conv_bench import median_time, pin_cores, torch_around, worker_main

BLOCKS = ((32, 64, 64), (32, 192, 64), (16, 128, 128), (16, 384, 128), (8, 256, 256), (8, 512, 256))
EMB = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="torch's threads (XLA uses every visible core)")
    p.add_argument("--cores", type=int, default=0, help="pin both workers to the first N cores; 0: all visible")
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ours_worker(args) -> dict:
    import allpet_jax  # noqa: F401  (the library choice)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from allpet_jax.models.layers import ResBlock

    times = []
    for size, cin, cout in BLOCKS:
        graphdef, state = nnx.split(ResBlock(cin, cout, emb_features=EMB, rngs=nnx.Rngs(0)))
        k = jax.random.split(jax.random.key(0), 2)
        x, emb = jax.random.normal(k[0], (args.batch, size, size, cin)), jax.random.normal(k[1], (args.batch, EMB))
        grad = jax.jit(jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, emb) ** 2), argnums=(0, 1)))
        times.append(median_time(lambda: jax.block_until_ready(grad(state, x)), args.repeats))
    return {"times": times, "version": f"jax {jax.__version__}"}


def theirs_worker(args) -> dict:
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = []
    for size, cin, cout in BLOCKS:
        block = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=EMB)
        x = torch.randn(args.batch, cin, size, size, requires_grad=True)
        emb = torch.randn(args.batch, EMB)

        def step():
            block.zero_grad(set_to_none=True)
            x.grad = None
            (block(x, emb) ** 2).sum().backward()

        times.append(median_time(step, args.repeats))
    return {"times": times, "version": f"torch {torch.__version__}"}


def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--cores", str(args.cores)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(batch: int, ours: dict, theirs: list[dict]) -> str:
    """Markdown rows per block: ms of ours, of theirs (the passes pooled by the median of their medians), and
    ours / theirs in speed (theirs' time over ours)."""
    lines = ["| block (B x H x W, in -> out) | ours ms | diffusers ms | ours / diffusers |", "|---|---|---|---|"]
    for i, (size, cin, cout) in enumerate(BLOCKS):
        t, p = ours["times"][i], float(np.median([r["times"][i] for r in theirs]))
        lines.append(f"| {batch} x {size} x {size}, {cin} -> {cout} | {1e3 * t:.2f} | {1e3 * p:.2f} | {p / t:.2f}x |")
    return "\n".join(lines)


def main():
    args = parse_args()
    if worker_main(args, ours_worker, theirs_worker):
        return
    theirs, (ours,) = torch_around(lambda: run_worker("theirs", args), lambda: run_worker("ours", args))
    print(f"Residual block, forward + backward, float32; {ours['version']}, {theirs[0]['version']} "
          f"({args.threads} threads, NCHW); median of {args.repeats} calls each"
          + (f"; both pinned to {args.cores} core(s)" if args.cores else ""))
    print(table(args.batch, ours, theirs))


if __name__ == "__main__":
    main()
