"""Train-step throughput of the latent U-Net against `diffusers.UNet2DModel` on PyTorch, both on the CPU.

    pip install torch==2.13.0 diffusers      # the `bench` extra; CPU build of torch
    python benchmarks/unet_bench.py [--batch 8] [--repeats 7] [--size 32] [--threads 2]
    python benchmarks/unet_bench.py --configs 64-128-256:64-128-256 --no-xla-defaults --without all
    python benchmarks/unet_bench.py --configs 64-128-256:64-128-256 --no-xla-defaults --clip-norm 1

One train step = forward + backward + AdamW update of an epsilon-prediction denoising loss on latents
`(B, 4, size, size)` (4 x 32 x 32 is a 128 x 128 sinogram at factor 4). Ours is the jitted step with its
real conditioning (prompt ids, geometry, condition channels); the peer is diffusers' unconditional
U-Net (same block layout: two residual blocks per level, attention on the last level and in the middle
block). Each row pairs a width list for each side; parameter counts are printed (the pairs are chosen
to match within ~10 %). The default rows are: the same widths on both sides; our tuned, deeper layout
(four levels, 32-64-128-256: FLOPs sit at high resolution, parameters at low resolution, so a fourth
level keeps the parameter count with a third of the FLOPs) against diffusers' common three-level layout
of about the same parameter count; and the deeper layout on both sides, which separates the
architecture's share of the gain from the framework's.

Ours runs twice: with `allpet_jax.xla_cpu`'s library choice, which every allpet process makes on import
(XNNPACK convolutions and dots), and under XLA's own defaults (`ALLPET_XLA_DEFAULTS=1`; YNNPACK and Eigen),
so the table shows what that choice is worth; `--no-xla-defaults` skips the second.

Each framework runs in its own worker process (the script starts them): XLA's and torch's thread
pools in one process slow torch down by up to 15x, measured here, which would flatter us. The torch
workers run once before and once after the JAX workers, and their timings are pooled, so a drift in
machine load shows up as a difference between the two torch passes (printed). Each worker times
`--repeats` steps after two warm-up steps (compile, allocator, oneDNN caches) and reports the median;
torch uses `--threads` threads, XLA its default pool (all visible cores). The table also gives our
step's FLOPs and compiled memory from XLA's analysis, and our achieved GFLOP/s (those FLOPs / median step
time) and its share of the machine's float32 sgemm peak, measured in this process after the workers have
finished (numpy and jitted `jax.numpy`, 2048 x 2048; the reference rows under the table). The FLOP count
is XLA's `cost_analysis()` of the whole jitted step, AdamW update and elementwise ops included,
transcendentals not; one line checks it against a hand count for a convolution (`benchmarks/flop_rate.py`).
diffusers' FLOPs are not counted (torch gives no count here), so its rate is not printed. Nothing here
asserts a speed.

`--without` takes parts out of both sides alike, to split a gap between them (comma-separated, or `all`):
`groupnorm` and `silu` become the identity, `attention` blocks the identity on their input, and `adamw`
plain SGD (one update per parameter, as both frameworks still do). The difference between a full and a
stripped run is what those parts cost each framework; what remains is convolutions, their gradients'
transposes, the residual and skip plumbing, the embeddings and the loss.

`--clip-norm C` clips the global gradient norm at `C` on both sides before the update, as both projects
train: our `training.step.make_optimizer` chains `optax.clip_by_global_norm` before AdamW (`train.clip_norm =
1.0`), and diffusers' training examples call `clip_grad_norm_(..., 1.0)` before `optimizer.step()`. The
clip makes every update wait for every gradient, so XLA updates the donated parameters in place; without
it each update waits only for its own gradient while the backward pass still reads the old weights (the
input gradients' transposed kernels), and XLA copies every parameter first (216 copies here, 1 with the
clip; `train.py`'s step has none, see `training.step.device_step`). The copies overlap other work: our step took 0.636 s
with and without them, diffusers' 0.557 s without the clip and 0.568 s with it (issue 17, session 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


PARTS = ("groupnorm", "silu", "attention", "adamw")


def parts_list(spec: str) -> str:
    """`--without`'s value, checked and normalised to a comma-separated subset of `PARTS`."""
    names = list(PARTS) if spec == "all" else [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected parts from {', '.join(PARTS)} or 'all'; got {', '.join(unknown)}")
    return ",".join(n for n in PARTS if n in names)


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="64-128-256:64-128-256,32-64-128-256:64-128-256,32-64-128-256:32-64-128-256",
                   help="comma-separated OURS:DIFFUSERS pairs of dash-separated widths per level")
    p.add_argument("--xla-flags", default="", help="XLA_FLAGS for our worker, e.g. "
                   "'--xla_cpu_experimental_ynn_fusion_type=' (Eigen instead of YNNPACK convolutions); empty: "
                   "allpet_jax.xla_cpu's choice (XNNPACK convolutions and dots)")
    p.add_argument("--no-xla-defaults", action="store_true",
                   help="skip the extra row of ours under XLA's own defaults (ALLPET_XLA_DEFAULTS=1)")
    p.add_argument("--without", default="", type=parts_list,
                   help=f"parts to take out of both sides: comma-separated from {', '.join(PARTS)}, or 'all'")
    p.add_argument("--clip-norm", type=non_negative, default=0.0,
                   help="clip the global gradient norm at this value on both sides before the update (0: no clip)")
    p.add_argument("--worker", choices=("ours", "ours-xla-defaults", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--widths", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def timed_steps(step, repeats: int) -> list[float]:
    step()
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def ours_worker(args, widths) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from allpet_jax import losses
    from allpet_jax.diffusion import linear_schedule
    from allpet_jax.models import (LatentUNet, Prompt, compiled_cost, condition_channel_count, count_parameters,
                                   layers)

    without = set(args.without.split(",")) - {""}
    if "groupnorm" in without:
        layers.GroupNorm.__call__ = lambda self, x, film=None: x
    if "silu" in without:
        jax.nn.silu = lambda x: x  # this worker process only
    if "attention" in without:
        layers.SpatialSelfAttention.__call__ = lambda self, x: x
    B, S, z = args.batch, args.size, args.latent_channels
    model = LatentUNet(latent_channels=z, cond_channels=condition_channel_count(z), channels=widths,
                       num_res_blocks=2, attention_levels=(len(widths) - 1,),
                       rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))  # rbg: fast-compiling initialisers
    tx = optax.sgd(1e-4) if "adamw" in without else optax.adamw(1e-4)
    if args.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(args.clip_norm), tx)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    schedule = linear_schedule(1000)
    graphdef, state = nnx.split((model, optimizer))
    # The step takes and returns the state as a flat list of arrays: flattening an `nnx.State` of
    # Variable objects costs Python time per leaf on every call (~0.1-0.3 s per step at ~1000 leaves).
    leaves, treedef = jax.tree.flatten(state)

    def train_step(leaves, x0, prompt, cond, key):
        model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

        def loss_fn(model):
            return losses.diffusion_loss(lambda x, t: model(x, t, prompt=prompt, cond=cond), key, schedule, x0)

        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return jax.tree.leaves(nnx.state((model, optimizer))), loss

    jitted = jax.jit(train_step, donate_argnums=0)
    k = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k[0], (B, S, S, z))
    ids = jnp.zeros((B,), jnp.int32)
    prompt = Prompt(ids, ids, ids, jnp.tile(jnp.array([[4.0 * S, 4.0 * S]]), (B, 1)))
    cond = jax.random.uniform(k[1], (B, S, S, condition_channel_count(z)))
    start = time.perf_counter()
    cost = compiled_cost(jitted, leaves, x0, prompt, cond, k[2])
    compile_s = time.perf_counter() - start
    holder = {"state": leaves, "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], loss = jitted(holder["state"], x0, prompt, cond, jax.random.fold_in(k[2], holder["i"]))
        loss.block_until_ready()

    return {"params": count_parameters(model), "times": timed_steps(step, args.repeats), "flops": cost.flops,
            "memory": cost.total_bytes, "compile_s": compile_s, "version": f"jax {jax.__version__}",
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def theirs_worker(args, widths) -> dict:
    import diffusers
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, S, z, n = args.batch, args.size, args.latent_channels, len(widths)
    unet = UNet2DModel(sample_size=S, in_channels=z, out_channels=z, layers_per_block=2,
                       block_out_channels=tuple(widths), attention_head_dim=widths[-1] // 4,
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1))
    without = set(args.without.split(",")) - {""}

    def strip(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm) and "groupnorm" in without or (
                    isinstance(child, torch.nn.SiLU) and "silu" in without):
                setattr(module, name, torch.nn.Identity())
            else:
                strip(child)

    strip(unet)
    if "silu" in without:
        F.silu = lambda x, inplace=False: x  # the functional calls (this worker process only)
    if "attention" in without:
        from diffusers.models.attention_processor import Attention

        Attention.forward = lambda self, hidden_states, *a, **k: hidden_states
    opt = (torch.optim.SGD if "adamw" in without else torch.optim.AdamW)(unet.parameters(), lr=1e-4)
    alpha_bar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000)), dtype=torch.float32)
    x0 = torch.randn(B, z, S, S)

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (B,))
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.clip_norm)
        opt.step()

    return {"params": sum(p.numel() for p in unet.parameters()), "times": timed_steps(step, args.repeats),
            "version": f"torch {torch.__version__}, diffusers {diffusers.__version__}"}


