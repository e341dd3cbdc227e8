"""Schedules, samplers and guidance against analytic references.

The sampler tests use Gaussian data, `x0 ~ N(mu, var)` per dimension, where the optimal denoiser is
closed-form: with `x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`, `E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) /
(ab var + 1 - ab)`. Samples drawn with it must have the data's mean and variance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allpet_jax.diffusion import ddbm, ddim, ddpm, guidance, schedules

def key(seed):
    # "rbg" keys: XLA:CPU compiles threefry sampling ~10x slower; these statistics do not care which PRNG.
    return jax.random.key(seed, impl="rbg")


MU = np.array([1.0, -0.5], np.float32)
VAR = np.array([0.25, 2.0], np.float32)
N = 20000


def gaussian_denoiser(params, x_t, t):
    """Optimal eps-, x0- or v-prediction for Gaussian data; `params = (alpha_bar, mu, var, kind)`."""
    alpha_bar, mu, var, kind = params
    ab = alpha_bar[t][:, None]
    eps = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * var + 1 - ab)
    x0 = (x_t - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    return jnp.select([kind == 0, kind == 1], [eps, x0], jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0)


def params_for(schedule, kind=0):
    return (schedule.alpha_bar, jnp.asarray(MU), jnp.asarray(VAR), jnp.asarray(kind))


@pytest.mark.parametrize("make", [schedules.linear_schedule, schedules.cosine_schedule])
def test_schedule_tables(make):
    s = make(1000)
    ab = np.asarray(s.alpha_bar, np.float64)
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < 1e-2 and 0.99 < ab[0] < 1
    np.testing.assert_allclose(ab, np.cumprod(1 - np.asarray(s.betas, np.float64)), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(s.alpha_bar_prev)[1:], ab[:-1], rtol=1e-6)


def test_cosine_alpha_bar_closed_form():
    s = schedules.cosine_schedule(1000)
    t = np.arange(1, 1001) / 1000
    f = lambda t: np.cos((t + 8e-3) / (1 + 8e-3) * np.pi / 2) ** 2  # noqa: E731
    # Betas are clipped at 0.999 only at the very end, so compare away from it.
    np.testing.assert_allclose(np.asarray(s.alpha_bar)[:990], (f(t) / f(0))[:990], rtol=1e-4, atol=1e-7)


def test_q_sample_then_inversions_recover_x0():
    s = schedules.linear_schedule(1000)
    k1, k2 = jax.random.split(key(0))
    x0 = jax.random.normal(k1, (5, 8, 8, 4))
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 250, 700, 999])
    x_t = schedules.q_sample(s, x0, t, eps)
    for kind, out in [("eps", eps), ("x0", x0), ("v", schedules.v_from_x0_eps(s, t, x0, eps))]:
        x0_hat, eps_hat = schedules.to_x0_eps(s, kind, out, x_t, t)
        np.testing.assert_allclose(x0_hat[:4], x0[:4], atol=2e-4)  # t = 999 amplifies rounding by 1/sqrt(ab)
        np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
        np.testing.assert_allclose(schedules.training_target(s, kind, x0, t, eps), out)
    # At t = 0 the posterior is a point mass at x0.
    mean, var, _ = schedules.posterior_mean_variance(s, x0, x_t, jnp.zeros(5, jnp.int32))
    np.testing.assert_allclose(mean, x0, atol=1e-6)
    assert float(jnp.max(var)) == 0.0


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0, computed independently."""
    s = schedules.cosine_schedule(200)
    betas = np.asarray(s.betas, np.float64)
    ab = np.cumprod(1 - betas)
    x0, x_t = 0.7, -0.3
    for t in (1, 57, 199):
        # x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) e1;  x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) e2.
        m1, v1 = np.sqrt(ab[t - 1]) * x0, 1 - ab[t - 1]
        a = np.sqrt(1 - betas[t])
        m2, v2, cov = a * m1, a * a * v1 + betas[t], a * v1
        want_mean = m1 + cov / v2 * (x_t - m2)
        want_var = v1 - cov**2 / v2
        mean, var, log_var = schedules.posterior_mean_variance(
            s, jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t]))
        np.testing.assert_allclose(float(mean[0, 0]), want_mean, rtol=1e-4)
        np.testing.assert_allclose(float(var[0, 0]), want_var, rtol=1e-4)
        np.testing.assert_allclose(float(log_var[0, 0]), np.log(want_var), rtol=1e-4)


