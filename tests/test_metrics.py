"""allpet_jax.metrics against independent references: scikit-image, closed forms, analytic sinograms."""

import functools

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.metrics as skm

import radon
from allpet_jax import metrics
from allpet_jax.data.phantoms import LABEL_IDS
from ellipses import analytic_sinogram, random_ellipses

SSIM_REFERENCE = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


# --- paired scores ---------------------------------------------------------------------------------


def _noisy_pair(rng, shape, offset=0.0, scale=1.0):
    target = offset + scale * rng.uniform(size=shape)
    pred = target + 0.1 * scale * rng.normal(size=shape)
    return pred, target


def test_psnr_matches_skimage_with_default_and_given_data_range():
    rng = np.random.default_rng(0)
    pred, target = _noisy_pair(rng, (5, 24, 30), offset=3.0, scale=7.0)
    ours = np.asarray(metrics.psnr(pred, target))
    ref = [skm.peak_signal_noise_ratio(t, p, data_range=t.max() - t.min()) for p, t in zip(pred, target)]
    assert np.max(np.abs(ours - ref)) < 1e-4  # measured 2e-6 dB (float32)
    ranges = rng.uniform(5, 20, size=5)
    ours = np.asarray(metrics.psnr(pred, target, data_range=ranges))
    ref = [skm.peak_signal_noise_ratio(t, p, data_range=r) for p, t, r in zip(pred, target, ranges)]
    assert np.max(np.abs(ours - ref)) < 1e-4
    assert np.isinf(np.asarray(metrics.psnr(target, target))).all()


def test_nrmse_is_skimage_euclidean_with_target_as_reference():
    rng = np.random.default_rng(1)
    pred, target = _noisy_pair(rng, (4, 3, 17, 9), offset=0.5)
    pred = 0.6 * pred  # a biased prediction, so that swapping reference and test changes the score
    ours = np.asarray(metrics.nrmse(pred, target))
    ref = [skm.normalized_root_mse(t, p, normalization="euclidean") for p, t in zip(pred, target)]
    swapped = [skm.normalized_root_mse(p, t, normalization="euclidean") for p, t in zip(pred, target)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    assert np.min(np.abs(np.asarray(swapped) - ref)) > 0.1  # the argument order matters, and is tested


def _smooth_images(rng, shape, sigma=3.0):
    return ndi.gaussian_filter(rng.normal(size=shape), sigma=(0,) * (len(shape) - 2) + (sigma, sigma))


@pytest.mark.parametrize("kind", ["random", "smooth", "offset"])
def test_ssim_matches_skimage_gaussian_population_covariance(kind):
    rng = np.random.default_rng(2)
    if kind == "random":
        pred, target = _noisy_pair(rng, (4, 40, 33))
    elif kind == "smooth":
        target = _smooth_images(rng, (4, 40, 33))
        pred = target + 0.3 * _smooth_images(rng, (4, 40, 33), sigma=1.0)
    else:  # counts on a large offset: float32 ssim must still match skimage's float64
        pred, target = _noisy_pair(rng, (4, 40, 33), offset=5e3, scale=300.0)
    ours = np.asarray(metrics.ssim(pred.astype(np.float32), target.astype(np.float32)))
    ref = [skm.structural_similarity(t, p, data_range=t.max() - t.min(), **SSIM_REFERENCE) for p, t in zip(pred, target)]
    assert np.max(np.abs(ours - ref)) < 1e-4  # measured <= 3e-7 for all three
    assert 0.05 < np.min(ref) and np.max(ref) < 0.99  # a case where the score means something


def test_ssim_channels_are_averaged_like_skimage_channel_axis():
    rng = np.random.default_rng(3)
    pred, target = _noisy_pair(rng, (3, 2, 21, 25))
    ours = np.asarray(metrics.ssim(pred, target, data_range=1.0))
    ref = [skm.structural_similarity(t, p, data_range=1.0, channel_axis=0, **SSIM_REFERENCE) for p, t in zip(pred, target)]
    assert np.max(np.abs(ours - ref)) < 1e-4
    np.testing.assert_allclose(np.asarray(jax.jit(metrics.ssim)(target, target)), 1.0, atol=1e-6)


def test_paired_scores_reject_bad_shapes_with_the_shapes_in_the_message():
    x = np.zeros((2, 16, 16))
    with pytest.raises(ValueError, match=r"same shape.*\(2, 16, 16\).*\(2, 16, 15\)"):
        metrics.psnr(x, np.zeros((2, 16, 15)))
    with pytest.raises(ValueError, match=r"batch.*\(16,\)"):
        metrics.nrmse(np.zeros(16), np.zeros(16))
    with pytest.raises(ValueError, match=r"at least 11 x 11.*\(8, 16\)"):
        metrics.ssim(np.zeros((2, 8, 16)), np.zeros((2, 8, 16)))
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, C, H, W\)"):
        metrics.ssim(np.zeros((2, 1, 1, 16, 16)), np.zeros((2, 1, 1, 16, 16)))
    with pytest.raises(ValueError, match=r"data_range.*\(2,\).*\(3,\)"):
        metrics.psnr(x, x + 1, data_range=np.ones(3))