def xla_defaults_cell(result, batch: int, theirs_samples_per_s: float) -> str:
    if result is None:
        return "-"
    samples_per_s = batch / np.median(result["times"])
    return f"{samples_per_s:.2f}, {samples_per_s / theirs_samples_per_s:.2f}x"


def run_worker(kind: str, widths: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--widths", widths, "--batch", str(args.batch),
           "--size", str(args.size), "--latent-channels", str(args.latent_channels),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--without", args.without,
           "--clip-norm", str(args.clip_norm)]
    env = None
    if kind == "ours" and args.xla_flags:
        env = dict(os.environ, XLA_FLAGS=args.xla_flags)
    if kind == "ours-xla-defaults":
        cmd[cmd.index("--worker") + 1] = "ours"
        env = dict(os.environ, ALLPET_XLA_DEFAULTS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {kind:17s} {widths:16s} median {np.median(result['times']):.3f} s/step", flush=True)
    return result


def main():
    args = parse_args()
    if args.worker:
        widths = tuple(int(c) for c in args.widths.split("-"))
        result = (theirs_worker if args.worker == "theirs" else ours_worker)(args, widths)
        print(json.dumps(result))
        return

    pairs = [tuple(spec.split(":")) for spec in args.configs.split(",")]
    theirs_widths = list(dict.fromkeys(t for _, t in pairs))
    ours_widths = list(dict.fromkeys(o for o, _ in pairs))
    print("timing (torch, then ours, ours under XLA's defaults, then torch again):", flush=True)
    torch_before = {w: run_worker("theirs", w, args) for w in theirs_widths}
    ours = {w: run_worker("ours", w, args) for w in ours_widths}
    defaults = {} if args.no_xla_defaults else {w: run_worker("ours-xla-defaults", w, args) for w in ours_widths}
    torch_after = {w: run_worker("theirs", w, args) for w in theirs_widths}

    import flop_rate  # imports JAX: only now, so the peak is measured with the cores free of the workers

    peaks = flop_rate.sgemm_gflop_per_s()
    peak = max(peaks.values())
    B = args.batch
    first = next(iter(ours.values()))
    print()
    print(f"Train step (fwd + bwd + AdamW), latents {B} x {args.latent_channels} x {args.size} x {args.size}, "
          f"torch threads {args.threads}; {first['version']} (XLA_FLAGS={first['xla_flags']!r}), "
          f"{torch_before[theirs_widths[0]]['version']}"
          + (f"; both sides without: {args.without}" if args.without else "")
          + (f"; both sides clip the gradient norm at {args.clip_norm:g}" if args.clip_norm > 0 else ""))
    print("| widths ours | widths diffusers | params ours | params diffusers | ours samples/s | diffusers samples/s "
          f"(pass 1 / pass 2) | ratio | ours under XLA's defaults: samples/s, ratio | our GFLOP/step | our GFLOP/s "
          f"| % of peak ({peak:.0f} GFLOP/s) | our memory MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wo, wt in pairs:
        o, t1, t2 = ours[wo], torch_before[wt], torch_after[wt]
        so = B / np.median(o["times"])
        rate = flop_rate.gflop_per_s(o["flops"], float(np.median(o["times"])))
        st = B / np.median(t1["times"] + t2["times"])
        passes = f"{B / np.median(t1['times']):.2f} / {B / np.median(t2['times']):.2f}"
        print(f"| {wo} | {wt} | {o['params'] / 1e6:.2f} M | {t1['params'] / 1e6:.2f} M | {so:.2f} | "
              f"{st:.2f} ({passes}) "
              f"| {so / st:.2f}x | {xla_defaults_cell(defaults.get(wo), B, st)} | {o['flops'] / 1e9:.1f} | {rate:.1f} "
              f"| {100 * rate / peak:.1f} % "
              f"| {o['memory'] / 2**20:.0f} |")
    print()
    print(flop_rate.describe_peak(peaks))
    print()
    print(flop_rate.conv_check())


if __name__ == "__main__":
    main()
