"""A 3x3 convolution's forward and both gradients, ours (XLA:CPU) against PyTorch's, at the U-Net's shapes.

    pip install torch==2.13.0          # the `bench` extra; CPU build of torch
    python benchmarks/conv_bench.py [--batch 8] [--repeats 50] [--threads 2] [--shapes 32:64:64,16:128:128]
    python benchmarks/conv_bench.py --cores 1 --no-xla-defaults     # both frameworks on one core

`unet_bench.py` times whole train steps; this splits the convolutions out, since they are most of a step's
FLOPs. For each shape (`size:in:out`, batch `--batch`, SAME padding, no bias) it times, each jitted on its
own: the forward `conv(x, w)`, the input gradient and the weight gradient (each from `jax.vjp`, so with
whatever transposes XLA puts around it). The peer runs `torch.nn.functional.conv2d`,
`torch.nn.grad.conv2d_input` and `conv2d_weight` on NCHW tensors, the layout diffusers trains in
(oneDNN on x86). Ours runs with `allpet_jax.xla_cpu`'s library choice (XNNPACK) and under XLA's defaults
(`ALLPET_XLA_DEFAULTS=1`). Each framework runs in its own worker process (unet_bench.py's doc says why);
torch runs before and after ours and the two passes are pooled. GFLOP/s count `2 B H W Cin Cout 9` (the
padding's taps too) for every row, ours and theirs alike. `--cores N` pins both workers to the first N
cores (`os.sched_setaffinity`, which XLA's thread pool follows) and gives torch N threads: one core against
two separates a library's single-core speed from how it spreads one convolution over the cores. Nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

OPS = ("forward", "input gradient", "weight gradient")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="torch's threads (XLA uses every visible core)")
    p.add_argument("--shapes", default="32:64:64,16:128:128,8:256:256,32:128:64",
                   help="comma-separated size:in:out (the 64-128-256 U-Net's levels at 32 x 32 latents)")
    p.add_argument("--cores", type=int, default=0,
                   help="pin both workers to the first N cores (torch then uses N threads); 0: all visible cores")
    p.add_argument("--no-xla-defaults", action="store_true", help="skip the run under XLA's defaults")
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shapes(spec: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in s.split(":")) for s in spec.split(",")]


def gflop(batch: int, size: int, cin: int, cout: int) -> float:
    """A 3x3 convolution's FLOPs per pass in GFLOP, 2 per multiply-add, padding taps included."""
    return 2 * batch * size * size * cin * cout * 9 / 1e9


def median_time(fn, repeats: int, warmup_s: float = 1.0) -> float:
    """Median wall time of `repeats` calls, after at least `warmup_s` seconds (and 5 calls) of warm-up: compile,
    allocator, library caches. On this machine a fresh process's first shape ran up to 2x slower for its
    first ten calls (torch more than ours)."""
    start, calls = time.perf_counter(), 0
    while calls < 5 or time.perf_counter() - start < warmup_s:
        fn()
        calls += 1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def ours_worker(args) -> dict:
    import allpet_jax  # noqa: F401  (the library choice, unless ALLPET_XLA_DEFAULTS=1)
    import jax
    import jax.numpy as jnp

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fns = (jax.jit(conv), jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
           jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]))
    out = {}
    for size, cin, cout in shapes(args.shapes):
        k = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(k[0], (args.batch, size, size, cin))
        w = 0.05 * jax.random.normal(k[1], (3, 3, cin, cout))
        g = jax.random.normal(k[2], (args.batch, size, size, cout))
        operands = ((x, w), (x, w, g), (x, w, g))
        out[f"{size}:{cin}:{cout}"] = [median_time(lambda f=f, a=a: jax.block_until_ready(f(*a)), args.repeats)
                                       for f, a in zip(fns, operands)]
    return {"times": out, "version": f"jax {jax.__version__}", "xla_flags": os.environ.get("XLA_FLAGS", "")}


