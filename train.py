"""Train ALL-PET: the sinogram autoencoder, the RMAS foundation model, low-shot task fine-tuning, and
the regression baselines the evaluation compares against.

    python train.py --config configs/base.py:cpu --workdir workdir [--config.data.task=low_dose ...]

Each stage in `config.train.stages` runs in `WORKDIR/<stage>`: mesh, data, model and optimiser,
checkpoint manager (resuming from the latest checkpoint there), then the loop. A later stage reads the
earlier stages' checkpoints: the U-Net stages freeze the autoencoder of `WORKDIR/autoencoder`, and the
task stage starts from the U-Net of `WORKDIR/foundation` (the regressor starts from scratch). The
pixel-space `pixel_regressor` needs no earlier stage. With no data path the simulator is the data
(`allpet_jax/data/`).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from allpet_jax import tasks
from allpet_jax.atomic_write import write_text
from allpet_jax.cli import fail
from allpet_jax.data import pipeline
from allpet_jax.models import count_parameters, latent
from allpet_jax.training import checkpointing, memory, pixel_regressor, runs, stages
from allpet_jax.training import step as train_step
from allpet_jax.training.latent_cache import LatentCache
from allpet_jax.training.metrics import MetricsWriter
from allpet_jax.training.preview import save_grid
from allpet_jax.training.transforms import TmaTransform

FLAGS = flags.FLAGS
PROG = "train"  # the name in its error lines, `train: error: ...`
config_flags.DEFINE_config_file("config", "configs/base.py", "ml_collections config file[:preset]")
flags.DEFINE_string("workdir", "workdir", "where checkpoints, metrics and figures go")

# Batch fields the train step uses; everything else stays on the host.
_INIT_BATCHES = 4  # training batches for the patch PCA of the autoencoder and the latent/residual scales
_STEP_FIELDS = ("source", "target", "prompt", "index", "sino_mask", "positive", "negative", "full", "tma")


def maybe_initialize_distributed() -> None:
    """Multi-host runs (docs/cluster.md): start `jax.distributed` when a launcher started several processes.

    `srun` and `mpirun` describe the job in variables `jax.distributed.initialize()` reads itself. Anywhere
    else set JAX_COORDINATOR_ADDRESS=host:port on every process, plus JAX_NUM_PROCESSES and JAX_PROCESS_ID
    where no cluster supplies them (JAX reads no variable for those two). A one-task SLURM job stays
    single-process: JAX would otherwise show it only the GPU numbered SLURM_LOCALID."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=int(count) if count else None,
                                   process_id=int(index) if index else None)
    elif (int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_STEP_NODELIST" in env  # srun's tasks, not the batch shell
          or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1):
        jax.distributed.initialize()


def channels_of(batch) -> tuple[int, int]:
    return int(batch["target"].shape[1]), int(batch["source"].shape[1])


