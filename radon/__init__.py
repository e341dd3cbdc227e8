"""Differentiable 2D parallel-beam Radon transform and PET physics in pure `jax.numpy`."""

from radon.geometry import Geometry
from radon.projector import adjoint, forward

__all__ = ["Geometry", "forward", "adjoint"]
