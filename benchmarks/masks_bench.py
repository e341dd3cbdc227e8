"""Cost of RMAS masks + views (and of TMA maps) per batch, against a training step of comparable size.

    python benchmarks/masks_bench.py [--batch 32] [--size 128] [--angles 128] [--repeats 5] [--unet small]

Prints one Markdown table: median seconds per batch over `--repeats` timed calls after a compile call,
for each RMAS setting (`allpet_jax.masks.make_rmas`), for TMA (`allpet_jax.attention.attention_maps`),
for one plain `radon.forward` of the batch (what projecting every image mask directly would cost), and
for the peer measured in the same run: a jitted forward + backward + AdamW step (flax NNX, optax) of the
project's `LatentUNet` on `(batch, size/4, size/4, 4)` latents with an epsilon-prediction MSE loss
(`--unet small`: channels (32, 64, 128), one residual block per level, attention at the lowest level;
`--unet default`: the model's defaults, channels (64, 128, 256), two blocks per level). The last column
is each row's time as a percentage of that step (the target for RMAS is below 20%). Everything runs on
the default JAX device of this process. Timing is for information; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import radon
from allpet_jax import attention, masks
from allpet_jax.models.unet import LatentUNet

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.flop_rate import median_seconds  # noqa: E402

UNETS = {
    "small": dict(channels=(32, 64, 128), num_res_blocks=1, attention_levels=(2,)),
    "default": dict(),
}


def phantom_batch(geom: radon.Geometry, batch: int, seed: int = 0) -> dict:
    """Random ellipse phantoms `(batch, 1, H, W)` and their noisy sinograms."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(geom.x_mm, geom.y_mm)
    r = geom.fov_radius_mm
    images = np.zeros((batch, 1) + geom.image_shape, np.float32)
    for n in range(batch):
        images[n, 0] = ((x / (0.8 * r)) ** 2 + (y / (0.6 * r)) ** 2 <= 1) * 1.0
        for _ in range(5):
            cx, cy = rng.uniform(-0.5 * r, 0.5 * r, 2)
            a, b = rng.uniform(0.05 * r, 0.2 * r, 2)
            images[n, 0] += ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1
    sino = np.asarray(radon.forward(jnp.asarray(images), geom))
    noisy = rng.poisson(np.maximum(sino, 0) * 2.0).astype(np.float32) / 2.0
    return {"target": jnp.asarray(noisy), "image": jnp.asarray(images), "index": jnp.arange(batch)}


def train_step_seconds(batch: int, size: int, unet: str, repeats: int) -> tuple[float, int]:
    model = LatentUNet(latent_channels=4, rngs=nnx.Rngs(0), **UNETS[unet])
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=1e-2), wrt=nnx.Param)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    latent = size // 4
    x0 = jax.random.normal(jax.random.key(0), (batch, latent, latent, 4))

    @nnx.jit
    def step(model, optimizer, x0, key):
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
        eps = jax.random.normal(k_eps, x0.shape)
        alpha = jnp.cos(0.5 * jnp.pi * t / 1000.0)[:, None, None, None]
        x_t = alpha * x0 + jnp.sqrt(1 - alpha**2) * eps

        def loss_fn(model):
            return jnp.mean((model(x_t, t) - eps) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    keys = iter(jax.random.split(jax.random.key(1), repeats + 1))
    return median_seconds(lambda: step(model, optimizer, x0, next(keys)), repeats), n_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128, help="image size and detector bins")
    p.add_argument("--angles", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--unet", choices=sorted(UNETS), default="small")
    args = p.parse_args(argv)

    geom = radon.Geometry.square(args.size, args.angles, pixel_size=2.0, bin_spacing=2.0)
    batch = phantom_batch(geom, args.batch)
    key = jax.random.key(0)
    rows = []
    settings = [
        ("RMAS mask mode, uniform layout, k ~ U{1..4}", masks.MaskConfig()),
        ("RMAS mask mode, clustered, k ~ Poisson(3)", masks.MaskConfig(layout="clustered", count="poisson")),
        ("RMAS mask mode, activity (FBP) layout", masks.MaskConfig(layout="activity")),
        ("RMAS split mode P = R(m x), N = R((1-m) x)", masks.MaskConfig(mode="split")),
    ]
    for name, config in settings:
        rmas = masks.make_rmas(geom, config)
        rows.append((name, median_seconds(lambda: rmas(key, batch), args.repeats)))
    rows.append(("radon.forward of the batch (one projection, for scale)", median_seconds(lambda: radon.forward(batch["image"], geom), args.repeats)))
    rows.append(("TMA maps (FBP + segmentation + projection)", median_seconds(lambda: attention.attention_maps(batch["target"][:, 0], geom), args.repeats)))
    step_s, n_params = train_step_seconds(args.batch, args.size, args.unet, args.repeats)

    print(
        f"RMAS/TMA cost per batch of {args.batch} at {args.size}x{args.size}, {args.angles} angles, {args.size} bins; "
        f"device {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), median of {args.repeats} after compile\n"
    )
    print("| step | ms per batch | % of train step |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {1e3 * seconds:.1f} | {100 * seconds / step_s:.1f}% |")
    print(
        f"| peer: LatentUNet ({args.unet}, {n_params / 1e6:.2f} M params) fwd+bwd+AdamW on "
        f"({args.batch}, {args.size // 4}, {args.size // 4}, 4) latents | {1e3 * step_s:.1f} | 100% |"
    )


if __name__ == "__main__":
    main()
