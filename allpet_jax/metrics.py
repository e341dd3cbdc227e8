"""Evaluation metrics for ALL-PET (DESIGN.md 2.7): paired image/sinogram scores, lesion scores, and the
physics consistency and sample statistics of generated sinograms.

What it is for: numbers in evaluation tables and validation logs. Every function is pure and works on
a batch along the leading axis; all but `sinogram_features`, `frechet_distance` and
`sample_statistics_distance` (which need float64 linear algebra in scipy) are `jax.numpy` and can run
under `jit`. What it is not: a loss (nothing here is meant to be differentiated), a reconstruction
(`radon.fbp`, `radon.osem`), or a plotting tool.

- Paired scores, any array `(B, ...)` (sinograms or images): `psnr`, `nrmse`; `ssim` on 2-D images
  `(B, H, W)` or `(B, C, H, W)`.
- Lesion scores from a phantom label map (`allpet_jax.data.phantoms.LABELS`): `lesion_regions`,
  `contrast_recovery`, `lesion_roi_error`.
- Synthesis consistency of sinograms `(..., n_angles, n_bins)`: `helgason_ludwig_residual` (the moment
  conditions of the range of the Radon transform), `range_residual` (`S - R(FBP(S))`),
  `negative_fraction`; and `sample_statistics_distance`, the Frechet distance between Gaussians
  fitted to `sinogram_features` of a generated and a reference set.
- A posterior judged as a posterior, from `K` samples `(K, B, ...)` against the truth `(B, ...)`:
  `crps_ensemble` (per bin, averaged per sample), `interval_coverage` (of the central interval) with
  `calibrated_coverage`, what a calibrated `K`-member ensemble scores, and `spread_error_correlation`.
- Comparing methods on one test set: `paired_bootstrap_ci`, the percentile bootstrap interval of the
  mean per-sample difference (numpy in float64, resampling indices from an explicit `jax.random` key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

import radon
from allpet_jax.data.phantoms import LABEL_IDS, LABELS
from radon.validation import check_array

# SSIM constants of Wang et al. 2004, as in scikit-image's `structural_similarity` with
# `gaussian_weights=True`: an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma).
SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_TRUNCATE = 0.01, 0.03, 1.5, 3.5

LESION_KINDS = ("hot", "cold")
"""Lesion kinds scored separately; kind `k` is label `lesion_{k}`."""

FEATURES = (
    "total", "angular_variation", "radial_offset", "radial_width", "peak_to_mean", "roughness_bins",
    "roughness_angles", "negative_fraction",
)
"""Names of the per-sinogram summary features of `sinogram_features`, in order."""


# ---------------------------------------------------------------------------------------------------
# Paired scores


def psnr(pred, target, data_range=None):
    """Peak signal-to-noise ratio in dB per sample: `(B, ...)` x 2 -> `(B,)`.

    `PSNR = 10 log10(R^2 / MSE)`, `MSE = mean((pred - target)^2)` over all but the leading axis. The
    data range `R` is, by default, the per-sample range of the target, `max(target) - min(target)`
    (so the score does not depend on the count level); pass `data_range` (a scalar or `(B,)`) to fix
    it, e.g. to a dataset-wide peak. Identical inputs give `+inf`; a constant target has `R = 0` by
    default, giving `-inf` (pass `data_range`). Matches `skimage.metrics.peak_signal_noise_ratio(target,
    pred, data_range=R)` per sample.
    """
    pred, target = _paired("psnr", pred, target, "(B, ...)")
    axes = tuple(range(1, target.ndim))
    mse = jnp.mean((pred - target) ** 2, axis=axes)
    r = _data_range("psnr", target, data_range)
    return 10.0 * jnp.log10(r**2 / mse)


def nrmse(pred, target):
    """Normalised root-mean-square error per sample: `||pred - target|| / ||target||`, `(B, ...)` -> `(B,)`.

    Euclidean norms over all but the leading axis; the target is the reference. This is
    `skimage.metrics.normalized_root_mse(target, pred, normalization="euclidean")` (scikit-image takes
    the reference first). A zero target gives `inf` (or `nan` if `pred` is zero too).
    """
    pred, target = _paired("nrmse", pred, target, "(B, ...)")
    axes = tuple(range(1, target.ndim))
    return jnp.sqrt(jnp.sum((pred - target) ** 2, axis=axes) / jnp.sum(target**2, axis=axes))


def ssim(pred, target, data_range=None):
    """Structural similarity per sample of 2-D images `(B, H, W)` or `(B, C, H, W)` -> `(B,)`.

    Wang et al. 2004 with Gaussian weights, as `skimage.metrics.structural_similarity(target, pred,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R)` (with `channel_axis=0`
    for `C` channels, whose scores are averaged):

        SSIM(x, y) = mean over pixels of (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))

    with local means, variances and covariance under an 11 x 11 Gaussian window (sigma 1.5 pixels,
    truncated at 3.5 sigma, normalised), `C1 = (0.01 R)^2`, `C2 = (0.03 R)^2`. As in scikit-image the
    mean runs only over pixels whose whole window lies inside the image (a 5-pixel border is left out),
    so no boundary rule is involved. `R` defaults to the per-sample range of the target (all channels),
    `max(target) - min(target)`; pass `data_range` (a scalar or `(B,)`) to fix it. Images need
    `H, W >= 11`.
    """
    pred, target = _paired("ssim", pred, target, "(B, H, W) or (B, C, H, W)")
    if target.ndim not in (3, 4):
        raise ValueError(
            f"ssim takes 2-D images laid out (B, H, W) or (B, C, H, W); got shape {target.shape}. "
            "Reshape extra axes into B or C."
        )
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE)
    if min(target.shape[-2:]) < taps.size:
        raise ValueError(
            f"ssim needs images of at least {taps.size} x {taps.size} pixels (the Gaussian window); "
            f"got (H, W) = {target.shape[-2:]}"
        )
    r = _data_range("ssim", target, data_range)[:, None, None, None]
    x = pred if pred.ndim == 4 else pred[:, None]
    y = target if target.ndim == 4 else target[:, None]
    # Variances and the covariance are differences of window means; computing them on the images less
    # their own means keeps those differences accurate in float32 whatever the activity offset.
    x_mean = jnp.mean(x, axis=(-2, -1), keepdims=True)
    y_mean = jnp.mean(y, axis=(-2, -1), keepdims=True)
    xc, yc = x - x_mean, y - y_mean
    mu_xc, mu_yc = _filter_valid(xc, taps), _filter_valid(yc, taps)
    var_x = _filter_valid(xc * xc, taps) - mu_xc**2
    var_y = _filter_valid(yc * yc, taps) - mu_yc**2
    cov = _filter_valid(xc * yc, taps) - mu_xc * mu_yc
    mu_x, mu_y = mu_xc + x_mean, mu_yc + y_mean
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
    """The normalised 1-D Gaussian of `scipy.ndimage.gaussian_filter`: radius `int(truncate * sigma + 0.5)`."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _filter_valid(x, taps: np.ndarray):
    """Separable correlation of `(..., H, W)` with `taps` on both image axes, 'valid' part only:
    `(..., H - n + 1, W - n + 1)` for `n` taps."""
    n = taps.size
    H, W = x.shape[-2:]
    x = sum(float(w) * x[..., k:k + H - n + 1, :] for k, w in enumerate(taps))
    return sum(float(w) * x[..., k:k + W - n + 1] for k, w in enumerate(taps))


