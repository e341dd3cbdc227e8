"""Random ellipse phantoms with closed-form Radon transforms: the analytic reference for projector tests."""

from __future__ import annotations

import numpy as np

import radon


def random_ellipses(rng: np.random.Generator, n: int, fov_radius_mm: float) -> np.ndarray:
    """`(n, 6)` rows `(x0, y0, a, b, phi, density)` of ellipses that lie inside the disc of `fov_radius_mm`."""
    rows = []
    while len(rows) < n:
        a, b = rng.uniform(0.08, 0.45, size=2) * fov_radius_mm
        r = rng.uniform(0, 0.9 * fov_radius_mm - max(a, b))
        if r < 0:
            continue
        t = rng.uniform(0, 2 * np.pi)
        rows.append((r * np.cos(t), r * np.sin(t), a, b, rng.uniform(0, np.pi), rng.uniform(0.2, 1.0)))
    return np.array(rows)


def rasterise(ellipses: np.ndarray, geom: radon.Geometry, supersample: int = 8) -> np.ndarray:
    """Area-fraction rasterisation: each pixel is the mean density over `supersample**2` sub-points."""
    H, W = geom.image_shape
    p = geom.pixel_size
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    x = (geom.x_mm[None, :, None, None] + offs[None, None, None, :] * p)
    y = (geom.y_mm[:, None, None, None] - offs[None, None, :, None] * p)
    image = np.zeros((H, W, supersample, supersample))
    for x0, y0, a, b, phi, rho in ellipses:
        c, s = np.cos(phi), np.sin(phi)
        u = (x - x0) * c + (y - y0) * s
        v = -(x - x0) * s + (y - y0) * c
        image += rho * ((u / a) ** 2 + (v / b) ** 2 <= 1.0)
    return image.mean(axis=(2, 3))


def analytic_sinogram(ellipses: np.ndarray, geom: radon.Geometry) -> np.ndarray:
    """Exact line integrals `(n_angles, n_bins)` of the ellipses along `x cos(theta) + y sin(theta) = s`."""
    theta = geom.theta[:, None]
    s = geom.s_mm[None, :]
    sino = np.zeros(geom.sino_shape)
    for x0, y0, a, b, phi, rho in ellipses:
        a2 = (a * np.cos(theta - phi)) ** 2 + (b * np.sin(theta - phi)) ** 2
        d = s - (x0 * np.cos(theta) + y0 * np.sin(theta))
        sino += np.where(d**2 < a2, 2 * rho * a * b * np.sqrt(np.maximum(a2 - d**2, 0)) / a2, 0.0)
    return sino
