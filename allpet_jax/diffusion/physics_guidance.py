"""Physics-aware sampling: pull each DDIM clean estimate towards the Poisson likelihood of the raw prompts.

A low-dose scan measures raw prompts `y ~ Poisson(lambda)` per bin, with the scanner model (`simulate.py`)

    lambda = eta * (a * d * t + s + r)

(`eta` normalisation, `a` attenuation factors, `d` dose fraction, `t` full-dose trues in counts, `s` and
`r` the expected scatter and randoms of the low-dose acquisition). The model generates `t` in its own
normalised units, `t = target_scale * decoded`, so the likelihood of a clean latent estimate `x0` is

    lambda(x0) = gain * decode(x0) + background,   gain = eta * a * d * target_scale,
                                                    background = eta * (s + r)

and its negative log-likelihood (up to a constant in `y`) `NLL = sum(lambda - y log lambda)`. Every DDIM
step moves the clean latent estimate against the gradient of the NLL (through the frozen decoder),

    x0_hat <- x0_hat - scale * sqrt(1 - alpha_bar_t) * g / rms(g),   g = dNLL/dx0_hat,

a normalised step (as DPS, Chung et al. 2023, normalises by the residual) whose size is `scale` latent
standard deviations at the noisiest step and vanishes as the sample becomes clean, so the last steps
keep the model's detail. The likelihood is that of the raw prompts, which are Poisson; corrected
sinograms (prompts with randoms and scatter subtracted and divided by `eta * a`) are not, and are never
used here. `sampling.add_poisson_data` computes `y`, `gain` and `background` from a sample's physics
fields (`data/sources.py` PHYSICS_FIELDS). The same guide serves a `low_dose` task model and the
foundation model (the zero-pair arm: prior plus likelihood, no paired training). This is beyond the
paper: ALL-PET conditions on the source but never checks the output against it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from allpet_jax.diffusion.schedules import Schedule

LAMBDA_FLOOR = 1e-3
"""Expected prompts are floored here (counts): the decoder may dip below zero where the background is 0."""


class PoissonData(NamedTuple):
    """Traced inputs of the guidance, sinograms `(B, C, A, Bn)` in counts: the raw prompts `y`, the `gain`
    (counts of prompts per decoded model unit: `eta * a * d * target_scale`) and the `background`
    (`eta * (s + r)`); `scale`, the step size in latent standard deviations (scalar)."""

    y: jnp.ndarray
    gain: jnp.ndarray
    background: jnp.ndarray
    scale: jnp.ndarray


def expected_prompts(data: PoissonData, decoded):
    """`lambda = gain * decoded + background`, floored at `LAMBDA_FLOOR`; `decoded` `(B, C, A, Bn)` in the
    model's target units."""
    return jnp.maximum(data.gain * decoded + data.background, LAMBDA_FLOOR)


def poisson_nll(lam, y):
    """`sum(lam - y log lam)` per sample `(B,)`: the Poisson negative log-likelihood of counts `y` with
    means `lam > 0`, without its `log(y!)` constant."""
    return jnp.sum((lam - y * jnp.log(lam)).reshape(lam.shape[0], -1), axis=1)


def make_poisson_guide(to_sinogram: Callable, schedule: Schedule):
    """`guide(data, x0_hat, t)` for `ddim_sample`; `to_sinogram(x0_hat)` decodes a clean model latent to
    sinograms in the model's normalised target units (for a residual task model: baseline plus residual)."""

    def guide(data: PoissonData, x0, t):
        def nll(x0):
            lam = expected_prompts(data, to_sinogram(x0))
            return jnp.sum(poisson_nll(lam, data.y)), lam

        g, lam = jax.grad(nll, has_aux=True)(x0)
        axes = tuple(range(1, g.ndim))
        rms = jnp.sqrt(jnp.mean(g**2, axis=axes, keepdims=True)) + 1e-12
        # A sample whose expected prompts equal its data to rounding has nothing to correct: its gradient is
        # rounding error, which the normalisation would otherwise blow up to a full step in no direction.
        misfit = jnp.max(jnp.abs(lam - data.y).reshape(lam.shape[0], -1) / lam.reshape(lam.shape[0], -1), axis=1)
        fitted = misfit <= 16 * jnp.finfo(lam.dtype).eps
        noise = jnp.sqrt(1.0 - schedule.alpha_bar[t]) * jnp.where(fitted, 0.0, 1.0)
        return x0 - data.scale * noise.reshape((-1,) + (1,) * (g.ndim - 1)) * g / rms

    return guide