def _paired(name, pred, target, layout):
    pred, target = _float(pred), _float(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred and target must have the same shape {layout}; got pred {pred.shape} and target "
            f"{target.shape}"
        )
    if target.ndim < 2:
        raise ValueError(
            f"{name} scores a batch laid out {layout}, leading axis = samples; got shape {target.shape}. "
            "Add a batch axis (x[None]) for one sample."
        )
    return pred, target


def _data_range(name, target, data_range):
    """`(B,)` data range: the per-sample target range by default, else `data_range` broadcast to `(B,)`."""
    B = target.shape[0]
    if data_range is None:
        axes = tuple(range(1, target.ndim))
        return jnp.max(target, axis=axes) - jnp.min(target, axis=axes)
    if np.shape(data_range) not in ((), (B,)):
        raise ValueError(
            f"{name}: data_range must be a scalar or one value per sample, shape ({B},); got shape "
            f"{np.shape(data_range)}"
        )
    return jnp.broadcast_to(jnp.asarray(data_range, target.dtype), (B,))


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------------
# Lesion scores


def lesion_regions(labels, kind: str, ring_px: int = 3):
    """The lesion and background masks of one lesion kind in a label map `(..., H, W)` -> two bool `(..., H, W)`.

    - lesion: the pixels labelled `lesion_{kind}` (all lesions of the kind pooled into one region).
    - background: the host tissue around them: pixels within `ring_px` pixels (Euclidean distance
      between pixel centres) of a lesion pixel of this kind, that are not lesion (of either kind), and
      whose label is one of the tissue classes touching the lesions, i.e. found among the 8-neighbours
      of a lesion pixel, other than `background` (air/outside the body) and the lesion labels. So a
      liver lesion near the liver edge is compared with liver, not with the fat beyond it, unless it
      touches the fat itself.
    Both masks are empty where the phantom has no lesion of the kind.
    """
    if kind not in LESION_KINDS:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS}; got {kind!r}")
    if not isinstance(ring_px, (int, np.integer)) or isinstance(ring_px, bool) or ring_px < 1:
        raise ValueError(f"ring_px must be a positive whole number of pixels; got {ring_px!r}")
    labels = jnp.asarray(labels)
    if labels.ndim < 2 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be an integer label map (..., H, W) of phantoms.LABELS ids; got shape {labels.shape} "
            f"and dtype {labels.dtype}"
        )
    lesion = labels == LABEL_IDS[f"lesion_{kind}"]
    any_lesion = (labels == LABEL_IDS["lesion_hot"]) | (labels == LABEL_IDS["lesion_cold"])
    shell = _dilate(lesion, 1, euclidean=False) & ~any_lesion
    classes = labels[..., None] == jnp.arange(len(LABELS))  # (..., H, W, n_labels) one-hot
    touching = jnp.any(classes & shell[..., None], axis=(-3, -2))  # (..., n_labels)
    excluded = np.isin(np.arange(len(LABELS)), [LABEL_IDS[n] for n in ("background", "lesion_hot", "lesion_cold")])
    touching = touching & ~excluded
    host = jnp.any(classes & touching[..., None, None, :], axis=-1)
    background = _dilate(lesion, ring_px, euclidean=True) & ~any_lesion & host
    return lesion, background


