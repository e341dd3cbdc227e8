"""The pixel-space U-Net regressor stage: it starts as the identity baseline, it learns a known residual
through the real train step, and it refuses samplers it does not have. (Its train.py run, checkpoint and
`runs.load_trained` round trip are in test_train.py.)"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from allpet_jax.training import pixel_regressor, runs  # noqa: E402
from allpet_jax.training import step as S  # noqa: E402
from configs import base  # noqa: E402
from model_helpers import quick_jit  # noqa: E402

SHAPE = (16, 16)  # (n_angles, n_bins)


def _config():
    """The smoke preset with a one-level U-Net: the fewer distinct layers, the faster it initialises and
    compiles (the smoke preset's own U-Net is trained end to end in test_train.py)."""
    cfg = base.get_config("smoke")
    cfg.data.n_angles, cfg.data.n_bins = SHAPE
    cfg.model.pixel_unet_channels, cfg.model.pixel_attention_levels = (8,), ()
    return runs.stage_config(cfg, "pixel_regressor")


def _batch(source, target_channels):
    B = source.shape[0]
    return {"source": jnp.asarray(source), "target": jnp.zeros((B, target_channels) + SHAPE, jnp.float32),
            "prompt": jnp.tile(jnp.array([[0, 1, 1]], jnp.int32), (B, 1)), "index": jnp.arange(B, dtype=jnp.int32)}


@pytest.mark.parametrize("target_channels", [1, 2])
def test_untrained_model_is_exactly_the_identity_baseline(target_channels):
    rng = np.random.default_rng(0)
    source = rng.gamma(2.0, 1.0, size=(2, 1) + SHAPE).astype(np.float32)
    stage = pixel_regressor.pixel_regressor_stage(_config(), target_channels, 1, seed=3)
    assert stage.frozen == {}
    generate, loss_fn = quick_jit(stage.generate), quick_jit(stage.loss_fn)
    out = np.asarray(generate(stage.params, stage.frozen, _batch(source, target_channels), jax.random.key(0)))
    # The source itself, or a mixture's even split over the two channels (tracer_separation).
    expected = np.repeat(source, target_channels, axis=1) / target_channels
    np.testing.assert_array_equal(out, expected)

    # The loss of the identity is the plain MSE between source baseline and target.
    batch = dict(_batch(source, target_channels), target=jnp.asarray(expected + 0.5))
    loss, _ = loss_fn(stage.params, stage.frozen, batch, jax.random.split(jax.random.key(0), 2))
    np.testing.assert_allclose(float(loss), 0.25, rtol=1e-6)

    with pytest.raises(ValueError, match="direct"):
        stage.generate(stage.params, stage.frozen, _batch(source, target_channels), jax.random.key(0), sampler="ddim")
    with pytest.raises(ValueError, match="guidance=0"):
        stage.generate(stage.params, stage.frozen, _batch(source, target_channels), jax.random.key(0), guidance=0.1)


def test_train_step_learns_a_known_residual():
    """target = 2 * source: the residual to learn is the source itself (initial loss mean(source^2))."""
    rng = np.random.default_rng(1)
    source = rng.gamma(2.0, 0.5, size=(4, 1) + SHAPE).astype(np.float32)
    batch = dict(_batch(source, 1), target=jnp.asarray(2.0 * source))
    stage = pixel_regressor.pixel_regressor_stage(_config(), 1, 1, seed=0)
    tx = S.make_optimizer(3e-3, total_steps=100, warmup_steps=1, weight_decay=0.0)
    state = S.init_state(stage.params, tx, seed=0, frozen=stage.frozen)  # frozen = {}: nothing pretrained
    step = quick_jit(lambda st, b: S.device_step(st, b, loss_fn=stage.loss_fn, tx=tx, n_micro=1, ema_decay=0.0,
                                               axis_name=None))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], np.mean(source**2), rtol=1e-5)
    assert losses[-1] < 0.25 * losses[0], losses  # measured: 0.07x


def test_the_ramp_loss_weighs_the_residual_along_the_bins():
    """`train.sinogram_loss="ramp"`: the untrained model's loss is the ramp-weighted MSE of target - source
    along the bins (not the views), per `losses.ramp_mse` on the channels-first sinograms."""
    from allpet_jax import losses as L

    rng = np.random.default_rng(2)
    source = rng.gamma(2.0, 0.5, size=(2, 1) + SHAPE).astype(np.float32)
    target = rng.gamma(2.0, 0.5, size=(2, 1) + SHAPE).astype(np.float32)
    config = _config()
    config.train.sinogram_loss = "ramp"
    stage = pixel_regressor.pixel_regressor_stage(config, 1, 1, seed=0)
    loss, _ = stage.loss_fn(stage.params, stage.frozen, dict(_batch(source, 1), target=jnp.asarray(target)), None)
    np.testing.assert_allclose(loss, np.mean(L.ramp_mse(jnp.asarray(target - source))), rtol=1e-5)
    assert abs(float(loss) / float(np.mean(L.ramp_mse(jnp.asarray(target - source).swapaxes(-1, -2)))) - 1) > 1e-3
