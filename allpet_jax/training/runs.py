"""Run-level pieces shared by `train.py`, `sample.py` and `allpet_jax.evaluate`: a stage's config and
compatibility record, its optimiser, and loading a trained stage back from its directory.

A stage directory (`WORKDIR/<stage>`) holds Orbax checkpoints whose `config` item is the stage's
resolved config and whose `meta` item records stage, task, geometry, model, the sinogram channels and
the data normalisation; that is enough to rebuild the model without the training data.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from allpet_jax import tasks
from allpet_jax.data import pipeline
from allpet_jax.training import checkpointing, pixel_regressor, stages
from allpet_jax.training import step as train_step

_TMA_STAGES = ("task", "regressor", "pixel_regressor")  # the stages that train on pairs with TMA when tma.enabled


def stage_config(config, stage: str):
    """The config as this stage trains it: the foundation model learns synthesis on RMAS views; the
    other stages read the task's pairs, and the task stage and both regressors add TMA when `tma.enabled`."""
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    if stage == "foundation":
        cfg.data.task = tasks.SYNTHESIS
    if cfg.data.cache_dir:  # one shard cache per task, so the stages can share a cache root
        cfg.data.cache_dir = os.path.join(cfg.data.cache_dir, cfg.data.task)
    # With model.ae_views the autoencoder also trains on the masked views the foundation encodes.
    cfg.masks.enabled = (stage == "foundation" or (stage == "autoencoder" and _ae_views(config))) and \
        bool(config.masks.get("rmas", True))
    cfg.tma.enabled = stage in _TMA_STAGES and config.tma.enabled  # TMA is a fine-tuning option
    return cfg


def _ae_views(config) -> bool:
    return bool(config.model.get("ae_views", False))  # configs saved before it existed: full sinograms only


def stage_meta(cfg, stage: str) -> dict:
    """What must match to resume a stage ("recipe" too) or to build on it (the rest); `cfg` is the
    stage's config (`stage_config`)."""
    return {
        "stage": stage,
        "task": cfg.data.task,
        "geometry": pipeline.geometry_from_config(cfg.data).to_dict(),
        "model": model_record(cfg.model, stage),
        "recipe": recipe(cfg, stage),
    }


def model_record(model_cfg, stage: str) -> dict:
    """The `config.model` fields recorded for `stage`: all of them, less the pixel regressor's own fields
    for the other stages (they do not read them, and checkpoints written before those fields existed
    must still resume and load)."""
    record = json.loads(model_cfg.to_json())
    if stage != pixel_regressor.NAME:
        for field in pixel_regressor.CONFIG_FIELDS:
            record.pop(field, None)
    return record


def recipe(cfg, stage: str) -> dict:
    """The settings that decide what a stage learns besides its model: resuming a checkpoint under other
    ones (another seed, training set, diffusion objective, masks or TMA) would silently mix two runs.
    The number of steps is not among them: resuming with more steps is how a run is extended."""
    out = {"seed": int(cfg.seed), "n_train": int(cfg.data.n_train)}
    if stage in ("foundation", "task"):
        out["diffusion"] = json.loads(cfg.diffusion.to_json())
    if stage == "foundation" or (stage == "autoencoder" and _ae_views(cfg)):
        out["masks"] = {k: v for k, v in json.loads(cfg.masks.to_json()).items() if k != "device"}
    if stage in _TMA_STAGES:
        out["tma"] = json.loads(cfg.tma.to_json())
    return out


def load_state(directory: str, stage_obj, cfg, name: str, check_task: bool = True):
    """The latest `TrainState` of stage `name` in `directory`, into `stage_obj`'s structure, after checking
    that its geometry and model (and task, with `check_task`) match `cfg`. `stage_obj` may also be a
    function of the checkpoint's meta that builds the stage, where its shapes depend on what the
    checkpoint holds (the foundation model's channel count)."""
    if not checkpointing.has_checkpoint(directory):
        raise FileNotFoundError(
            f"the {name} stage needs a checkpoint in {directory}; train it first "
            f"(--config.train.stages={name},...) or point --config.train.{name}_dir at one"
        )
    manager = checkpointing.make_manager(directory, keep_best=0)
    meta = checkpointing.read_meta(manager)
    expected = stage_meta(stage_config(cfg, name), name)
    keys = ("geometry", "model") + (("task",) if check_task else ())
    checkpointing.check_compatible(meta, expected, keys, directory)
    if callable(stage_obj):
        stage_obj = stage_obj(meta)
    abstract = train_step.init_state(stage_obj.params, make_tx(cfg, name), cfg.seed, stage_obj.frozen)
    state = checkpointing.restore_state_only(manager, manager.latest_step(), checkpointing.abstract(abstract))
    manager.close()
    return state, meta