# --- lesion scores -----------------------------------------------------------------------------------

HOT, COLD = LABEL_IDS["lesion_hot"], LABEL_IDS["lesion_cold"]
LIVER, TISSUE, FAT = LABEL_IDS["liver"], LABEL_IDS["soft_tissue"], LABEL_IDS["fat"]
ACTIVITY = {0: 0.0, TISSUE: 1.0, LIVER: 2.0, FAT: 0.5, HOT: 8.0, COLD: 0.25}


def _phantom():
    """40 x 40: air outside a disc of radius 19, soft tissue, a liver block (rows 5-24, cols 5-24) with a
    3 x 3 hot lesion in its middle, a fat strip (cols 30-32), and a cold disc in soft tissue next to it
    (two pixels from the fat, so the fat is inside its ring but does not touch it)."""
    i, j = np.mgrid[:40, :40]
    labels = np.where(np.hypot(i - 19.5, j - 19.5) < 19, TISSUE, 0)
    labels[5:25, 5:25] = LIVER
    labels[13:16, 13:16] = HOT
    labels[12:30, 30:33] = FAT
    cold = np.hypot(i - 30, j - 26) <= 1.5
    labels[cold] = COLD
    truth = np.vectorize(ACTIVITY.get)(labels).astype(np.float64)
    return labels.astype(np.int32), truth


def _disc(radius):
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return y * y + x * x <= radius * radius


def test_lesion_regions_are_the_ring_of_touching_host_tissue():
    labels, _ = _phantom()
    lesion, bg = (np.asarray(m) for m in metrics.lesion_regions(labels, "hot", ring_px=3))
    np.testing.assert_array_equal(lesion, labels == HOT)
    ring = ndi.binary_dilation(labels == HOT, structure=_disc(3)) & (labels != HOT)
    np.testing.assert_array_equal(bg, ring)  # all liver: the lesion is 4 pixels from the liver edge
    assert bg.sum() == 2 * (7 + 7 + 3) + 3 * 9 - 9  # by rows: the radius-3 disc dilation of a 3 x 3 square, less it

    lesion, bg = (np.asarray(m) for m in metrics.lesion_regions(labels, "cold", ring_px=3))
    ring = ndi.binary_dilation(labels == COLD, structure=_disc(3)) & (labels != COLD)
    assert (ring & (labels == FAT)).any()  # fat is within the ring but does not touch the lesion,
    np.testing.assert_array_equal(bg, ring & (labels == TISSUE))  # so only soft tissue is background


