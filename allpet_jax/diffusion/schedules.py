"""Discrete-time variance-preserving (DDPM) noise schedules and the Gaussian identities built on them.

Notation (Ho et al. 2020; score_sde's discrete VP-SDE): `T` steps indexed `t = 0 .. T-1`,
`alpha_t = 1 - beta_t`, `alpha_bar_t = prod_{s<=t} alpha_s`, and the forward marginal

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps.

The posterior of one reverse step is Gaussian,

    q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + ct_t x_t, var_t),
    c0_t = sqrt(ab_{t-1}) beta_t / (1 - ab_t),   ct_t = sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t),
    var_t = beta_t (1 - ab_{t-1}) / (1 - ab_t),   with ab_{-1} = 1.

A denoiser may predict `eps`, `x0` or the velocity `v = sqrt(ab) eps - sqrt(1 - ab) x_0` (Salimans & Ho
2022); `to_x0_eps` turns any of them into the pair `(x0, eps)` the samplers use. This module holds no
model and no sampler: see `ddpm.py`, `ddim.py`, `ddbm.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

PARAMETERIZATIONS = ("eps", "x0", "v")


class Schedule(NamedTuple):
    """Per-step tables of a discrete VP schedule, each `(T,)` float32. A pytree: pass it through `jit`."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alpha_bar: jnp.ndarray
    alpha_bar_prev: jnp.ndarray  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    posterior_variance: jnp.ndarray
    posterior_log_variance: jnp.ndarray  # log of the variance, the t = 0 entry clipped to the t = 1 one
    posterior_coef_x0: jnp.ndarray
    posterior_coef_xt: jnp.ndarray

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 max_beta: float = 0.999) -> np.ndarray:
    """Ho et al. (2020): betas linear in `t`; the endpoints (given for 1000 steps) are scaled by
    `1000 / num_steps` as in Nichol & Dhariwal (2021), so fewer steps still end near pure noise, and
    clipped at `max_beta`."""
    _check_steps(num_steps)
    scale = 1000.0 / num_steps
    return np.clip(np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64), 0.0, max_beta)


def cosine_betas(num_steps: int = 1000, s: float = 8e-3, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): `alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)`, betas clipped at `max_beta`."""
    _check_steps(num_steps)
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)


def make_schedule(betas) -> Schedule:
    """All tables of the schedule with the given `(T,)` betas in (0, 1), computed in float64 then cast."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1 or not np.all((betas > 0) & (betas < 1)):
        raise ValueError(f"betas must be a non-empty 1-D array with values in (0, 1); got shape {betas.shape}")
    alphas = 1.0 - betas
    alpha_bar = np.cumprod(alphas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    log_var = np.log(np.concatenate([[var[1] if var.size > 1 else betas[0]], var[1:]]))
    coef_x0 = np.sqrt(alpha_bar_prev) * betas / (1.0 - alpha_bar)
    coef_xt = np.sqrt(alphas) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(*map(f32, (betas, alphas, alpha_bar, alpha_bar_prev, var, log_var, coef_x0, coef_xt)))


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Schedule:
    return make_schedule(linear_betas(num_steps, beta_start, beta_end))


def cosine_schedule(num_steps: int = 1000, s: float = 8e-3) -> Schedule:
    return make_schedule(cosine_betas(num_steps, s))


def _at(table, t, x):
    """`table[t]` shaped to broadcast against `x` `(B, ...)` for integer steps `t` `(B,)` or scalar."""
    v = table[jnp.asarray(t, dtype=jnp.int32)]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: Schedule, x0, t, noise):
    """Draw `x_t ~ q(x_t | x_0)` with the given standard-normal `noise` (same shape as `x0` `(B, ...)`)."""
    ab = _at(schedule.alpha_bar, t, x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def posterior_mean_variance(schedule: Schedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of `q(x_{t-1} | x_t, x_0)` (variances broadcastable)."""
    mean = _at(schedule.posterior_coef_x0, t, x_t) * x0 + _at(schedule.posterior_coef_xt, t, x_t) * x_t
    return mean, _at(schedule.posterior_variance, t, x_t), _at(schedule.posterior_log_variance, t, x_t)


def x0_from_eps(schedule: Schedule, x_t, t, eps):
    ab = _at(schedule.alpha_bar, t, x_t)
    return (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)


def eps_from_x0(schedule: Schedule, x_t, t, x0):
    ab = _at(schedule.alpha_bar, t, x_t)
    return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def v_from_x0_eps(schedule: Schedule, t, x0, eps):
    """The velocity target `v = sqrt(ab) eps - sqrt(1 - ab) x0`."""
    ab = _at(schedule.alpha_bar, t, x0)
    return jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0


def x0_from_v(schedule: Schedule, x_t, t, v):
    ab = _at(schedule.alpha_bar, t, x_t)
    return jnp.sqrt(ab) * x_t - jnp.sqrt(1.0 - ab) * v


def eps_from_v(schedule: Schedule, x_t, t, v):
    ab = _at(schedule.alpha_bar, t, x_t)
    return jnp.sqrt(1.0 - ab) * x_t + jnp.sqrt(ab) * v


def skip_offset(schedule: Schedule, x_t, t, sigma2):
    """The term a learned skip adds to a `v` output: `v = F + c(t) x_t`, so that
    `x0 = c_skip(t) x_t - s F` with the Wiener (EDM) skip of a prior of variance `sigma2`,
    `c_skip = a sigma2 / (a^2 sigma2 + s^2)` (`a = sqrt(alpha_bar_t)`, `s = sqrt(1 - alpha_bar_t)`):

        c(t) = (a - c_skip) / s = a s (1 - sigma2) / (a^2 sigma2 + s^2).

    `sigma2 = 1` is plain `v` prediction (`c = 0`). `sigma2 = 0` with `F = 0` predicts `x0 = 0` at every step:
    a residual model then samples exactly its baseline (the identity). In between, a zero `F` samples
    `N(0, sigma2)`, and the skip still passes `x_t` at low noise (`c_skip -> 1 / a` as `s -> 0`).
    """
    ab = _at(schedule.alpha_bar, t, x_t)
    a, s2 = jnp.sqrt(ab), 1.0 - ab
    return a * jnp.sqrt(s2) * (1.0 - sigma2) / (ab * sigma2 + s2) * x_t


def to_x0_eps(schedule: Schedule, parameterization: str, output, x_t, t):
    """Convert a denoiser `output` under `parameterization` ("eps", "x0" or "v") to `(x0, eps)`."""
    if parameterization == "eps":
        return x0_from_eps(schedule, x_t, t, output), output
    if parameterization == "x0":
        return output, eps_from_x0(schedule, x_t, t, output)
    if parameterization == "v":
        return x0_from_v(schedule, x_t, t, output), eps_from_v(schedule, x_t, t, output)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")


def training_target(schedule: Schedule, parameterization: str, x0, t, noise):
    """What a denoiser trained under `parameterization` should output for `q_sample(x0, t, noise)`."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(schedule, t, x0, noise)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")


def _check_steps(num_steps) -> None:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