def contrast_recovery(recon, truth, labels, ring_px: int = 3):
    """Lesion contrast recovery per kind: `{"hot": (...), "cold": (...)}`.

        CR = (mean_recon(lesion) / mean_recon(bg) - 1) / (mean_truth(lesion) / mean_truth(bg) - 1)

    with the lesion and background regions of `lesion_regions(labels, kind, ring_px)`. 1 is perfect
    recovery; below 1 the contrast is lost (blur, smoothing), above 1 it is exaggerated; for cold lesions
    both ratios are below 1 and CR reads the same way. NaN where the phantom has no lesion of the kind.

    Args:
      recon: reconstructed activity `(..., H, W)` (e.g. FBP of a predicted sinogram).
      truth: true activity `(..., H, W)` (`simulate_pair`'s `image`).
      labels: int label map whose shape broadcasts against `recon` (`(H, W)` for all, `(B, 1, H, W)` for a
        batch of `(B, C, H, W)`); `simulate_pair`'s `labels`.
      ring_px: background ring width in pixels.
    Returns `(...)` float arrays, the broadcast of the leading shapes.
    """
    recon, truth, labels = _lesion_inputs("contrast_recovery", recon, truth, labels)
    out = {}
    for kind in LESION_KINDS:
        lesion, background = lesion_regions(labels, kind, ring_px)
        recon_ratio = _masked_mean(recon, lesion) / _masked_mean(recon, background)
        truth_ratio = _masked_mean(truth, lesion) / _masked_mean(truth, background)
        out[kind] = (recon_ratio - 1.0) / (truth_ratio - 1.0)
    return out


def lesion_roi_error(recon, truth, labels, kind: str | None = None):
    """Absolute relative error of the mean activity inside the lesions, `(...)`.

    For one kind, `|mean_recon(lesion) / mean_truth(lesion) - 1|` over the pixels labelled
    `lesion_{kind}` (a kind's lesions pooled), NaN where there is none. With `kind=None` (default), the
    mean of that error over the kinds the phantom has (NaN if it has no lesion). Shapes as in
    `contrast_recovery`.
    """
    if kind is not None and kind not in LESION_KINDS:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS} or None (their mean); got {kind!r}")
    recon, truth, labels = _lesion_inputs("lesion_roi_error", recon, truth, labels)
    errors = []
    for k in LESION_KINDS if kind is None else (kind,):
        lesion = labels == LABEL_IDS[f"lesion_{k}"]
        errors.append(jnp.abs(_masked_mean(recon, lesion) / _masked_mean(truth, lesion) - 1.0))
    return jnp.nanmean(jnp.stack(errors), axis=0)


