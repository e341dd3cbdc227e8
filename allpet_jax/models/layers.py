"""Convolutional building blocks shared by the sinogram autoencoder and the latent U-Net (Flax NNX).

All blocks work on channels-last arrays `(B, H, W, C)`, the layout XLA's convolutions prefer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= `max_groups` that divides `channels` (GroupNorm needs a divisor)."""
    return math.gcd(channels, max_groups)


class GroupNorm(nnx.Module):
    """Group normalisation (Wu & He 2018) of `(B, H, W, C)`, written for speed on XLA:CPU.

    Same maths as `nnx.GroupNorm` (biased variance, `epsilon` inside the square root, learned per-channel
    scale and bias) but computed as per-channel sums over `H*W` (one fused pass over the activations),
    tiny per-group arithmetic on `(B, C)`, and a single fused `x * a + b`. `nnx.GroupNorm` reshapes to
    `(B, H, W, G, C/G)` and reduces over non-minor axes, which XLA:CPU runs about ten times slower at
    U-Net sizes (measured in `benchmarks/unet_bench.py`'s development). An optional per-sample
    `(scale, shift)` `(B, C)` pair (FiLM) is folded into the same `a`, `b`.
    """

    def __init__(self, num_features: int, num_groups: int = 32, *, epsilon: float = 1e-6, rngs: nnx.Rngs):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm num_groups ({num_groups}) must divide num_features ({num_features})")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x, film=None):
        B, H, W, C = x.shape
        G = self.num_groups
        flat = x.reshape(B, H * W, C).astype(jnp.float32)
        n = H * W * (C // G)
        mean = jnp.sum(flat, axis=1).reshape(B, G, C // G).sum(-1) / n  # (B, G)
        mean_sq = jnp.sum(flat * flat, axis=1).reshape(B, G, C // G).sum(-1) / n
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
        a = jnp.repeat(inv, C // G, axis=1) * self.scale[...]  # (B, C)
        b = self.bias[...] - jnp.repeat(mean, C // G, axis=1) * a
        if film is not None:
            scale, shift = film
            a, b = a * (1.0 + scale), b * (1.0 + scale) + shift
        return (x * a[:, None, None, :].astype(x.dtype) + b[:, None, None, :].astype(x.dtype))


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-Conv twice with a residual path; optionally modulated by an embedding.

    With `emb_features`, the embedding `(B, emb_features)` sets a per-channel scale and shift of the
    second normalisation (FiLM / "scale-shift norm" of Dhariwal & Nichol 2021). The last convolution
    starts at zero, so a new block is the identity.
    """

    def __init__(self, in_features: int, out_features: int, *, emb_features: int | None = None,
                 max_groups: int = 32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_features, group_count(in_features, max_groups), rngs=rngs)
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), rngs=rngs)
        self.norm2 = GroupNorm(out_features, group_count(out_features, max_groups), rngs=rngs)
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.emb = (
            nnx.Linear(emb_features, 2 * out_features, kernel_init=nnx.initializers.zeros, rngs=rngs)
            if emb_features
            else None
        )
        self.skip = nnx.Conv(in_features, out_features, (1, 1), rngs=rngs) if in_features != out_features else None

    def __call__(self, x, emb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        film = None if self.emb is None else jnp.split(self.emb(jax.nn.silu(emb)), 2, axis=-1)
        h = self.conv2(jax.nn.silu(self.norm2(h, film)))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nnx.Module):
    """Halve `H` and `W` with a stride-2 3x3 convolution."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(features, features, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Double `H` and `W`: nearest-neighbour repeat, then a 3x3 convolution (no checkerboard artefacts)."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(features, features, (3, 3), rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class SpatialSelfAttention(nnx.Module):
    """Multi-head self-attention over the `H*W` positions, pre-normed, with a zero-initialised residual."""

    def __init__(self, features: int, *, num_heads: int = 4, max_groups: int = 32, rngs: nnx.Rngs):
        if features % num_heads:
            raise ValueError(f"attention features ({features}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = GroupNorm(features, group_count(features, max_groups), rngs=rngs)
        self.qkv = nnx.Linear(features, 3 * features, rngs=rngs)
        self.out = nnx.Linear(features, features, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, H * W, 3 * self.num_heads, C // self.num_heads)
        q, k, v = jnp.split(qkv, 3, axis=2)
        h = jax.nn.dot_product_attention(q, k, v)  # (B, HW, heads, C/heads)
        return x + self.out(h.reshape(B, H, W, C))


def space_to_depth(x, f: int):
    """`(B, H, W, C)` -> `(B, H/f, W/f, f*f*C)`: each `f x f` patch becomes one pixel's channels."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // f, f, W // f, f, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H // f, W // f, f * f * C)


def depth_to_space(x, f: int):
    """Inverse of `space_to_depth`: `(B, h, w, f*f*C)` -> `(B, h*f, w*f, C)`."""
    B, h, w, D = x.shape
    C = D // (f * f)
    x = x.reshape(B, h, w, f, f, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * f, w * f, C)
