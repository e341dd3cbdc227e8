"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), model-agnostic and jit-compiled.

The denoiser is any pure function `denoise_fn(params, x_t, t) -> output` with `x_t` `(B, ...)`, `t` the
integer step `(B,)` int32 in `0 .. T-1`, and `output` the model's prediction under `parameterization`
("eps", "x0" or "v", see `schedules.to_x0_eps`). `params` is any pytree (model state, conditions): it
is traced, so new weights or conditions do not recompile. `denoise_fn` is a static argument, so it must
be hashable and stable across calls (a module-level function or `model_function.NNXDenoiser`, not a
fresh lambda per call, which would recompile every time).

Each reverse step draws `x_{t-1} ~ N(posterior mean(x0_hat, x_t), var_t)` with `x0_hat` the
denoiser's clean estimate; `var_t` is the posterior variance ("posterior", beta-tilde) or `beta_t`
("beta"), the two choices of Ho et al. The steps run under `lax.scan`, so the program size does not
grow with `T`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from allpet_jax.diffusion import schedules
from allpet_jax.diffusion.schedules import Schedule

VARIANCES = ("posterior", "beta")


@functools.partial(
    jax.jit, static_argnames=("denoise_fn", "shape", "parameterization", "variance", "clip_x0")
)
def ddpm_sample(
    denoise_fn,
    params,
    key,
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    parameterization: str = "eps",
    variance: str = "posterior",
    clip_x0: float | None = None,
):
    """Draw `shape` `(B, ...)` samples by `T` ancestral steps from `x_T ~ N(0, I)`.

    Args:
      clip_x0: if given, clip the clean estimate to `[-clip_x0, clip_x0]` at every step.
    Returns:
      `x_0` of `shape`, float32.
    """
    if variance not in VARIANCES:
        raise ValueError(f"ddpm_sample variance must be one of {VARIANCES}; got {variance!r}")
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape, jnp.float32)
    log_var_table = schedule.posterior_log_variance if variance == "posterior" else jnp.log(schedule.betas)

    def step(x, inputs):
        t, k = inputs
        tt = jnp.full((shape[0],), t, jnp.int32)
        x0, _ = schedules.to_x0_eps(schedule, parameterization, denoise_fn(params, x, tt), x, tt)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        mean, _, _ = schedules.posterior_mean_variance(schedule, x0, x, tt)
        std = jnp.where(t > 0, jnp.exp(0.5 * log_var_table[t]), 0.0)  # the last step returns the mean
        return mean + std * jax.random.normal(k, shape, jnp.float32), None

    T = schedule.num_steps
    x, _ = lax.scan(step, x_T, (jnp.arange(T - 1, -1, -1), jax.random.split(step_key, T)))
    return x
