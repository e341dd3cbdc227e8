"""Losses: zero at the exact answer, the documented weights, finite gradients through the real networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import radon
from allpet_jax import losses
from allpet_jax.diffusion import ddbm, linear_schedule, schedules
from allpet_jax.models import LatentUNet, SinogramAutoencoder, condition_channel_count, condition_channels
from model_helpers import TINY_AE, quick_jit, rngs


def smooth_sinograms(key, batch, n_angles=32, n_bins=32):
    """Sinograms of random discs: smooth, non-negative, unit scale."""
    k1, k2 = jax.random.split(key)
    geom = radon.Geometry(image_shape=(n_bins, n_bins), n_angles=n_angles, n_bins=n_bins)
    yy, xx = jnp.meshgrid(jnp.arange(n_bins) - n_bins / 2, jnp.arange(n_bins) - n_bins / 2, indexing="ij")
    c = jax.random.uniform(k1, (batch, 1, 1, 2), minval=-5, maxval=5)
    r = jax.random.uniform(k2, (batch, 1, 1), minval=4, maxval=10)
    images = ((yy - c[..., 0]) ** 2 + (xx - c[..., 1]) ** 2 < r**2).astype(jnp.float32)
    sino = radon.forward(images, geom)[:, None]
    return sino / jnp.max(sino), geom


def lossless_autoencoder(sino):
    """factor 4, one channel, 16 latent channels: the PCA-initialised shortcut is invertible."""
    ae = quick_jit(lambda: SinogramAutoencoder(latent_channels=16, rngs=rngs(0), **TINY_AE))()
    ae.init_patch_pca(sino)
    return ae


def test_autoencoder_loss_parts_image_term_and_gradients():
    sino, geom = smooth_sinograms(jax.random.key(0, impl="rbg"), 4)
    ae = lossless_autoencoder(sino)

    @quick_jit
    def run(ae, sino):
        exact = losses.autoencoder_loss(ae, sino, None, reconstruction="l2", kl_weight=0.0, image_weight=1.0,
                                        geom=geom)
        plain = losses.autoencoder_loss(ae, sino, None, reconstruction="l1")
        # With a sampled latent (std e^-5) the reconstruction is no longer exact: every term has a gradient.
        sampled = nnx.value_and_grad(
            lambda m: losses.autoencoder_loss(m, sino, jax.random.key(2, impl="rbg"), kl_weight=1e-3, image_weight=0.1,
                                              geom=geom), has_aux=True)(ae)
        return exact, plain, sampled, ae.encode(sino)[0]

    (total, parts), (_, plain_parts), ((_, sampled_parts), grads), mean = run(ae, sino)
    assert float(parts["reconstruction"]) < 1e-9 and float(parts["image"]) < 1e-9
    assert float(total) == pytest.approx(float(parts["reconstruction"] + parts["image"]))
    # KL of N(mean, e^-10) against N(0, 1) per element: 0.5 (mean^2 + e^-10 - 1 + 10)
    want = 0.5 * (np.mean(np.asarray(mean) ** 2) + np.exp(-10) + 9)
    assert float(parts["kl"]) == pytest.approx(want, rel=1e-4)
    assert set(plain_parts) == {"reconstruction", "kl", "total"}
    assert float(sampled_parts["reconstruction"]) > 1e-5 and float(sampled_parts["image"]) > 0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.sum(jnp.abs(grads["decoder"]["conv_out"]["kernel"][...]))) > 0
    assert float(jnp.sum(jnp.abs(grads["encoder"]["conv_out"]["kernel"][...]))) > 0
    with pytest.raises(ValueError, match="needs geom"):
        losses.autoencoder_loss(ae, sino, None, image_weight=1.0)


def test_tma_weight_and_weighted_mse():
    tma = jnp.zeros((1, 8, 8)).at[0, :4, :4].set(1.0)
    w = losses.tma_latent_weight(tma, (2, 2), alpha=3.0)
    np.testing.assert_allclose(w[0, :, :, 0], [[4.0, 1.0], [1.0, 1.0]])
    pred, target = jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1))
    np.testing.assert_allclose(losses.weighted_mse(pred, target), [1.0])
    np.testing.assert_allclose(losses.weighted_mse(pred, target, w), [(4 + 1 + 1 + 1) / 4])


def test_consistency_loss_zero_for_exact_predictions():
    sino, _ = smooth_sinograms(jax.random.key(3, impl="rbg"), 2)
    mask = (jnp.arange(32)[None, None, :, None] < 16).astype(jnp.float32) * jnp.ones_like(sino)
    ae = lossless_autoencoder(sino)
    schedule = linear_schedule(100)

    @quick_jit
    def run(ae):
        z_full, z_pos, z_neg = (ae.encode(v)[0] for v in (sino, mask * sino, (1 - mask) * sino))
        S = ae.decode(z_pos) + ae.decode(z_neg)
        exact = losses.consistency_loss(ae.decode, z_pos, z_neg, S)
        wrong = losses.consistency_loss(ae.decode, z_pos, z_pos, S)
        # Through the full RMAS loss with an oracle x0-predictor: both parts vanish.
        views = jnp.stack([z_full, z_pos, z_neg])
        oracle = lambda x_t, t: views.reshape((-1,) + views.shape[2:])  # noqa: E731
        full = losses.rmas_diffusion_loss(oracle, jax.random.key(4, impl="rbg"), schedule, views, parameterization="x0",
                                          decode=ae.decode, sino=S, consistency_weight=1.0)
        off = losses.rmas_diffusion_loss(oracle, jax.random.key(4, impl="rbg"), schedule, views, parameterization="x0")
        return S, exact, wrong, full, off

    S, exact, wrong, (total, parts), (_, off_parts) = run(ae)
    np.testing.assert_allclose(S, sino, atol=1e-4)  # P + N = S survives the (lossless) autoencoder
    assert float(jnp.max(exact)) == 0.0 and float(jnp.min(wrong)) > 1e-4
    assert float(parts["diffusion"]) == 0.0 and float(parts["consistency"]) == pytest.approx(0.0, abs=1e-12)
    assert float(total) == pytest.approx(0.0, abs=1e-12)
    assert set(off_parts) == {"diffusion", "total"}  # off switch: no consistency part, no decoder needed


def test_diffusion_loss_oracle_eps_is_zero():
    """An eps-predictor that inverts q_sample with the true x0 is exact, so the loss is 0 up to rounding."""
    schedule = linear_schedule(100)
    x0 = jax.random.normal(jax.random.key(5, impl="rbg"), (3, 4, 4, 2))
    oracle = lambda x_t, t: schedules.eps_from_x0(schedule, x_t, t, x0)  # noqa: E731
    loss, parts = losses.diffusion_loss(oracle, jax.random.key(6, impl="rbg"), schedule, x0)
    assert float(loss) < 1e-6 and parts["total"] is loss
    loss, _ = losses.diffusion_loss(lambda x_t, t: jnp.zeros_like(x_t), jax.random.key(6, impl="rbg"), schedule, x0)
    assert float(loss) == pytest.approx(1.0, abs=0.2)  # E[eps^2] = 1


def test_bridge_loss_oracle_is_zero():
    target = jax.random.normal(jax.random.key(7, impl="rbg"), (2, 4, 4, 2))
    loss, parts = losses.bridge_loss(lambda x_t, t: target, jax.random.key(8, impl="rbg"), target, target + 1.0)
    assert float(loss) == 0.0 and set(parts) == {"bridge", "total"}


def test_bridge_loss_per_sample_keys_draw_each_sample_alone():
    """With one key per sample, sample b's bridge state is what a batch of one draws with its own key, so a
    batch split over devices or micro-batches sees the same numbers."""
    target = jax.random.normal(jax.random.key(7), (3, 4, 4, 2))
    source = target + 1.0
    keys = jax.random.split(jax.random.key(8), 3)
    seen = []
    losses.bridge_loss(lambda x_t, t: seen.append((x_t, t)) or x_t, keys, target, source, sigma=0.5)
    for b in range(3):
        x_t, t = ddbm.bridge_training_input(keys[b], target[b:b + 1], source[b:b + 1], 0.5)
        np.testing.assert_allclose(np.asarray(seen[0][0][b]), np.asarray(x_t[0]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(seen[0][1][b]), float(t[0]), rtol=1e-6)


def test_regression_loss_is_the_weighted_mse():
    pred, target = jnp.zeros((2, 3, 3, 1)), jnp.ones((2, 3, 3, 1))
    weight = jnp.full((2, 3, 3, 1), 2.0).at[1].set(4.0)
    loss, parts = losses.regression_loss(pred, target, weight)
    assert float(loss) == pytest.approx(3.0) and set(parts) == {"regression", "total"}
    assert float(losses.regression_loss(pred, target)[0]) == pytest.approx(1.0)


def test_rmas_loss_gradients_finite_through_unet_and_decoder():
    sino, _ = smooth_sinograms(jax.random.key(9, impl="rbg"), 2)
    mask = jnp.ones((2, 32, 32)).at[:, :, :16].set(0.0)
    ae = quick_jit(lambda: SinogramAutoencoder(latent_channels=4, rngs=rngs(0), **TINY_AE))()
    unet = quick_jit(lambda: LatentUNet(
        latent_channels=4, cond_channels=condition_channel_count(4), channels=(8, 16), num_res_blocks=1,
        attention_levels=(1,), num_heads=2, max_groups=4, num_tracers=3, num_regions=4, num_tasks=6, rngs=rngs(1)))()
    cond = jnp.concatenate([condition_channels(2, (8, 8), 4, mask=m) for m in (jnp.ones_like(mask), mask, 1 - mask)])
    tma = jnp.zeros((2, 32, 32)).at[:, 10:20, :].set(1.0)
    schedule = linear_schedule(100)

    @quick_jit
    def run(unet, ae):
        stacked = jnp.concatenate([sino, mask[:, None] * sino, (1 - mask[:, None]) * sino])
        views = ae.encode(stacked)[0].reshape((3, 2, 8, 8, 4))

        def loss_fn(unet):
            return losses.rmas_diffusion_loss(
                lambda x_t, t: unet(x_t, t, cond=cond), jax.random.key(10, impl="rbg"), schedule, views,
                parameterization="v",
                weight=losses.tma_latent_weight(tma, (8, 8), alpha=2.0), decode=ae.decode, sino=sino,
                consistency_weight=0.5)

        return nnx.value_and_grad(loss_fn, has_aux=True)(unet)

    (total, parts), grads = run(unet, ae)
    assert float(total) == pytest.approx(float(parts["diffusion"] + 0.5 * parts["consistency"]), rel=1e-6)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.sum(jnp.abs(grads["conv_out"]["kernel"][...]))) > 0


def test_per_sample_keys_draw_the_same_numbers_in_any_split():
    """One key per sample: a sample's step and noise depend only on its own key, not on the batch it is in."""
    schedule = linear_schedule(100)
    keys = jax.random.split(jax.random.key(11), 6)
    t, noise = losses.draw_steps_and_noise(keys, schedule, 6, (4, 4, 2))
    t2, noise2 = losses.draw_steps_and_noise(keys[2:5], schedule, 3, (4, 4, 2))
    np.testing.assert_array_equal(t[2:5], t2)
    np.testing.assert_array_equal(noise[2:5], noise2)
    assert noise.shape == (6, 4, 4, 2) and int(t.min()) >= 0 and int(t.max()) < 100
    assert abs(float(noise.std()) - 1.0) < 0.15 and len(set(np.asarray(t).tolist())) > 1
    with pytest.raises(ValueError, match="one per sample"):
        losses.draw_steps_and_noise(keys[:5], schedule, 6, (4, 4, 2))


