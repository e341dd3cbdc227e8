"""Diffusion maths for the latent model: schedules, samplers (DDPM, DDIM, DDBM) and guidance.

Each file is one idea (score_sde style). Samplers take the model as a pure function
`denoise_fn(params, x_t, t)` (see `model_function.nnx_denoiser`), so they work with any network.
"""

from allpet_jax.diffusion.ddbm import bridge_marginal, bridge_training_input, ddbm_sample
from allpet_jax.diffusion.ddim import ddim_sample, ddim_timesteps
from allpet_jax.diffusion.ddpm import ddpm_sample
from allpet_jax.diffusion.guidance import GuidedDenoiser, classifier_free_guidance, drop_ids
from allpet_jax.diffusion.model_function import NNXDenoiser, nnx_denoiser
from allpet_jax.diffusion.schedules import (
    Schedule,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    q_sample,
    to_x0_eps,
    training_target,
)

__all__ = [
    "GuidedDenoiser",
    "NNXDenoiser",
    "Schedule",
    "bridge_marginal",
    "bridge_training_input",
    "classifier_free_guidance",
    "cosine_schedule",
    "ddbm_sample",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "drop_ids",
    "linear_schedule",
    "make_schedule",
    "nnx_denoiser",
    "q_sample",
    "to_x0_eps",
    "training_target",
]