def build_stage(cfg, stage: str, workdir: str, example_batch, train_ds):
    """The `Stage` (model, losses) for `stage`, loading what it needs from the earlier stages.

    A few training batches (read by a fresh iterator, so the training iterator and its checkpointed
    state are untouched) set the data-dependent starting points: the autoencoder's patch PCA, the
    latent scale and the residual scale."""
    if stage == pixel_regressor.NAME:  # sinogram space: no autoencoder, no data-dependent scales
        return pixel_regressor.pixel_regressor_stage(cfg, *channels_of(example_batch), cfg.seed)
    # whole global batches on every process, so that every process starts from the same state
    first = [multihost_utils.process_allgather(step_batch(b), tiled=True)
             for _, b in zip(range(_INIT_BATCHES), iter(train_ds))]
    if stage == "autoencoder":
        init = {k: np.concatenate([b[k] for b in first])
                for k in ("target", "source", "positive", "negative") if k in first[0]}
        return stages.autoencoder_stage(cfg, cfg.seed, init_batch=init)
    ae_dir = cfg.train.autoencoder_dir or os.path.join(os.path.dirname(workdir), "autoencoder")
    ae = stages.autoencoder_stage(cfg, cfg.seed)
    ae_state, _ = runs.load_state(ae_dir, ae, cfg, "autoencoder", check_task=False)  # any sinograms will do
    ae_params = ae_state.ema
    scale = latent.measure_latent_scale(ae.graphdef, ae_params, first)
    target_channels, source_channels = channels_of(example_batch)
    init = None
    if stage == "task":
        foundation_dir = cfg.train.foundation_dir or os.path.join(os.path.dirname(workdir), "foundation")
        if checkpointing.has_checkpoint(foundation_dir):
            def foundation_of(meta):
                # Built with its own channel count (synthesis sinograms have one; a task may have more).
                found = meta.get("channels", {})
                return stages.diffusion_stage("foundation", cfg, ae.graphdef, ae_params, scale,
                                              found.get("target", target_channels),
                                              found.get("source", source_channels), cfg.seed)

            found_state, found_meta = runs.load_state(foundation_dir, foundation_of, cfg, "foundation",
                                                      check_task=False)
            found = found_meta.get("channels", {})
            init = functools.partial(
                stages.warm_start_task, found_state.ema, z=cfg.model.latent_channels,
                channels=(target_channels, source_channels),
                foundation_channels=(found.get("target", target_channels), found.get("source", source_channels)),
                source_trained=stages.foundation_reads_source(found_meta.get("recipe", {})),
                seen_tasks=(tasks.task_id(tasks.SYNTHESIS),), null_task=tasks.NULL_TASK)
            print(f"[task] starting from the foundation U-Net in {foundation_dir} (output and untrained "
                  "condition inputs reset, stages.warm_start_task)", flush=True)
        else:
            logging.warning("task: no foundation checkpoint in %s; training the U-Net from scratch", foundation_dir)
    residual_scale = 1.0
    if stage in ("task", "regressor") and cfg.diffusion.residual:
        residual_scale = latent.measure_residual_scale(ae.graphdef, ae_params, first, scale)
    return stages.diffusion_stage(stage, cfg, ae.graphdef, ae_params, scale, target_channels, source_channels,
                                  cfg.seed, init=init, residual_scale=residual_scale)


def step_batch(batch: dict) -> dict:
    """The fields the train step reads, with `index` numbering training records (`step.record_index`)."""
    return dict({k: np.asarray(v) for k, v in batch.items() if k in _STEP_FIELDS}, index=train_step.record_index(batch))


