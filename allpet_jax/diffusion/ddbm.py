"""Denoising diffusion bridge (DDBM) from a source to a target, for paired tasks (low dose -> full dose, ...).

Which bridge
------------
The Brownian bridge, i.e. the variance-exploding bridge of DDBM (Zhou, Lou, Sun & Ermon 2023, "VE"
case) written on a unit time interval, sampled with the exact Gaussian posterior as in I2SB (Liu et al.
2023) and, for `eta < 1`, the implicit update of DBIM (Zheng et al. 2024). Time runs from the target
`x_0` (clean, `t = 0`) to the source `x_1` (`t = 1`): the forward process is `dx = sigma dW` pinned at
both ends, with marginals

    q(x_t | x_0, x_1) = N(m_t, c_t^2 I),   m_t = (1 - t) x_0 + t x_1,   c_t^2 = sigma^2 t (1 - t).

(DDBM-VE with noise level `s` has `q = N((s^2/S^2) x_S + (1 - s^2/S^2) x_0, s^2 (1 - s^2/S^2))`; with
`t = s^2/S^2` and `sigma = S` that is the same family.) Because the pinned process is Markov, the step
back from `t` to `s < t` given the target is again a Brownian bridge, between `(0, x_0)` and `(t, x_t)`:

    q(x_s | x_t, x_0) = N((1 - s/t) x_0 + (s/t) x_t,  sigma^2 s (t - s) / t).

The sampler replaces `x_0` by the denoiser's estimate `x0_hat = D(x_t, t; source)` (trained with an
x0-regression loss, see `bridge_training_input`). Writing `eps_hat = (x_t - m_t(x0_hat)) / c_t`, one step
is

    x_s = m_s(x0_hat) + sqrt(c_s^2 - rho^2) eps_hat + rho z,   rho^2 = eta^2 sigma^2 s (t - s) / t,

which for `eta = 1` is exactly the posterior above (the algebra: `sqrt(c_s^2 - rho^2) / c_t = s / t`)
and for `eta = 0` is deterministic after the first step. The first step leaves `t = 1` where `c_t = 0`
and `x_t` is the source itself, so it always draws the full marginal noise (`rho = c_s`). With the
exact denoiser `E[x_0 | x_t, x_1]` every step has the exact mean of the true reverse transition; its
variance lacks the denoiser's own uncertainty term (as in DDPM), an error that vanishes as the steps
get finer, and is zero when the target is a deterministic function of the source.

The denoiser contract is `denoise_fn(params, x_t, t_model) -> x0_hat`, `t_model = TIME_SCALE * t`
`(B,)` float32 (so a U-Net's sinusoidal embedding sees the same range as with DDPM steps); the source
reaches the model through `params` (e.g. as condition channels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

TIME_SCALE = 1000.0


def _bcast(v, x):
    v = jnp.asarray(v, jnp.float32)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def bridge_mean_std(x0, x1, t, sigma):
    """Mean `(1 - t) x0 + t x1` and std `sigma sqrt(t (1 - t))` of the bridge at `t` `(B,)` or scalar."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * x1, sigma * jnp.sqrt(jnp.clip(tb * (1.0 - tb), 0.0, None))


def bridge_marginal(x0, x1, t, sigma, noise):
    """`x_t ~ q(x_t | x0, x1)` with the given standard-normal `noise`."""
    mean, std = bridge_mean_std(x0, x1, t, sigma)
    return mean + std * noise


def bridge_training_input(key, x0, x1, sigma, t_min: float = 1e-3):
    """A training input for an x0-predicting bridge denoiser.

    Args:
      x0: targets `(B, ...)`; x1: sources, same shape.
    Returns:
      `(x_t, t_model)`: the noisy bridge state and the model time `TIME_SCALE * t` `(B,)`, with
      `t ~ U(t_min, 1)`. The regression target is `x0`.
    """
    kt, kn = jax.random.split(key)
    t = jax.random.uniform(kt, (x0.shape[0],), jnp.float32, t_min, 1.0)
    return bridge_marginal(x0, x1, t, sigma, jax.random.normal(kn, x0.shape, jnp.float32)), TIME_SCALE * t


@functools.partial(jax.jit, static_argnames=("denoise_fn", "num_steps", "return_trajectory"))
def ddbm_sample(denoise_fn, params, key, source, num_steps: int, *, sigma=1.0, eta=1.0, return_trajectory=False):
    """Carry `source` `(B, ...)` (at `t = 1`) to a target sample (at `t = 0`) in `num_steps` steps.

    Args:
      sigma: the bridge's noise scale (the same as in training); traced.
      eta: 1 is the exact ancestral posterior, 0 the deterministic implicit sampler; traced.
      return_trajectory: also return the states at every grid time, `(num_steps + 1, B, ...)`, the first
        being `source`, the last the returned sample.
    Returns:
      the sample `(B, ...)`, or `(sample, trajectory)`.
    """
    if num_steps < 1:
        raise ValueError(f"ddbm_sample num_steps must be >= 1; got {num_steps}")
    source = jnp.asarray(source, jnp.float32)
    B = source.shape[0]
    grid = jnp.linspace(1.0, 0.0, num_steps + 1)

    def step(x, inputs):
        t, s, k = inputs
        x0_hat = denoise_fn(params, x, jnp.full((B,), TIME_SCALE * t, jnp.float32))
        m_t, c_t = bridge_mean_std(x0_hat, source, t, sigma)
        m_s, c_s = bridge_mean_std(x0_hat, source, s, sigma)
        has_noise = c_t > 0
        eps_hat = jnp.where(has_noise, (x - m_t) / jnp.where(has_noise, c_t, 1.0), 0.0)
        post_var = sigma**2 * s * (t - s) / t
        rho2 = jnp.where(has_noise, eta**2 * post_var, c_s**2)
        x = m_s + jnp.sqrt(jnp.maximum(c_s**2 - rho2, 0.0)) * eps_hat + jnp.sqrt(rho2) * jax.random.normal(
            k, source.shape, jnp.float32
        )
        return x, x

    x, path = lax.scan(step, source, (grid[:-1], grid[1:], jax.random.split(key, num_steps)))
    if return_trajectory:
        return x, jnp.concatenate([source[None], path], axis=0)
    return x