def test_completion_loss_oracle_and_hand_computed_consistency():
    """A predictor that returns the exact target has zero denoising loss; one whose clean estimate is off
    by `d` everywhere has the decoded term `mean_b alpha_bar_{t_b} * mean(unseen_b) * d^2` (the decoder
    here is the identity on a (B, 1, h, w) view of the latent), and its share is w*cons / total."""
    schedule = linear_schedule(100)
    B, h, w = 4, 6, 5
    x0 = jax.random.normal(jax.random.key(1), (B, h, w, 1))
    keys = jax.random.split(jax.random.key(2), B)
    t, noise = losses.draw_steps_and_noise(keys, schedule, B, x0.shape[1:])
    unseen = (jax.random.uniform(jax.random.key(3), (B, h, w)) < 0.4).astype(jnp.float32)
    decode = lambda lat: jnp.moveaxis(lat, -1, 1)  # noqa: E731  (B, h, w, 1) -> (B, 1, h, w)
    sino = decode(x0)
    target = schedules.training_target(schedule, "x0", x0, t, noise)
    exact, parts = losses.completion_loss(lambda x_t, tt: target, keys, schedule, x0, parameterization="x0",
                                          decode=decode, sino=sino, unseen=unseen, consistency_weight=2.0)
    assert float(exact) < 1e-10 and float(parts["consistency"]) < 1e-10
    d = 0.3
    total, parts = losses.completion_loss(lambda x_t, tt: target + d, keys, schedule, x0, parameterization="x0",
                                          decode=decode, sino=sino, unseen=unseen, consistency_weight=2.0)
    ab = np.asarray(schedule.alpha_bar)[np.asarray(t)]
    cons = np.mean(ab * np.asarray(unseen).reshape(B, -1).mean(axis=1) * d**2)
    np.testing.assert_allclose(float(parts["consistency"]), cons, rtol=1e-5)
    np.testing.assert_allclose(float(parts["diffusion"]), d**2, rtol=1e-5)
    np.testing.assert_allclose(float(total), d**2 + 2.0 * cons, rtol=1e-5)
    np.testing.assert_allclose(float(parts["consistency_share"]), 2.0 * cons / (d**2 + 2.0 * cons), rtol=1e-5)
    with pytest.raises(ValueError, match="needs decode"):
        losses.completion_loss(lambda x_t, tt: target, keys, schedule, x0, consistency_weight=1.0)