def _dilate(mask, radius: int, euclidean: bool):
    """Binary dilation of `(..., H, W)` by a disc (`euclidean`) or a square of `radius` pixels; outside is False."""
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if not euclidean or dy * dy + dx * dx <= radius * radius]
    H, W = mask.shape[-2:]
    pad = [(0, 0)] * (mask.ndim - 2) + [(radius, radius), (radius, radius)]
    padded = jnp.pad(mask, pad)
    out = jnp.zeros_like(mask)
    for dy, dx in offsets:
        out = out | padded[..., radius + dy:radius + dy + H, radius + dx:radius + dx + W]
    return out


def _masked_mean(x, mask):
    """Mean of `x` over `mask` on the last two axes (broadcasting); NaN where the mask is empty."""
    count = jnp.sum(mask, axis=(-2, -1))
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=(-2, -1))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def _lesion_inputs(name, recon, truth, labels):
    recon, truth, labels = _float(recon), _float(truth), jnp.asarray(labels)
    if recon.shape != truth.shape or recon.ndim < 2:
        raise ValueError(
            f"{name}: recon and truth must be activity images of one shape (..., H, W); got recon {recon.shape} "
            f"and truth {truth.shape}"
        )
    try:
        np.broadcast_shapes(labels.shape, recon.shape)
    except ValueError:
        raise ValueError(
            f"{name}: labels {labels.shape} must broadcast against the images {recon.shape} (e.g. (H, W) for all, "
            "or (B, 1, H, W) for images (B, C, H, W))"
        ) from None
    if labels.shape[-2:] != recon.shape[-2:]:
        raise ValueError(f"{name}: labels must have the images' (H, W) = {recon.shape[-2:]}; got {labels.shape}")
    return recon, truth, labels


# ---------------------------------------------------------------------------------------------------
# Synthesis: physics consistency


