"""Train-step throughput of the latent U-Net against `diffusers.UNet2DModel` on PyTorch, both on the CPU.

    pip install torch==2.13.0 diffusers      # the `bench` extra; CPU build of torch
    python benchmarks/unet_bench.py [--batch 8] [--repeats 7] [--size 32] [--threads 2]

One train step = forward + backward + AdamW update of an epsilon-prediction denoising loss on latents
`(B, 4, size, size)` (4 x 32 x 32 is a 128 x 128 sinogram at factor 4). Ours is the jitted step with its
real conditioning (prompt ids, geometry, condition channels), the peer is diffusers' unconditional
U-Net with the same widths, depth and attention placement; parameter counts are printed (matched
within ~10 %). Both run in this process; torch with `--threads` threads, XLA with its default pool (all
visible cores: run on a machine, or under `taskset`, with `--threads` cores for a like-for-like count); repeats are interleaved
(ours, theirs, ours, ...) so a change in machine load hits both alike. Each config reports the median
samples/s of `--repeats` timed steps after two warm-up steps (compile, allocator), the ratio, and our
step's FLOPs and compiled memory from XLA's analysis. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="64-128-256:64-128-256,32-64-128-256:32-64-128-256,32-64-128-256:64-128-256",
                   help="comma-separated OURS:DIFFUSERS pairs of dash-separated widths per level; attention on "
                        "the last level (and in the middle block) of both")
    return p.parse_args()


args = parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from allpet_jax import losses  # noqa: E402
from allpet_jax.diffusion import linear_schedule  # noqa: E402
from allpet_jax.models import LatentUNet, Prompt, compiled_cost, condition_channel_count, count_parameters  # noqa: E402


def ours(channels, batch, size, z):
    """A `step()` closure running our jitted train step, our parameter count and the compiled cost."""
    model = LatentUNet(latent_channels=z, cond_channels=condition_channel_count(z), channels=channels,
                       num_res_blocks=2, attention_levels=(len(channels) - 1,), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    schedule = linear_schedule(1000)
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, x0, prompt, cond, key):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return losses.diffusion_loss(lambda x, t: model(x, t, prompt=prompt, cond=cond), key, schedule, x0)

        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    jitted = jax.jit(train_step, donate_argnums=0)
    k = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k[0], (batch, size, size, z))
    ids = jnp.zeros((batch,), jnp.int32)
    prompt = Prompt(ids, ids, ids, jnp.tile(jnp.array([[4.0 * size, 4.0 * size]]), (batch, 1)))
    cond = jax.random.uniform(k[1], (batch, size, size, condition_channel_count(z)))
    cost = compiled_cost(jitted, state, x0, prompt, cond, k[2])
    holder = {"state": state, "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], loss = jitted(holder["state"], x0, prompt, cond, jax.random.fold_in(k[2], holder["i"]))
        loss.block_until_ready()

    return step, count_parameters(model), cost


def theirs(channels, batch, size, z, threads):
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = len(channels)
    unet = UNet2DModel(sample_size=size, in_channels=z, out_channels=z, layers_per_block=2,
                       block_out_channels=tuple(channels), attention_head_dim=channels[-1] // 4,
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    alpha_bar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000)), dtype=torch.float32)
    x0 = torch.randn(batch, z, size, size)

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in unet.parameters()), f"torch {torch.__version__}"


def interleaved_medians(fns, repeats):
    for fn in fns:  # warm-up: compile, allocator, oneDNN primitive caches
        fn()
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def main():
    import diffusers

    rows = []
    for spec in args.configs.split(","):
        our_widths, their_widths = (tuple(int(c) for c in side.split("-")) for side in spec.split(":"))
        our_step, our_params, cost = ours(our_widths, args.batch, args.size, args.latent_channels)
        their_step, their_params, torch_version = theirs(their_widths, args.batch, args.size, args.latent_channels,
                                                         args.threads)
        t_ours, t_theirs = interleaved_medians([our_step, their_step], args.repeats)
        rows.append((our_widths, their_widths, our_params, their_params, args.batch / t_ours, args.batch / t_theirs,
                     cost))
        print(f"done {spec}", flush=True)

    print()
    print(f"Train step (fwd + bwd + AdamW), latents {args.batch} x {args.latent_channels} x {args.size} x {args.size}, "
          f"{args.threads} CPU threads; jax {jax.__version__}, {torch_version}, diffusers {diffusers.__version__}")
    print("| widths ours | widths diffusers | params ours | params diffusers | ours samples/s | diffusers samples/s "
          "| ratio | our GFLOP/step | our memory MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for wo, wt, po, pt, so, st, cost in rows:
        print(f"| {'-'.join(map(str, wo))} | {'-'.join(map(str, wt))} | {po / 1e6:.2f} M | {pt / 1e6:.2f} M | "
              f"{so:.2f} | {st:.2f} | {so / st:.2f}x | {cost.flops / 1e9:.1f} | {cost.total_bytes / 2**20:.0f} |")


if __name__ == "__main__":
    main()
