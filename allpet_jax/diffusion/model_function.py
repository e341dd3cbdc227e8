"""Turn a Flax NNX module into the pure, hashable `denoise_fn(params, x_t, t)` the samplers take.

`nnx.split` separates the module into a static graph definition (hashable, so it can be a static
argument of `jax.jit`) and a state pytree (traced). Keyword arguments of the module call (prompt,
condition channels) travel with the state in `params`, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


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
