"""Networks of the latent diffusion model: the sinogram autoencoder and the latent U-Net (Flax NNX), and
the latent space between them (`latent`)."""

from allpet_jax.models.autoencoder import SinogramAutoencoder
from allpet_jax.models.compiled_cost import CompiledCost, compiled_cost
from allpet_jax.models.conditioning import condition_channel_count, condition_channels, sinogram_map_to_latent
from allpet_jax.models.latent import latent_scale
from allpet_jax.models.parameters import count_parameters, parameter_overview, print_parameter_overview
from allpet_jax.models.unet import LatentUNet, Prompt

__all__ = [
    "CompiledCost",
    "LatentUNet",
    "Prompt",
    "SinogramAutoencoder",
    "compiled_cost",
    "condition_channel_count",
    "condition_channels",
    "count_parameters",
    "latent_scale",
    "parameter_overview",
    "print_parameter_overview",
    "sinogram_map_to_latent",
]
