"""allpet_jax.generation: the generation features separate real sinograms from degraded ones, and the
memorisation ratio tells copies from new samples; against closed forms where there are any."""

import functools

import jax
import numpy as np
import pytest

from allpet_jax import generation
from allpet_jax.data import pipeline
from configs import base


@functools.lru_cache(maxsize=1)
def _real():
    """160 simulated synthesis sinograms at the smoke geometry (32 x 32), and that geometry."""
    data = base.get_config("smoke").data
    data.task, data.n_test = "synthesis", 160
    source = pipeline.make_source(data, "test", progress=False)
    return np.asarray(source.read_batch(list(range(160)))["target"])[:, 0], pipeline.geometry_from_config(data)


def test_band_power_puts_a_cosine_in_its_band():
    # a cosine along x at radial frequency f sits in band floor(f / 0.5 * BANDS); the others hold ~0
    n = 48
    for f in (5 / 48, 13 / 48, 21 / 48):
        x = np.cos(2 * np.pi * f * np.arange(n))[None, None, :] * np.ones((1, n, 1))
        band = int(f / 0.5 * generation.BANDS)
        logs = generation.band_power(x)[0]  # log10(band / band 0), bands 1..BANDS-1
        powers = np.concatenate([[0.0], logs])  # band 0 relative to itself
        assert int(np.argmax(powers)) == band
        others = np.delete(powers, band)
        assert powers[band] - others.max() > 8  # 1e8 times the leakage (rounding only)


def test_frechet_on_features_separates_real_from_slightly_degraded_sinograms():
    x, geom = _real()
    dist = generation.validate_features(x[:80], x[80:], geom, jax.random.key(0))
    # measured at 80 per set: real 2.8 (the F^2 / N bias of two samples of one distribution), blur 32, noise 45,
    # blocks 6.8; at 512 per set and 64 x 64 (RESULTS.md): real 0.4, the degraded 6-36
    for kind in generation.DEGRADATIONS:
        assert dist[kind] > 2 * dist["real"], (kind, dist)


def test_memorisation_ratio_is_small_for_copies_and_about_one_for_new_samples():
    x, _ = _real()
    train, held, fresh = x[:48], x[48:96], x[96:144]
    rng = np.random.default_rng(0)
    copies = train[:16] * (1 + 0.01 * rng.normal(size=train[:16].shape))
    assert np.median(generation.memorisation_ratio(copies, train, held)) < 0.2
    ratio = generation.memorisation_ratio(fresh, train, held)
    assert 0.8 < np.median(ratio) < 1.25, np.median(ratio)
    # the distance is scale-free: a copy at 3x the counts is still a copy
    assert np.median(generation.memorisation_ratio(3 * copies, train, held)) < 0.2
    with pytest.raises(ValueError, match="same size"):
        generation.memorisation_ratio(copies, train, held[:10])


def test_nearest_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    q, r = rng.uniform(size=(7, 5, 4)), rng.uniform(size=(11, 5, 4))
    unit = lambda a: a.reshape(len(a), -1) / a.reshape(len(a), -1).sum(axis=1, keepdims=True)  # noqa: E731
    brute = np.sqrt(((unit(q)[:, None] - unit(r)[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(generation.nearest_distance(q, r, chunk=3), brute, rtol=1e-9, atol=1e-12)


def test_frechet_sd_falls_as_one_over_root_n():
    """Two sets from one Gaussian: the bootstrap spread of their Frechet distance shrinks about as 1/N (a
    squared distance) at fixed dimension; at 16x the samples, by far more than 4x."""
    rng = np.random.default_rng(0)
    sds = [generation.frechet_sd(rng.standard_normal((n, 6)), rng.standard_normal((n, 6)), jax.random.key(1), 50)
           for n in (100, 1600)]
    assert sds[0] > 0 and 6 < sds[0] / sds[1] < 40, sds  # measured: 14.8
    same = rng.standard_normal((200, 6))
    assert generation.frechet_sd(same, same, jax.random.key(2), 20) == generation.frechet_sd(same, same, jax.random.key(2), 20)


def test_band_means_hold_a_white_noise_variance_in_every_band():
    # Parseval: white noise of variance s^2 has mean |FFT|^2 / (H W) = s^2 at every frequency but the zeroed
    # mean, which is one of the lowest band's 9 frequencies
    # on a 16 x 16 grid (radius below 0.1: the origin, 4 axial and 4 diagonal neighbours)
    x = 1.5 * np.random.default_rng(0).normal(size=(400, 16, 16))
    bands = generation.band_means(x).mean(axis=0)
    np.testing.assert_allclose(bands[1:], 1.5 ** 2, rtol=0.05)
    np.testing.assert_allclose(bands[0], 1.5 ** 2 * 8 / 9, rtol=0.05)


def test_latent_statistics_of_a_shrunk_copy_and_the_clip():
    real = np.random.default_rng(1).standard_t(3, size=(64, 8, 8, 4))  # heavy tails, as the real latents
    stats = generation.latent_statistics(0.5 * real, real, clip=5.0)
    assert stats["std_ratio"] == pytest.approx(0.5)
    np.testing.assert_allclose(stats["band_power_ratio"], 0.25, rtol=1e-9)  # power scales as amplitude squared
    assert stats["generated_abs_q99"] == pytest.approx(0.5 * stats["real_abs_q99"])
    assert stats["real_share_beyond_clip"] == pytest.approx(np.mean(np.abs(real) > 5))
    assert stats["real_samples_beyond_clip"] == pytest.approx(np.mean(np.abs(real).max(axis=(1, 2, 3)) > 5))
    assert "real_share_beyond_clip" not in generation.latent_statistics(real, real, clip=None)


def test_sampled_latents_decode_to_the_sampled_sinograms():
    """`generate(latents=True)` then `decode` (what `generation` scores) is `generate` in one program, and
    `encode` is the stage's own encoding at its scale."""
    from allpet_jax import sampling
    from allpet_jax.models import latent
    from model_helpers import random_trained_stage

    trained = random_trained_stage()
    batch = sampling.model_batch(trained, {"prompt": np.array([[0, 0, 0], [1, 2, 0], [0, 1, 0]], np.int32),
                                           "geometry_only": np.zeros((3, 1, 32, 32), np.float32)})
    key = jax.random.key(3)
    sinos = sampling.generate(trained, batch, key, num_steps=3, progress=False)[0]
    z = sampling.generate(trained, batch, key, num_steps=3, progress=False, latents=True)[0]
    assert z.shape[0] == 3 and z.ndim == 4
    np.testing.assert_allclose(sampling.decode(trained, z, chunk=2), sinos, rtol=1e-4,
                               atol=1e-4 * float(np.abs(sinos).max()))
    frozen, scale = trained.state.frozen, trained.normalisation.target_scale
    from allpet_jax.training import stages
    ae = stages.autoencoder_stage(trained.config, trained.config.seed)
    expected = latent.encode(ae.graphdef, frozen["ae"], sinos / scale, frozen["scale"])
    np.testing.assert_allclose(sampling.encode(trained, sinos, chunk=2), expected, rtol=1e-4, atol=1e-5)