def helgason_ludwig_residual(sino, geom: radon.Geometry, max_order: int = 4):
    """How far a sinogram is from satisfying the Helgason-Ludwig consistency conditions, per order.

    For the Radon transform `p` of any image, the moment of order `n`,
    `M_n(theta) = sum_k s_k^n p(theta, s_k) ds`, is a homogeneous polynomial of degree `n` in
    `(cos theta, sin theta)`, i.e. a combination of `cos(k theta)` and `sin(k theta)` for `k <= n`,
    `k = n mod 2` (`n + 1` functions). For each order the moments over the geometry's angles are fitted
    by least squares with those functions, and the residual is normalised:

        r_n = ||M_n - fit_n|| / ||A_n||,   A_n(theta) = sum_k |s_k|^n |p(theta, s_k)| ds

    (norms over angles). `A_n` bounds `|M_n|` and equals it for even `n` and non-negative `p`; unlike
    `M_n` it does not vanish for odd `n` when the object is centred, so `r_n` is always well defined
    (0 for a zero sinogram). `s` is measured in units of the detector half-width, which changes no
    `r_n`. Exact line integrals give `r_n` of the order of the discretisation error of the sums;
    inconsistent data (angles out of order, angle-dependent gains, structure no image could make)
    give a large one.

    Args:
      sino: `(..., n_angles, n_bins)` line integrals.
      geom: the geometry they were measured in (bin positions and angles).
      max_order: highest moment order; needs `n_angles > max_order + 1`.
    Returns `{"orders": (..., max_order + 1), "mean": (...)}`: `r_0..r_max_order` and their mean.
    """
    check_array(sino, geom.sino_shape, "sinogram", "(..., n_angles, n_bins)")
    if not isinstance(max_order, (int, np.integer)) or isinstance(max_order, bool) or max_order < 0:
        raise ValueError(f"max_order must be a non-negative integer; got {max_order!r}")
    if geom.n_angles <= max_order + 1:
        raise ValueError(
            f"helgason_ludwig_residual fits {max_order + 1} functions of the angle at order {max_order}, so it "
            f"needs more angles than that; got n_angles = {geom.n_angles}. Lower max_order."
        )
    sino = _float(sino)
    s = geom.s_mm / (0.5 * geom.n_bins * geom.bin_spacing)
    orders = np.arange(max_order + 1)
    powers = jnp.asarray(s[None, :] ** orders[:, None], sino.dtype)  # (n_orders, n_bins)
    moments = jnp.einsum("...ab,nb->...na", sino, powers)  # (..., n_orders, n_angles)
    bound = jnp.einsum("...ab,nb->...na", jnp.abs(sino), jnp.abs(powers))
    residual = jnp.einsum("nac,...nc->...na", jnp.asarray(_hl_residual_projectors(geom, max_order), sino.dtype),
                          moments)
    norm = jnp.linalg.norm(bound, axis=-1)
    r = jnp.where(norm > 0, jnp.linalg.norm(residual, axis=-1) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return {"orders": r, "mean": jnp.mean(r, axis=-1)}


def _hl_residual_projectors(geom: radon.Geometry, max_order: int) -> np.ndarray:
    """`(max_order + 1, n_angles, n_angles)`: for each order `n`, `I - Q Q^T`, with `Q` an orthonormal
    basis of the allowed moment functions of `n` sampled at the geometry's angles."""
    theta = geom.theta
    out = []
    for n in range(max_order + 1):
        ks = range(n % 2, n + 1, 2)
        cols = [np.cos(k * theta) for k in ks] + [np.sin(k * theta) for k in ks if k > 0]
        basis = np.stack(cols, axis=1)  # (n_angles, n + 1)
        q, rr = np.linalg.qr(basis)
        if np.min(np.abs(np.diag(rr))) < 1e-8 * np.max(np.abs(np.diag(rr))):
            raise ValueError(
                f"helgason_ludwig_residual: the geometry's angles cannot tell apart the {n + 1} moment functions "
                f"of order {n} (too few distinct angles in [0, pi)); lower max_order or use more angles"
            )
        out.append(np.eye(geom.n_angles) - q @ q.T)
    return np.stack(out)


def range_residual(sino, geom: radon.Geometry, filter: str = "ramp"):
    """Distance of a sinogram from the range of the projector: `||S - R(FBP(S))|| / ||S||` per sinogram.

    `R = radon.forward`, `FBP = radon.fbp(., geom, filter)`; norms over `(n_angles, n_bins)`. For data in
    the range (the projection of an image inside the field of view) `R(FBP(S)) ~ S` up to the
    discretisation of both operators (a few percent, more for sharp edges); components no image can
    produce (noise, inconsistent angles) are largely removed by FBP and come back in the residual.
    `sino` `(..., n_angles, n_bins)` -> `(...)`; 0 for a zero sinogram.
    """
    check_array(sino, geom.sino_shape, "sinogram", "(..., n_angles, n_bins)")
    sino = _float(sino)
    reprojected = radon.forward(radon.fbp(sino, geom, filter), geom)
    norm = jnp.linalg.norm(sino, axis=(-2, -1))
    diff = jnp.linalg.norm(sino - reprojected, axis=(-2, -1))
    return jnp.where(norm > 0, diff / jnp.where(norm > 0, norm, 1.0), 0.0)


def negative_fraction(sino):
    """Fraction of the absolute mass that is negative, `sum(max(-x, 0)) / sum(|x|)`, per sample.

    `(B, ...)` -> `(B,)` (sums over all but the leading axis); 0 for an all-zero sample. Expected counts
    are non-negative; corrected noisy data are slightly negative in low-count bins.
    """
    x = _float(sino)
    if x.ndim < 2:
        raise ValueError(f"negative_fraction scores a batch (B, ...); got shape {x.shape}. Add a batch axis.")
    axes = tuple(range(1, x.ndim))
    total = jnp.sum(jnp.abs(x), axis=axes)
    negative = jnp.sum(jnp.maximum(-x, 0.0), axis=axes)
    return jnp.where(total > 0, negative / jnp.where(total > 0, total, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------
# Synthesis: sample statistics


def sinogram_features(sino) -> np.ndarray:
    """Summary features of each sinogram, `(..., n_angles, n_bins)` -> float64 `(..., len(FEATURES))`.

    With `P(theta) = sum_s p` the projection totals, `s` in [-1, 1] across the detector, `w = max(p, 0)`,
    and `m = mean |p|`:
    - `total`: `mean_theta P` (the counts; constant over angles for consistent data);
    - `angular_variation`: `std_theta P / |mean_theta P|`;
    - `radial_offset`: `mean_theta |c(theta)|`, `c` the `w`-weighted centroid in `s` of each projection
      (how far off-centre the activity is);
    - `radial_width`: `mean_theta` of the `w`-weighted standard deviation in `s` (how wide it is);
    - `peak_to_mean`: `max p / m`;
    - `roughness_bins`, `roughness_angles`: mean absolute difference between neighbouring bins, or
      neighbouring angles, over `m` (noise and sharp structure);
    - `negative_fraction`: as `negative_fraction`.
    Ratios with a zero denominator are 0.
    """
    p = np.asarray(sino, dtype=np.float64)
    if p.ndim < 2 or min(p.shape[-2:]) < 2:
        raise ValueError(f"sinogram_features takes sinograms (..., n_angles, n_bins), each at least 2 x 2; got {p.shape}")
    s = np.linspace(-1.0, 1.0, p.shape[-1])
    totals = p.sum(axis=-1)
    total = totals.mean(axis=-1)
    w = np.maximum(p, 0.0)
    w_sum = w.sum(axis=-1)
    centre = _safe_ratio((w * s).sum(axis=-1), w_sum)
    spread = np.sqrt(np.maximum(_safe_ratio((w * s**2).sum(axis=-1), w_sum) - centre**2, 0.0))
    m = np.abs(p).mean(axis=(-2, -1))
    features = [
        total,
        _safe_ratio(totals.std(axis=-1), np.abs(total)),
        np.abs(centre).mean(axis=-1),
        spread.mean(axis=-1),
        _safe_ratio(p.max(axis=(-2, -1)), m),
        _safe_ratio(np.abs(np.diff(p, axis=-1)).mean(axis=(-2, -1)), m),
        _safe_ratio(np.abs(np.diff(p, axis=-2)).mean(axis=(-2, -1)), m),
        _safe_ratio(np.maximum(-p, 0.0).sum(axis=(-2, -1)), np.abs(p).sum(axis=(-2, -1))),
    ]
    return np.stack(features, axis=-1)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein squared) distance between Gaussians `N(mu1, cov1)` and `N(mu2, cov2)`:

        ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))

    in float64 with `scipy.linalg.sqrtm`; the tiny imaginary part sqrtm can return is dropped and the
    result clipped at 0 against rounding.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means (d,) and covariances (d, d) of one d; got mu1 {mu1.shape}, cov1 "
            f"{cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}"
        )
    cross = np.real(scipy.linalg.sqrtm(cov1 @ cov2))
    value = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(cross)
    return max(float(value), 0.0)