def run_stage(config, stage: str, workdir: str) -> dict:
    stage_start = time.perf_counter()
    cfg = runs.stage_config(config, stage)
    os.makedirs(workdir, exist_ok=True)
    total_steps = int(cfg.train.steps[stage])
    print(f"=== stage {stage}: {total_steps} steps in {workdir}", flush=True)

    # --- mesh ------------------------------------------------------------------------------------------
    mesh = train_step.make_mesh(cfg.train.n_devices or None)
    n_dev = mesh.devices.size  # data.batch_size divides over them (runs.check_config)

    # --- data ------------------------------------------------------------------------------------------
    extra = (TmaTransform(cfg),) if cfg.tma.enabled else ()
    train_ds, normalisation = pipeline.pipeline_from_config(cfg.data, "train", masks=cfg.masks, extra_transforms=extra)
    train_iter = iter(train_ds)
    val_ds, _ = pipeline.pipeline_from_config(cfg.data, "val", normalisation=normalisation, masks=cfg.masks,
                                              extra_transforms=extra)
    val_batches = [step_batch(b) for b in val_ds if b["target"].shape[0] == cfg.data.batch_size] or [
        step_batch(next(iter(val_ds)))]
    example = val_batches[0]

    # --- model and optimiser -----------------------------------------------------------------------------
    stage_obj = build_stage(cfg, stage, workdir, example, train_ds)
    n_params = count_parameters(stage_obj.params)
    print(f"[{stage}] trainable parameters: {n_params:,}", flush=True)
    tx = runs.make_tx(cfg, stage)
    state = train_step.init_state(stage_obj.params, tx, cfg.seed, stage_obj.frozen)
    # paired latent stages: each training pair is encoded once, not at every step
    cache = (LatentCache(stage_obj.cached_latents, jax.device_get(stage_obj.frozen)) if stage_obj.cached_latents is not None
             else lambda b: b)

    # --- checkpoints: resume from the latest in this stage's workdir -------------------------------------
    best_name, best_mode = stage_obj.best_metric
    manager = checkpointing.make_manager(workdir, keep_last=cfg.train.keep_checkpoints, best_metric=best_name,
                                         best_mode=best_mode)
    meta = runs.stage_meta(cfg, stage)
    meta["normalisation"] = normalisation.to_dict()
    meta["channels"] = dict(zip(("target", "source"), channels_of(example)))
    start = 0
    if manager.latest_step() is not None:
        found = checkpointing.read_meta(manager)
        # "recipe" only where the checkpoint records one (checkpoints written before it was added resume)
        keys = ("stage", "task", "geometry", "model") + (("recipe",) if "recipe" in found else ())
        checkpointing.check_compatible(found, meta, keys, workdir)
        state, _ = checkpointing.restore(manager, manager.latest_step(), checkpointing.abstract(state), train_iter)
        start = int(state.step)
        print(f"[{stage}] resumed from step {start}", flush=True)
    # from host values: every process holds the same state, and a process cannot place arrays on another's devices
    state = jax.device_put(jax.device_get(state), train_step.replicated(mesh))

    # --- the step, with the micro-batch chosen from the memory budget ------------------------------------
    per_device = cfg.data.batch_size // n_dev
    step_example = example if stage_obj.cached_latents is None else dict(
        example, **jax.eval_shape(stage_obj.cached_latents, stage_obj.frozen, example))
    batch_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=train_step.batch_sharding(mesh)),
                              step_example)

    def make_step(n_micro):
        return train_step.data_parallel_step(mesh, loss_fn=stage_obj.loss_fn, tx=tx, n_micro=n_micro,
                                             ema_decay=cfg.train.ema_decay,
                                             ema_warmup=bool(cfg.train.get("ema_warmup", False)))

    budget = cfg.train.memory_budget_gb or None
    n_micro, estimate = memory.choose_micro_batch(lambda n: make_step(n).lower(state, batch_spec).compile(),
                                                  per_device, budget)
    print(f"[{stage}] {estimate.describe()}" + (f" (budget {budget} GiB)" if budget else ""), flush=True)
    step_fn = make_step(n_micro)
    evaluate = jax.jit(stage_obj.evaluate)

    # --- loop ------------------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, start)  # a resumed run drops the killed run's lines past its checkpoint
    from tqdm import tqdm

    progress = tqdm(total=total_steps, initial=start, desc=stage, unit="step", dynamic_ncols=True,
                    disable=jax.process_index() != 0)
    last_val = {}
    if start == 0:  # the untrained model's numbers, so the log shows how far training moved them
        last_val = validate(evaluate, state, val_batches, cfg.seed)
        writer.write(0, last_val, split="val")
    worst = float("-inf") if best_mode == "max" else float("inf")
    t0, seen = time.perf_counter(), 0
    for step in range(start, total_steps):
        batch = train_step.global_batch(mesh, cache(step_batch(next(train_iter))))  # this process's rows
        state, metrics = step_fn(state, batch)
        seen += cfg.data.batch_size
        done = step + 1
        if done % cfg.train.log_every == 0 or done == total_steps:
            scalars = jax.device_get(metrics)
            if scalars["skipped"]:
                logging.warning("step %d: non-finite gradients, update skipped", done)
            elapsed = time.perf_counter() - t0
            scalars.update(samples_per_s=seen / max(elapsed, 1e-9),
                           lr=float(tx_learning_rate(cfg, stage, done)),
                           memory_gib=estimate.total_bytes / 2**30)
            writer.write(done, scalars)
            progress.set_postfix(loss=f"{float(scalars['loss']):.4f}", **{k: f"{v:.2f}" for k, v in last_val.items()})
            t0, seen = time.perf_counter(), 0
        if done % cfg.train.eval_every == 0 or done == total_steps:
            last_val = validate(evaluate, state, val_batches, cfg.seed)  # the same draws at every step: a smooth curve
            writer.write(done, last_val, split="val")
        if done % cfg.train.checkpoint_every == 0 or done == total_steps:
            checkpointing.save(manager, done, jax.device_get(state), train_iter, json.loads(cfg.to_json()), meta,
                               metrics={best_name: float(last_val.get(best_name, worst))})
        progress.update(1)
    progress.close()
    manager.wait_until_finished()
    manager.close()

    # --- a grid of samples for people ----------------------------------------------------------------------
    rows = stage_obj.preview(state.ema, state.frozen, jax.tree.map(jnp.asarray, example), jax.random.key(cfg.seed))
    path = os.path.join(workdir, f"samples_{stage}.png")
    if jax.process_index() == 0:
        save_grid(rows, path, title=f"{stage}, step {int(state.step)}")  # atomically (plots.save_figure)
    final = validate(evaluate, state, val_batches, cfg.seed)
    final["wall_s"] = time.perf_counter() - stage_start
    print(f"[{stage}] done at step {int(state.step)}: " + ", ".join(f"{k} {v:.2f}" for k, v in final.items())
          + f"; samples in {path}", flush=True)
    writer.close()
    return final


