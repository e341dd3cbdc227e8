"""Turn a Flax NNX module into the pure, hashable `denoise_fn(params, x_t, t)` the samplers take.

`nnx.split` separates the module into a static graph definition (hashable, so it can be a static
argument of `jax.jit`) and a state pytree (traced). Keyword arguments of the module call (prompt,
condition channels) travel with the state in `params`, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from allpet_jax.diffusion.schedules import skip_offset


@dataclasses.dataclass(frozen=True)
class NNXDenoiser:
    """`NNXDenoiser(graphdef)((state, kwargs), x_t, t) = nnx.merge(graphdef, state)(x_t, t, **kwargs)`."""

    graphdef: Any

    def __call__(self, params, x_t, t):
        state, kwargs = params
        return nnx.merge(self.graphdef, state)(x_t, t, **kwargs)


def nnx_denoiser(model: nnx.Module, **kwargs):
    """`(denoise_fn, params)` for the samplers: `denoise_fn(params, x_t, t) == model(x_t, t, **kwargs)`."""
    graphdef, state = nnx.split(model)
    return NNXDenoiser(graphdef), (state, kwargs)


@dataclasses.dataclass(frozen=True)
class SkipDenoiser:
    """A `v` denoiser with a learned skip: `SkipDenoiser(inner, rate)(((state, kwargs), schedule), x_t, t)`
    is `inner((state, kwargs), x_t, t) + schedules.skip_offset(schedule, x_t, t, skip_variance(state, rate))`.

    The skip's prior variance is the U-Net's `skip_gate` parameter times `rate` (`LatentUNet(learned_skip=
    True)`): it starts at 0, where a zero output predicts `x0 = 0`, and training opens it."""

    inner: Any
    rate: float

    def __call__(self, params, x_t, t):
        (state, kwargs), schedule = params
        return self.inner((state, kwargs), x_t, t) + skip_offset(schedule, x_t, t, skip_variance(state, self.rate))


def skip_variance(state, rate: float):
    """The learned skip's prior variance `max(rate * skip_gate, 0)` from a U-Net state."""
    return jnp.maximum(rate * state["skip_gate"][...], 0.0)
