"""Run in a subprocess with 4 host CPU devices: N steps on a 4-device mesh vs a 1-device mesh.

Two models: a toy regression (tight tolerance) and the real foundation and task stages of the `smoke`
preset (autoencoder, U-Net, RMAS triplets with the consistency loss, prompt dropping, TMA weights) on
random sinograms.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from allpet_jax.training import stages  # noqa: E402
from allpet_jax.training import step as S  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs import base  # noqa: E402


def loss_fn(params, frozen, batch, keys):
    noise = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys) * 0.1
    pred = jnp.tanh((batch["x"] + noise) @ params["w1"]) @ params["w2"] + params["b"]
    err = jnp.mean((pred - batch["y"]) ** 2)
    return err, {"mse": err}


def toy_batch(i):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    return {"x": x, "y": np.sin(x.sum(1, keepdims=True)).astype(np.float32),
            "index": np.arange(16 * i, 16 * (i + 1), dtype=np.int32)}


def toy_problem():
    k = jax.random.key(0)
    params = {"w1": jax.random.normal(k, (3, 8)), "w2": jax.random.normal(jax.random.fold_in(k, 1), (8, 1)),
              "b": jnp.zeros((1,))}
    return loss_fn, params, {}, toy_batch


def stage_problem(name):
    """The real `smoke` stage `name` on random 32 x 32 sinograms, batch 8."""
    cfg = base.get_config("smoke")
    cfg.tma.enabled = name == "task"
    ae = stages.autoencoder_stage(cfg, 0)
    stage = stages.diffusion_stage(name, cfg, ae.graphdef, ae.params, 1.5, 1, 1, seed=1)

    def batch(i):
        return stages.random_batch(cfg, name, 8, seed=100, step=i)

    return stage.loss_fn, stage.params, stage.frozen, batch


def run(problem, n_devices, n_micro, steps=5, lr=1e-2):
    loss_fn, params, frozen, make_batch = problem
    mesh = S.make_mesh(n_devices)
    tx = S.make_optimizer(lr, total_steps=steps, warmup_steps=1)
    params, frozen = jax.tree.map(jnp.array, (params, frozen))  # fresh buffers: the step donates its state
    state = jax.device_put(S.init_state(params, tx, seed=3, frozen=frozen), S.replicated(mesh))
    step_fn = S.data_parallel_step(mesh, loss_fn=loss_fn, tx=tx, n_micro=n_micro, ema_decay=0.9)
    losses = []
    for i in range(steps):
        batch = jax.device_put(make_batch(i), S.batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(state.params)])
    return losses, flat


def compare(problem, cases, **kwargs):
    ref_losses, ref_params = run(problem, 1, 1, **kwargs)
    out = {"ref_losses": ref_losses}
    for n_dev, n_micro in cases:
        losses, params = run(problem, n_dev, n_micro, **kwargs)
        out[f"{n_dev}x{n_micro}"] = {
            "loss_diff": float(np.max(np.abs(np.array(losses) - ref_losses))),
            "param_diff": float(np.max(np.abs(params - ref_params))),
        }
    return out


assert jax.device_count() == 4, jax.device_count()
result = {"toy": compare(toy_problem(), [(4, 1), (1, 4), (4, 2)])}
for name in ("foundation", "task"):
    result[name] = compare(stage_problem(name), [(4, 2)], steps=3, lr=1e-3)
json.dump(result, sys.stdout)