def sample_statistics_distance(generated, reference) -> float:
    """Distance between a set of generated sinograms and a reference set, from their summary statistics.

    Each set `(N, ..., n_angles, n_bins)` (the same trailing shape; channels are kept apart) is mapped
    to `sinogram_features`, flattened to `(N, F)`. Every feature is divided by the root mean of its two
    within-set variances (1 where both are 0), so the distance is unit-free, does not saturate, and is
    symmetric in its arguments. The result is `frechet_distance` between the Gaussians fitted to the
    two sets (sample mean, sample covariance): 0 for identical sets, and for two samples of one
    distribution a small positive bias of order `F^2 / N`, so compare sets of equal sizes, `N >> F`.
    """
    g, r = np.asarray(generated), np.asarray(reference)
    if g.ndim < 3 or g.shape[1:] != r.shape[1:]:
        raise ValueError(
            f"sample_statistics_distance takes two sets of sinograms (N, ..., n_angles, n_bins) with the same "
            f"shape after N; got generated {g.shape} and reference {r.shape}"
        )
    if g.shape[0] < 2 or r.shape[0] < 2:
        raise ValueError(f"each set needs at least 2 sinograms to fit a covariance; got {g.shape[0]} and {r.shape[0]}")
    return feature_frechet_distance(sinogram_features(g).reshape(g.shape[0], -1),
                                    sinogram_features(r).reshape(r.shape[0], -1))


def feature_frechet_distance(generated_features, reference_features) -> float:
    """`frechet_distance` between the Gaussians of two feature sets `(N, F)`, `(M, F)`, every feature divided
    by the root mean of its two within-set variances (1 where both are 0): unit-free and symmetric."""
    fg, fr = np.asarray(generated_features, np.float64), np.asarray(reference_features, np.float64)
    scale = np.sqrt(0.5 * (fg.var(axis=0, ddof=1) + fr.var(axis=0, ddof=1)))
    scale = np.where(scale > 0, scale, 1.0)
    fg, fr = fg / scale, fr / scale
    return frechet_distance(fg.mean(0), np.cov(fg, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))


