"""allpet_jax.evaluate's figure: each row is the image that row was scored on."""

import numpy as np
from scipy import ndimage

from allpet_jax import evaluate


def test_figure_rows_are_the_scored_images(monkeypatch):
    # Reconstruction stubbed as "sinogram / count_scale", so each row's image is known in closed form; the
    # rows must then be the first slices, post-filtered with that row's own tuned width, channel 0.
    monkeypatch.setattr(evaluate, "image_space", lambda sino, sample, geom: {
        "osem": np.asarray(sino) / np.asarray(sample["count_scale"]).reshape(-1, 1, 1, 1)})
    rng = np.random.default_rng(0)
    n, shape = 6, (6, 2, 8, 8)
    truth, scale = rng.random(shape).astype(np.float32), np.arange(1.0, n + 1)
    model, pixel = "ALL-PET (ddim 20), mean of 8", "pixel U-Net regressor"
    sinograms = {"identity": {"test": rng.random(shape)}, f"{model[:-10]}, one sample": {"test": rng.random(shape)},
                 model: {"test": (truth + 0.1) * scale.reshape(-1, 1, 1, 1)}, pixel: {"test": rng.random(shape)}}
    images = {evaluate.SOURCE_CLINICAL: {"test": {"osem": rng.random(shape)}},
              evaluate.FULL_DOSE: {"test": {"osem": rng.random(shape)}}}
    sigmas = {evaluate.SOURCE_CLINICAL: {"osem": 1.0}, evaluate.FULL_DOSE: {"osem": 0.0}, model: {"osem": 0.0},
              pixel: {"osem": 0.5}, "identity": {"osem": 2.0}}
    rows = evaluate.figure_rows(sinograms, images, sigmas, {"image": truth, "count_scale": scale}, geom=None, shown=4)
    names = [name for name, _, _ in rows]
    assert names == ["true activity", "clinical OSEM, low dose", "ALL-PET\n(ddim 20), mean of 8", pixel,
                     "full-dose clinical OSEM", "model - truth"]
    by = {name: a for name, a, _ in rows}
    np.testing.assert_allclose(by["true activity"], truth[:4, 0])
    clinical = ndimage.gaussian_filter(images[evaluate.SOURCE_CLINICAL]["test"]["osem"][:4, 0], (0, 1.0, 1.0))
    np.testing.assert_allclose(by["clinical OSEM, low dose"], clinical, rtol=1e-6)
    pixel_image = sinograms[pixel]["test"][:4, 0] / scale[:4].reshape(-1, 1, 1)
    np.testing.assert_allclose(by[pixel], ndimage.gaussian_filter(pixel_image, (0, 0.5, 0.5)), rtol=1e-6)
    np.testing.assert_allclose(by["model - truth"], 0.1, rtol=1e-5)
    assert [kind for _, _, kind in rows] == ["value"] * 5 + ["error"]
