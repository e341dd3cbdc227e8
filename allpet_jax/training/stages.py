"""The training stages of ALL-PET as pure functions for the generic train step.

- `autoencoder`: the KL sinogram autoencoder on every sinogram channel of the task's data and, with RMAS
  on, on the masked views of its targets that the foundation encodes.
- `foundation`: the latent diffusion model for synthesis, trained on RMAS views (masked completion or the
  paper's triplet, `objectives.Completion` / `objectives.Triplet`).
- `task`: low-shot fine-tuning for one paired task: the target latent is generated conditioned on the
  source latent (and the TMA map), with the loss weighted by `1 + alpha * A_sino` (`objectives.PairedDiffusion`
  or `objectives.Bridge`, by `diffusion.task_objective`).
- `regressor`: the evaluation's deterministic baseline, the same U-Net trained on the same pairs as a
  plain regression source -> target (`objectives.Regression`).
- `pixel_regressor`: the evaluation's strong baseline, a U-Net on the sinograms themselves (no
  autoencoder); it lives in `pixel_regressor.py` and uses the builders here.

Each stage gives a `Stage`: the trainable parameters, the frozen ones (autoencoder and latent scale for
the latent stages), the loss, a validation function, the validation metric that picks the best
checkpoint, and a preview for the sample grid. This module reads the config and assembles those from
the pieces that do the work: the latent space (`models/latent.py`), the objectives (`objectives.py`), the
losses and the samplers. It also holds the warm start of a task from the foundation. Nothing here runs
a loop; `train.py` does.

Validation: the autoencoder reports reconstruction PSNR; the diffusion stages report `val_loss`, the
training loss on the validation batch with fixed keys (the standard progress measure of diffusion
training, and the only one for synthesis, where a sample is not meant to match any one sinogram); the
paired stages also sample (DDIM for the diffusion task) and report the samples' PSNR against the target
next to the identity baseline (the source itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allpet_jax import losses, metrics
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import REGIONS
from allpet_jax.diffusion import schedules
from allpet_jax.models import latent
from allpet_jax.models.autoencoder import SinogramAutoencoder
from allpet_jax.models.conditioning import condition_channel_count
from allpet_jax.models.unet import LatentUNet
from allpet_jax.tasks import TASKS
from allpet_jax.training import objectives

STAGES = ("autoencoder", "foundation", "task", "regressor", "pixel_regressor")


@dataclasses.dataclass
class Stage:
    name: str
    graphdef: Any
    params: Any
    frozen: dict
    loss_fn: Callable  # (params, frozen, batch, keys) -> (loss, parts)
    evaluate: Callable  # (params, frozen, batch, key) -> dict of per-batch metrics (incl. best_metric)
    preview: Callable  # (params, frozen, batch, key) -> (rows of images: [(title, (B, A, Bn)), ...])
    best_metric: tuple[str, str] = ("val_psnr", "max")  # (metric, 'max' or 'min') for the best checkpoint
    generate: Callable | None = None  # (params, frozen, batch, key, sampler, num_steps, eta) -> sinograms
    # (frozen, batch) -> {"<name>_latent": ...}: what the loss may read precomputed (paired stages: the
    # fixed training pairs' latents, encoded once per record instead of at every step; `train.LatentCache`)
    cached_latents: Callable | None = None
    # latent stages: (frozen, sinograms (B, C, A, Bn)) -> latents (B, h, w, C * z) and back, at the diffusion's
    # scale (the frozen autoencoder's posterior mean, and its decoder)
    encode: Callable | None = None
    decode: Callable | None = None


def split_model(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(model).__name__} has non-parameter state, which the train step does not carry")
    return graphdef, params


def warm_start(pretrained, fresh):
    """`fresh` (freshly initialised parameters) with each leaf taken from `pretrained` where it fits.

    Equal shapes are copied. A leaf that differs in size along some axes (the U-Net's first and last
    convolutions when the task has more sinogram channels than the foundation model, e.g. the two of
    `tracer_separation`) is built axis by axis: where the fresh size is a multiple of the pretrained one
    the pretrained values are tiled (each output channel group starts as the foundation's prediction),
    elsewhere the overlapping block is copied and the rest keeps its fresh initialisation. The trees
    must have the same structure (same architecture); a leaf of another rank is an error.
    """
    def one(path, new, old):
        new, old = jnp.asarray(new), jnp.asarray(old)
        if new.shape == old.shape:
            return old.astype(new.dtype)
        if new.ndim != old.ndim:
            raise ValueError(f"warm start: parameter {jax.tree_util.keystr(path)} has shape {old.shape} in the "
                             f"pretrained model and {new.shape} here")
        for axis, (n, o) in enumerate(zip(new.shape, old.shape)):
            if n != o and n % o == 0:
                old = jnp.concatenate([old] * (n // o), axis=axis)
        block = tuple(slice(0, min(n, o)) for n, o in zip(new.shape, old.shape))
        return new.at[block].set(old[block].astype(new.dtype))

    return jax.tree_util.tree_map_with_path(one, fresh, pretrained)


def warm_start_task(pretrained, fresh, *, z: int, channels: tuple[int, int], foundation_channels: tuple[int, int],
                    source_trained: bool, seen_tasks, null_task: int):
    """A task U-Net's start from the foundation U-Net: what the foundation learnt, with the parts it never
    trained reset, and an output that is zero: with the learned skip (`diffusion.task_skip_open_steps`,
    its gate at 0) or `diffusion.task_parameterization = 'x0'` the task then samples exactly the identity
    baseline; with plain `v` a zero output samples residual noise, as a fresh U-Net does.

    Carried over: every layer (`warm_start`), the latent input weights (tiled over the task's target
    channels), the RMAS mask channel's weights, the tracer, region and geometry embeddings, and the
    source-condition weights when the foundation was trained on masked completion (`source_trained`:
    it then already reads a source sinogram).
    Reset:
    - the output convolution to zero: the foundation's output meant the full latent's v, the task's
      means the residual's (with `x0`, every first DDIM sample is then `E(source)`, the identity);
    - the source-condition input weights to zero when the foundation never saw a source (it was fed
      zeros there, so those weights are untrained noise), and the TMA channel's always;
    - the task-embedding rows of tasks the foundation never trained on (`seen_tasks`) to its null
      row, the "no task" embedding that prompt dropping trained.

    Args:
      pretrained, fresh: the foundation's and a freshly built task U-Net's `nnx.State` parameters.
      z: latent channels per sinogram channel; channels, foundation_channels: `(target, source)`
        sinogram channels of the task and of the foundation (condition layout `build_unet`).
    """
    old = nnx.to_pure_dict(pretrained)
    params = nnx.to_pure_dict(fresh)
    gate = params.pop("skip_gate", None)  # the learned skip's gate (the foundation has none) starts at 0
    params = warm_start(old, params)
    if gate is not None:
        params["skip_gate"] = gate
    (ct, cs), (ft, fs) = channels, foundation_channels

    def tiled(block, n):  # (3, 3, m, c) -> (3, 3, n, c): repeated channel groups, as `warm_start` does
        reps = -(-n // block.shape[2])
        return jnp.concatenate([block] * reps, axis=2)[:, :, :n]

    k_old = old["conv_in"]["kernel"]
    x_part = tiled(k_old[:, :, :ft * z], ct * z)
    src_old = k_old[:, :, ft * z:(ft + fs) * z]
    src_part = tiled(src_old, cs * z) if source_trained else jnp.zeros(src_old.shape[:2] + (cs * z,) + src_old.shape[3:])
    mask_part = k_old[:, :, (ft + fs) * z:(ft + fs) * z + 1]
    params["conv_in"]["kernel"] = jnp.concatenate([x_part, src_part, mask_part, jnp.zeros_like(mask_part)], axis=2)
    params["conv_out"] = jax.tree.map(jnp.zeros_like, params["conv_out"])
    table = params["task_embed"]["embedding"]
    unseen = np.array([i not in set(seen_tasks) for i in range(table.shape[0])])
    unseen[null_task] = False
    params["task_embed"]["embedding"] = jnp.where(unseen[:, None], table[null_task][None], table)
    out = jax.tree.map(lambda x: x, fresh)
    nnx.replace_by_pure_dict(out, params)
    return out


def relative_crps_pair(a, b, target):
    """The fair CRPS of the two-member ensemble `a`, `b` against `target` (`metrics.crps_ensemble` with
    K = 2, in `jnp` so it runs inside the validation step), per sample over its mean absolute target:
    `mean(|a - y| + |b - y| - |a - b|) / 2 / mean|y|`, `(B, ...)` -> `(B,)`. For `a == b` it is the
    relative absolute error."""
    axes = tuple(range(1, target.ndim))
    score = 0.5 * jnp.mean(jnp.abs(a - target) + jnp.abs(b - target) - jnp.abs(a - b), axis=axes)
    return score / jnp.maximum(jnp.mean(jnp.abs(target), axis=axes), 1e-12)


def psnr(pred, target):
    """Validation PSNR in dB `(B,)`: `metrics.psnr` with each target's own peak as the data range. (The
    evaluation's default range, `max - min` of the target, is the same for sinograms whose minimum is 0.)"""
    peak = jnp.max(target, axis=tuple(range(1, target.ndim)))
    return metrics.psnr(pred, target, data_range=jnp.maximum(peak, 1e-12))


# --- autoencoder --------------------------------------------------------------------------------------


def model_rngs(seed: int) -> nnx.Rngs:
    """Initialiser keys: `rbg` keys, whose initialisers compile about ten times faster on CPU than threefry."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def build_autoencoder(model_cfg, seed: int) -> SinogramAutoencoder:
    return SinogramAutoencoder(
        in_channels=1,
        latent_channels=model_cfg.latent_channels,
        factor=model_cfg.factor,
        channels=tuple(model_cfg.ae_channels),
        num_res_blocks=model_cfg.ae_res_blocks,
        rngs=model_rngs(seed),
    )


def autoencoder_stage(config, seed: int, init_batch: dict | None = None) -> Stage:
    """The autoencoder stage; with `init_batch` (training sinograms) its patch shortcut starts as their
    whitened patch PCA (`SinogramAutoencoder.init_patch_pca`), so training starts from the best linear
    code instead of from noise."""
    model = build_autoencoder(config.model, seed)
    if init_batch is not None:
        model.init_patch_pca(_all_sinograms(init_batch))
    graphdef, params = split_model(model)
    kl_weight = config.model.kl_weight
    reconstruction = config.model.reconstruction

    def loss_fn(p, frozen, batch, keys):
        model = nnx.merge(graphdef, p)
        sino = _all_sinograms(batch)
        reps = sino.shape[0] // keys.shape[0]
        per_key = jnp.concatenate([keys] * reps)

        def one(s, k):  # per sample, so the latent noise follows the sample's own key
            return losses.autoencoder_loss(model, s[None], k, reconstruction=reconstruction, kl_weight=kl_weight)

        loss, parts = jax.vmap(one)(sino, per_key)
        return jnp.mean(loss), jax.tree.map(jnp.mean, parts)

    def reconstruct(p, sino):
        return nnx.merge(graphdef, p)(sino)[0]

    def evaluate(p, frozen, batch, key):
        sino = _all_sinograms(batch, views=False)
        recon = reconstruct(p, sino)
        out = {"val_psnr": jnp.mean(psnr(recon, sino)), "val_l1": jnp.mean(jnp.abs(recon - sino))}
        if "positive" in batch:  # the masked views the foundation encodes (RMAS on)
            views = jnp.concatenate([latent.channels_to_batch(batch[k]) for k in ("positive", "negative")])
            out["val_psnr_views"] = jnp.mean(psnr(reconstruct(p, views), views))
        return out

    def preview(p, frozen, batch, key):
        sino = _all_sinograms(batch, views=False)
        recon = reconstruct(p, sino)
        return [("input", sino[:, 0]), ("reconstruction", recon[:, 0]), ("|error|", jnp.abs(recon - sino)[:, 0])]

    return Stage("autoencoder", graphdef, params, {}, loss_fn, evaluate, preview)


def _all_sinograms(batch, views: bool = True):
    """Every sinogram channel of a batch (target, then source, then with `views` the RMAS positive and
    negative views when the batch has them: the foundation encodes those) as single-channel sinograms
    `(N, 1, A, Bn)`."""
    keys = ("target", "source") + (("positive", "negative") if views else ())
    return jnp.concatenate([latent.channels_to_batch(batch[k]) for k in keys if k in batch])


# --- latent U-Net stages -------------------------------------------------------------------------------


def build_unet(config, target_channels: int, source_channels: int, seed: int, learned_skip: bool = False) -> LatentUNet:
    """The latent U-Net of the diffusion stages: `target_channels` sinogram channels' latents out, the
    condition channels of `conditioning.condition_channels` (source latent, RMAS mask, TMA) in; with
    `learned_skip` the gate of the task's learned skip (`skip_rate`)."""
    z = config.model.latent_channels
    return prompted_unet(config.model, target_channels * z, condition_channel_count(source_channels * z),
                         config.model.unet_channels, config.model.attention_levels, seed, learned_skip)


def skip_rate(name: str, config) -> float:
    """The rate of the learned skip of stage `name` (`objectives.PairedDiffusion.skip_rate`): the task's
    `diffusion` objective with `diffusion.task_skip_open_steps > 0` gets `1 / (learning_rate * open_steps)`,
    so that Adam, whose steps are about the learning rate, can open the skip's variance from 0 to 1 in that
    many steps; every other stage 0 (configs saved before the option had none)."""
    open_steps = int(config.diffusion.get("task_skip_open_steps", 0))
    if open_steps < 0:
        raise ValueError(f"diffusion.task_skip_open_steps must be >= 0; got {open_steps}")
    parameterization = config.diffusion.get("task_parameterization", config.diffusion.parameterization)
    if not open_steps or objectives.objective_of(name, config) != "diffusion" or parameterization != "v":
        return 0.0
    return 1.0 / (float(config.train.learning_rate) * open_steps)


def prompted_unet(model_cfg, out_channels: int, cond_channels: int, channels, attention_levels, seed: int,
                  learned_skip: bool = False) -> LatentUNet:
    """A `LatentUNet` with the prompt tables of every tracer, region and task, and `model_cfg`'s residual
    blocks and heads: the latent U-Net (`build_unet`) and the pixel regressor's share it."""
    return LatentUNet(
        latent_channels=out_channels,
        cond_channels=cond_channels,
        channels=tuple(channels),
        num_res_blocks=model_cfg.unet_res_blocks,
        attention_levels=tuple(attention_levels),
        num_heads=model_cfg.num_heads,
        num_tracers=len(TRACERS),
        num_regions=len(REGIONS),
        num_tasks=len(TASKS),
        learned_skip=learned_skip,
        rngs=model_rngs(seed),
    )


def task_min_snr(config) -> float:
    """`diffusion.task_min_snr`: the task loss's min-SNR gamma, 0 for off (configs saved before it had none)."""
    gamma = float(config.diffusion.get("task_min_snr", 0.0))
    if not gamma >= 0:
        raise ValueError(f"diffusion.task_min_snr must be >= 0 (0: off); got {gamma}")
    return gamma


def make_schedule(diffusion_cfg):
    if diffusion_cfg.schedule == "cosine":
        return schedules.cosine_schedule(diffusion_cfg.num_steps)
    if diffusion_cfg.schedule == "linear":
        return schedules.linear_schedule(diffusion_cfg.num_steps)
    raise ValueError(f"diffusion.schedule must be 'cosine' or 'linear'; got {diffusion_cfg.schedule!r}")


def make_objective(name: str, config, unet_graphdef, null_ids, ae_graphdef, target_channels: int,
                   source_channels: int) -> objectives.Objective:
    """The objective of latent U-Net stage `name` (`objectives.objective_of`) with `config`'s settings, for
    the U-Net `unet_graphdef` (with prompt tables whose null ids are `null_ids`)."""
    kind = objectives.objective_of(name, config)
    d, masks = config.diffusion, config.masks
    rmas_objective = masks.get("objective", "triplet")  # configs saved before it existed trained triplets
    if rmas_objective not in ("completion", "triplet"):
        raise ValueError(f"masks.objective must be 'completion' or 'triplet'; got {rmas_objective!r}")
    common = dict(stage=name, unet=unet_graphdef, null_ids=null_ids, autoencoder=ae_graphdef,
                  target_channels=target_channels, source_channels=source_channels,
                  latent_channels=config.model.latent_channels, factor=config.model.factor,
                  drop_prob=float(d.prompt_drop_prob) if kind != "regression" else 0.0, val_steps=d.val_steps)
    denoising = dict(schedule=make_schedule(d), clip_x0=float(d.clip_x0) or None)
    tma_alpha = float(config.tma.alpha) if config.tma.enabled else 0.0
    residual = bool(d.get("residual", False))
    if kind == "regression":
        return objectives.Regression(**common, tma_alpha=tma_alpha, residual=residual)
    if kind == "bridge":
        return objectives.Bridge(**common, tma_alpha=tma_alpha, sigma=float(d.get("bridge_sigma", 1.0)))
    if kind == "diffusion":  # configs saved before task_parameterization existed trained with `parameterization`
        return objectives.PairedDiffusion(**common, **denoising, tma_alpha=tma_alpha, residual=residual,
                                          parameterization=d.get("task_parameterization", d.parameterization),
                                          skip_rate=skip_rate(name, config), min_snr=task_min_snr(config))
    synthesis = dict(common, **denoising, parameterization=d.parameterization,
                     consistency_weight=float(d.consistency_weight))
    if not masks.get("rmas", True):  # plain synthesis; the mask channel as the configured objective sets it
        return objectives.Synthesis(**synthesis, known_rays=0.0 if rmas_objective == "completion" else 1.0)
    if rmas_objective == "completion":
        return objectives.Completion(**synthesis, completion_prob=float(masks.get("completion_prob", 0.0)))
    return objectives.Triplet(**synthesis)


def diffusion_stage(name: str, config, ae_graphdef, ae_params, latent_scale: float, target_channels: int,
                    source_channels: int, seed: int, init=None, residual_scale: float = 1.0) -> Stage:
    """A latent U-Net stage: `foundation`, `task` or `regressor`, with the objective `make_objective` picks.

    `init` maps the fresh U-Net parameters to the starting ones (the task's warm start from the
    foundation, `warm_start_task`). `residual_scale` scales the residual latents of the residual
    objectives (`diffusion.residual`; `latent.measure_residual_scale` measures it). The `diffusion` task
    predicts with `diffusion.task_parameterization` (with `x0` a zero output is the identity, see
    `warm_start_task`; `v` by default), the foundation with `diffusion.parameterization`.
    """
    unet = build_unet(config, target_channels, source_channels, seed, learned_skip=skip_rate(name, config) > 0)
    graphdef, params = split_model(unet)
    objective = make_objective(name, config, graphdef, unet.null_ids, ae_graphdef, target_channels, source_channels)
    if init is not None:
        params = init(params)
    frozen = objective.frozen_state(ae_params, latent_scale, residual_scale)

    sampled = objective.paired and objective.name != "regression"

    def evaluate(p, frozen, batch, key):
        loss_key, sample_key = jax.random.split(key)
        target = batch["target"]
        B = target.shape[0]
        out = {"val_loss": objective.loss(p, frozen, batch, jax.random.split(loss_key, B))[0]}
        if not objective.paired:
            return out
        if sampled:  # two samples per input, drawn as one batch: a proper score of the whole posterior
            both = objective.generate(p, frozen, jax.tree.map(lambda x: jnp.concatenate([x, x]), batch), sample_key)
            generated = both[:B]
            out["val_crps"] = jnp.mean(relative_crps_pair(generated, both[B:], target))
        else:
            generated = objective.generate(p, frozen, batch, sample_key)
        out["val_psnr"] = jnp.mean(psnr(generated, target))
        out["val_psnr_source"] = jnp.mean(psnr(latent.match_channels(batch["source"], target_channels), target))
        return out

    def preview(p, frozen, batch, key):
        generated = objective.generate(p, frozen, batch, key)
        rows = [("target", batch["target"][:, 0]), ("generated", generated[:, 0])]
        if objective.paired:
            rows.insert(0, ("source", batch["source"][:, 0]))
        return rows

    # a sampled task by its CRPS: one sample's PSNR prefers a model that collapsed to its mean (the identity
    # start of the learned skip is such a model), the CRPS prefers the posterior that is calibrated
    best = ("val_crps", "min") if sampled else ("val_psnr", "max") if objective.paired else ("val_loss", "min")
    return Stage(name, graphdef, params, frozen, objective.loss, evaluate, preview, best_metric=best,
                 generate=objective.generate, cached_latents=objective.cached_latents if objective.paired else None,
                 encode=objective.encode, decode=objective.decode)


def foundation_reads_source(recipe: dict) -> bool:
    """Whether a foundation trained with `recipe` (`runs.recipe`) learnt to read the source-condition
    channels: only masked completion feeds them anything but zeros."""
    masks = recipe.get("masks", {})
    return bool(masks.get("rmas", False)) and masks.get("objective") == "completion" and \
        float(masks.get("completion_prob", 0.0)) > 0


def random_batch(config, stage: str, batch_size: int, seed: int = 0, step: int = 0) -> dict:
    """A batch of random sinograms with every field `stage`'s loss reads, at the config's geometry (one
    channel): for benchmarks and equivalence tests of the train step, where the simulator is not the
    point. `index` continues over steps, as the pipeline's does."""
    rng = np.random.default_rng([seed, step])
    shape = (batch_size, 1, config.data.n_angles, config.data.n_bins)
    target = rng.gamma(2.0, 1.0, size=shape).astype(np.float32)
    mask = (rng.random((batch_size,) + shape[2:]) < 0.5).astype(np.float32)
    batch = {"target": target, "source": (target + rng.normal(size=shape)).astype(np.float32),
             "prompt": np.tile(np.array([[0, 1, 1]], np.int32), (batch_size, 1)),
             "index": np.arange(batch_size * step, batch_size * (step + 1), dtype=np.int32)}
    if stage == "foundation":
        batch.update(sino_mask=mask, full=target, positive=mask[:, None] * target,
                     negative=(1 - mask[:, None]) * target)
    if stage in ("task", "regressor", "pixel_regressor") and config.tma.enabled:
        batch["tma"] = mask
    return batch