def test_ddim_eta0_is_deterministic_and_parameterization_free():
    s = schedules.linear_schedule(1000)
    x_T = jax.random.normal(key(1), (64, 2))
    runs = [
        ddim.ddim_sample(gaussian_denoiser, params_for(s, kind), key(seed), s, (64, 2), 20,
                         eta=0.0, x_T=x_T, parameterization=name)
        for seed, (kind, name) in enumerate([(0, "eps"), (0, "eps"), (1, "x0"), (2, "v")])
    ]
    np.testing.assert_array_equal(runs[0], runs[1])  # different keys, same result
    np.testing.assert_allclose(runs[2], runs[0], atol=1e-4)
    np.testing.assert_allclose(runs[3], runs[0], atol=1e-4)
    assert ddim.ddim_timesteps(1000, 20)[0] == 999 and ddim.ddim_timesteps(1000, 20)[-1] == 0


def _assert_gaussian(samples, mu=MU, var=VAR, n=N):
    samples = np.asarray(samples, np.float64)
    assert samples.shape == (n, len(mu))
    se_mean = np.sqrt(var / n)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mu), 5 * se_mean + 0.01)
    # The sample variance has relative standard error sqrt(2/n) (1% here). On top, the ancestral
    # samplers' variance lacks Var[x0 | x_t] per step and DDIM's Euler steps shrink it (measured: 3.5 %
    # at 250 DDIM steps, 7 % at 100, 1.5 % at 1000, so it is discretisation): allow 5 %.
    np.testing.assert_allclose(samples.var(0), var, rtol=4 * np.sqrt(2 / n) + 0.05)


def test_ddpm_and_ddim_sample_the_gaussian_data_distribution():
    s = schedules.linear_schedule(1000)
    a = ddpm.ddpm_sample(gaussian_denoiser, params_for(s), key(2), s, (N, 2))
    b = ddim.ddim_sample(gaussian_denoiser, params_for(s), key(2), s, (N, 2), 250, eta=0.0)
    for samples in (a, b):
        _assert_gaussian(samples)
    # DDPM and DDIM agree with each other in distribution, not only with the truth.
    np.testing.assert_allclose(np.var(a, 0), np.var(b, 0), rtol=0.15)


def zero_output(params, x_t, t):
    return jnp.zeros_like(x_t)


def test_learned_skip_with_a_zero_output_is_the_optimal_denoiser_of_its_prior():
    """`SkipDenoiser` around a U-Net that outputs 0 is, by construction, the optimal `v` denoiser of
    `N(0, sigma2)` data (the closed form of this module's Gaussian denoiser with mu = 0): DDIM draws that
    distribution, and at `sigma2 = 0` (the gate closed, a warm-started task's start) exactly 0, the
    identity of a residual model."""
    from allpet_jax.diffusion.model_function import SkipDenoiser

    s = schedules.cosine_schedule(1000)
    x_T = jax.random.normal(key(4), (N, 2))
    for sigma2 in (0.0, 0.3, 1.0):
        denoiser = SkipDenoiser(zero_output, 2.0)  # rate 2: the gate's value is half the variance
        params = (({"skip_gate": jnp.asarray(sigma2 / 2.0)}, {}), s)
        out = ddim.ddim_sample(denoiser, params, key(5), s, (N, 2), 250, eta=0.0, x_T=x_T, parameterization="v")
        reference = ddim.ddim_sample(gaussian_denoiser, (s.alpha_bar, jnp.zeros(2), jnp.full(2, sigma2), 2), key(5),
                                     s, (N, 2), 250, eta=0.0, x_T=x_T, parameterization="v")
        if sigma2 == 0.0:
            assert float(jnp.abs(out).max()) < 1e-5
        else:
            np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-3)
            _assert_gaussian(out, np.zeros(2), np.full(2, sigma2))


