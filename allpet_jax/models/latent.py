"""The latent space of the diffusion stages: sinograms of any channel count through the frozen
single-channel autoencoder, and the scales that bring its latents to unit variance.

Channels: every sinogram channel is encoded on its own (channels fold into the batch), so one
single-channel `SinogramAutoencoder` serves 1-channel sources and 2-channel separation targets; a
C-channel sinogram's latent `(B, h, w, C * z)` is the C per-channel latents concatenated on the channel
axis, times the latent scale.

Not here: the autoencoder itself (`autoencoder.py`), the condition channels built from these latents
(`conditioning.py`), training (`training/`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def channels_to_batch(sino):
    """Sinograms `(B, C, A, Bn)` as `B * C` single-channel sinograms `(B * C, 1, A, Bn)`."""
    B, C = sino.shape[:2]
    return sino.reshape((B * C, 1) + sino.shape[2:])


def encode(ae_graphdef, ae_params, sino, scale):
    """Latent `(B, h, w, C * z)` (posterior mean, times `scale`) of sinograms `(B, C, A, Bn)`."""
    model = nnx.merge(ae_graphdef, ae_params)
    B, C = sino.shape[:2]
    mean, _ = model.encode(channels_to_batch(sino))
    mean = mean.reshape((B, C) + mean.shape[1:])  # (B, C, h, w, z)
    return scale * jnp.moveaxis(mean, 1, -2).reshape(mean.shape[:1] + mean.shape[2:4] + (-1,))


def decode(ae_graphdef, ae_params, latent, scale, channels: int):
    """Sinograms `(B, C, A, Bn)` from latents `(B, h, w, C * z)`, `C = channels`."""
    model = nnx.merge(ae_graphdef, ae_params)
    B, h, w, cz = latent.shape
    z = latent.reshape(B, h, w, channels, cz // channels) / scale
    sino = model.decode(jnp.moveaxis(z, 3, 1).reshape(B * channels, h, w, cz // channels))
    return sino.reshape((B, channels) + sino.shape[2:])


def match_channels(source, channels: int):
    """The identity baseline `(B, channels, A, Bn)`: the source itself, or its channel mean split evenly
    over `channels` (a mixture's even split for `tracer_separation`)."""
    if source.shape[1] == channels:
        return source
    return jnp.repeat(source.mean(axis=1, keepdims=True), channels, axis=1) / channels


def latent_scale(latents) -> jnp.ndarray:
    """`1 / std` of a batch of latents: multiply latents by it before diffusion (Rombach et al. 2022)."""
    return 1.0 / jnp.maximum(jnp.std(latents), 1e-6)


def measure_latent_scale(ae_graphdef, ae_params, batches) -> float:
    """`latent_scale` of the target latents of a few training batches."""
    latents = [encode(ae_graphdef, ae_params, jnp.asarray(b["target"]), 1.0) for b in batches]
    return float(latent_scale(jnp.concatenate([x.ravel() for x in latents])))


def measure_residual_scale(ae_graphdef, ae_params, batches, scale: float) -> float:
    """`latent_scale` of the residual latents `E(target) - E(baseline)` (latents times `scale`) of a few
    training batches, `baseline` the source matched to the target's channels (`match_channels`)."""
    res = []
    for b in batches:
        target = jnp.asarray(b["target"])
        base = match_channels(jnp.asarray(b["source"]), target.shape[1])
        res.append(encode(ae_graphdef, ae_params, target, scale) - encode(ae_graphdef, ae_params, base, scale))
    return float(latent_scale(jnp.concatenate([r.ravel() for r in res])))
