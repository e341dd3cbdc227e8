"""Sinogram-resolution maps (RMAS mask, TMA attention) brought to the latent grid, and the U-Net's
condition channels assembled from them.

Layout of the condition channels (`condition_channels`): `[source latent (z), mask (1), TMA map (1)]`,
`z + 2` channels in all; any part that is absent is zeros, so one network serves synthesis (no source),
paired tasks (with source, every ray known: mask 1) and the RMAS views (the view's ray mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def condition_channel_count(latent_channels: int) -> int:
    """Channels produced by `condition_channels`: the source latent, the mask and the TMA map."""
    return latent_channels + 2


def sinogram_map_to_latent(sino_map, latent_hw: tuple[int, int]):
    """Resample a map `(B, n_angles, n_bins)` or `(B, C, n_angles, n_bins)` to `(B, h, w, C)` (C = 1 for 3-D).

    Average pooling when the sizes divide (each latent pixel gets the mean of the sinogram pixels it
    summarises), antialiased linear resizing otherwise.
    """
    m = jnp.asarray(sino_map, jnp.float32)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise ValueError(f"sinogram map must be (B, n_angles, n_bins) or (B, C, n_angles, n_bins); got {m.shape}")
    B, C, A, N = m.shape
    h, w = latent_hw
    if A % h == 0 and N % w == 0:
        out = m.reshape(B, C, h, A // h, w, N // w).mean(axis=(3, 5))
    else:
        out = jax.image.resize(m, (B, C, h, w), method="linear", antialias=True)
    return jnp.transpose(out, (0, 2, 3, 1))


def condition_channels(batch: int, latent_hw: tuple[int, int], latent_channels: int, *, source=None,
                       mask=None, tma=None):
    """Condition channels `(B, h, w, latent_channels + 2)` for `LatentUNet(cond_channels=...)`.

    Args:
      source: task source latent `(B, h, w, latent_channels)` or None.
      mask: RMAS sinogram mask `(B, n_angles, n_bins)` (1 = kept), a number that every ray shares (1.0:
        all rays known, as for a task's source), or None.
      tma: TMA sinogram attention `(B, n_angles, n_bins)` in [0, 1] or None.
    """
    h, w = latent_hw
    zeros = lambda c: jnp.zeros((batch, h, w, c), jnp.float32)  # noqa: E731
    if source is None:
        source = zeros(latent_channels)
    elif source.shape != (batch, h, w, latent_channels):
        raise ValueError(f"source latent must be {(batch, h, w, latent_channels)}; got {source.shape}")
    parts = [source.astype(jnp.float32)]
    for m in (mask, tma):
        if m is None:
            parts.append(zeros(1))
        elif isinstance(m, (int, float)):
            parts.append(jnp.full((batch, h, w, 1), m, jnp.float32))
        else:
            parts.append(sinogram_map_to_latent(m, latent_hw))
    return jnp.concatenate(parts, axis=-1)
