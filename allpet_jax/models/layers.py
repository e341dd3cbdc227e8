"""Convolutional building blocks shared by the sinogram autoencoder and the latent U-Net (Flax NNX).

All blocks work on channels-last arrays `(B, H, W, C)`, the layout XLA's convolutions prefer.

Per-channel sums over the pixels (GroupNorm's statistics and gradients, a convolution's bias gradient)
are written as vector-matrix products (`channel_sums`, the custom VJPs of `group_norm` and `add_bias`).
Autodiff writes them as reductions over the non-minor axes, which XLA:CPU runs several times slower than a
dot: one such reduction of 8 x 32 x 32 x 192 took 3.7 ms against 0.7 ms as a dot, and inside the U-Net's
train step the fused ones took up to 27 ms each (issue 17, session 12, Intel Xeon, `jax.profiler`). With
both, the 64-128-256 U-Net's train step (benchmarks/unet_bench.py's shapes) went from 0.78 to 0.63 s.
Per-group numbers are summed and repeated over channels by dots with a 0/1 matrix (`same_group`) rather
than reshapes, which XLA would fuse into the element-wise passes (0.61 -> 0.58 s, session 15).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= `max_groups` that divides `channels` (GroupNorm needs a divisor)."""
    return math.gcd(channels, max_groups)


def channel_sums(x):
    """`(B, H, W, C)` -> `(B, C)`: the sums over `H` and `W`, as a batched vector-matrix product."""
    B, H, W, C = x.shape
    return jnp.einsum("bn,bnc->bc", jnp.ones((B, H * W), x.dtype), x.reshape(B, H * W, C))


def same_group(channels: int, num_groups: int):
    """`(C, C)` float32: 1 where two channels share one of `num_groups` contiguous groups, else 0.

    `v @ same_group(C, G)` turns per-channel sums `(B, C)` into their group's sum, repeated over the group's
    channels: a tiny dot, where `v.reshape(B, G, C // G).sum(-1)` and `jnp.repeat` would be fused into the
    large element-wise passes that read the result, which then compute each element's group by an integer
    division: GroupNorm + SiLU, forward and backward, of 8 x 32 x 32 x 192 took 5.9 ms that way and 3.0 ms
    with these dots (issue 17, session 15)."""
    group = np.arange(channels) // (channels // num_groups)
    return jnp.asarray(group[:, None] == group[None, :], jnp.float32)


def _group_stats(x, num_groups: int, epsilon: float):
    """Each group's mean and inverse standard deviation (biased variance), repeated per channel: `(B, C)` each."""
    B, H, W, C = x.shape
    same, n = same_group(C, num_groups), H * W * (C // num_groups)
    mean = channel_sums(x) @ same / n
    mean_sq = channel_sums(x * x) @ same / n
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
    return mean, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, gamma, beta, num_groups: int, epsilon: float):
    """`(x - mean) * inv * gamma + beta` of `(B, H, W, C)`, the statistics per sample and group, with a
    per-sample, per-channel `gamma` and `beta` `(B, C)`."""
    return _group_norm_fwd(x, gamma, beta, num_groups, epsilon)[0]


def _group_norm_fwd(x, gamma, beta, num_groups, epsilon):
    mean, inv = _group_stats(x, num_groups, epsilon)
    a = inv * gamma
    return x * a[:, None, None] + (beta - mean * a)[:, None, None], (x, gamma, mean, inv)


