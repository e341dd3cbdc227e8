"""MLEM and OSEM: the statistical (Poisson maximum-likelihood) image reconstruction of PET sinograms.

The model is the one in `radon.pet`, `ybar = eta * a * R(x) + b` with `b` = randoms + scatter; the
multiplicative EM update is

    x <- x / (R_S^T (eta a)_S) * R_S^T( (eta a)_S * y_S / ybar_S )

over the whole sinogram (MLEM) or over subsets `S` of the angles in turn (OSEM, one sub-iteration per
subset). Subsets interleave the angles (subset `s` holds angles `s, s + n_subsets, ...`) and each is
projected with its own `Geometry(angles=...)`, so a sub-iteration costs `1 / n_subsets` of a full
projection. This is the clinical baseline for image-domain evaluation, not a regularised or
learned reconstruction, and it does not estimate the attenuation, normalisation or background: they are
inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from radon.geometry import Geometry
from radon.pet import checked_sinogram_term, multiplicative_factors
from radon.projector import adjoint, forward
from radon.validation import check_array, check_nonnegative


def fov_mask(geom: Geometry) -> np.ndarray:
    """`(H, W)` float32: 1 for pixels whose centre lies inside the disc every angle sees (`geom.fov_radius_mm`)."""
    x, y = np.meshgrid(geom.x_mm, geom.y_mm)
    return (np.hypot(x, y) <= geom.fov_radius_mm).astype(np.float32)


def angle_subsets(geom: Geometry, n_subsets: int) -> tuple[tuple[tuple[int, ...], Geometry], ...]:
    """Interleaved angle subsets: `(angle indices, sub-geometry with those angles)` for each subset."""
    if not (isinstance(n_subsets, (int, np.integer)) and 1 <= n_subsets <= geom.n_angles):
        raise ValueError(f"n_subsets must be an integer in [1, n_angles = {geom.n_angles}]; got {n_subsets!r}")
    theta = geom.theta
    subsets = []
    for s in range(int(n_subsets)):
        index = tuple(range(s, geom.n_angles, int(n_subsets)))
        sub = Geometry(
            image_shape=geom.image_shape,
            n_angles=len(index),
            n_bins=geom.n_bins,
            pixel_size=geom.pixel_size,
            bin_spacing=geom.bin_spacing,
            angles=tuple(float(theta[i]) for i in index),
        )
        subsets.append((index, sub))
    return tuple(subsets)


def mlem(counts, geom: Geometry, n_iter: int, *, attenuation=None, normalisation=None, background=None, x0=None,
         mask=None):
    """Maximum-likelihood EM reconstruction of `counts` `(..., n_angles, n_bins)` -> activity `(..., H, W)` float32.

    Args:
      counts: measured (or expected) counts, non-negative.
      geom: the geometry of `counts`.
      n_iter: number of full EM iterations (static: each value compiles once; to watch convergence,
        continue from the previous image with `x0`).
      attenuation, normalisation: factors `a`, `eta` of `ybar = eta * a * R(x) + background`; `None` = 1.
        Scalars or arrays ending in `(n_angles, n_bins)` that broadcast against `counts`.
      background: expected randoms + scatter counts, same shapes; `None` = 0.
      x0: non-negative start image `(..., H, W)`; default uniform, with total expected counts equal to
        the measured total minus the background. EM keeps zeros at zero.
      mask: optional `(..., H, W)` support (e.g. `fov_mask(geom)`); the image is zero outside it.

    Returns:
      Activity in the units that make `R(x)` (activity x mm) match the counts.
    """
    whole = ((None, geom),)
    return _reconstruct(counts, geom, n_iter, whole, attenuation, normalisation, background, x0, mask)


def osem(counts, geom: Geometry, n_iter: int, n_subsets: int, *, attenuation=None, normalisation=None,
         background=None, x0=None, mask=None):
    """Ordered-subsets EM: `n_iter` passes over `n_subsets` interleaved angle subsets.

    Same arguments and result as `mlem`; `n_subsets` (static) must be in `[1, n_angles]`. One OSEM
    iteration costs about one MLEM iteration and, on consistent data, advances about `n_subsets` of them.
    """
    subsets = angle_subsets(geom, n_subsets)
    return _reconstruct(counts, geom, n_iter, subsets, attenuation, normalisation, background, x0, mask)


def _reconstruct(counts, geom, n_iter, subsets, attenuation, normalisation, background, x0, mask):
    """Checks the inputs of `mlem`/`osem` and runs the compiled EM loop."""
    check_array(counts, geom.sino_shape, "counts", "(..., n_angles, n_bins)")
    check_nonnegative(counts, "counts")
    if not (isinstance(n_iter, (int, np.integer)) and not isinstance(n_iter, bool) and n_iter >= 0):
        raise ValueError(f"n_iter must be a non-negative integer; got {n_iter!r}")
    factors = multiplicative_factors(geom, attenuation=attenuation, normalisation=normalisation)
    background = None if background is None else checked_sinogram_term(background, geom, "background")
    for name, image in (("x0", x0), ("mask", mask)):
        if image is not None:
            check_array(image, geom.image_shape, name, "(..., H, W)")
            check_nonnegative(image, name)
    return _em(counts, factors, background, x0, mask, geom, subsets, int(n_iter))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _em(counts, factors, background, x0, mask, geom: Geometry, subsets, n_iter: int):
    y = counts.astype(jnp.float32)
    m = jnp.ones(geom.sino_shape, jnp.float32) if factors is None else _as_sinogram(factors, geom)
    b = None if background is None else _as_sinogram(background, geom)

    def take(sino, index):  # the rows of one subset; index None (MLEM) is the whole sinogram
        return sino if index is None else sino[..., np.asarray(index), :]

    parts = [(take(y, i), take(m, i), None if b is None else take(b, i), g) for i, g in subsets]
    sens = [adjoint(m_s, g) for _, m_s, _, g in parts]  # loop invariant: computed once

    if x0 is None:
        x0 = _uniform_start(y, b, sum(sens), mask)
    elif mask is not None:
        x0 = x0 * mask
    x = jnp.asarray(x0, jnp.float32)

    def iteration(_, x):
        for (y_s, m_s, b_s, g), sens_s in zip(parts, sens):
            x = _em_update(x, y_s, m_s, b_s, sens_s, g)
        return x

    return lax.fori_loop(0, n_iter, iteration, x)


def _em_update(x, y, m, b, sens, geom: Geometry):
    """One EM step on one subset: `x * R^T(m * y / ybar) / sens` with `ybar = m R(x) + b`, guarded for zeros."""
    ybar = m * forward(x, geom)
    if b is not None:
        ybar = ybar + b
    ratio = _safe_divide(y, ybar)
    return _safe_divide(x * adjoint(m * ratio, geom), sens)


def _uniform_start(y, b, sens, mask):
    """Uniform image whose expected trues match the measured counts minus background (at least tiny)."""
    support = jnp.ones_like(sens) if mask is None else mask * jnp.ones_like(sens)
    trues = jnp.sum(y, axis=(-2, -1)) - (0.0 if b is None else jnp.sum(b, axis=(-2, -1)))
    level = jnp.maximum(trues, 1e-6) / jnp.maximum(jnp.sum(sens * support, axis=(-2, -1)), 1e-30)
    return level[..., None, None] * support


def _as_sinogram(term, geom: Geometry):
    """A checked sinogram term (scalar or `(..., A, B)`) with explicit trailing `(A, B)` axes."""
    term = jnp.asarray(term, jnp.float32)
    return jnp.broadcast_to(term, geom.sino_shape) if term.ndim == 0 else term


def _safe_divide(num, den):
    """`num / den` where `den > 0`, else 0 (no NaN in values or gradients)."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)
