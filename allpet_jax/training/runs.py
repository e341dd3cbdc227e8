"""Run-level pieces shared by `train.py`, `sample.py` and `allpet_jax.evaluate`: a stage's config and
compatibility record, its optimiser, and loading a trained stage back from its directory.

A stage directory (`WORKDIR/<stage>`) holds Orbax checkpoints whose `config` item is the stage's
resolved config and whose `meta` item records stage, task, geometry, model, the sinogram channels and
the data normalisation; that is enough to rebuild the model without the training data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections

from allpet_jax import losses, masks, tasks
from allpet_jax.data import pipeline
from allpet_jax.diffusion import schedules
from allpet_jax.training import checkpointing, metrics, objectives, pixel_regressor, stages
from allpet_jax.training import step as train_step

_TMA_STAGES = ("task", "regressor", "pixel_regressor")  # the stages that train on pairs with TMA when tma.enabled


class ConfigError(ValueError):
    """A config value a run cannot train with: the message names the field, what it must be and the value."""


def check_config(config, device_count: int, process_count: int = 1) -> None:
    """Refuse a config that cannot train, before any work: raise `ConfigError` naming the first bad field.

    Checks what `train.py` reads itself (stages, step counts and intervals, batch and devices, the
    optimiser's numbers) and asks the builders that validate their own part (geometry, masks, the
    autoencoder's and the U-Nets' shapes, the diffusion schedule and objective) for theirs, on every
    stage of `train.stages` as that stage will see the config (`stage_config`)."""
    t, d = config.train, config.data
    names = str(t.stages).split(",")
    unknown = [s for s in names if s not in stages.STAGES]
    _require(not unknown, "train.stages", f"a comma-separated list of {stages.STAGES}",
             t.stages, f" (unknown: {unknown})")
    _require(len(set(names)) == len(names), "train.stages", "a list without repeats", t.stages)
    for name in names:
        _require(name in t.steps and _count(t.steps[name], 1), f"train.steps.{name}", "a positive number of steps",
                 t.steps.get(name))
    for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _require(_count(t[field], 1), f"train.{field}", "a positive integer", t[field])
    _require(_count(t.warmup_steps, 0), "train.warmup_steps", "a non-negative integer", t.warmup_steps)
    _require(t.get("sinogram_loss", "mse") in losses.SINOGRAM_LOSSES, "train.sinogram_loss",
             f"one of {losses.SINOGRAM_LOSSES}", t.get("sinogram_loss"))
    _require(_count(t.n_devices, 0) and t.n_devices <= device_count, "train.n_devices",
             f"0 (every device) or a count up to the {device_count} device(s) here", t.n_devices)
    # learning_rate > 0: the task's learned skip opens at a rate of 1 / learning_rate (stages.skip_rate)
    for field, ok, expected in (("learning_rate", lambda v: v > 0, "> 0"),
                                ("weight_decay", lambda v: v >= 0, ">= 0"),
                                ("clip_norm", lambda v: v > 0, "> 0"),
                                ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
                                ("memory_budget_gb", lambda v: v >= 0, ">= 0 (0: no budget)")):
        _require(_number(t[field]) and ok(t[field]), f"train.{field}", f"a number {expected}", t[field])
    n_dev = t.n_devices or device_count
    _require(_count(d.batch_size, 1) and d.batch_size % n_dev == 0, "data.batch_size",
             f"a positive multiple of the {n_dev} device(s) the batch is split over", d.batch_size)
    _require(_count(d.n_train, d.batch_size * process_count), "data.n_train",
             f"at least one batch of training samples per process (data.batch_size={d.batch_size} x "
             f"{process_count} process(es))", d.n_train)
    _require("foundation" not in names or "pretrain_seed" not in d or d.pretrain_seed != d.seed, "data.pretrain_seed",
             f"a seed other than data.seed={d.seed} (the foundation's sinograms must share no sample with the "
             "task's splits)", d.get("pretrain_seed"))
    _require(_count(d.n_val, 1), "data.n_val", "a positive number of validation samples", d.n_val)
    _require(d.task in tasks.TASKS, "data.task", f"one of {tasks.TASKS}", d.task)
    paired = [s for s in names if s in ("task", "regressor", pixel_regressor.NAME)]
    _require(not paired or tasks.is_paired(d.task), "data.task", f"a paired task ({tasks.PAIRED_TASKS}) for the "
             f"stages {paired}, which learn source -> target", d.task)
    _require(d.source in ("simulated", "files"), "data.source", "'simulated' or 'files'", d.source)
    tma_map = config.tma.get("map", "segmented")
    _require(tma_map in ("segmented", "oracle"), "tma.map", "'segmented' or 'oracle'", tma_map)
    _require(tma_map != "oracle" or d.source == "simulated", "tma.map", "'segmented' for users' files (the "
             "oracle reads the simulator's lesion labels)", tma_map)
    try:
        _check_builders(config, names)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a builder's own check, worded by the builder
        raise ConfigError(f"this config cannot train: {e}") from e


def _check_builders(config, names) -> None:
    """The builders' own checks of the stages `names` (geometry, masks, objectives, the autoencoder's and the
    U-Nets' shapes), on abstract models: nothing is initialised. Each model is checked once (the stages
    share `config.model`)."""
    from flax import nnx

    geom = pipeline.geometry_from_config(config.data)
    for name in names:
        cfg = stage_config(config, name)
        if cfg.masks.enabled:
            grid = masks.MaskConfig.from_config(cfg.masks).grid
            _require(grid <= min(geom.image_shape), "masks.grid", f"at most the image's {min(geom.image_shape)} "
                     "pixels per side, so that every cell holds a pixel", grid)
        if name == pixel_regressor.NAME:
            pixel_regressor._check_geometry(cfg)  # its U-Net's levels against the sinogram
        elif name != "autoencoder":
            stages.make_schedule(cfg.diffusion)
            objectives.objective_of(name, cfg)
            stages.skip_rate(name, cfg)
            stages.task_min_snr(cfg)
    if all(name == pixel_regressor.NAME for name in names):
        return
    ae = nnx.eval_shape(lambda: stages.build_autoencoder(config.model, 0))  # factor and widths
    h, w, z = ae.latent_shape(geom.n_angles, geom.n_bins)
    _require(z <= ae.factor**2, "model.latent_channels", f"at most factor^2 = {ae.factor**2} (the autoencoder "
             "starts from its patch PCA, which has that many components per sinogram channel)", z)
    if not any(name in ("foundation", "task", "regressor") for name in names):
        return
    d, levels = config.diffusion, len(config.model.unet_channels)
    _require(h % 2 ** (levels - 1) == 0 and w % 2 ** (levels - 1) == 0, "model.unet_channels",
             f"at most as many levels as halve the {h} x {w} latent (model.factor={ae.factor}) evenly",
             tuple(config.model.unet_channels))
    nnx.eval_shape(lambda: stages.build_unet(config, 1, 1, 0))  # attention levels
    for field in ("parameterization", "task_parameterization"):
        _require(d.get(field, "v") in schedules.PARAMETERIZATIONS, f"diffusion.{field}",
                 f"one of {schedules.PARAMETERIZATIONS}", d.get(field))
    _require(_count(d.val_steps, 1) and d.val_steps <= d.num_steps, "diffusion.val_steps",
             f"a number of sampling steps in [1, diffusion.num_steps={d.num_steps}]", d.val_steps)
    _require(_number(d.prompt_drop_prob) and 0 <= d.prompt_drop_prob <= 1, "diffusion.prompt_drop_prob",
             "a probability in [0, 1]", d.prompt_drop_prob)


def _require(ok: bool, field: str, expected: str, got, note: str = "") -> None:
    if not ok:
        raise ConfigError(f"config.{field} must be {expected}; got {got!r}{note}. Set it with --config.{field}=...")


def _count(value, least: int) -> bool:
    """Whether `value` is an integer (not a bool) >= `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value) -> bool:
    """Whether `value` is a finite real number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage_config(config, stage: str):
    """The config as this stage trains it: the foundation model learns synthesis on RMAS views; the
    other stages read the task's pairs, and the task stage and both regressors add TMA when `tma.enabled`."""
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    if stage == "foundation":
        cfg.data.task = tasks.SYNTHESIS
        cfg.data.seed = pretrain_seed(config)
    if cfg.data.cache_dir:  # one shard cache per task, so the stages can share a cache root
        cfg.data.cache_dir = os.path.join(cfg.data.cache_dir, cfg.data.task)
    # With model.ae_views the autoencoder also trains on the masked views the foundation encodes.
    cfg.masks.enabled = (stage == "foundation" or (stage == "autoencoder" and _ae_views(config))) and \
        bool(config.masks.get("rmas", True))
    cfg.tma.enabled = stage in _TMA_STAGES and config.tma.enabled  # TMA is a fine-tuning option
    return cfg


def pretrain_seed(config) -> int:
    """The data seed of the foundation's sinograms (`data.pretrain_seed`; configs saved before it existed drew
    them with `data.seed`)."""
    return int(config.data.get("pretrain_seed", config.data.seed))


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
    if stage == "foundation":
        out["data_seed"] = int(cfg.data.seed)  # data.pretrain_seed (stage_config)
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
    (`mode` 'max' or 'min'), read by `metrics.read_metrics` (which skips a line cut short by a kill; where a
    step was logged twice, as resumes did before they truncated the log, the last line counts). `None` when
    no checkpointed step was validated."""
    path = os.path.join(directory, metrics.FILE)
    if not os.path.exists(path):
        return None
    values = {}
    for record in metrics.read_metrics(path):
        if record.get("split") == "val" and metric in record and record["step"] in steps:
            values[record["step"]] = float(record[metric])
    if not values:
        return None
    return (max if mode == "max" else min)(values, key=values.get)


def build_trained_stage(cfg, meta: dict) -> stages.Stage:
    """The stage a checkpoint's `config` and `meta` describe, freshly initialised (to restore into)."""
    name = meta["stage"]
    channels = meta.get("channels", {"target": 1, "source": 1})
    if name == "autoencoder":
        return stages.autoencoder_stage(cfg, cfg.seed)
    if name == pixel_regressor.NAME:  # no autoencoder
        return pixel_regressor.pixel_regressor_stage(cfg, channels["target"], channels["source"], cfg.seed)
    ae = stages.autoencoder_stage(cfg, cfg.seed)
    return stages.diffusion_stage(name, cfg, ae.graphdef, ae.params, 1.0, channels["target"], channels["source"],
                                  cfg.seed)


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
        stage_obj = build_trained_stage(cfg, meta)
        if step is None:
            saved = set(manager.all_steps())
            step = best_validated_step(directory, saved, *stage_obj.best_metric) if best else None
            if best and step is None and stage_obj.best_metric[0] == "val_crps":  # runs logged before val_crps
                step = best_validated_step(directory, saved, "val_psnr", "max")
            step = latest if step is None else step
        abstract = train_step.init_state(stage_obj.params, make_tx(cfg, name), cfg.seed, stage_obj.frozen)
        state = checkpointing.restore_state_only(manager, step, checkpointing.abstract(abstract))
    finally:
        manager.close()
    return TrainedStage(name, cfg, meta, stage_obj, state, int(step), directory)
