"""KL-regularised convolutional autoencoder for sinograms: the first stage of the latent diffusion model.

A sinogram `(B, C, n_angles, n_bins)` (the project's layout, `C` >= 1 channels, e.g. the two tracers of a
separation task) is encoded to a diagonal Gaussian over latents `(B, n_angles/f, n_bins/f, z)`
(channels-last, the layout of the latent U-Net) and decoded back. `f` is 4 or 8 (2 or 3 stride-2
stages); any geometry whose sizes are divisible by `f` works, so one autoencoder serves 96 x 128 and
128 x 128 sinograms alike. The small KL weight of the loss (`allpet_jax.losses.autoencoder_loss`) only
keeps the latent scale tame, as in Rombach et al. (2022); it is not a VAE prior to sample from.

Not here: the loss (in `allpet_jax/losses.py`), training (`train.py`), multi-channel sinograms through
this single-channel model and the latent scale of the diffusion stages (`latent.py`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allpet_jax.models.layers import (
    Conv,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    depth_to_space,
    group_count,
    space_to_depth,
)

DEFAULT_CHANNELS = {4: (32, 64, 128), 8: (32, 64, 128, 128)}
INITIAL_LOGVAR = -10.0


class Encoder(nnx.Module):
    """`(B, H, W, C)` -> `(B, H/f, W/f, 2 z)` (mean and log-variance stacked on the channel axis)."""

    def __init__(self, in_channels: int, latent_channels: int, channels: Sequence[int], num_res_blocks: int,
                 max_groups: int, patch_shortcut: bool, *, rngs: nnx.Rngs):
        self.factor = 2 ** (len(channels) - 1)
        self.shortcut = (
            nnx.Linear(self.factor**2 * in_channels, 2 * latent_channels, rngs=rngs) if patch_shortcut else None
        )
        self.conv_in = Conv(in_channels, channels[0], (3, 3), rngs=rngs)
        blocks, downs = [], []
        prev = channels[0]
        for i, ch in enumerate(channels):
            level = []
            for _ in range(num_res_blocks):
                level.append(ResBlock(prev, ch, max_groups=max_groups, rngs=rngs))
                prev = ch
            blocks.append(nnx.List(level))
            downs.append(Downsample(ch, rngs=rngs) if i < len(channels) - 1 else None)
        self.blocks = nnx.List(blocks)
        self.downs = nnx.List(downs)
        self.mid = ResBlock(prev, prev, max_groups=max_groups, rngs=rngs)
        self.norm_out = GroupNorm(prev, group_count(prev, max_groups), rngs=rngs)
        # With the shortcut the convolutions start as a zero residual; the log-variance starts at
        # INITIAL_LOGVAR so early training is not drowned in posterior noise of unit variance.
        z = latent_channels
        self.conv_out = Conv(
            prev, 2 * z, (3, 3),
            kernel_init=nnx.initializers.zeros if patch_shortcut else nnx.initializers.lecun_normal(),
            bias_init=lambda key, shape, dtype: jnp.concatenate([jnp.zeros(z), jnp.full(z, INITIAL_LOGVAR)]).astype(
                dtype),
            rngs=rngs,
        )

    def __call__(self, x):
        h = self.conv_in(x)
        for level, down in zip(self.blocks, self.downs):
            for block in level:
                h = block(h)
            if down is not None:
                h = down(h)
        h = self.mid(h)
        out = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return out if self.shortcut is None else out + self.shortcut(space_to_depth(x, self.factor))


class Decoder(nnx.Module):
    """`(B, H/f, W/f, z)` -> `(B, H, W, C)`."""

    def __init__(self, out_channels: int, latent_channels: int, channels: Sequence[int], num_res_blocks: int,
                 max_groups: int, patch_shortcut: bool, *, rngs: nnx.Rngs):
        self.factor = 2 ** (len(channels) - 1)
        self.shortcut = (
            nnx.Linear(latent_channels, self.factor**2 * out_channels, rngs=rngs) if patch_shortcut else None
        )
        top = channels[-1]
        self.conv_in = Conv(latent_channels, top, (3, 3), rngs=rngs)
        self.mid = ResBlock(top, top, max_groups=max_groups, rngs=rngs)
        blocks, ups = [], []
        prev = top
        for i in reversed(range(len(channels))):
            level = []
            for _ in range(num_res_blocks + 1):
                level.append(ResBlock(prev, channels[i], max_groups=max_groups, rngs=rngs))
                prev = channels[i]
            blocks.append(nnx.List(level))
            ups.append(Upsample(prev, rngs=rngs) if i > 0 else None)
        self.blocks = nnx.List(blocks)
        self.ups = nnx.List(ups)
        self.norm_out = GroupNorm(prev, group_count(prev, max_groups), rngs=rngs)
        self.conv_out = Conv(
            prev, out_channels, (3, 3),
            kernel_init=nnx.initializers.zeros if patch_shortcut else nnx.initializers.lecun_normal(), rngs=rngs,
        )

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level, up in zip(self.blocks, self.ups):
            for block in level:
                h = block(h)
            if up is not None:
                h = up(h)
        out = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return out if self.shortcut is None else out + depth_to_space(self.shortcut(z), self.factor)


class SinogramAutoencoder(nnx.Module):
    """KL autoencoder on sinograms `(B, C, n_angles, n_bins)` with latents `(B, n_angles/f, n_bins/f, z)`.

    Args:
      in_channels: sinogram channels `C`.
      latent_channels: `z`.
      factor: spatial downsampling factor `f`, 4 or 8.
      channels: feature widths per resolution level, `log2(f) + 1` of them (default
        `DEFAULT_CHANNELS[f]`).
      num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
      patch_shortcut: add a linear path around each half, `f x f` patches -> latent pixel and back
        (a learned patch PCA; the space-to-channel shortcut of DC-AE, Chen et al. 2025). Smooth
        sinograms are mostly captured by it, so training converges in far fewer steps and the
        convolutions only learn the residual.
    """

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, factor: int = 4,
                 channels: Sequence[int] | None = None, num_res_blocks: int = 1, max_groups: int = 32,
                 patch_shortcut: bool = True, *, rngs: nnx.Rngs):
        if factor not in (4, 8):
            raise ValueError(f"SinogramAutoencoder factor must be 4 or 8; got {factor!r}")
        levels = int(math.log2(factor))
        channels = tuple(channels) if channels is not None else DEFAULT_CHANNELS[factor]
        if len(channels) != levels + 1:
            raise ValueError(
                f"SinogramAutoencoder with factor {factor} needs {levels + 1} channel widths "
                f"(one per resolution level); got {len(channels)}: {channels}"
            )
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.factor = factor
        args = (latent_channels, channels, num_res_blocks, max_groups, patch_shortcut)
        self.encoder = Encoder(in_channels, *args, rngs=rngs)
        self.decoder = Decoder(in_channels, *args, rngs=rngs)

    def latent_shape(self, n_angles: int, n_bins: int) -> tuple[int, int, int]:
        """`(n_angles/f, n_bins/f, z)` for a sinogram geometry (raises if not divisible)."""
        f = self.factor
        if n_angles % f or n_bins % f:
            raise ValueError(
                f"sinogram size ({n_angles} angles x {n_bins} bins) must be divisible by the autoencoder's "
                f"downsampling factor {f}; crop or pad the sinogram, or use a geometry with multiples of {f}"
            )
        return (n_angles // f, n_bins // f, self.latent_channels)

    def init_patch_pca(self, sino) -> None:
        """Data-dependent initialisation of the patch shortcut: whitened PCA of the `f x f` patches.

        Sets the encoder shortcut to project each patch (less the mean patch) on the `z` leading
        principal directions divided by their standard deviations, and the decoder shortcut to the
        inverse map, so that the untrained autoencoder already is the best linear patch code of this
        size and its latents have unit variance per channel. Call once, before training, with a few
        dozen training sinograms `(B, C, n_angles, n_bins)`.
        """
        enc, dec = self.encoder.shortcut, self.decoder.shortcut
        if enc is None:
            raise ValueError("init_patch_pca needs a SinogramAutoencoder built with patch_shortcut=True")
        f, z = self.factor, self.latent_channels
        if f * f * self.in_channels < z:
            raise ValueError(f"init_patch_pca needs latent_channels <= f*f*C = {f * f * self.in_channels}; got {z}")
        self.latent_shape(*sino.shape[2:])
        patches = np.asarray(space_to_depth(jnp.transpose(jnp.asarray(sino), (0, 2, 3, 1)), f), np.float64)
        patches = patches.reshape(-1, patches.shape[-1])
        mean = patches.mean(axis=0)
        _, s, vt = np.linalg.svd(patches - mean, full_matrices=False)
        basis = vt[:z]  # (z, f*f*C)
        std = np.maximum(s[:z] / np.sqrt(len(patches)), 1e-8)
        enc_kernel = np.zeros(enc.kernel.shape)
        enc_kernel[:, :z] = basis.T / std
        enc_bias = np.zeros(enc.bias.shape)
        enc_bias[:z] = -(mean @ basis.T) / std
        enc.kernel[...] = jnp.asarray(enc_kernel, jnp.float32)
        enc.bias[...] = jnp.asarray(enc_bias, jnp.float32)
        dec.kernel[...] = jnp.asarray(std[:, None] * basis, jnp.float32)
        dec.bias[...] = jnp.asarray(mean, jnp.float32)

    def encode(self, sino):
        """Posterior `(mean, logvar)`, each `(B, n_angles/f, n_bins/f, z)`, of `sino` `(B, C, n_angles, n_bins)`."""
        if sino.ndim != 4 or sino.shape[1] != self.in_channels:
            raise ValueError(
                f"SinogramAutoencoder.encode expects (B, {self.in_channels}, n_angles, n_bins); got {sino.shape}"
            )
        self.latent_shape(*sino.shape[2:])
        moments = self.encoder(jnp.transpose(sino, (0, 2, 3, 1)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Sinogram `(B, C, n_angles, n_bins)` from latents `z` `(B, n_angles/f, n_bins/f, z)`."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"SinogramAutoencoder.decode expects (B, h, w, {self.latent_channels}); got {z.shape}")
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, sino, key=None):
        """`(reconstruction, mean, logvar)`; the latent is sampled with `key`, or is the mean without it."""
        mean, logvar = self.encode(sino)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar
