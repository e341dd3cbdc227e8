"""The error-structure diagnostic: errors scaled to a sinogram PSNR exactly, and a blur costs the image more
than Poisson noise of the same sinogram PSNR (the finding it exists to show, at the smoke preset)."""

import numpy as np

from allpet_jax import error_structure, metrics
from allpet_jax.experiments import preset_config


def test_errors_are_scaled_to_the_asked_psnr():
    rng = np.random.default_rng(0)
    clean = rng.uniform(1, 5, (3, 1, 8, 8)).astype(np.float32)
    out = error_structure.at_psnr(clean, rng.standard_normal(clean.shape).astype(np.float32), 27.0)
    np.testing.assert_allclose(metrics.psnr(out, clean), 27.0, atol=1e-3)


def test_a_blur_costs_the_image_more_than_noise_of_the_same_sinogram_psnr():
    r = error_structure.run(preset_config("smoke"), 0.05, 4, psnrs=(30.0,), n_val=4, kinds=("poisson", "blur"))["rows"]
    assert r["clean target"]["osem_psnr"] > r["noisy target"]["osem_psnr"]
    for name in ("poisson @ 30", "blur @ 30"):
        assert abs(r[name]["sino_psnr"] - 30.0) < 1e-3
    assert r["blur @ 30"]["gain"]["hi"] < r["poisson @ 30"]["gain"]["lo"]  # measured: -2.0 and +1.9 dB
    assert "| blur @ 30 | 30.00 |" in error_structure.markdown({"rows": r, "clinical_osem_psnr": 1.0,
                                                                  "clinical_sigma_px": 0.5})
