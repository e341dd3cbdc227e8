"""Exported weights: the round trip keeps every parameter (exactly in float32, to float16 rounding otherwise),
sampling from the file reproduces the checkpoint's samples, and a wrong file is one clear error."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allpet_jax import export, metrics, sampling
from model_helpers import random_trained_stage

_STAGE = functools.lru_cache(maxsize=1)(random_trained_stage)


def _samples(trained):
    batch = sampling.model_batch(trained, {"prompt": np.array([[0, 0, 0], [1, 2, 0]], np.int32),
                                           "geometry_only": np.zeros((2, 1, 32, 32), np.float32)})
    return sampling.generate(trained, batch, jax.random.key(0), num_steps=4, progress=False)[0]


def test_round_trip_keeps_every_parameter_and_the_samples(tmp_path):
    trained = _STAGE()
    exact = export.load(str(tmp_path / "f32.npz")) if export.export(trained, str(tmp_path / "f32.npz"), "float32") else None
    for a, b in zip(jax.tree.leaves((trained.state.ema, trained.state.frozen)), jax.tree.leaves((exact.state.ema, exact.state.frozen))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert exact.step == 7 and exact.normalisation == trained.normalisation and exact.name == "foundation"
    assert exact.config.to_json() == trained.config.to_json()
    reference = _samples(trained)

    size = export.export(trained, str(tmp_path / "f16.npz"))
    assert size < 0.6 * (tmp_path / "f32.npz").stat().st_size  # float16 halves the parameters
    half = export.load(str(tmp_path / "f16.npz"))
    for a, b in zip(jax.tree.leaves(trained.state.ema), jax.tree.leaves(half.state.ema)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)  # float16 rounding
    # the samples move far less than their own spread (PSNR of one against the other); run through the first
    # stage's compiled sampler (the parameters are its arguments), so the test compiles it once
    assert float(np.mean(metrics.psnr(_samples(dataclasses.replace(trained, state=half.state))[:, 0],
                                      reference[:, 0]))) > 40


def test_a_wrong_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained weights 'nope'"):
        export.load("nope")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an exported weights file"):
        export.load(str(tmp_path / "other.npz"))
    trained = _STAGE()
    path = str(tmp_path / "w.npz")
    export.export(trained, path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    first = next(k for k in arrays if k.startswith("ema/"))
    np.savez(tmp_path / "cut.npz", **{k: v for k, v in arrays.items() if k != first})
    with pytest.raises(ValueError, match="lacks 1 parameter"):
        export.load(str(tmp_path / "cut.npz"))
    np.savez(tmp_path / "bent.npz", **dict(arrays, **{first: np.zeros((3, 3, 3, 3, 3), np.float16)}))
    with pytest.raises(ValueError, match="has shape"):
        export.load(str(tmp_path / "bent.npz"))
    with pytest.raises(ValueError, match="one of --workdir"):
        sampling.load_for_task("synthesis", workdir="/x", pretrained=path)


def test_the_shipped_weights_load_and_sample():
    """weights/*.npz still fit the code: every parameter found with its shape, and a sample drawn."""
    names = sorted(f[:-4] for f in os.listdir(export.WEIGHTS_DIR) if f.endswith(".npz"))
    assert names, "no weights shipped in weights/"
    for name in names:
        trained = export.load(name)
        assert trained.meta["format"] == export.FORMAT and trained.config.preset == "workstation"
        if trained.name == "foundation":
            geom = sampling.geometry_of(trained)
            batch = sampling.model_batch(trained, {"prompt": np.array([[0, 0, 0]], np.int32),
                                                   "geometry_only": np.zeros((1, 1) + geom.sino_shape, np.float32)})
            out = sampling.generate(trained, batch, jax.random.key(0), num_steps=2, progress=False)
            assert out.shape == (1, 1, 1) + geom.sino_shape and np.isfinite(out).all()
        else:  # a task model: one simulated test input, denoised, closer to its clean target than the input is
            x = sampling.simulated_inputs(trained, 1)
            out = sampling.generate(trained, sampling.model_batch(trained, x), jax.random.key(0), num_steps=10,
                                    progress=False)[0]
            assert out.shape == x["target_clean"].shape and np.isfinite(out).all()
            norm = trained.normalisation  # the identity: the source at the target's count level
            source = np.asarray(x["source"], np.float32) * norm.target_scale / norm.source_scale
            clean = np.asarray(x["target_clean"], np.float32)
            assert np.mean((out - clean) ** 2) < np.mean((source - clean) ** 2)
