"""sampling.py pieces that need no trained model: prompts, and outputs written whole or not at all."""

import os

import numpy as np
import pytest

from allpet_jax import sampling
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import REGIONS
from allpet_jax.data.simulate import TASKS


def test_parse_prompt_names_and_null_ids():
    assert sampling.parse_prompt("tracer=FDG,region=brain").tolist() == [0, 0, 0]
    assert sampling.parse_prompt("tracer=11c-acetate, region=Trunk", "low_dose").tolist() == [
        TRACERS.index("11C-acetate"), REGIONS.index("trunk"), TASKS.index("low_dose")]
    assert sampling.parse_prompt("").tolist() == [len(TRACERS), len(REGIONS), len(TASKS)]  # unconditional
    assert sampling.parse_prompt("region=chest").tolist() == [len(TRACERS), REGIONS.index("chest"), 0]
    with pytest.raises(ValueError, match="unknown tracer 'XYZ'"):
        sampling.parse_prompt("tracer=XYZ")
    with pytest.raises(ValueError, match="key=value"):
        sampling.parse_prompt("FDG")


def test_write_outputs_is_all_or_nothing(tmp_path):
    arrays = {"output": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    out = sampling.write_outputs(tmp_path / "run", arrays, mat=True)
    with np.load(os.path.join(out, "outputs.npz"), allow_pickle=False) as f:
        np.testing.assert_array_equal(f["output"], arrays["output"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        sampling.write_outputs(tmp_path / "run", arrays)

    def broken_figure(path):
        raise RuntimeError("figure failed")

    with pytest.raises(RuntimeError, match="figure failed"):
        sampling.write_outputs(tmp_path / "other", arrays, figures=[("a.png", broken_figure)])
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing half-written, no temporary directory left


# --- physics: clinical OSEM and the Poisson guidance data ------------------------------------------------


def _scanner(geom, rng, channels=1):
    """Random eta, a `(A, B)` and scatter, randoms `(C, A, B)` in the simulator's units (before eta)."""
    eta = rng.uniform(0.7, 1.3, geom.sino_shape).astype(np.float32)
    a = rng.uniform(0.2, 0.9, geom.sino_shape).astype(np.float32)
    s = rng.uniform(0.5, 1.5, (channels,) + geom.sino_shape).astype(np.float32)
    r = np.full((channels,) + geom.sino_shape, 0.8, np.float32)
    return eta, a, s, r


def test_clinical_osem_of_expected_prompts_converges_to_the_image():
    import radon

    geom = radon.Geometry((16, 16), 24, 16)
    mask = radon.fov_mask(geom) > 0
    yy, xx = np.mgrid[:16, :16]
    image = ((1.0 + 2.0 * np.exp(-((xx - 6) ** 2 + (yy - 9) ** 2) / 6.0)) * mask).astype(np.float32)
    eta, a, s, r = _scanner(geom, np.random.default_rng(4))
    count_scale = 30.0
    prompts = eta * (a * count_scale * np.asarray(radon.forward(image, geom)) + s + r)  # noise-free, (1, A, B)
    errors = []
    for n_iter in (1, 8, 64):
        x = sampling.clinical_osem(prompts[None], geom, normalisation=eta[None], attenuation=a[None], scatter=s[None],
                                   randoms=r[None], n_iter=n_iter, n_subsets=2)
        assert x.shape == (1, 1, 16, 16)
        errors.append(np.linalg.norm((x[0, 0] / count_scale - image)[mask]) / np.linalg.norm(image[mask]))
    # Measured 0.208, 0.090, 0.053 (the floor is the 24-angle sampling of a 16 x 16 image).
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.065


def _physics_inputs(n=2, channels=1, dose=0.1):
    import radon

    geom = radon.Geometry((8, 8), 6, 8)
    rng = np.random.default_rng(0)
    eta, a, s, r = _scanner(geom, rng, channels)
    tile = lambda x: np.repeat(x[None], n, axis=0)
    return {"prompts": rng.poisson(5.0, (n, channels) + geom.sino_shape).astype(np.float32),
            "normalisation": tile(eta), "attenuation": tile(a), "scatter": tile(s), "randoms": tile(r),
            "dose": np.full((n,), dose, np.float32),
            "prompt": np.tile(np.array([[0, 0, TASKS.index("low_dose")]], np.int32), (n, 1))}


def _stub_model(task="low_dose"):
    from types import SimpleNamespace

    from allpet_jax.data import pipeline

    return SimpleNamespace(meta={"task": task, "channels": {"source": 1, "target": 1}},
                           normalisation=pipeline.Normalisation(source_scale=3.0, target_scale=40.0))


def test_add_poisson_data_builds_the_likelihood_of_the_raw_prompts():
    inputs = _physics_inputs()
    batch = {"prompt": inputs["prompt"].copy(), "target": np.zeros_like(inputs["prompts"])}
    out = sampling.add_poisson_data(_stub_model(), batch, inputs)
    eta, a = inputs["normalisation"][:, None], inputs["attenuation"][:, None]
    np.testing.assert_array_equal(out["guide_y"], inputs["prompts"])
    np.testing.assert_allclose(out["guide_gain"], eta * a * 0.1 * 40.0, rtol=1e-6)  # eta a d target_scale
    np.testing.assert_allclose(out["guide_background"], eta * (inputs["scatter"] + inputs["randoms"]), rtol=1e-6)
    np.testing.assert_array_equal(out["prompt"], inputs["prompt"])
    # --dose overrides the inputs' own; the foundation model (zero-pair arm) sees its synthesis task id.
    zero_pair = sampling.add_poisson_data(_stub_model("synthesis"), batch, inputs, dose=0.5)
    np.testing.assert_allclose(zero_pair["guide_gain"], eta * a * 0.5 * 40.0, rtol=1e-6)
    np.testing.assert_array_equal(zero_pair["prompt"][:, 2], TASKS.index("synthesis"))
    np.testing.assert_array_equal(batch["prompt"][:, 2], TASKS.index("low_dose"))  # the caller's batch is kept
    with pytest.raises(ValueError, match="checkpoint's task is 'delayed_frame'"):
        sampling.add_poisson_data(_stub_model("delayed_frame"), batch, inputs)
    other = dict(inputs, prompt=np.tile(np.array([[0, 0, TASKS.index("synthesis")]], np.int32), (2, 1)))
    with pytest.raises(ValueError, match=r"inputs are of task\(s\) \['synthesis'\]"):
        sampling.add_poisson_data(_stub_model("synthesis"), batch, other)


def test_add_poisson_data_names_the_missing_physics_in_one_line():
    inputs = _physics_inputs()
    del inputs["scatter"], inputs["randoms"], inputs["dose"]
    batch = {"prompt": inputs["prompt"], "target": np.zeros_like(inputs["prompts"])}
    with pytest.raises(ValueError, match="missing: scatter, randoms, dose ") as info:
        sampling.add_poisson_data(_stub_model(), batch, inputs)
    assert "\n" not in str(info.value) and "data.physics" in str(info.value) and "variables" in str(info.value)
    with pytest.raises(ValueError, match="missing: scatter, randoms ") as info:
        sampling.add_poisson_data(_stub_model(), batch, inputs, dose=0.1)