def test_contrast_recovery_and_roi_error_closed_forms():
    labels, truth = _phantom()
    perfect = metrics.contrast_recovery(truth, truth, labels)
    for kind in ("hot", "cold"):
        np.testing.assert_allclose(float(perfect[kind]), 1.0, rtol=1e-6)
    for kind in ("hot", "cold", None):
        np.testing.assert_allclose(float(metrics.lesion_roi_error(truth, truth, labels, kind)), 0.0, atol=1e-7)

    # Lesions keep half their contrast over the host: CR = 1/2 for both kinds. Hot: 2 + (8 - 2)/2 = 5,
    # error |5/8 - 1| = 3/8; cold: 1 + (0.25 - 1)/2 = 0.625, error |0.625/0.25 - 1| = 3/2.
    half = truth.copy()
    half[labels == HOT] = 5.0
    half[labels == COLD] = 0.625
    cr = metrics.contrast_recovery(half, truth, labels)
    np.testing.assert_allclose([float(cr["hot"]), float(cr["cold"])], [0.5, 0.5], rtol=1e-6)
    err = [float(metrics.lesion_roi_error(half, truth, labels, kind)) for kind in ("hot", "cold", None)]
    np.testing.assert_allclose(err, [0.375, 1.5, 0.9375], rtol=1e-6)

    # A global scale keeps the contrast (CR 1) and is a 100 % lesion error; an offset c gives
    # hot CR = ((8 + c)/(2 + c) - 1)/3 by hand.
    np.testing.assert_allclose(float(metrics.contrast_recovery(2 * truth, truth, labels)["hot"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(metrics.lesion_roi_error(2 * truth, truth, labels)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(metrics.contrast_recovery(truth + 1, truth, labels)["hot"]), (9 / 3 - 1) / 3, rtol=1e-6)


def test_contrast_recovery_of_a_blurred_image_against_hand_computed_regions():
    labels, truth = _phantom()
    blurred = ndi.gaussian_filter(truth, 1.2)
    cr = metrics.contrast_recovery(blurred, truth, labels)
    for kind, lesion_id in (("hot", HOT), ("cold", COLD)):
        lesion = labels == lesion_id
        ring = ndi.binary_dilation(lesion, structure=_disc(3)) & (labels != HOT) & (labels != COLD)
        bg = ring & (labels == (LIVER if kind == "hot" else TISSUE))
        expected = (blurred[lesion].mean() / blurred[bg].mean() - 1) / (truth[lesion].mean() / truth[bg].mean() - 1)
        np.testing.assert_allclose(float(cr[kind]), expected, rtol=1e-5)
        assert 0.2 < expected < 0.9  # blur loses contrast


def test_lesion_scores_broadcast_over_batch_and_channels_and_are_nan_without_lesions():
    labels, truth = _phantom()
    no_cold = np.where(labels == COLD, TISSUE, labels)
    batch_labels = np.stack([labels, no_cold])[:, None]  # (2, 1, H, W)
    batch_truth = np.stack([truth, truth])[:, None] * np.array([1.0, 3.0])[None, :, None, None]  # (2, 2, H, W)
    recon = ndi.gaussian_filter(batch_truth, (0, 0, 1.0, 1.0))
    cr = jax.jit(metrics.contrast_recovery)(recon, batch_truth, batch_labels)
    assert cr["hot"].shape == cr["cold"].shape == (2, 2)
    np.testing.assert_allclose(cr["hot"][0, 0], metrics.contrast_recovery(recon[0, 0], truth, labels)["hot"], rtol=1e-6)
    np.testing.assert_allclose(cr["hot"][:, 0], cr["hot"][:, 1], rtol=1e-5)  # CR is scale-free
    assert np.isnan(cr["cold"][1]).all() and np.isfinite(cr["cold"][0]).all()
    err, hot = (metrics.lesion_roi_error(recon, batch_truth, batch_labels, kind) for kind in (None, "hot"))
    assert err.shape == (2, 2)
    np.testing.assert_allclose(err[1], hot[1], rtol=1e-6)  # the mean over the kinds present
    with pytest.raises(ValueError, match=r"labels \(3, 40, 40\).*\(2, 2, 40, 40\)"):
        metrics.contrast_recovery(recon, batch_truth, np.zeros((3, 40, 40), np.int32))


# --- physics consistency -------------------------------------------------------------------------------

HL_GEOM = radon.Geometry.square(512, 360)


@functools.lru_cache(maxsize=1)
def _ellipse_sinograms():
    rng = np.random.default_rng(4)
    return np.stack([analytic_sinogram(random_ellipses(rng, 5, HL_GEOM.fov_radius_mm), HL_GEOM) for _ in range(2)])


def test_helgason_ludwig_residual_is_tiny_for_exact_line_integrals_and_large_when_perturbed():
    sino = _ellipse_sinograms()
    clean = metrics.helgason_ludwig_residual(sino, HL_GEOM, max_order=4)
    assert clean["orders"].shape == (2, 5) and clean["mean"].shape == (2,)
    assert np.max(clean["orders"]) < 1e-3  # measured <= 4.4e-4 (order 4), <= 9.6e-5 (order 0)

    rng = np.random.default_rng(5)
    shuffled = metrics.helgason_ludwig_residual(sino[:, rng.permutation(HL_GEOM.n_angles)], HL_GEOM)
    assert np.max(shuffled["orders"][:, 0]) < 1e-3  # order 0 is blind to the angle order ...
    assert np.min(shuffled["orders"][:, 1:]) > 0.05  # ... the others are not (measured 0.18-0.56)

    # A smooth random perturbation: 5 % of the peak times low-frequency Fourier modes in (theta, s).
    theta, s = HL_GEOM.theta[:, None], HL_GEOM.s_mm[None, :] / 256
    field = sum(rng.normal() * np.cos(a * theta + rng.uniform(0, 2 * np.pi)) * np.cos(b * np.pi * s + rng.uniform(0, 2 * np.pi))
                for a in range(1, 6) for b in range(4))
    perturbed = sino + 0.05 * sino.max() * field / np.abs(field).max()
    r = metrics.helgason_ludwig_residual(perturbed, HL_GEOM)
    assert np.min(r["mean"]) > 30 * np.max(clean["mean"])  # measured 0.068 vs 2.4e-4


def test_helgason_ludwig_residual_bad_input():
    geom = radon.Geometry.square(16, 5)
    with pytest.raises(ValueError, match=r"needs more angles.*n_angles = 5"):
        metrics.helgason_ludwig_residual(np.zeros((5, 16)), geom, max_order=4)
    with pytest.raises(ValueError, match=r"\(5, 16\).*\(5, 15\)"):
        metrics.helgason_ludwig_residual(np.zeros((5, 15)), geom, max_order=2)
    np.testing.assert_array_equal(metrics.helgason_ludwig_residual(np.zeros((5, 16)), geom, max_order=2)["mean"], 0.0)


RANGE_GEOM = radon.Geometry.square(64, 64)


def test_range_residual_orders_consistent_noisy_and_inconsistent_sinograms():
    rng = np.random.default_rng(6)
    yy, xx = np.meshgrid(RANGE_GEOM.y_mm, RANGE_GEOM.x_mm, indexing="ij")
    image = sum(rng.uniform(0.3, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w**2))
                for cx, cy, w in rng.uniform([-12, -12, 3], [12, 12, 6], size=(4, 3)))
    sino = np.asarray(radon.forward(image.astype(np.float32), RANGE_GEOM))
    counts = rng.poisson(50 * sino / sino.max()).astype(np.float32)
    cases = np.stack([sino, counts, sino[rng.permutation(64)], rng.normal(size=sino.shape)])
    smooth, poisson, shuffled, noise = np.asarray(metrics.range_residual(cases, RANGE_GEOM))
    assert smooth < 0.05  # measured 0.028: discretisation of FBP and projector
    assert smooth < poisson < shuffled < noise  # measured 0.028, 0.11, 0.28, 0.67
    assert noise > 0.5  # white noise: about half its energy lies outside the range


def test_negative_fraction_by_hand():
    x = np.array([[[1.0, -1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[-3.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_allclose(metrics.negative_fraction(x), [0.25, 0.0, 0.75])


# --- sample statistics -------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    np.testing.assert_allclose(metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 2.0**2 + (2.0 - 3.0) ** 2)
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    np.testing.assert_allclose(metrics.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)),
                               3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    rng = np.random.default_rng(7)
    m1, m2 = rng.normal(size=(2, 4, 4))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    w, v = np.linalg.eigh(c1)  # via the symmetric form tr((c1^1/2 c2 c1^1/2)^1/2)
    root = (v * np.sqrt(w)) @ v.T
    expected = np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(root @ c2 @ root)))
    np.testing.assert_allclose(metrics.frechet_distance(np.zeros(4), c1, np.zeros(4), c2), expected, rtol=1e-8)


def test_sinogram_features_of_a_constant_sinogram():
    f = metrics.sinogram_features(np.full((2, 6, 5), 3.0))
    s = np.linspace(-1, 1, 5)
    np.testing.assert_allclose(f, np.broadcast_to([15.0, 0.0, 0.0, np.sqrt(np.mean(s**2)), 1.0, 0.0, 0.0, 0.0], f.shape))
    assert f.shape == (2, len(metrics.FEATURES))


def _blob_sinograms(rng, n, width_scale=1.0, n_angles=16, n_bins=24):
    """`n` sinograms of one Gaussian blob each (random amplitude, position, width) plus Gaussian noise."""
    theta = np.arange(n_angles) * np.pi / n_angles
    s = np.linspace(-1, 1, n_bins)
    amp, r, phi = rng.uniform(0.5, 1.5, n), rng.uniform(0, 0.4, n), rng.uniform(0, 2 * np.pi, n)
    w = width_scale * rng.uniform(0.1, 0.2, n)
    centre = r[:, None] * np.cos(theta[None] - phi[:, None])  # (n, n_angles)
    sino = amp[:, None, None] * np.exp(-((s - centre[..., None]) ** 2) / (2 * w[:, None, None] ** 2))
    return sino + 0.02 * rng.normal(size=sino.shape)


def test_sample_statistics_distance_zero_for_one_distribution_larger_when_shifted_symmetric():
    rng = np.random.default_rng(8)
    a, b = _blob_sinograms(rng, 2000), _blob_sinograms(rng, 2000)
    shifted = _blob_sinograms(rng, 2000, width_scale=1.15)
    assert metrics.sample_statistics_distance(a, a) < 1e-8
    same = metrics.sample_statistics_distance(a, b)
    moved = metrics.sample_statistics_distance(a, shifted)
    assert same < 0.06  # measured 0.033 here (0.01-0.03 over seeds): the finite-sample bias, ~F^2/N
    assert moved > 20 * same  # measured 1.8 here, 1.9-2.1 over other seeds
    np.testing.assert_allclose(metrics.sample_statistics_distance(shifted, a), moved, rtol=1e-6)
    with pytest.raises(ValueError, match=r"same shape after N.*\(4, 16, 24\).*\(4, 16, 23\)"):
        metrics.sample_statistics_distance(a[:4], a[:4, :, :23])


# --- posterior quality and paired comparisons ---------------------------------------------------------


def _gaussian_crps(y, sigma=1.0):
    """Closed-form CRPS of N(0, sigma^2) at y (Gneiting & Raftery 2007)."""
    from scipy.stats import norm

    z = y / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def test_crps_ensemble_matches_the_gaussian_closed_form_and_the_pairwise_formula():
    rng = np.random.default_rng(0)
    truth = rng.normal(0.0, 1.5, size=(6, 3000))
    samples = rng.normal(size=(16,) + truth.shape)
    crps = metrics.crps_ensemble(samples, truth)
    expected = _gaussian_crps(truth).mean(axis=1)
    np.testing.assert_allclose(crps, expected, atol=0.02)
    # A second implementation: the O(K^2) pair sum, fair and empirical.
    x, y = samples[:, :2, :50], truth[:2, :50]
    skill = np.abs(x - y).mean(0)
    pairs = np.abs(x[:, None] - x[None]).sum((0, 1))
    np.testing.assert_allclose(metrics.crps_ensemble(x, y), (skill - pairs / (2 * 16 * 15)).mean(1), rtol=1e-10)
    np.testing.assert_allclose(metrics.crps_ensemble(x, y, fair=False), (skill - pairs / (2 * 16 * 16)).mean(1),
                               rtol=1e-10)
    # One member: the absolute error.
    np.testing.assert_allclose(metrics.crps_ensemble(x[:1], y, fair=False), np.abs(x[0] - y).mean(1), rtol=1e-12)


def test_interval_coverage_of_a_calibrated_and_an_overconfident_ensemble():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(4, 5000))
    calibrated = metrics.interval_coverage(rng.normal(size=(16,) + truth.shape), truth)
    assert metrics.calibrated_coverage(16) == pytest.approx(15 / 17)
    np.testing.assert_allclose(calibrated.mean(), 15 / 17, atol=0.01)
    # Members 3x too narrow: the truth leaves [min, max] of 16 draws of N(0, 1/9) far more often.
    narrow = metrics.interval_coverage(rng.normal(scale=1 / 3, size=(16,) + truth.shape), truth)
    assert narrow.mean() < 0.6
    # Many members: the 90 % interval's coverage tends to 0.90.
    assert metrics.calibrated_coverage(199) == pytest.approx(0.9)
    many = metrics.interval_coverage(rng.normal(size=(199, 1, 4000)), truth[:1, :4000])
    np.testing.assert_allclose(many, 0.9, atol=0.015)


def test_rank_histogram_against_scipy_ranks_and_its_calibrated_shapes():
    import scipy.stats

    rng = np.random.default_rng(4)
    # Against scipy's average ranks of [truth, members] per bin, ties included (values on a coarse grid).
    x, y = np.round(rng.normal(size=(8, 2, 300)) * 2) / 2, np.round(rng.normal(size=(2, 300)) * 2) / 2
    ranks = scipy.stats.rankdata(np.concatenate([y[None], x]), axis=0, method="average")[0] - 1  # members below
    expected = np.stack([np.bincount(np.floor(r + 0.5).astype(int), minlength=9) / 300 for r in ranks])
    np.testing.assert_allclose(metrics.rank_histogram(x, y), expected)
    assert metrics.rank_histogram(x, y).shape == (2, 9)
    # Calibrated: flat at 1/(K+1) (binomial sd at 40000 bins is 0.0014); 3x too narrow: a U; biased: a slope.
    truth = rng.normal(size=(1, 40000))
    flat = metrics.rank_histogram(rng.normal(size=(8, 1, 40000)), truth)[0]
    np.testing.assert_allclose(flat, 1 / 9, atol=0.006)
    narrow = metrics.rank_histogram(rng.normal(scale=1 / 3, size=(8, 1, 40000)), truth)[0]
    assert narrow[0] > 0.25 and narrow[-1] > 0.25 and narrow[4] < 0.06
    high = metrics.rank_histogram(rng.normal(loc=1.0, size=(8, 1, 40000)), truth)[0]
    assert high[0] > 3 * high[-1]


def test_spread_error_correlation_sees_whether_the_spread_follows_the_error():
    rng = np.random.default_rng(2)
    sigma = np.exp(rng.normal(size=(3, 4000)))  # per-bin uncertainty that varies over the bins
    truth = rng.normal(size=sigma.shape) * sigma
    informative = metrics.spread_error_correlation(rng.normal(size=(16,) + sigma.shape) * sigma, truth)
    blind = metrics.spread_error_correlation(rng.normal(size=(16,) + sigma.shape), truth)
    assert np.all(informative > 0.4)
    assert np.all(np.abs(blind) < 0.08)
    assert np.isnan(metrics.spread_error_correlation(np.zeros((4, 1, 10)), np.ones((1, 10))))[0]


def test_paired_bootstrap_interval_covers_the_true_mean_difference_about_95_percent():
    rng = np.random.default_rng(3)
    keys = jax.random.split(jax.random.key(0), 300)
    hits = 0
    for key in keys:  # skewed per-sample differences with mean 0.3
        a = rng.exponential(1.0, size=60) + 0.3 - 1.0
        ci = metrics.paired_bootstrap_ci(a, np.zeros(60), key, num_resamples=1000)
        hits += ci["lo"] <= 0.3 <= ci["hi"]
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert 0.90 <= hits / len(keys) <= 0.98
    same = metrics.paired_bootstrap_ci([1.0, np.nan, 3.0], [0.5, 1.0, np.inf], jax.random.key(1))
    assert same == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 1}
    with pytest.raises(ValueError, match="same test samples"):
        metrics.paired_bootstrap_ci(np.zeros(3), np.zeros(4), jax.random.key(0))


def test_body_shape_features_of_ellipses_match_closed_forms_and_prompt_matches():
    """A uniform ellipse with semi-axes a, b (pixels) centred at (cy, cx): area fraction pi a b / (H W),
    elongation a / b (coordinate variances a^2/4, b^2/4), centroid offset hypot(cy, cx) / H (square image)."""
    H = 128
    yy, xx = np.meshgrid(np.arange(H) - (H - 1) / 2, np.arange(H) - (H - 1) / 2, indexing="ij")

    def ellipse(a, b, cy=0.0, cx=0.0):
        return (((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1).astype(np.float32)

    images = np.stack([ellipse(40, 20), ellipse(30, 30, 10, -20), ellipse(12, 36)])
    f = metrics.body_shape_features(images)
    np.testing.assert_allclose(f[:, 0], [np.pi * 40 * 20 / H**2, np.pi * 900 / H**2, np.pi * 12 * 36 / H**2], rtol=0.02)
    np.testing.assert_allclose(f[:, 1], [2.0, 1.0, 3.0], rtol=0.03)
    np.testing.assert_allclose(f[:, 2], [0.0, np.hypot(10, 20) / H, 0.0], atol=2e-3)
    # classes: small round bodies (0) and large wide ones (1)
    reference = np.stack([ellipse(20 + k, 20 + k) for k in range(4)] + [ellipse(30 + k, 55) for k in range(4)])
    labels = np.array([0] * 4 + [1] * 4)
    ref = metrics.body_shape_features(reference)
    query = metrics.body_shape_features(np.stack([ellipse(22, 21), ellipse(31, 54), ellipse(22, 21)]))
    np.testing.assert_array_equal(metrics.prompt_matches(query, [0, 1, 1], ref, labels), [True, True, False])
    with pytest.raises(ValueError, match="no reference"):
        metrics.prompt_matches(query, [0, 2, 1], ref, labels)


def test_validation_crps_of_a_pair_matches_the_ensemble_crps():
    """The training loop's in-jit CRPS of two samples (`stages.relative_crps_pair`) is `crps_ensemble` with
    K = 2 (sorted-order pair sum) over the mean absolute target; for identical members the relative
    absolute error."""
    from allpet_jax.training import stages

    rng = np.random.default_rng(0)
    a, b, y = (rng.normal(size=(3, 1, 8, 6)).astype(np.float32) for _ in range(3))
    expected = metrics.crps_ensemble(np.stack([a, b]), y) / np.abs(y).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(stages.relative_crps_pair(a, b, y)), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stages.relative_crps_pair(a, a, y)),
                               np.abs(a - y).reshape(3, -1).mean(axis=1) / np.abs(y).reshape(3, -1).mean(axis=1),
                               rtol=1e-5)