def test_ddpm_beta_variance_and_clipping_run():
    s = schedules.linear_schedule(50)
    x = ddpm.ddpm_sample(gaussian_denoiser, params_for(s), key(3), s, (16, 2), variance="beta", clip_x0=1.0)
    assert x.shape == (16, 2) and bool(jnp.all(jnp.isfinite(x)))
    with pytest.raises(ValueError, match="variance"):
        ddpm.ddpm_sample(gaussian_denoiser, params_for(s), key(3), s, (16, 2), variance="large")


# --- DDBM: toy paired problem, target | source ~ N(2 source + 1, tau^2) ---

def bridge_denoiser(params, x_t, t_model):
    """E[x0 | x_t, x1] for x0 | x1 ~ N(2 x1 + 1, tau^2) under the Brownian bridge of `ddbm`."""
    source, tau2, sigma = params
    t = (t_model / ddbm.TIME_SCALE)[:, None]
    m = 2 * source + 1
    c2 = sigma**2 * t * (1 - t)
    gain = tau2 * (1 - t) / ((1 - t) ** 2 * tau2 + c2 + 1e-12)
    return m + gain * (x_t - t * source - (1 - t) * m)


def test_ddbm_starts_at_source_and_ends_at_target():
    source = jax.random.normal(key(4), (32, 3))
    for eta in (1.0, 0.0):
        x, path = ddbm.ddbm_sample(bridge_denoiser, (source, 0.0, 1.0), key(5), source, 10,
                                   sigma=1.0, eta=eta, return_trajectory=True)
        assert path.shape == (11, 32, 3)
        np.testing.assert_array_equal(path[0], source)
        np.testing.assert_allclose(x, 2 * source + 1, atol=1e-5)  # deterministic pairing: exactly the target
        np.testing.assert_array_equal(path[-1], x)
        assert float(jnp.std(path[5] - (0.5 * source + 0.5 * x))) > 0.1  # noisy in between


def test_ddbm_conditional_distribution():
    tau2 = 0.25
    source = jnp.full((N, 2), 0.5)
    x = ddbm.ddbm_sample(bridge_denoiser, (source, tau2, 1.0), key(6), source, 500, sigma=1.0, eta=1.0)
    _assert_gaussian(x, mu=np.array([2.0, 2.0]), var=np.array([tau2, tau2]))


def test_bridge_marginal_endpoints():
    x0, x1, noise = jnp.zeros((2, 4)), jnp.ones((2, 4)), jnp.ones((2, 4))
    ends = ddbm.bridge_marginal(x0, x1, jnp.array([0.0, 1.0]), 2.0, noise)
    np.testing.assert_array_equal(ends, [[0.0] * 4, [1.0] * 4])
    mid = ddbm.bridge_marginal(x0, x1, 0.5, 2.0, noise)
    np.testing.assert_allclose(mid, 0.5 + 2.0 * 0.5, rtol=1e-6)  # mean 1/2, std 2 sqrt(1/4)


# --- guidance ---

def scaled_denoiser(params, x_t, t):
    return params * x_t


def test_classifier_free_guidance():
    x = jnp.ones((2, 3))
    guided = guidance.GuidedDenoiser(scaled_denoiser)
    np.testing.assert_allclose(guided((3.0, 1.0, 0.0), x, None), 1.0)
    np.testing.assert_allclose(guided((3.0, 1.0, 1.0), x, None), 3.0)
    np.testing.assert_allclose(guided((3.0, 1.0, 2.5), x, None), 1.0 + 2.5 * 2.0)
    assert guided == guidance.GuidedDenoiser(scaled_denoiser)  # hashable and equal: no recompilation


def test_drop_ids_rate():
    ids = jnp.zeros((20000,), jnp.int32)
    dropped = guidance.drop_ids(key(7), ids, 0.1, null_id=9)
    assert set(np.unique(dropped)) == {0, 9}
    assert abs(float(jnp.mean(dropped == 9)) - 0.1) < 0.01


# --- Poisson guidance on raw prompts (physics_guidance.py) ---