def test_ramp_mse_is_the_image_error_of_a_consistent_sinogram_error():
    """For an error that is the Radon transform of an image error (as a blur's is), the ramp-weighted MSE
    tracks the image error's energy (Fourier slice theorem) whatever its smoothness, where the plain MSE
    does not; scikit-image's radon is the forward reference."""
    from scipy import ndimage
    from skimage.transform import radon

    rng = np.random.default_rng(0)
    n, angles = 64, 128
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    disk = xx**2 + yy**2 < (n / 2 - 8) ** 2
    ramp, plain = [], []
    for sigma in (0.7, 4.0):  # sharp and smooth image errors
        f = np.stack([ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma) * disk for _ in range(3)])
        e = np.stack([radon(x, theta=np.arange(angles) * 180.0 / angles, circle=True).T for x in f])  # (3, A, B)
        energy = np.mean(f**2)
        ramp.append(float(jnp.mean(losses.ramp_mse(jnp.asarray(e, jnp.float32)))) / energy)
        plain.append(np.mean(e**2) / energy)
    assert max(ramp) / min(ramp) < 1.5 and max(plain) / min(plain) > 4  # measured: 1.36 and 6.2


def test_ramp_mse_against_a_full_spectrum_reference():
    rng = np.random.default_rng(1)
    err = rng.standard_normal((2, 3, 5, 16))
    spectrum = np.fft.fft(err, n=32, axis=-1)
    w = np.maximum(np.abs(np.fft.fftfreq(32, 1 / 32)), 1)
    w /= w.mean()
    expected = (w * np.abs(spectrum) ** 2).sum(axis=-1).reshape(2, -1).sum(axis=1) / 32 / (3 * 5 * 16)
    np.testing.assert_allclose(losses.ramp_mse(jnp.asarray(err, jnp.float32)), expected, rtol=1e-5)
    white = rng.standard_normal((1, 64, 4096))  # white noise keeps its MSE
    np.testing.assert_allclose(losses.ramp_mse(jnp.asarray(white, jnp.float32)), np.mean(white**2), rtol=0.02)
    np.testing.assert_allclose(losses.ramp_mse(jnp.asarray(err, jnp.float32).swapaxes(-1, -2), axis=-2), expected,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="sinogram_loss must be one of"):
        losses.regression_loss(jnp.zeros(3), jnp.zeros(3), sinogram_loss="l1")