def _group_norm_bwd(num_groups, epsilon, residuals, dy):
    """With `xhat = (x - mean) * inv` and `g = dy * gamma`: d beta = sum dy, d gamma = sum dy * xhat (over
    H, W), and dx = inv * (g - mean_group(g) - xhat * mean_group(g * xhat)), written as one pass
    `dy * p + x * q + r` with per-(sample, channel) coefficients."""
    x, gamma, mean, inv = residuals
    B, H, W, C = x.shape
    same, n = same_group(C, num_groups), H * W * (C // num_groups)
    d_beta = channel_sums(dy)
    d_gamma = inv * (channel_sums(dy * x) - mean * d_beta)
    # the means over each group's pixels and channels, repeated per channel
    m1, m2 = (gamma * d_beta) @ same / n, (gamma * d_gamma) @ same / n
    p, q, r = inv * gamma, -inv * inv * m2, inv * (inv * m2 * mean - m1)
    return dy * p[:, None, None] + x * q[:, None, None] + r[:, None, None], d_gamma, d_beta


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


@jax.custom_vjp
def add_bias(y, bias):
    """`y + bias` over the last axis; the bias gradient is a vector-matrix product (module doc)."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, dy):
    channels = dy.shape[-1]
    return dy, jnp.ones((dy.size // channels,), dy.dtype) @ dy.reshape(-1, channels)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Conv(nnx.Conv):
    """`nnx.Conv` with the same parameters (names, shapes, initialisation and random keys) whose bias is
    added by `add_bias`, so that its gradient is a dot (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adds_bias = self.use_bias
        self.use_bias = False  # nnx.Conv's call then leaves the bias to ours

    def __call__(self, x):
        y = super().__call__(x)
        return add_bias(y, self.bias[...]) if self.adds_bias else y


class Linear(nnx.Linear):
    """`nnx.Linear` with the same parameters whose bias is added by `add_bias` (see `Conv`): applied to
    `(B, H*W, C)` tokens its bias gradient is a sum over the non-minor axes, 1-3 ms each as a reduction
    fused into the attention block's backward."""

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)  # as nnx.Linear
        y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else add_bias(y, bias)


class GroupNorm(nnx.Module):
    """Group normalisation (Wu & He 2018) of `(B, H, W, C)`, written for speed on XLA:CPU.

    Same maths as `nnx.GroupNorm` (biased variance, `epsilon` inside the square root, learned per-channel
    scale and bias) but computed by `group_norm`: per-channel sums over `H*W` as dots (module doc), tiny
    per-group arithmetic on `(B, C)`, and a single fused `x * a + b`; its gradient is written by hand in the
    same form. `nnx.GroupNorm` reshapes to `(B, H, W, G, C/G)` and reduces over non-minor axes, which
    XLA:CPU runs about ten times slower at U-Net sizes (measured in `benchmarks/unet_bench.py`'s
    development). An optional per-sample `(scale, shift)` `(B, C)` pair (FiLM) is folded into `gamma`, `beta`.
    """

    def __init__(self, num_features: int, num_groups: int = 32, *, epsilon: float = 1e-6, rngs: nnx.Rngs):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm num_groups ({num_groups}) must divide num_features ({num_features})")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x, film=None):
        B, C = x.shape[0], x.shape[-1]
        gamma, beta = jnp.broadcast_to(self.scale[...], (B, C)), jnp.broadcast_to(self.bias[...], (B, C))
        if film is not None:
            scale, shift = film
            gamma, beta = gamma * (1.0 + scale), beta * (1.0 + scale) + shift
        return group_norm(x.astype(jnp.float32), gamma, beta, self.num_groups, self.epsilon).astype(x.dtype)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-Conv twice with a residual path; optionally modulated by an embedding.

    With `emb_features`, the embedding `(B, emb_features)` sets a per-channel scale and shift of the
    second normalisation (FiLM / "scale-shift norm" of Dhariwal & Nichol 2021). The last convolution
    starts at zero, so a new block is the identity.
    """

    def __init__(self, in_features: int, out_features: int, *, emb_features: int | None = None,
                 max_groups: int = 32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_features, group_count(in_features, max_groups), rngs=rngs)
        self.conv1 = Conv(in_features, out_features, (3, 3), rngs=rngs)
        self.norm2 = GroupNorm(out_features, group_count(out_features, max_groups), rngs=rngs)
        self.conv2 = Conv(out_features, out_features, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.emb = (
            nnx.Linear(emb_features, 2 * out_features, kernel_init=nnx.initializers.zeros, rngs=rngs)
            if emb_features
            else None
        )
        self.skip = Conv(in_features, out_features, (1, 1), rngs=rngs) if in_features != out_features else None

    def __call__(self, x, emb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        film = None if self.emb is None else jnp.split(self.emb(jax.nn.silu(emb)), 2, axis=-1)
        h = self.conv2(jax.nn.silu(self.norm2(h, film)))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nnx.Module):
    """Halve `H` and `W` with a stride-2 3x3 convolution."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.conv = Conv(features, features, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Double `H` and `W`: nearest-neighbour repeat, then a 3x3 convolution (no checkerboard artefacts)."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.conv = Conv(features, features, (3, 3), rngs=rngs)

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
        self.qkv = Linear(features, 3 * features, rngs=rngs)
        self.out = Linear(features, features, kernel_init=nnx.initializers.zeros, rngs=rngs)

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
