"""The latent U-Net denoiser of the diffusion stage, conditioned on time, a prompt and condition channels.

Inputs (channels-last latents, see `autoencoder.py`):
- `x_t` `(B, h, w, latent_channels)`: the noisy latent (or the bridge state for DDBM).
- `t` `(B,)`: diffusion time as a float; DDPM/DDIM pass the integer step `0 .. T-1`, DDBM passes
  `1000 * t`. It enters through a sinusoidal embedding (Vaswani et al. 2017) and a two-layer MLP.
- `prompt`: a `Prompt` of tracer, region and task ids `(B,)` int32 and the sinogram geometry
  `(B, 2)` = `(n_angles, n_bins)` float. Each id table has one extra row, `null_id`, the learned "no
  prompt" of classifier-free guidance. The geometry enters as Fourier features of `n / GEOMETRY_SCALE`
  (continuous, so sizes not seen in training still get a sensible code). Everything is summed into the
  time embedding, which modulates every residual block (scale-shift norm).
- `cond` `(B, h, w, cond_channels)`: condition channels concatenated to `x_t` at the input: the task
  source latent, the RMAS mask and the TMA map (see `conditioning.condition_channels`); `None` is zeros.

The output has `x_t`'s shape: eps, x0 or v, as the diffusion loss was set up.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from allpet_jax.models.layers import Conv, Downsample, GroupNorm, ResBlock, SpatialSelfAttention, Upsample, group_count

GEOMETRY_SCALE = 512.0


class Prompt(NamedTuple):
    """What to generate: ids `(B,)` int32 (a table's `null_id` means "unspecified") and geometry `(B, 2)`."""

    tracer: jnp.ndarray
    region: jnp.ndarray
    task: jnp.ndarray
    geometry: jnp.ndarray  # (B, 2): n_angles, n_bins (counts, not normalised)


def timestep_embedding(t, features: int, max_period: float = 10000.0):
    """Sinusoidal embedding `(B, features)` of times `t` `(B,)`: `[cos(t w_k), sin(t w_k)]`, geometric `w_k`."""
    half = features // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, features - 2 * half)))


def geometry_features(geometry, num_frequencies: int):
    """Features `(B, 4 + 4 F)` of `(n_angles, n_bins)` `(B, 2)`: `u = n / GEOMETRY_SCALE`, `log2(n) / 10`
    and `sin`/`cos(2^k pi u)` for `k < F`."""
    u = jnp.asarray(geometry, jnp.float32) / GEOMETRY_SCALE
    freqs = (2.0 ** jnp.arange(num_frequencies, dtype=jnp.float32)) * jnp.pi
    args = (u[..., None] * freqs).reshape(u.shape[0], -1)
    log_n = jnp.log2(jnp.maximum(jnp.asarray(geometry, jnp.float32), 1.0)) / 10.0
    return jnp.concatenate([u, log_n, jnp.sin(args), jnp.cos(args)], axis=-1)


class LatentUNet(nnx.Module):
    """U-Net on latents `(B, h, w, latent_channels)`; `h`, `w` divisible by `2 ** (len(channels) - 1)`.

    Args:
      latent_channels: channels of `x_t` and of the output.
      cond_channels: channels of `cond` (0 for none); `conditioning.condition_channel_count` gives the
        default layout's count.
      channels: feature width per resolution level (the first is the input resolution).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_levels: level indices (0 = input resolution) with self-attention after each block.
      num_tracers, num_regions, num_tasks: sizes of the id vocabularies; id `n` is each table's null id.
      emb_features: width of the time/prompt embedding (default `4 * channels[0]`).
      learned_skip: add `skip_gate`, a scalar parameter starting at 0 that the U-Net itself never reads:
        the task objective turns it into the prior variance of a learned skip around the output
        (`schedules.skip_offset`, `objectives.PairedDiffusion.skip_rate`).
    """

    def __init__(self, latent_channels: int = 4, cond_channels: int = 0, channels: Sequence[int] = (64, 128, 256),
                 num_res_blocks: int = 2, attention_levels: Sequence[int] = (2,), num_heads: int = 4,
                 num_tracers: int = 8, num_regions: int = 8, num_tasks: int = 8, emb_features: int | None = None,
                 geometry_frequencies: int = 6, max_groups: int = 32, learned_skip: bool = False, *,
                 rngs: nnx.Rngs):
        channels = tuple(channels)
        bad = [a for a in attention_levels if not 0 <= a < len(channels)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the U-Net's levels 0 .. {len(channels) - 1}")
        self.latent_channels = latent_channels
        self.cond_channels = cond_channels
        self.num_levels = len(channels)
        self.geometry_frequencies = geometry_frequencies
        self.null_ids = (num_tracers, num_regions, num_tasks)
        emb = emb_features or 4 * channels[0]
        self.time_features = channels[0]
        self.time_mlp = nnx.Sequential(
            nnx.Linear(channels[0], emb, rngs=rngs), jax.nn.silu, nnx.Linear(emb, emb, rngs=rngs)
        )
        self.tracer_embed = nnx.Embed(num_tracers + 1, emb, rngs=rngs)
        self.region_embed = nnx.Embed(num_regions + 1, emb, rngs=rngs)
        self.task_embed = nnx.Embed(num_tasks + 1, emb, rngs=rngs)
        self.geometry_mlp = nnx.Sequential(
            nnx.Linear(4 + 4 * geometry_frequencies, emb, rngs=rngs), jax.nn.silu, nnx.Linear(emb, emb, rngs=rngs)
        )

        def block(cin, cout, level):
            res = ResBlock(cin, cout, emb_features=emb, max_groups=max_groups, rngs=rngs)
            attn = (
                SpatialSelfAttention(cout, num_heads=num_heads, max_groups=max_groups, rngs=rngs)
                if level in attention_levels
                else None
            )
            return nnx.List([res, attn])

        self.conv_in = Conv(latent_channels + cond_channels, channels[0], (3, 3), rngs=rngs)
        skips = [channels[0]]
        down, downsample = [], []
        prev = channels[0]
        for level, ch in enumerate(channels):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(prev, ch, level))
                prev = ch
                skips.append(ch)
            down.append(nnx.List(blocks))
            if level < len(channels) - 1:
                downsample.append(Downsample(ch, rngs=rngs))
                skips.append(ch)
            else:
                downsample.append(None)
        self.down = nnx.List(down)
        self.downsample = nnx.List(downsample)
        self.mid = nnx.List([
            ResBlock(prev, prev, emb_features=emb, max_groups=max_groups, rngs=rngs),
            SpatialSelfAttention(prev, num_heads=num_heads, max_groups=max_groups, rngs=rngs),
            ResBlock(prev, prev, emb_features=emb, max_groups=max_groups, rngs=rngs),
        ])
        up, upsample = [], []
        for level in reversed(range(len(channels))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(prev + skips.pop(), channels[level], level))
                prev = channels[level]
            up.append(nnx.List(blocks))
            upsample.append(Upsample(prev, rngs=rngs) if level > 0 else None)
        self.up = nnx.List(up)
        self.upsample = nnx.List(upsample)
        self.norm_out = GroupNorm(prev, group_count(prev, max_groups), rngs=rngs)
        self.conv_out = Conv(prev, latent_channels, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
        if learned_skip:
            self.skip_gate = nnx.Param(jnp.zeros((), jnp.float32))

    def null_prompt(self, geometry) -> Prompt:
        """The unconditional prompt (all ids null) for `geometry` `(B, 2)`; geometry is never dropped."""
        geometry = jnp.asarray(geometry, jnp.float32)
        B = geometry.shape[0]
        return Prompt(*(jnp.full((B,), n, jnp.int32) for n in self.null_ids), geometry)

    def embed(self, t, prompt: Prompt | None):
        """The `(B, emb)` vector that modulates every residual block."""
        emb = self.time_mlp(timestep_embedding(t, self.time_features))
        if prompt is not None:
            emb = emb + self.tracer_embed(prompt.tracer) + self.region_embed(prompt.region)
            emb = emb + self.task_embed(prompt.task)
            emb = emb + self.geometry_mlp(geometry_features(prompt.geometry, self.geometry_frequencies))
        return emb

    def __call__(self, x_t, t, *, prompt: Prompt | None = None, cond=None):
        B, h, w, c = x_t.shape
        m = 2 ** (self.num_levels - 1)
        if c != self.latent_channels or h % m or w % m:
            raise ValueError(
                f"LatentUNet expects x_t (B, h, w, {self.latent_channels}) with h, w divisible by {m}; got "
                f"{x_t.shape}. Use an autoencoder factor or sinogram size that makes the latent divisible."
            )
        if self.cond_channels:
            if cond is None:
                cond = jnp.zeros((B, h, w, self.cond_channels), x_t.dtype)
            elif cond.shape != (B, h, w, self.cond_channels):
                raise ValueError(f"LatentUNet cond must be {(B, h, w, self.cond_channels)}; got {cond.shape}")
            x_t = jnp.concatenate([x_t, cond.astype(x_t.dtype)], axis=-1)
        elif cond is not None:
            raise ValueError("LatentUNet was built with cond_channels=0 but was given cond; rebuild it with them")
        emb = self.embed(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (B,)), prompt)

        h_ = self.conv_in(x_t)
        skips = [h_]
        for blocks, down in zip(self.down, self.downsample):
            for res, attn in blocks:
                h_ = res(h_, emb)
                if attn is not None:
                    h_ = attn(h_)
                skips.append(h_)
            if down is not None:
                h_ = down(h_)
                skips.append(h_)
        res1, attn, res2 = self.mid
        h_ = res2(attn(res1(h_, emb)), emb)
        for blocks, up in zip(self.up, self.upsample):
            for res, attn in blocks:
                h_ = res(jnp.concatenate([h_, skips.pop()], axis=-1), emb)
                if attn is not None:
                    h_ = attn(h_)
            if up is not None:
                h_ = up(h_)
        return self.conv_out(jax.nn.silu(self.norm_out(h_)))