def test_min_snr_caps_the_loss_of_a_closed_skip_at_gamma():
    """A closed learned skip with a zero output predicts x0 = 0, so its `v` error is x0 / s_t and its loss
    (SNR_t + 1) |x0|^2, unbounded as t -> 0; min-SNR-gamma weighting makes it min(SNR_t, gamma) |x0|^2."""
    schedule = schedules.cosine_schedule(1000)
    x0 = jax.random.normal(jax.random.key(0), (64, 2, 2, 3))
    keys = jax.random.split(jax.random.key(1), 64)
    t, _ = losses.draw_steps_and_noise(keys, schedule, 64, x0.shape[1:])
    closed = lambda x_t, t: schedules.skip_offset(schedule, x_t, t, 0.0)  # noqa: E731
    snr = np.asarray(schedule.alpha_bar)[np.asarray(t)] / (1 - np.asarray(schedule.alpha_bar)[np.asarray(t)])
    energy = np.mean(np.asarray(x0).reshape(64, -1) ** 2, axis=1)
    plain, _ = losses.diffusion_loss(closed, keys, schedule, x0, parameterization="v")
    capped, _ = losses.diffusion_loss(closed, keys, schedule, x0, parameterization="v", min_snr=5.0)
    np.testing.assert_allclose(plain, np.mean((snr + 1) * energy), rtol=2e-3)
    np.testing.assert_allclose(capped, np.mean(np.minimum(snr, 5.0) * energy), rtol=2e-3)
    for p, expected in (("eps", np.minimum(snr, 5.0) / snr), ("x0", np.minimum(snr, 5.0))):
        np.testing.assert_allclose(losses.min_snr_weight(schedule, t, p, 5.0), expected, rtol=1e-4)
