"""Physics-aware sampling: pull each DDIM clean estimate towards the Poisson likelihood of the measured data.

For `low_dose` the measured source is a low-count acquisition of the same object. With the dose
fraction `d`, both sinograms in counts of the low-dose acquisition are

    y      = d * source_counts          (measured, corrected prompts; clipped at 0)
    lambda = d * decode(x0_hat)_counts  (what the current clean estimate predicts)

and the Poisson negative log-likelihood is `NLL = sum(lambda - y log lambda)`. Every DDIM step moves the
clean latent estimate against the gradient of the NLL (through the frozen decoder),

    x0_hat <- x0_hat - scale * sqrt(1 - alpha_bar_t) * g / rms(g),   g = dNLL/dx0_hat,

a normalised step (as DPS, Chung et al. 2023, normalises by the residual) whose size is `scale` latent
standard deviations at the noisiest step and vanishes as the sample becomes clean, so the last steps
keep the model's detail. Corrected prompts are not exactly Poisson (randoms, scatter and attenuation
corrections change the variance); the likelihood is the standard approximation. This is beyond the
paper: ALL-PET conditions on the source but never checks the output against it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from allpet_jax.diffusion.schedules import Schedule


class PoissonData(NamedTuple):
    """Traced inputs of the guidance: measured counts `y` `(B, C, A, Bn)`, `counts_per_unit` `(B, 1, 1, 1)`
    (maps decoder output to low-dose counts: dose x target normalisation scale), and the step `scale`."""

    y: jnp.ndarray
    counts_per_unit: jnp.ndarray
    scale: jnp.ndarray


def poisson_nll(lam, y, floor: float = 1e-3):
    """`sum(lam - y log lam)` per sample `(B,)`, with `lam` floored (the decoder may dip below 0)."""
    lam = jnp.maximum(lam, floor)
    return jnp.sum((lam - y * jnp.log(lam)).reshape(lam.shape[0], -1), axis=1)


def make_poisson_guide(to_sinogram: Callable, schedule: Schedule):
    """`guide(data, x0_hat, t)` for `ddim_sample`; `to_sinogram(x0_hat)` decodes a clean model latent to
    sinograms in the model's (normalised) target units."""

    def guide(data: PoissonData, x0, t):
        def nll(x0):
            return jnp.sum(poisson_nll(data.counts_per_unit * to_sinogram(x0), data.y))

        g = jax.grad(nll)(x0)
        axes = tuple(range(1, g.ndim))
        rms = jnp.sqrt(jnp.mean(g**2, axis=axes, keepdims=True)) + 1e-12
        noise = jnp.sqrt(1.0 - schedule.alpha_bar[t]).reshape((-1,) + (1,) * (g.ndim - 1))
        return x0 - data.scale * noise * g / rms

    return guide
