"""The PET measurement model, composed from elementwise operators around the pure projector.

    ybar = eta * a * R(x) + r + s,    a = exp(-R(mu)),    y ~ Poisson(ybar)

with `R` = `radon.forward`, activity `x` `(..., H, W)`, 511 keV attenuation map `mu` in 1/mm,
normalisation `eta`, randoms `r` and scatter `s`: sinograms `(..., n_angles, n_bins)` that broadcast
against each other, or scalars. This is the model of STIR, SIRF and parallelproj. Nothing here projects
except through `radon.forward`, and nothing here reconstructs (see `radon.recon`).

Count levels: a simulator first computes the noise-free trues `eta * a * R(x)` of a phantom in
arbitrary activity units, then `scale_to_total_counts` sets the expected total counts of the sinogram
and the fractions of randoms and scatter in it; a dose fraction `d` is then just `d * ybar`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from radon.geometry import Geometry
from radon.projector import forward
from radon.validation import check_array, check_nonnegative, is_concrete


def attenuation_factors(mu, geom: Geometry):
    """Survival probability of each line of response: `exp(-R(mu))`, `(..., n_angles, n_bins)` in (0, 1].

    Args:
      mu: linear attenuation coefficients at 511 keV in 1/mm, `(..., H, W)` (water ~0.0096/mm).
    """
    check_array(mu, geom.image_shape, "mu (attenuation map, 1/mm)", "(..., H, W)")
    check_nonnegative(mu, "mu (attenuation map, 1/mm)")
    return jnp.exp(-forward(mu, geom))


def expected_counts(activity, geom: Geometry, *, attenuation=None, normalisation=None, randoms=None, scatter=None):
    """Expected counts `ybar = eta * a * R(activity) + r + s`, `(..., n_angles, n_bins)`.

    `None` means the neutral value: `a = 1`, `eta = 1`, `r = 0`, `s = 0`. Each sinogram term may be a
    scalar or an array ending in `(n_angles, n_bins)` that broadcasts against the result (e.g. one
    `(n_angles, n_bins)` map for a whole batch).

    Args:
      activity: `(..., H, W)`, non-negative; `R(activity)` is in activity x mm.
      attenuation: attenuation factors `a` in [0, 1] (see `attenuation_factors`).
      normalisation: detector efficiencies `eta` >= 0.
      randoms, scatter: expected background counts >= 0, in the units of the result.
    """
    check_array(activity, geom.image_shape, "activity", "(..., H, W)")
    check_nonnegative(activity, "activity")
    factors = multiplicative_factors(geom, attenuation=attenuation, normalisation=normalisation)
    background = additive_background(geom, randoms=randoms, scatter=scatter)
    ybar = forward(activity, geom)
    if factors is not None:
        ybar = factors * ybar
    if background is not None:
        ybar = ybar + background
    return ybar


def multiplicative_factors(geom: Geometry, *, attenuation=None, normalisation=None):
    """`eta * a`, the per-bin factor on the trues (checked), or `None` when both are `None`."""
    terms = _checked_terms(geom, attenuation=attenuation, normalisation=normalisation)
    return None if not terms else functools.reduce(jnp.multiply, terms)


def additive_background(geom: Geometry, *, randoms=None, scatter=None):
    """`r + s`, the additive term in counts (checked), or `None` when both are `None`."""
    terms = _checked_terms(geom, randoms=randoms, scatter=scatter)
    return None if not terms else functools.reduce(jnp.add, terms)


def _checked_terms(geom: Geometry, **terms) -> list:
    """The given (not `None`) sinogram terms as float32 arrays, after shape and sign checks."""
    return [checked_sinogram_term(value, geom, name) for name, value in terms.items() if value is not None]


def checked_sinogram_term(value, geom: Geometry, name: str):
    """`value` as float32 after checks: a scalar or an array ending in `(n_angles, n_bins)`, finite, >= 0."""
    shape = np.shape(value)
    if len(shape) == 1 or (len(shape) >= 2 and tuple(shape[-2:]) != geom.sino_shape):
        raise ValueError(
            f"{name} must be a scalar or a sinogram ending in (n_angles, n_bins) = {geom.sino_shape}; "
            f"got shape {shape} (transpose (n_bins, n_angles) data, or add leading axes with [None] for a batch)"
        )
    check_nonnegative(value, name)
    return jnp.asarray(value, jnp.float32)


class CountLevel(NamedTuple):
    """The parts of a sinogram scaled to a total count level; every array `(..., n_angles, n_bins)`.

    `expected` (= trues + randoms + scatter) is the Poisson mean to sample from; `scale` `(...,)` is the
    factor applied to the input trues, so `scale[..., None, None] * activity` is the activity image
    that produces `trues` (the ground truth for a reconstruction of these counts).
    """

    trues: jax.Array
    randoms: jax.Array
    scatter: jax.Array
    scale: jax.Array

    @property
    def background(self) -> jax.Array:
        """`randoms + scatter`, the additive term of the model."""
        return self.randoms + self.scatter

    @property
    def expected(self) -> jax.Array:
        """`trues + randoms + scatter`."""
        return self.trues + self.randoms + self.scatter


def scale_to_total_counts(
    trues, total_counts, *, randoms_fraction=0.0, scatter_fraction=0.0, randoms_shape=None, scatter_shape=None
) -> CountLevel:
    """Scales noise-free trues and adds randoms and scatter so each sinogram holds `total_counts` expected counts.

    Fractions are of the total prompts, as scanners report them: the trues, randoms and scatter sum to
    `(1 - fr - fs) * total`, `fr * total` and `fs * total` per sinogram (sum over the last two axes).
    Clinical 2D PET has scatter fractions of about 0.1-0.2 and randoms fractions of about 0.1-0.4.

    Args:
      trues: noise-free `eta * a * R(x)`, `(..., n_angles, n_bins)`, non-negative, not all zero.
      total_counts: expected prompts per sinogram, scalar or `(...)` matching the leading axes.
      randoms_fraction, scatter_fraction: in [0, 1), with sum < 1.
      randoms_shape, scatter_shape: non-negative sinograms broadcastable to `trues` whose *shape* the
        randoms / scatter follow (rescaled to their fraction); default uniform over the sinogram, which
        is close to real randoms. Scatter is smooth and wide: pass e.g. a blurred `trues` for it.
    """
    check_nonnegative(trues, "trues")
    trues = jnp.asarray(trues, jnp.float32)
    check_nonnegative(total_counts, "total_counts")
    for name, value in (("randoms_fraction", randoms_fraction), ("scatter_fraction", scatter_fraction)):
        if not (np.ndim(value) == 0 and 0.0 <= float(value) < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1) (a fraction of all prompts); got {value!r}")
    if float(randoms_fraction) + float(scatter_fraction) >= 1.0:
        raise ValueError(
            f"randoms_fraction + scatter_fraction must be < 1 so some trues remain; "
            f"got {randoms_fraction} + {scatter_fraction}"
        )
    if trues.ndim < 2:
        raise ValueError(f"trues must be a sinogram (..., n_angles, n_bins); got shape {trues.shape}")
    total = jnp.asarray(total_counts, jnp.float32)[..., None, None]
    true_fraction = 1.0 - randoms_fraction - scatter_fraction
    trues_sum = jnp.sum(trues, axis=(-2, -1), keepdims=True)
    _check_positive_sum(trues_sum, "trues")
    scale = true_fraction * total / jnp.where(trues_sum > 0, trues_sum, 1.0)
    return CountLevel(
        trues=scale * trues,
        randoms=_part_with_total(randoms_shape, trues, randoms_fraction, total, "randoms_shape"),
        scatter=_part_with_total(scatter_shape, trues, scatter_fraction, total, "scatter_shape"),
        scale=scale[..., 0, 0],
    )


def _part_with_total(shape_map, trues, fraction, total, name: str):
    """A sinogram like `trues` that follows `shape_map` (uniform if None) and sums to `fraction * total`."""
    if shape_map is None:
        shape_map = jnp.ones_like(trues)
    else:
        check_nonnegative(shape_map, name)
        shape_map = jnp.broadcast_to(jnp.asarray(shape_map, trues.dtype), trues.shape)
    shape_sum = jnp.sum(shape_map, axis=(-2, -1), keepdims=True)
    if fraction > 0:
        _check_positive_sum(shape_sum, name)
    return fraction * total * shape_map / jnp.where(shape_sum > 0, shape_sum, 1.0)


def _check_positive_sum(sums, name: str) -> None:
    if is_concrete(sums) and np.any(np.asarray(sums) <= 0):
        raise ValueError(f"{name} must have a positive sum in every sinogram to be scaled; got an all-zero sinogram")


def poisson_counts(key, ybar):
    """Poisson-distributed counts with mean `ybar` (any shape, non-negative), as float32 of the same shape.

    Randomness only through the explicit `key`; for low-dose data pass `dose * ybar`. Not differentiable
    in `ybar` (the sample is integer-valued).
    """
    check_nonnegative(ybar, "ybar (expected counts)")
    return jax.random.poisson(key, jnp.asarray(ybar, jnp.float32)).astype(jnp.float32)