def validate(evaluate, state, val_batches, seed: int) -> dict:
    """Mean of the per-batch validation metrics, computed with the EMA parameters. Every validation of a run
    draws the same diffusion times, noise and samples (keys from `seed`), so the curve moves with the model
    only and the best checkpoint is picked on common draws."""
    rows = [jax.device_get(evaluate(state.ema, state.frozen, jax.tree.map(jnp.asarray, b), jax.random.key(seed + i)))
            for i, b in enumerate(val_batches)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def tx_learning_rate(cfg, stage: str, step: int) -> float:
    t = cfg.train
    return train_step.learning_rate_schedule(t.learning_rate, int(t.steps[stage]), t.warmup_steps)(step)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain narrate every save at INFO
    maybe_initialize_distributed()
    config = FLAGS.config
    runs.check_config(config, jax.device_count(), jax.process_count())  # before any work
    os.makedirs(FLAGS.workdir, exist_ok=True)
    results = {}
    for stage in config.train.stages.split(","):
        results[stage] = run_stage(config, stage, os.path.join(FLAGS.workdir, stage))
    if jax.process_index() == 0:
        write_text(os.path.join(FLAGS.workdir, "results.json"), json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or config override refused in one line (`cli.fail`)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # an unknown flag, a value of the wrong type, a config file that does not load
        lines = str(e).strip().splitlines()  # a config file's error carries its traceback: keep the last line
        fail(PROG, f"{lines[0]} {lines[-1]}" if "Traceback" in str(e) else str(e))
    except AttributeError as e:  # ml_collections: an override of a field the config does not have
        try:
            text = ast.literal_eval(str(e))  # ml_collections quotes its KeyError's message
        except (ValueError, SyntaxError):
            text = str(e)
        fail(PROG, "unknown config field " + ". ".join(line.strip() for line in str(text).splitlines() if line.strip()))


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=parse_flags)
    except (runs.ConfigError, checkpointing.CheckpointMismatchError, FileNotFoundError) as e:
        fail(PROG, str(e))
