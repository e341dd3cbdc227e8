"""Filtered back-projection (FBP): the analytic inverse of `radon.forward` for complete parallel-beam data.

`fbp(sino, geom)` filters every projection along the detector bins in the frequency domain,
interpolates the filtered projections to half-bin spacing (exactly, since they are band-limited), and
back-projects with `radon.adjoint` on a grid of half-size pixels that is then averaged 2 x 2. The finer
back-projection is what keeps FBP at or below scikit-image's `iradon` error (tests/test_fbp.py). It is what the rest of the project uses for quick image-domain views
of sinograms (evaluation, TMA segmentation, the `S - R(FBP(S))` consistency residual); it is not a
statistical reconstruction (see `radon.recon` for MLEM/OSEM) and does no attenuation or scatter
correction.

The ramp is the DFT of the band-limited spatial ramp kernel (Kak & Slaney 1988, ch. 3, eq. 61:
`h[0] = 1/4`, `h[n odd] = -1/(pi n)^2`, zero for even `n`), not the sampled `|f|`, which zeroes the DC term and
biases the reconstruction. Filter tables are computed in float64 numpy once per `(n_bins, filter,
cutoff)` and enter the program as constants.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from radon.geometry import Geometry
from radon.projector import adjoint
from radon.validation import check_array

FILTERS = ("ramp", "shepp-logan", "cosine", "hann", "hamming")


def padded_size(n_bins: int) -> int:
    """FFT length: the smallest power of two >= `2 * n_bins` (and >= 64), so the circular convolution
    of the zero-padded projection with the ramp kernel does not wrap around onto the data."""
    return max(64, 1 << math.ceil(math.log2(2 * n_bins)))


def _window(nu: np.ndarray, filter: str) -> np.ndarray:
    """Apodisation window at `nu = |f| / (cutoff * Nyquist)` in [0, 1] (zero above 1 is applied by the caller)."""
    if filter == "ramp":
        return np.ones_like(nu)
    if filter == "shepp-logan":
        return np.sinc(nu / 2)  # numpy sinc(x) = sin(pi x) / (pi x)
    if filter == "cosine":
        return np.cos(np.pi * nu / 2)
    if filter == "hann":
        return 0.5 + 0.5 * np.cos(np.pi * nu)
    return 0.54 + 0.46 * np.cos(np.pi * nu)  # hamming


@functools.lru_cache(maxsize=64)
def filter_table(n_bins: int, filter: str = "ramp", cutoff: float = 1.0) -> np.ndarray:
    """Frequency response `(padded_size(n_bins),)` float32, in numpy FFT order, in cycles per bin.

    The ramp part is `|f|` (up to the band-limiting correction of the spatial kernel) for `f` in cycles
    per bin, so 0.5 at Nyquist; the window scales its cutoff to `cutoff * Nyquist` and is zero above it.
    """
    _check_filter(filter, cutoff)
    size = padded_size(n_bins)
    n = np.arange(size)
    lag = np.minimum(n, size - n)  # circular distance from tap 0
    kernel = np.where(lag % 2 == 1, -1.0 / (np.pi * np.maximum(lag, 1)) ** 2, 0.0)
    kernel[0] = 0.25
    ramp = np.real(np.fft.fft(kernel))
    nu = np.abs(np.fft.fftfreq(size)) / (0.5 * cutoff)
    response = np.where(nu <= 1.0, ramp * _window(np.minimum(nu, 1.0), filter), 0.0)
    return response.astype(np.float32)


def filter_sinogram(sino, geom: Geometry, filter: str = "ramp", cutoff: float = 1.0):
    """Ramp-filter every projection along its bins: `(..., n_angles, n_bins)` -> same shape, float32.

    Zero padding to `padded_size(n_bins)` bins, multiplication by `filter_table`, and cropping back. The
    result is per bin (not per mm): `fbp` supplies the geometric scale.
    """
    check_array(sino, geom.sino_shape, "sinogram", "(..., n_angles, n_bins)")
    _check_filter(filter, cutoff)
    return _filter_sinogram(sino, geom.n_bins, filter, float(cutoff))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _filter_sinogram(sino, n_bins: int, filter: str, cutoff: float):
    table = jnp.asarray(filter_table(n_bins, filter, cutoff))
    spectrum = jnp.fft.rfft(sino.astype(jnp.float32), n=table.shape[0], axis=-1)
    half = table[: spectrum.shape[-1]]  # the table is even in f, so its first half serves rfft
    return jnp.fft.irfft(spectrum * half, n=table.shape[0], axis=-1)[..., :n_bins]


def fbp(sino, geom: Geometry, filter: str = "ramp", cutoff: float = 1.0):
    """Filtered back-projection of `sino` `(..., n_angles, n_bins)` -> image `(..., H, W)` float32.

    Inverts `radon.forward`: `fbp(forward(x, geom), geom) ~= x` (activity per pixel) for angles
    spread evenly over `[0, pi)`, any `pixel_size`/`bin_spacing` in mm.

    Args:
      sino: line integrals in activity x mm.
      geom: the geometry the sinogram was measured in.
      filter: one of `radon.fbp.FILTERS` ("ramp", "shepp-logan", "cosine", "hann", "hamming").
      cutoff: frequency cutoff as a fraction of Nyquist, in (0, 1]; lower values smooth more.
    """
    check_array(sino, geom.sino_shape, "sinogram", "(..., n_angles, n_bins)")
    _check_filter(filter, cutoff)
    return _fbp(sino, geom, filter, float(cutoff))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fbp(sino, geom: Geometry, filter: str, cutoff: float):
    table = jnp.asarray(filter_table(geom.n_bins, filter, cutoff))
    size = table.shape[0]
    spectrum = jnp.fft.rfft(sino.astype(jnp.float32), n=size, axis=-1) * table[: size // 2 + 1]
    # Band-limited interpolation of the filtered projections to half-bin spacing: the filtered data
    # hold no frequency above Nyquist, so zero-extending the spectrum is exact, and the back-projection
    # below then reads them with a linear interpolation half as wide. The fine bins sit a quarter bin
    # before each coarse bin and a quarter bin after it.
    freq = np.fft.rfftfreq(size)  # cycles per bin
    shift = np.exp(2j * np.pi * freq * -0.25)
    shift[-1] *= 0.5  # the old Nyquist term is split between +f and -f of the finer signal
    fine = jnp.fft.irfft(spectrum * shift, n=2 * size, axis=-1)[..., : 2 * geom.n_bins] * 2.0
    # Back-project on a grid of half-size pixels, then average each 2 x 2 block: the pixel's mean over
    # its area, as an activity image is defined.
    H, W = geom.image_shape
    fine_geom = Geometry((2 * H, 2 * W), geom.n_angles, 2 * geom.n_bins, geom.pixel_size / 2, geom.bin_spacing / 2,
                         angles=tuple(geom.theta))
    # Continuous FBP is x = int_0^pi (p * h)(x.theta) dtheta with h the ramp in cycles per mm. The
    # table is in cycles per bin, i.e. (p * h) = filtered / bin_spacing; `adjoint` on the fine grid
    # interpolates with total weight (pixel_size/2)^2 / (bin_spacing/2) per pixel and angle, and
    # dtheta = pi / n_angles.
    scale = 2.0 * np.pi / (geom.n_angles * geom.pixel_size**2)
    image = adjoint(fine, fine_geom) * scale
    image = image.reshape(image.shape[:-2] + (H, 2, W, 2)).mean(axis=(-3, -1))
    return image.astype(sino.dtype if jnp.issubdtype(sino.dtype, jnp.floating) else jnp.float32)


def _check_filter(filter, cutoff) -> None:
    if filter not in FILTERS:
        raise ValueError(f"fbp filter must be one of {FILTERS}; got {filter!r}")
    if not isinstance(cutoff, (int, float, np.floating, np.integer)) or not (0.0 < float(cutoff) <= 1.0):
        raise ValueError(f"fbp cutoff must be a fraction of Nyquist in (0, 1]; got {cutoff!r}")
