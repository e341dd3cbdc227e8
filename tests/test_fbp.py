"""radon.fbp: filters against scikit-image, reconstruction error against scikit-image's iradon, units, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.transform as skt
from skimage.data import shepp_logan_phantom
from skimage.transform.radon_transform import _get_fourier_filter  # the reference filter table

import radon
from radon.fbp import filter_table, padded_size
from ellipses import analytic_sinogram

N = 128
GEOM = radon.Geometry((N, N), 180, N)


@functools.lru_cache(maxsize=1)
def _phantom_and_sinograms():
    phantom = skt.resize(shepp_logan_phantom(), (N, N), anti_aliasing=True).astype(np.float64)
    # Each reconstruction gets its own projector's data. scikit-image: degrees, layout (n_bins, n_angles),
    # n_bins = image width with circle=True, rotation centre at pixel N // 2.
    sk_sino = skt.radon(phantom, theta=np.rad2deg(GEOM.theta), circle=True)
    ours_sino = radon.forward(jnp.asarray(phantom, jnp.float32), GEOM)
    return phantom, sk_sino, ours_sino


def _disc(radius_px):
    """Pixels within `radius_px` of both centre conventions (ours (N-1)/2, scikit-image's N // 2)."""
    i, j = np.mgrid[:N, :N]
    return (np.hypot(i - (N - 1) / 2, j - (N - 1) / 2) < radius_px) & (np.hypot(i - N // 2, j - N // 2) < radius_px)


def _mae_ours_and_skimage(filter_name):
    phantom, sk_sino, ours_sino = _phantom_and_sinograms()
    region = _disc(62)
    ours = np.asarray(radon.fbp(ours_sino, GEOM, filter_name))
    sk = skt.iradon(sk_sino, theta=np.rad2deg(GEOM.theta), filter_name=filter_name, circle=True)
    return np.abs(ours - phantom)[region].mean(), np.abs(sk - phantom)[region].mean()


@pytest.mark.parametrize("filter_name", ["ramp", "shepp-logan", "cosine"])
def test_filter_table_matches_scikit_image(filter_name):
    # scikit-image's table is 2|f| (its back-projection divides by 2); ours is |f| in cycles per bin.
    reference = _get_fourier_filter(padded_size(N), filter_name)[:, 0] / 2
    np.testing.assert_allclose(filter_table(N, filter_name), reference, atol=1e-6)


def test_hann_and_hamming_tables_match_scikit_image_windows_closely():
    # scikit-image uses numpy's symmetric windows (period size - 1), we use the periodic ones: the
    # windows differ by at most pi / (2 size) and the ramp is at most 0.5: measured 0.0030 at size 256.
    for name in ("hann", "hamming"):
        ref = _get_fourier_filter(256, name)[:, 0] / 2
        assert np.abs(filter_table(N, name) - ref).max() <= np.pi / (4 * 256)


# Measured MAE inside the disc, ours / scikit-image: ramp 0.0136 / 0.0157, shepp-logan 0.0153 / 0.0174,
# cosine 0.0194 / 0.0213, hann 0.0248 / 0.0262, hamming 0.0238 / 0.0253 (ratios 0.87-0.95). Both pipelines
# start from the phantom: each FBP reconstructs its own projector's sinogram.
@pytest.mark.parametrize("filter_name", radon.FILTERS)
def test_fbp_error_at_most_scikit_image(filter_name):
    ours, sk = _mae_ours_and_skimage(filter_name)
    assert ours <= sk


# Two ellipses in mm (x0, y0, a, b, phi, density): a unit-density body with a half-density insert.
ELLIPSES = np.array([[0.0, 0.0, 40.0, 30.0, 0.3, 1.0], [10.0, -5.0, 8.0, 12.0, 0.0, 0.5]])


@pytest.mark.parametrize(
    "pixel_size, bin_spacing, n_bins, max_dev",
    # max_dev: measured largest interior deviation 0.051, 0.036, 0.073, 0.010, 0.083: ramp ringing of the
    # analytic (not band-limited) edges, largest where bins or pixels are coarse.
    [(1.0, 1.0, 128, 0.07), (0.5, 0.5, 256, 0.05), (2.0, 2.0, 64, 0.1), (1.0, 0.5, 256, 0.02), (0.5, 1.0, 128, 0.12)],
)
def test_units_on_analytic_sinogram(pixel_size, bin_spacing, n_bins, max_dev):
    n = int(round(128 / pixel_size))
    geom = radon.Geometry((n, n), 180, n_bins, pixel_size=pixel_size, bin_spacing=bin_spacing)
    image = np.asarray(radon.fbp(jnp.asarray(analytic_sinogram(ELLIPSES, geom), jnp.float32), geom))
    x, y = np.meshgrid(geom.x_mm, geom.y_mm)
    u, v = x * np.cos(0.3) + y * np.sin(0.3), -x * np.sin(0.3) + y * np.cos(0.3)
    interior = ((u / 36) ** 2 + (v / 26) ** 2 < 1) & (np.hypot(x - 10, y + 5) > 16)  # density 1, 4 mm from edges
    assert abs(image[interior].mean() - 1.0) <= 0.002  # measured <= 4e-4
    assert np.abs(image[interior] - 1.0).max() <= max_dev


def test_same_image_at_half_millimetre_pixels():
    # Scaling every length by 0.5 scales the sinogram by 0.5 and must give back the same image.
    phantom, _, ours_sino = _phantom_and_sinograms()
    half = radon.Geometry((N, N), 180, N, pixel_size=0.5, bin_spacing=0.5)
    sino = radon.forward(jnp.asarray(phantom, jnp.float32), half)
    np.testing.assert_allclose(sino, 0.5 * ours_sino, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(radon.fbp(sino, half), radon.fbp(ours_sino, GEOM), rtol=1e-4, atol=1e-5)


def test_cutoff_removes_frequencies_above_it():
    table = filter_table(N, "hann", 0.5)
    f = np.abs(np.fft.fftfreq(table.shape[0]))
    assert np.all(table[f > 0.25] == 0) and np.all(table[(f > 0) & (f < 0.24)] > 0)
    # A lower cutoff smooths: less error on a noisy sinogram of the phantom.
    phantom, _, sino = _phantom_and_sinograms()
    noisy = sino + jax.random.normal(jax.random.key(0), sino.shape) * 2.0
    region = _disc(62)
    errors = [np.abs(np.asarray(radon.fbp(noisy, GEOM, "ramp", c)) - phantom)[region].mean() for c in (1.0, 0.5)]
    assert errors[1] < 0.8 * errors[0]


def test_batched_and_jit():
    _, _, sino = _phantom_and_sinograms()
    batch = jnp.stack([sino, 2 * sino])[:, None]  # (2, 1, A, B)
    out = jax.jit(radon.fbp, static_argnums=(1, 2, 3))(batch, GEOM, "hann", 0.8)
    assert out.shape == (2, 1, N, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[1, 0], 2 * radon.fbp(sino, GEOM, "hann", 0.8), rtol=1e-5, atol=1e-5)


def test_bad_filter_and_cutoff_raise():
    sino = jnp.zeros(GEOM.sino_shape)
    with pytest.raises(ValueError, match=r"one of \('ramp'.*got 'hanning'"):
        radon.fbp(sino, GEOM, "hanning")
    for cutoff in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            radon.fbp(sino, GEOM, "ramp", cutoff)
    with pytest.raises(ValueError, match="must end in"):
        radon.fbp(jnp.zeros((180, 64)), GEOM)