def _poisson_case(rng, B=2, latent=(2, 3, 2), sino=(1, 4, 5)):
    """A toy linear "decoder" `x0 -> x0 W + b` (positive for small latents) and positive gain and background."""
    n_in, n_out = int(np.prod(latent)), int(np.prod(sino))
    W, b = rng.normal(size=(n_in, n_out)), rng.uniform(1.0, 2.0, n_out)

    def decode(x0):
        return (x0.reshape(x0.shape[0], -1) @ W + b).reshape((x0.shape[0],) + sino)

    gain = rng.uniform(0.5, 2.0, (B,) + sino)
    background = rng.uniform(0.1, 1.0, (B,) + sino)
    x0 = 0.1 * rng.normal(size=(B,) + latent)
    return decode, W, gain, background, x0


def test_poisson_nll_gradient_matches_finite_differences_and_the_analytic_form():
    from allpet_jax.diffusion import physics_guidance as pg

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        decode, W, gain, background, x0 = _poisson_case(rng)
        y = rng.poisson(5.0, gain.shape).astype(np.float64)
        data = pg.PoissonData(jnp.asarray(y), jnp.asarray(gain), jnp.asarray(background), jnp.asarray(0.3))

        @jax.jit
        def nll(x):
            return jnp.sum(pg.poisson_nll(pg.expected_prompts(data, decode(x)), data.y))

        grad = np.asarray(jax.grad(nll)(jnp.asarray(x0)))
        lam = gain * decode(x0) + background
        assert lam.min() > pg.LAMBDA_FLOOR  # the floor is inactive: the NLL is smooth here
        analytic = ((gain * (1.0 - y / lam)).reshape(2, -1) @ W.T).reshape(x0.shape)  # W^T gain (1 - y / lambda)
        np.testing.assert_allclose(grad, analytic, rtol=1e-10, atol=1e-12)
        eps = 1e-6
        for i in range(x0.size):
            e = np.zeros(x0.size)
            e[i] = eps
            e = e.reshape(x0.shape)
            numeric = (float(nll(x0 + e)) - float(nll(x0 - e))) / (2 * eps)
            assert numeric == pytest.approx(grad.ravel()[i], rel=1e-6, abs=1e-7)
        # The guide takes the normalised step scale * sqrt(1 - alpha_bar_t) * g / rms(g), per sample.
        schedule = schedules.cosine_schedule(100)
        t = jnp.array([10, 90])
        stepped = np.asarray(pg.make_poisson_guide(decode, schedule)(data, jnp.asarray(x0), t))
        rms = np.sqrt(np.mean(analytic**2, axis=(1, 2, 3), keepdims=True))
        noise = np.sqrt(1.0 - np.asarray(schedule.alpha_bar)[np.asarray(t)]).reshape(2, 1, 1, 1)
        np.testing.assert_allclose(stepped, x0 - 0.3 * noise * analytic / rms, rtol=1e-6, atol=1e-9)


def test_poisson_nll_is_minimal_where_the_expected_prompts_equal_the_data():
    from allpet_jax.diffusion import physics_guidance as pg

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        decode, _, gain, background, x_star = _poisson_case(rng)
        y = gain * decode(x_star) + background  # reachable: lambda(x*) == y
        data = pg.PoissonData(jnp.asarray(y), jnp.asarray(gain), jnp.asarray(background), jnp.asarray(0.3))

        def nll(x):
            return float(jnp.sum(pg.poisson_nll(pg.expected_prompts(data, decode(x)), data.y)))

        grad = np.asarray(jax.grad(lambda x: jnp.sum(pg.poisson_nll(pg.expected_prompts(data, decode(x)), data.y)))(
            jnp.asarray(x_star)))
        assert np.abs(grad).max() < 1e-10
        best = nll(x_star)
        for _ in range(5):
            assert nll(x_star + 0.01 * rng.normal(size=x_star.shape)) > best
        guide = pg.make_poisson_guide(decode, schedules.cosine_schedule(100))
        step = guide(data, jnp.asarray(x_star), jnp.array([50, 50]))
        np.testing.assert_allclose(np.asarray(step), x_star, atol=1e-9)  # nothing to correct
