"""radon.pet: attenuation against the analytic chord, the composed model, count levels, Poisson noise, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import radon
from ellipses import rasterise

MU_WATER = 0.0096  # 1/mm at 511 keV
GEOM = radon.Geometry((128, 128), 60, 128, pixel_size=2.0, bin_spacing=2.0)  # 256 mm field of view
RADIUS = 100.0  # mm: a body-sized water cylinder


def _water_disc():
    return MU_WATER * rasterise(np.array([[0.0, 0.0, RADIUS, RADIUS, 0.0, 1.0]]), GEOM)


def test_attenuation_of_water_disc_matches_chord_length():
    a = np.asarray(radon.attenuation_factors(jnp.asarray(_water_disc(), jnp.float32), GEOM))
    s = GEOM.s_mm
    reference = np.exp(-MU_WATER * 2 * np.sqrt(np.maximum(RADIUS**2 - s**2, 0.0)))[None, :]
    # The chord length has a square-root edge that no pixel grid resolves: the last two pixels before
    # the edge carry most of the error (measured max 0.053 there, <= 1.8% relative elsewhere).
    assert np.abs(a - reference).max() <= 0.07
    away_from_edge = np.abs(s) < RADIUS - 2 * GEOM.pixel_size
    assert (np.abs(a - reference) / reference)[:, away_from_edge].max() <= 0.025
    centre = np.abs(s) < GEOM.bin_spacing
    np.testing.assert_allclose(a[:, centre].mean(), np.exp(-MU_WATER * 2 * RADIUS), rtol=0.005)
    # Edge pixels are partly covered up to RADIUS + pixel / sqrt(2); beyond one more pixel nothing attenuates.
    assert np.all(a[:, np.abs(s) > RADIUS + 2 * GEOM.pixel_size] == 1.0)


def test_expected_counts_composes_elementwise_terms():
    rng = np.random.default_rng(0)
    activity = jnp.asarray(rng.uniform(0, 1, (2,) + GEOM.image_shape), jnp.float32)
    a = radon.attenuation_factors(jnp.asarray(_water_disc(), jnp.float32), GEOM)
    eta = jnp.asarray(rng.uniform(0.8, 1.2, GEOM.sino_shape), jnp.float32)
    randoms = jnp.asarray(rng.uniform(0, 3, (2,) + GEOM.sino_shape), jnp.float32)
    ybar = radon.expected_counts(activity, GEOM, attenuation=a, normalisation=eta, randoms=randoms, scatter=0.5)
    line_integrals = radon.forward(activity, GEOM)
    np.testing.assert_allclose(ybar, eta * a * line_integrals + randoms + 0.5, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(radon.expected_counts(activity, GEOM), line_integrals, rtol=0, atol=0)
    np.testing.assert_allclose(radon.expected_counts(activity, GEOM, normalisation=2.0), 2 * line_integrals, rtol=1e-7)


def test_expected_counts_of_uniform_disc_is_analytic():
    # Independent of the composition: trues of a uniform disc are the chord length times its activity.
    activity = rasterise(np.array([[0.0, 0.0, RADIUS, RADIUS, 0.0, 1.0]]), GEOM)
    ybar = np.asarray(
        radon.expected_counts(jnp.asarray(activity, jnp.float32), GEOM,
                              attenuation=radon.attenuation_factors(jnp.asarray(_water_disc(), jnp.float32), GEOM))
    )
    chord = 2 * np.sqrt(np.maximum(RADIUS**2 - GEOM.s_mm**2, 0.0))
    centre = np.abs(GEOM.s_mm) < 50
    reference = chord * np.exp(-MU_WATER * chord)
    assert (np.abs(ybar - reference)[:, centre] / reference[centre]).max() <= 0.01


def test_scale_to_total_counts_sets_fractions_and_totals():
    rng = np.random.default_rng(1)
    activity = jnp.asarray(rng.uniform(0, 1, (3,) + GEOM.image_shape), jnp.float32)
    trues = radon.expected_counts(activity, GEOM)
    scatter_shape = jnp.ones(GEOM.sino_shape).at[:, :64].set(3.0)
    totals = jnp.array([1e5, 1e6, 3e6])
    level = radon.scale_to_total_counts(trues, totals, randoms_fraction=0.3, scatter_fraction=0.15,
                                        scatter_shape=scatter_shape)
    sums = lambda x: np.asarray(jnp.sum(x, axis=(-2, -1)), np.float64)
    np.testing.assert_allclose(sums(level.trues), 0.55 * np.asarray(totals), rtol=1e-5)
    np.testing.assert_allclose(sums(level.randoms), 0.30 * np.asarray(totals), rtol=1e-5)
    np.testing.assert_allclose(sums(level.scatter), 0.15 * np.asarray(totals), rtol=1e-5)
    np.testing.assert_allclose(sums(level.expected), np.asarray(totals), rtol=1e-5)
    np.testing.assert_allclose(level.background, level.randoms + level.scatter)
    # Randoms are flat by default; scatter follows its shape (3:1 across the two halves).
    flat = np.broadcast_to(0.3 * np.asarray(totals)[:, None, None] / np.prod(GEOM.sino_shape), level.randoms.shape)
    np.testing.assert_allclose(level.randoms, flat, rtol=1e-5)
    np.testing.assert_allclose(level.scatter[:, :, 0] / level.scatter[:, :, -1], 3.0, rtol=1e-5)
    # `scale` maps the activity to the image whose trues these are.
    np.testing.assert_allclose(
        radon.expected_counts(level.scale[:, None, None] * activity, GEOM), level.trues, rtol=1e-4, atol=1e-3
    )


def test_poisson_counts_mean_and_variance():
    # One sinogram-shaped draw (the shape every Poisson test here uses, so it compiles once) holding
    # n = 1920 samples of each of four means.
    lam = np.array([0.3, 2.0, 15.0, 400.0])
    y = radon.poisson_counts(jax.random.key(0), jnp.asarray(np.resize(lam, GEOM.sino_shape), jnp.float32))
    assert y.dtype == jnp.float32 and y.shape == GEOM.sino_shape
    assert np.all(np.asarray(y) == np.round(np.asarray(y))) and np.all(np.asarray(y) >= 0)
    y = np.asarray(y, np.float64).reshape(-1, 4)
    n = y.shape[0]
    mean_se = np.sqrt(lam / n)
    var_se = np.sqrt((lam + 2 * lam**2) / n)  # var of the sample variance: (mu4 - sigma^4) / n, mu4 = lam + 3 lam^2
    assert np.all(np.abs(y.mean(0) - lam) <= 4 * mean_se)
    assert np.all(np.abs(y.var(0, ddof=1) - lam) <= 4 * var_se)


def test_poisson_at_dose_level_is_calibrated():
    # A realistic sinogram: 2e6 prompts with 20% randoms and 10% scatter, at a dose fraction of 1/10.
    rng = np.random.default_rng(2)
    activity = jnp.asarray(rasterise(np.array([[0, 0, 90, 70, 0, 1.0], [20, 10, 20, 20, 0, 4.0]]), GEOM), jnp.float32)
    a = radon.attenuation_factors(jnp.asarray(_water_disc(), jnp.float32), GEOM)
    level = radon.scale_to_total_counts(radon.expected_counts(activity, GEOM, attenuation=a), 2e6,
                                        randoms_fraction=0.2, scatter_fraction=0.1)
    ybar = level.expected / 10
    y = radon.poisson_counts(jax.random.key(rng.integers(1 << 31)), ybar)
    ybar, y = np.asarray(ybar, np.float64), np.asarray(y, np.float64)
    n = ybar.size
    assert abs(y.sum() - ybar.sum()) <= 4 * np.sqrt(ybar.sum())
    z = (y - ybar) / np.sqrt(ybar)
    assert abs(z.mean()) <= 4 / np.sqrt(n)
    # var(z^2) = 2 + 1 / lambda for Poisson; the standard error of mean(z^2) follows.
    assert abs((z**2).mean() - 1) <= 4 * np.sqrt(np.mean(2 + 1 / ybar) / n)


def test_poisson_counts_is_reproducible_by_key():
    ybar = jnp.full(GEOM.sino_shape, 5.0)
    first, again, other = (radon.poisson_counts(jax.random.key(k), ybar) for k in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_model_is_jittable_and_differentiable():
    activity = jnp.asarray(np.random.default_rng(4).uniform(0, 1, GEOM.image_shape), jnp.float32)
    mu = jnp.asarray(_water_disc(), jnp.float32)

    def loss(mu):
        return jnp.sum(radon.expected_counts(activity, GEOM, attenuation=radon.attenuation_factors(mu, GEOM)))

    g = jax.jit(jax.grad(loss))(mu)
    # d/dmu sum(a * p) = -R^T(a * p), with p = R(activity).
    p = radon.forward(activity, GEOM)
    a = radon.attenuation_factors(mu, GEOM)
    np.testing.assert_allclose(g, -radon.adjoint(a * p, GEOM), rtol=1e-4, atol=1e-3)


def test_bad_inputs_raise_value_errors():
    image = jnp.ones(GEOM.image_shape)
    with pytest.raises(ValueError, match="non-negative"):
        radon.poisson_counts(jax.random.key(0), -jnp.ones(4))
    with pytest.raises(ValueError, match="finite"):
        radon.poisson_counts(jax.random.key(0), jnp.array([1.0, jnp.nan]))
    with pytest.raises(ValueError, match="non-negative"):
        radon.attenuation_factors(-0.01 * image, GEOM)
    with pytest.raises(ValueError, match="must end in"):
        radon.attenuation_factors(jnp.ones((64, 64)), GEOM)
    with pytest.raises(ValueError, match=r"attenuation must be a scalar or a sinogram ending in \(n_angles, n_bins\)"):
        radon.expected_counts(image, GEOM, attenuation=jnp.ones((128, 60)))
    with pytest.raises(ValueError, match="randoms must be finite"):
        radon.expected_counts(image, GEOM, randoms=jnp.full(GEOM.sino_shape, jnp.nan))
    with pytest.raises(ValueError, match="activity must be non-negative"):
        radon.expected_counts(-image, GEOM)
    trues = radon.forward(image, GEOM)
    with pytest.raises(ValueError, match="must be < 1"):
        radon.scale_to_total_counts(trues, 1e6, randoms_fraction=0.6, scatter_fraction=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        radon.scale_to_total_counts(trues, 1e6, scatter_fraction=-0.1)
    with pytest.raises(ValueError, match="positive sum"):
        radon.scale_to_total_counts(jnp.zeros(GEOM.sino_shape), 1e6)