def theirs_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    conv2d, grad = torch.nn.functional.conv2d, torch.nn.grad
    out = {}
    with torch.no_grad():
        for size, cin, cout in shapes(args.shapes):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, cin, size, size, generator=gen)
            w = 0.05 * torch.randn(cout, cin, 3, 3, generator=gen)
            g = torch.randn(args.batch, cout, size, size, generator=gen)
            fns = (lambda: conv2d(x, w, padding=1), lambda: grad.conv2d_input(x.shape, w, g, padding=1),
                   lambda: grad.conv2d_weight(x, w.shape, g, padding=1))
            out[f"{size}:{cin}:{cout}"] = [median_time(f, args.repeats) for f in fns]
    return {"times": out, "version": f"torch {torch.__version__}"}


def pin_cores(args) -> None:
    """With `--cores N`: check N, give torch N threads, and in a worker pin this process to the first N cores
    (before jax or torch create their thread pools). Without it, nothing."""
    if not args.cores:
        return
    available = sorted(os.sched_getaffinity(0))
    if not 0 < args.cores <= len(available):
        sys.exit(f"{os.path.basename(sys.argv[0])}: --cores expects 1 to the {len(available)} cores this process "
                 f"may use; got {args.cores}")
    args.threads = args.cores
    if args.worker:
        os.sched_setaffinity(0, available[:args.cores])


def worker_main(args, ours_worker, theirs_worker) -> bool:
    """Pin the cores (`pin_cores`); in a worker process also run its side and print the result as JSON. True
    if this was a worker (the caller then returns)."""
    pin_cores(args)
    if args.worker:
        print(json.dumps((ours_worker if args.worker == "ours" else theirs_worker)(args)))
    return bool(args.worker)


def torch_around(run_torch, *runs):
    """Torch's first pass, then each of `runs` in order, then torch's second pass (so a drift in machine load
    shows between the two torch passes): `([torch pass 1, torch pass 2], [results of runs])`."""
    first = run_torch()
    middle = [run() for run in runs]
    return [first, run_torch()], middle


def run_worker(kind: str, args, defaults: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--shapes", args.shapes, "--cores", str(args.cores)]
    env = dict(os.environ, ALLPET_XLA_DEFAULTS="1") if defaults else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(batch: int, ours: dict, theirs: list[dict], defaults: dict | None = None) -> str:
    """Markdown rows per shape and operation: GFLOP/s of ours, of theirs (its passes pooled by the median of
    their medians) and the ratio; a last row per shape sums the three operations."""
    head = "| shape (B x H x W, in -> out) | operation | ours GFLOP/s | torch GFLOP/s | ours / torch |"
    lines = [head + (" under XLA's defaults |" if defaults else ""), "|---|---|---|---|---|" + ("---|" if defaults else "")]
    for key, times in ours["times"].items():
        size, cin, cout = (int(v) for v in key.split(":"))
        flops = gflop(batch, size, cin, cout)
        peer = [float(np.median([t["times"][key][i] for t in theirs])) for i in range(len(OPS))]
        rows = [(op, flops, times[i], peer[i], defaults["times"][key][i] if defaults else None)
                for i, op in enumerate(OPS)]
        rows.append(("all three", 3 * flops, sum(times), sum(peer), sum(defaults["times"][key]) if defaults else None))
        for op, f, t, p, d in rows:
            cells = f"| {batch} x {size} x {size}, {cin} -> {cout} | {op} | {f / t:.0f} | {f / p:.0f} | {p / t:.2f}x |"
            lines.append(cells + (f" {f / d:.0f} GFLOP/s, {p / d:.2f}x |" if d is not None else ""))
    return "\n".join(lines)


def main():
    args = parse_args()
    if worker_main(args, ours_worker, theirs_worker):
        return
    theirs, (ours, defaults) = torch_around(
        lambda: run_worker("theirs", args), lambda: run_worker("ours", args),
        lambda: None if args.no_xla_defaults else run_worker("ours", args, defaults=True))
    print(f"3x3 convolutions, float32; {ours['version']} (XLA_FLAGS={ours['xla_flags']!r}), {theirs[0]['version']} "
          f"({args.threads} threads, NCHW); median of {args.repeats} calls each"
          + (f"; both pinned to {args.cores} core(s)" if args.cores else ""))
    print(table(args.batch, ours, theirs, defaults))


if __name__ == "__main__":
    main()