def body_shape_features(images, threshold: float = 0.25) -> np.ndarray:
    """Body size and shape of each image `(N, H, W)` (e.g. the FBP of a sinogram) -> `(N, 3)` float64:
    the body's area as a fraction of the image, its elongation `sqrt(l_max / l_min)` (`l` the eigenvalues
    of the body pixels' coordinate covariance) and its centroid's distance from the centre (in image
    sides). The body is the pixels above `threshold` times the image's 99th percentile (a robust peak, so
    one hot lesion does not shrink the body). These tell a brain (small, round, in a 256 mm field) from
    a body region (large, wide, in 600 mm), and a chest from an abdomen, without a learned network."""
    x = np.asarray(images, np.float64)
    if x.ndim != 3:
        raise ValueError(f"body_shape_features takes images (N, H, W); got shape {x.shape}")
    N, H, W = x.shape
    yy, xx = np.meshgrid((np.arange(H) - (H - 1) / 2) / H, (np.arange(W) - (W - 1) / 2) / W, indexing="ij")
    out = np.zeros((N, 3))
    for i, im in enumerate(x):
        body = im > threshold * max(np.percentile(im, 99), 1e-12)
        if body.sum() < 2:
            continue
        coords = np.stack([yy[body], xx[body]])
        cov = np.cov(coords)
        lo, hi = np.clip(np.linalg.eigvalsh(cov), 1e-12, None)
        out[i] = body.mean(), np.sqrt(hi / lo), np.hypot(*coords.mean(axis=1))
    return out


def prompt_matches(features, labels, reference_features, reference_labels) -> np.ndarray:
    """Per sample `(N,)` bool: whether its nearest reference-class centroid (features z-scored by the
    reference's pooled within-class standard deviation) is its own label. The mean is how often a
    generated sinogram looks like the class its prompt asked for. `features` `(N, F)` with integer `labels` `(N,)`; the
    reference `(M, F)`, `(M,)` holds real samples of every label in `labels`."""
    f, r = np.asarray(features, np.float64), np.asarray(reference_features, np.float64)
    labels, reference_labels = np.asarray(labels), np.asarray(reference_labels)
    classes = np.unique(reference_labels)
    missing = set(np.unique(labels).tolist()) - set(classes.tolist())
    if missing:
        raise ValueError(f"prompt_matches: labels {sorted(missing)} have no reference samples")
    centroids = np.stack([r[reference_labels == c].mean(axis=0) for c in classes])
    within = np.concatenate([r[reference_labels == c] - centroids[k] for k, c in enumerate(classes)])
    scale = np.where(within.std(axis=0) > 0, within.std(axis=0), 1.0)
    d = (((f[:, None, :] - centroids[None]) / scale) ** 2).sum(axis=-1)
    return classes[np.argmin(d, axis=1)] == labels


# ---------------------------------------------------------------------------------------------------
# Posterior quality from an ensemble of samples


def crps_ensemble(samples, truth, fair: bool = True):
    """Continuous ranked probability score of a `K`-member ensemble, per bin, averaged per sample.

    `samples` `(K, B, ...)`, `truth` `(B, ...)` -> `(B,)` float64, in the units of the data (lower is
    better; for a deterministic prediction it is the absolute error). Per bin, with members `x_k`:

        CRPS = 1/K sum_k |x_k - y| - 1/(2 K (K - 1)) sum_{k, l} |x_k - x_l|      (fair = True)

    the unbiased ("fair") estimator of the CRPS of the distribution the members are drawn from (Ferro
    2014); `fair=False` divides the spread term by `2 K^2` instead: the CRPS of the empirical
    distribution itself. The pair sum is computed from the sorted members in `O(K log K)`,
    `sum_{k,l} |x_k - x_l| = 2 sum_i (2 i - K + 1) x_(i)` (0-based order statistics).
    """
    x, y = _ensemble("crps_ensemble", samples, truth)
    K = x.shape[0]
    if fair and K < 2:
        raise ValueError("crps_ensemble with fair=True needs at least 2 samples per input; got 1 (pass fair=False)")
    skill = np.mean(np.abs(x - y[None]), axis=0)
    order = np.sort(x, axis=0)
    weights = (2.0 * np.arange(K) - K + 1.0).reshape((K,) + (1,) * (x.ndim - 1))
    pair_sum = 2.0 * np.sum(weights * order, axis=0)
    spread = pair_sum / (2.0 * K * (K - 1) if fair else 2.0 * K * K)
    return _per_sample_mean(skill - spread)


