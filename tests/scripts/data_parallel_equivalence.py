"""Run in a subprocess with 4 host CPU devices: N steps on a 4-device mesh vs a 1-device mesh."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from allpet_jax.training import step as S  # noqa: E402


def loss_fn(params, frozen, batch, keys):
    noise = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys) * 0.1
    pred = jnp.tanh((batch["x"] + noise) @ params["w1"]) @ params["w2"] + params["b"]
    err = jnp.mean((pred - batch["y"]) ** 2)
    return err, {"mse": err}


def run(n_devices, n_micro, steps=5):
    mesh = S.make_mesh(n_devices)
    tx = S.make_optimizer(1e-2, total_steps=steps, warmup_steps=1)
    k = jax.random.key(0)
    params = {"w1": jax.random.normal(k, (3, 8)), "w2": jax.random.normal(jax.random.fold_in(k, 1), (8, 1)),
              "b": jnp.zeros((1,))}
    state = jax.device_put(S.init_state(params, tx, seed=3), S.replicated(mesh))
    step_fn = S.data_parallel_step(mesh, loss_fn=loss_fn, tx=tx, n_micro=n_micro, ema_decay=0.9)
    losses = []
    for i in range(steps):
        rng = np.random.default_rng(i)
        x = rng.normal(size=(16, 3)).astype(np.float32)
        batch = {"x": x, "y": np.sin(x.sum(1, keepdims=True)).astype(np.float32),
                 "index": np.arange(16 * i, 16 * (i + 1), dtype=np.int32)}
        batch = jax.device_put(batch, S.batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(state.params)])
    return losses, flat


assert jax.device_count() == 4, jax.device_count()
ref_losses, ref_params = run(1, 1)
out = {}
for n_dev, n_micro in [(4, 1), (1, 4), (4, 2)]:
    losses, params = run(n_dev, n_micro)
    out[f"{n_dev}x{n_micro}"] = {
        "loss_diff": float(np.max(np.abs(np.array(losses) - ref_losses))),
        "param_diff": float(np.max(np.abs(params - ref_params))),
    }
out["ref_losses"] = ref_losses
json.dump(out, sys.stdout)
