"""The train step: written for one device, mapped over a `'data'` mesh axis with `jax.shard_map`.

A step takes the replicated `TrainState` and the device's slice of the global batch, splits that slice
into equal micro-batches whose gradients are summed with `lax.scan` (memory is bounded by one
micro-batch), averages gradients across devices with `lax.pmean`, clips, applies the optax update,
updates the EMA, and skips the update (keeping the old state) when any gradient is not finite.

Randomness inside the loss comes from `fold_in(state.key, step)` and then per sample from the
sample's global index (`batch['index']`), never from the device or micro-batch number, so a run on
4 devices or with 4 micro-batches computes the same numbers as one device with the whole batch.

This module knows nothing of the model: `loss_fn(params, frozen, batch, keys) -> (loss, parts)` is any
pure function of the trained parameters, the frozen ones (e.g. a pretrained autoencoder; not updated),
a micro-batch dict and one key per sample.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


class TrainState(NamedTuple):
    """Everything a step reads and writes; a plain pytree so Orbax saves it as is."""

    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    ema: Any
    key: jax.Array  # uint32 key data (raw, so it checkpoints as an array)
    frozen: Any  # parameters the loss reads but the optimiser never changes ({} when none)


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to 5% of it at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=max(1, warmup_steps),
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * 0.05,
    )


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, after global-norm gradient clipping."""
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
    )


def init_state(params, tx: optax.GradientTransformation, seed: int, frozen=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params),
        key=jax.random.key_data(jax.random.key(seed)),
        frozen={} if frozen is None else frozen,
    )


def sample_keys(state_key: jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
    """One key per sample from the run key, the step and the sample's global index `(n,)`."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state_key), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def record_index(batch: dict) -> np.ndarray:
    """The global index `(n,)` int32 that `sample_keys` reads: the training *record*. Under RMAS a record
    is (base sinogram, mask seed) and the pipeline's `index` is the base sinogram's, shared by every mask
    of it; `masks.RmasSource` numbers the records in `sample_index`, which then takes its place, so two
    masks of one sinogram in a batch get their own diffusion step and noise."""
    return np.asarray(batch.get("sample_index", batch["index"])).astype(np.int32)


def _split_micro(tree, n_micro: int):
    return jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), tree)


def accumulate_gradients(loss_fn: LossFn, params, frozen, batch: dict, keys: jax.Array, n_micro: int):
    """Mean loss, parts and gradients over `n_micro` equal micro-batches, summed with `lax.scan`."""
    grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(p, frozen, b, k), has_aux=True)
    if n_micro == 1:
        (loss, parts), grads = grad_fn(params, batch, keys)
        return loss, parts, grads
    micro = (_split_micro(batch, n_micro), _split_micro(keys, n_micro))

    def body(carry, mb):
        (loss, parts), grads = grad_fn(params, *mb)
        return jax.tree.map(jnp.add, carry, (loss, parts, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss, parts), grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, *first))
    (loss, parts, grads), _ = lax.scan(body, (loss, parts, grads), micro)
    mean = lambda x: x / n_micro  # noqa: E731  equal micro-batches: the mean of means is the batch mean
    return mean(loss), jax.tree.map(mean, parts), jax.tree.map(mean, grads)


def ema_decay_at(step, ema_decay: float):
    """The EMA's decay at the update from `step` (0 for the first): `min(ema_decay, (1 + step) / (10 + step))`,
    the warm-up of Tensorflow's ExponentialMovingAverage with `num_updates` and of diffusers' EMAModel.

    A constant decay `d` keeps `d^T` of the starting parameters after `T` steps: 5 % of a random
    initialisation (or of a warm start) after 3000 steps at 0.999: the workstation task's raw parameters beat
    such an EMA by 0.6 dB of sinogram PSNR (docs/RESULTS.md). With the warm-up the start keeps
    `prod_t (1 + t) / (10 + t)`, under 1e-20 after 1000 steps, and the average spans the last
    `1 / (1 - decay)` steps at most."""
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def device_step(
    state: TrainState,
    batch: dict,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    n_micro: int,
    ema_decay: float,
    ema_warmup: bool = False,
    axis_name: str | None = "data",
):
    """One optimisation step on this device's slice of the batch. Returns `(new_state, metrics)`.

    The EMA of the parameters decays by `ema_decay` per step; with `ema_warmup`, by `ema_decay_at(step)`,
    which forgets the starting parameters (see there).

    A step whose loss or gradient norm is not finite keeps the parameters, optimiser state and EMA (the
    step counter still advances). The choice is a `lax.cond` on the whole update rather than a
    `jnp.where(finite, new, old)` per array: the `where` reads the old and new value of every parameter and
    moment, and XLA recomputed each moment's update inside both the `where` and the parameter update, two
    unordered readers of a donated buffer, so it copied every parameter and moment first (573 copies in the
    workstation foundation step; none with the `cond`). The step is 2-3 % faster (in-process, alternating
    pairs on a 2-core Intel Xeon, median of 15: workstation 0.981 and 0.974, cpu 0.969, issue 17 session 16)."""
    keys = sample_keys(state.key, state.step, batch["index"])
    loss, parts, grads = accumulate_gradients(loss_fn, state.params, state.frozen, batch, keys, n_micro)
    if axis_name is not None:
        loss, parts, grads = lax.pmean((loss, parts, grads), axis_name)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    decay = ema_decay_at(state.step, ema_decay) if ema_warmup else ema_decay

    def update(params, opt_state, ema):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)

    params, opt_state, ema = lax.cond(finite, update, lambda *old: old, state.params, state.opt_state, state.ema)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema=ema,
        key=state.key,
        frozen=state.frozen,
    )
    metrics = dict(parts, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
    return new_state, metrics


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `n_devices` devices (all by default) with the axis `'data'`."""
    devices = jax.devices()[: n_devices or jax.device_count()]
    return Mesh(devices, ("data",))


def data_parallel_step(mesh: Mesh, **step_kwargs):
    """`device_step` mapped over the mesh: state replicated, batch split on its leading axis.

    Returns a jitted `(state, batch) -> (state, metrics)`; the state is donated.
    """

    def per_device(state, batch):
        return device_step(state, batch, axis_name="data", **step_kwargs)

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=0)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(mesh: Mesh, local_batch):
    """The global batch, split over the mesh, from this process's rows of it (all of it with one process)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x), local_batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