def interval_coverage(samples, truth, level: float = 0.9):
    """Fraction of bins whose truth lies in the central `level` interval of the samples, per sample.

    `samples` `(K, B, ...)`, `truth` `(B, ...)` -> `(B,)`. The interval runs between the `(1 - level)/2`
    and `(1 + level)/2` quantiles with plotting positions `k / (K + 1)` (numpy's `weibull` method): for
    `K` exchangeable draws and a truth drawn from the same distribution, the truth falls between order
    statistics `i < j` with probability `(j - i) / (K + 1)`, so the expected coverage is known for every
    `K` (`calibrated_coverage`; 15/17 = 0.882 for K = 16 at 90 %, where the interval is [min, max]).
    """
    x, y = _ensemble("interval_coverage", samples, truth)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    lo, hi = np.quantile(x, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0, method="weibull")
    return _per_sample_mean(((y >= lo) & (y <= hi)).astype(np.float64))


def calibrated_coverage(num_samples: int, level: float = 0.9) -> float:
    """The expected `interval_coverage` of a calibrated ensemble of `num_samples` members (the truth and
    the members drawn from one continuous distribution): the positions `p (K + 1)` of the two quantiles,
    clipped to `[1, K]`, apart, over `K + 1`."""
    K = int(num_samples)
    lo = min(max((1.0 - level) / 2.0 * (K + 1), 1.0), K)
    hi = min(max((1.0 + level) / 2.0 * (K + 1), 1.0), K)
    return (hi - lo) / (K + 1)


def rank_histogram(samples, truth) -> np.ndarray:
    """The rank histogram (Talagrand diagram) of each sample: `(K, B, ...)`, `(B, ...)` -> `(B, K + 1)`,
    the fraction of bins whose truth has rank r = 0..K among the K members (the number of members below
    it; a tie counts half below). For a calibrated ensemble every rank has probability 1 / (K + 1); a
    U shape means the samples are too narrow, a hump too wide, a slope a bias."""
    x, y = _ensemble("rank_histogram", samples, truth)
    K, B = x.shape[0], y.shape[0]
    below = np.sum(x < y, axis=0) + 0.5 * np.sum(x == y, axis=0)
    rank = np.floor(below + 0.5).astype(np.int64).reshape(B, -1)  # a half rank (one tie) rounds up
    counts = np.stack([np.bincount(r, minlength=K + 1) for r in rank])
    return counts / rank.shape[1]


def spread_error_correlation(samples, truth):
    """Pearson correlation, over the bins of each sample, between the ensemble's per-bin standard
    deviation and the absolute error of its mean: `(K, B, ...)`, `(B, ...)` -> `(B,)`. Near 1 when the
    uncertainty map points at the errors; 0 when it says nothing about them; NaN where either is
    constant."""
    x, y = _ensemble("spread_error_correlation", samples, truth)
    B = y.shape[0]
    std = x.std(axis=0, ddof=1 if x.shape[0] > 1 else 0).reshape(B, -1)
    err = np.abs(x.mean(axis=0) - y).reshape(B, -1)
    std, err = std - std.mean(axis=1, keepdims=True), err - err.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(std**2, axis=1) * np.sum(err**2, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(std * err, axis=1) / den, np.nan)


def _ensemble(name, samples, truth):
    x, y = np.asarray(samples, np.float64), np.asarray(truth, np.float64)
    if x.ndim < 2 or x.shape[1:] != y.shape:
        raise ValueError(f"{name} takes samples (K, B, ...) and a truth (B, ...) with the same shape after K; "
                         f"got samples {x.shape} and truth {y.shape}")
    return x, y


def _per_sample_mean(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


# ---------------------------------------------------------------------------------------------------
# Comparing methods on one test set


def paired_bootstrap_ci(a, b, key, level: float = 0.95, num_resamples: int = 2000) -> dict:
    """The mean per-sample difference `a - b` of two methods scored on the same test samples, with its
    percentile bootstrap interval: resample the samples (pairs kept together) `num_resamples` times.

    `a`, `b` `(N,)` per-sample scores; pairs where either is not finite are left out (`n` says how many
    remain). `key` is a `jax.random` key: the same key gives the same interval. Returns
    `{"mean", "lo", "hi", "n"}` (floats; NaN when no pair is left).
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_ci needs per-sample scores of the same test samples; got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    n = int(d.size)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    index = np.asarray(jax.random.randint(key, (num_resamples, n), 0, n))
    means = d[index].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": n}


def _safe_ratio(a, b):
    return np.where(b != 0, a / np.where(b != 0, b, 1.0), 0.0)