def make_tx(cfg, stage: str):
    t = cfg.train
    return train_step.make_optimizer(t.learning_rate, total_steps=int(t.steps[stage]), warmup_steps=t.warmup_steps,
                                     weight_decay=t.weight_decay, clip_norm=t.clip_norm)




@dataclasses.dataclass
class TrainedStage:
    """A trained stage loaded for inference: `generate(batch, key, ...)` uses the EMA parameters."""

    name: str
    config: ml_collections.ConfigDict  # the stage's resolved config, as trained
    meta: dict
    stage: stages.Stage
    state: train_step.TrainState
    step: int
    directory: str

    @property
    def normalisation(self) -> pipeline.Normalisation:
        return pipeline.Normalisation(**self.meta["normalisation"])

    def generate(self, batch: dict, key, sampler: str | None = None, num_steps: int | None = None,
                 eta: float | None = None, guidance: float = 0.0, cfg_scale: float = 1.0):
        if self.stage.generate is None:
            raise ValueError(f"the {self.name} stage does not generate sinograms")
        return self.stage.generate(self.state.ema, self.state.frozen, batch, key, sampler, num_steps, eta, guidance,
                                   cfg_scale)


def best_validated_step(directory: str, steps, metric: str, mode: str) -> int | None:
    """Of the checkpointed `steps`, the one whose validation `metric` in `directory/metrics.jsonl` is best
    (`mode` 'max' or 'min'; after a resume the last line logged for a step counts; lines that do not
    parse, such as one cut short by a kill, are skipped). `None` when no checkpointed step was validated."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    values = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("split") == "val" and metric in record and record.get("step") in steps:
                values[record["step"]] = float(record[metric])
    if not values:
        return None
    return (max if mode == "max" else min)(values, key=values.get)


def load_trained(directory: str, step: int | None = None, best: bool = False) -> TrainedStage:
    """The stage trained in `directory` (a `WORKDIR/<stage>` with checkpoints), at `step` (default latest;
    with `best`, the checkpoint with the best validation metric of the stage, `Stage.best_metric`, as
    `metrics.jsonl` logged it: the choice the validation split makes, never the test split).

    Raises FileNotFoundError (with what to do) when there is no finished checkpoint there.
    """
    directory = os.path.abspath(directory)
    if not checkpointing.has_checkpoint(directory):
        raise FileNotFoundError(
            f"no finished checkpoint in {directory} (expected {os.path.join(directory, 'checkpoints', '<step>')}); "
            "train it with train.py, or pass the directory of a trained stage (WORKDIR/<stage>)"
        )
    manager = checkpointing.make_manager(directory, keep_best=0)
    try:
        latest = manager.latest_step()
        if step is not None and step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {directory}; steps there: {manager.all_steps()}")
        config_json, meta = checkpointing.read_config_and_meta(manager, latest if step is None else step)
        cfg = ml_collections.ConfigDict(config_json)
        name = meta["stage"]
        channels = meta.get("channels", {"target": 1, "source": 1})
        if name == "autoencoder":
            stage_obj = stages.autoencoder_stage(cfg, cfg.seed)
        elif name == pixel_regressor.NAME:  # no autoencoder
            stage_obj = pixel_regressor.pixel_regressor_stage(cfg, channels["target"], channels["source"], cfg.seed)
        else:
            ae = stages.autoencoder_stage(cfg, cfg.seed)
            stage_obj = stages.diffusion_stage(name, cfg, ae.graphdef, ae.params, 1.0, channels["target"],
                                               channels["source"], cfg.seed)
        if step is None:
            step = best_validated_step(directory, set(manager.all_steps()), *stage_obj.best_metric) if best else None
            step = latest if step is None else step
        abstract = train_step.init_state(stage_obj.params, make_tx(cfg, name), cfg.seed, stage_obj.frozen)
        state = checkpointing.restore_state_only(manager, step, checkpointing.abstract(abstract))
    finally:
        manager.close()
    return TrainedStage(name, cfg, meta, stage_obj, state, int(step), directory)
