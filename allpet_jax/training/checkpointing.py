"""Orbax checkpoints of a run: state, Grain iterator, config and a compatibility record.

Each checkpoint step holds four items:
- `state`: the `TrainState` pytree (step, params, optimiser state, EMA, RNG key data);
- `data`: the Grain iterator state (so a resumed run sees exactly the batches it would have seen);
- `config`: the run's config as JSON, for people and for `sample.py`;
- `meta`: what must match to resume or fine-tune (stage, task, geometry, model shape).

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoints intact. The manager keeps the last
`keep_last` checkpoints plus the `keep_best` best by a validation metric.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointMismatchError(ValueError):
    """The checkpoint in the work directory belongs to another task, geometry or model."""


def make_manager(
    workdir: str,
    keep_last: int = 3,
    keep_best: int = 1,
    best_metric: str = "val_psnr",
    best_mode: str = "max",
) -> ocp.CheckpointManager:
    preservation = [policies.LatestN(keep_last)]
    if keep_best:
        preservation.append(
            policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
                           keep_checkpoints_without_metrics=False)
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preservation),
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        item_names=("state", "data", "config", "meta"),
        item_handlers={"data": grain.checkpoint.CheckpointHandler()},
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, config_json: dict, meta: dict,
         metrics: dict | None = None) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave(meta),
    )
    return manager.save(step, args=args, metrics=metrics)


def read_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def read_config_and_meta(manager: ocp.CheckpointManager, step: int | None = None) -> tuple[dict, dict]:
    """The `config` and `meta` items of a checkpoint step (default the latest)."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
    return dict(restored["config"]), dict(restored["meta"])


def check_compatible(found: dict, expected: dict, keys: tuple[str, ...], where: str) -> None:
    """Raise `CheckpointMismatchError` naming every key whose value differs."""
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, this run has {expected.get(k)!r}"
             for k in keys if _jsonable(found.get(k)) != _jsonable(expected.get(k))]
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint in {where} does not match this run ({'; '.join(diffs)}). "
            "Use another --workdir, or set the config to match the checkpoint. Nothing was overwritten."
        )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter) -> tuple[Any, dict]:
    """Restore `state` (into the structure/sharding of `abstract_state`) and the iterator in place."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], dict(restored["meta"])


def restore_state_only(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Only the `state` item (to build on an earlier stage without touching its data iterator)."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds at least one finished checkpoint step."""
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _jsonable(value):
    return json.loads(json.dumps(value)) if value is not None else None
