"""Classifier-free guidance (Ho & Salimans 2022): one network, trained with its prompt sometimes replaced
by a reserved "null" prompt, is evaluated with and without the prompt and the two predictions are
extrapolated, `out = uncond + scale * (cond - uncond)`. `scale = 1` is the plain conditional model,
`scale = 0` the unconditional one. The combination is linear, so it applies equally to eps-, x0- and
v-predictions (each is affine in the others at fixed `x_t`, `t`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


def classifier_free_guidance(cond_output, uncond_output, scale):
    """`uncond + scale * (cond - uncond)`, elementwise."""
    return uncond_output + scale * (cond_output - uncond_output)


def drop_ids(key, ids, drop_prob, null_id: int):
    """Replace each entry of the integer `ids` `(B,)` by `null_id` with probability `drop_prob` (training)."""
    keep = jax.random.uniform(key, jnp.shape(ids)) >= drop_prob
    return jnp.where(keep, ids, null_id)


@dataclasses.dataclass(frozen=True)
class GuidedDenoiser:
    """A sampler-ready denoiser `(params, x_t, t) -> output` with guidance built in.

    `params = (cond_params, uncond_params, scale)`: the wrapped `denoise_fn` is called once with each of
    the first two (e.g. the model state with the real and with the null prompt) and the outputs are
    combined. `scale` is traced, so a sweep over guidance scales compiles once.
    """

    denoise_fn: Callable[[Any, Any, Any], Any]

    def __call__(self, params, x_t, t):
        cond_params, uncond_params, scale = params
        return classifier_free_guidance(
            self.denoise_fn(cond_params, x_t, t), self.denoise_fn(uncond_params, x_t, t), scale
        )
