"""Differentiable 2D parallel-beam Radon transform and PET physics in pure `jax.numpy`."""

from radon.fbp import FILTERS, fbp, filter_sinogram
from radon.geometry import Geometry
from radon.pet import (
    CountLevel,
    attenuation_factors,
    expected_counts,
    poisson_counts,
    scale_to_total_counts,
)
from radon.projector import adjoint, forward
from radon.recon import angle_subsets, fov_mask, mlem, osem

__all__ = [
    "Geometry",
    "forward",
    "adjoint",
    "FILTERS",
    "fbp",
    "filter_sinogram",
    "CountLevel",
    "attenuation_factors",
    "expected_counts",
    "poisson_counts",
    "scale_to_total_counts",
    "angle_subsets",
    "fov_mask",
    "mlem",
    "osem",
]
