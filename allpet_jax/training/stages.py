"""The training stages of ALL-PET as pure functions for the generic train step.

- `autoencoder`: the KL sinogram autoencoder on every sinogram channel of the task's data and, with RMAS
  on, on the masked views of its targets that the foundation encodes.
- `foundation`: the latent diffusion model for synthesis, trained on the RMAS/DMM triplet (full,
  positive, negative views) with the positive/negative consistency loss.
- `task`: low-shot fine-tuning for one paired task: the target latent is generated conditioned on the
  source latent (and the TMA map), with the diffusion loss weighted by `1 + alpha * A_sino`.
- `regressor`: the evaluation's deterministic baseline, the same U-Net trained on the same pairs as a
  plain regression source -> target.
- `pixel_regressor`: the evaluation's strong baseline, a U-Net on the sinograms themselves (no
  autoencoder); it lives in `pixel_regressor.py` and uses the helpers here.

Autoencoder channels: every sinogram channel is encoded on its own (channels fold into the batch), so
one single-channel autoencoder serves 1-channel sources and 2-channel separation targets; a C-channel
sinogram's latent is the C per-channel latents concatenated on the channel axis, times `latent_scale`.

Each stage gives a `Stage`: the trainable parameters, the frozen ones (autoencoder and latent scale for
the diffusion stages), the loss, a validation function, the validation metric that picks the best
checkpoint, and a preview for the sample grid. Nothing here runs a loop; `train.py` does.

Validation: the autoencoder reports reconstruction PSNR; the diffusion stages report `val_loss`, the
training loss on the validation batch with fixed keys (the standard progress measure of diffusion
training, and the only one for synthesis, where a sample is not meant to match any one sinogram); the
task stage also samples with DDIM and reports the samples' PSNR against the target next to the
identity baseline (the source itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allpet_jax import losses
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import REGIONS
from allpet_jax.data.simulate import TASKS
from allpet_jax.diffusion import ddbm, ddim, ddpm, physics_guidance, schedules
from allpet_jax.diffusion.guidance import GuidedDenoiser
from allpet_jax.diffusion.model_function import NNXDenoiser
from allpet_jax.models.autoencoder import SinogramAutoencoder
from allpet_jax.models.unet import LatentUNet, Prompt

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
    """A task U-Net's start from the foundation U-Net that samples exactly the identity baseline.

    Carried over: every layer (`warm_start`), the latent input weights (tiled over the task's target
    channels), the RMAS mask channel's weights, the tracer, region and geometry embeddings, and the
    source-condition weights when the foundation was trained on masked completion (`source_trained`:
    it then already reads a source sinogram).
    Reset:
    - the output convolution to zero, so the task model's first prediction of the residual's clean
      latent is 0: with the `x0` parameterisation every DDIM sample is then `E(source)`, the identity;
    - the source-condition input weights to zero when the foundation never saw a source (it was fed
      zeros there, so those weights are untrained noise), and the TMA channel's always;
    - the task-embedding rows of tasks the foundation never trained on (`seen_tasks`) to its null
      row, the "no task" embedding that prompt dropping trained.

    Args:
      pretrained, fresh: the foundation's and a freshly built task U-Net's `nnx.State` parameters.
      z: latent channels per sinogram channel; channels, foundation_channels: `(target, source)`
        sinogram channels of the task and of the foundation (condition layout `build_unet`).
    """
    params = nnx.to_pure_dict(warm_start(pretrained, fresh))
    old = nnx.to_pure_dict(pretrained)
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


def psnr(pred, target):
    """Per-sample PSNR in dB `(B,)` with the target's own peak as the data range."""
    axes = tuple(range(1, target.ndim))
    mse = jnp.mean((pred - target) ** 2, axis=axes)
    peak = jnp.max(target, axis=axes)
    return 10.0 * jnp.log10(jnp.maximum(peak, 1e-12) ** 2 / jnp.maximum(mse, 1e-20))


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


def _channels_to_batch(sino):
    B, C = sino.shape[:2]
    return sino.reshape((B * C, 1) + sino.shape[2:])


def encode(ae_graphdef, ae_params, sino, scale):
    """Latent `(B, h, w, C * z)` (posterior mean, times `scale`) of sinograms `(B, C, A, Bn)`."""
    model = nnx.merge(ae_graphdef, ae_params)
    B, C = sino.shape[:2]
    mean, _ = model.encode(_channels_to_batch(sino))
    mean = mean.reshape((B, C) + mean.shape[1:])  # (B, C, h, w, z)
    return scale * jnp.moveaxis(mean, 1, -2).reshape(mean.shape[:1] + mean.shape[2:4] + (-1,))


def decode(ae_graphdef, ae_params, latent, scale, channels: int):
    """Sinograms `(B, C, A, Bn)` from latents `(B, h, w, C * z)`."""
    model = nnx.merge(ae_graphdef, ae_params)
    B, h, w, cz = latent.shape
    z = latent.reshape(B, h, w, channels, cz // channels) / scale
    sino = model.decode(jnp.moveaxis(z, 3, 1).reshape(B * channels, h, w, cz // channels))
    return sino.reshape((B, channels) + sino.shape[2:])


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
        metrics = {"val_psnr": jnp.mean(psnr(recon, sino)), "val_l1": jnp.mean(jnp.abs(recon - sino))}
        if "positive" in batch:  # the masked views the foundation encodes (RMAS on)
            views = jnp.concatenate([_channels_to_batch(batch[k]) for k in ("positive", "negative")])
            metrics["val_psnr_views"] = jnp.mean(psnr(reconstruct(p, views), views))
        return metrics

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
    return jnp.concatenate([_channels_to_batch(batch[k]) for k in keys if k in batch])


def measure_latent_scale(ae_graphdef, ae_params, batches) -> float:
    """`1 / std` of the autoencoder's latents over a few training batches (Rombach et al. 2022)."""
    latents = [np.asarray(encode(ae_graphdef, ae_params, jnp.asarray(b["target"]), 1.0)) for b in batches]
    return float(1.0 / max(np.std(np.concatenate([x.ravel() for x in latents])), 1e-6))


# --- latent diffusion ----------------------------------------------------------------------------------


def build_unet(config, target_channels: int, source_channels: int, seed: int) -> LatentUNet:
    z = config.model.latent_channels
    return prompted_unet(config.model, target_channels * z, source_channels * z + 2,  # source latent, RMAS mask, TMA
                         config.model.unet_channels, config.model.attention_levels, seed)


def prompted_unet(model_cfg, out_channels: int, cond_channels: int, channels, attention_levels, seed: int) -> LatentUNet:
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
        rngs=model_rngs(seed),
    )


def make_schedule(diffusion_cfg):
    if diffusion_cfg.schedule == "cosine":
        return schedules.cosine_schedule(diffusion_cfg.num_steps)
    if diffusion_cfg.schedule == "linear":
        return schedules.linear_schedule(diffusion_cfg.num_steps)
    raise ValueError(f"diffusion.schedule must be 'cosine' or 'linear'; got {diffusion_cfg.schedule!r}")


def prompt_of(batch, sino_shape) -> Prompt:
    """The model prompt from `batch['prompt']` `(B, 3)` (tracer, region and task ids: indices into
    `TRACERS`, `REGIONS`, `TASKS`) and the sinogram geometry `(n_angles, n_bins)`."""
    ids = jnp.asarray(batch["prompt"], jnp.int32)
    B = ids.shape[0]
    geometry = jnp.broadcast_to(jnp.asarray(sino_shape, jnp.float32), (B, 2))
    return Prompt(tracer=ids[:, 0], region=ids[:, 1], task=ids[:, 2], geometry=geometry)


def drop_prompt(prompt: Prompt, drop, null_ids) -> Prompt:
    """Classifier-free guidance training: where `drop` `(B,)` is true every id becomes its table's null id
    (`LatentUNet.null_ids`); the geometry is never dropped."""
    tracer, region, task = (jnp.where(drop, n, ids) for n, ids in zip(null_ids, prompt[:3]))
    return prompt._replace(tracer=tracer, region=region, task=task)


def _latent_map(sino_map, latent_hw):
    from allpet_jax.models.conditioning import sinogram_map_to_latent

    return sinogram_map_to_latent(sino_map, latent_hw)


SAMPLERS = {"diffusion": ("ddim", "ddpm"), "bridge": ("ddbm",), "regression": ("direct",)}
"""The samplers each objective's model can be sampled with."""


def objective_of(name: str, config) -> str:
    """`synthesis` (foundation), `diffusion` or `bridge` (task, `config.diffusion.task_objective`) or
    `regression` (the deterministic baselines `regressor` and `pixel_regressor`)."""
    if name == "foundation":
        return "synthesis"
    if name in ("regressor", "pixel_regressor"):
        return "regression"
    objective = config.diffusion.get("task_objective", "diffusion")  # configs saved before it existed
    if objective not in ("diffusion", "bridge"):
        raise ValueError(f"diffusion.task_objective must be 'diffusion' or 'bridge'; got {objective!r}")
    return objective


def diffusion_stage(name: str, config, ae_graphdef, ae_params, latent_scale: float, target_channels: int,
                    source_channels: int, seed: int, init=None, residual_scale: float = 1.0) -> Stage:
    """A latent U-Net stage: `foundation`, `task` or `regressor`.

    - `foundation`: synthesis from a prompt, trained on RMAS triplets (the mask is a condition channel).
    - `task`: the paired task, conditioned on the source latent (and the TMA map), trained with
      `config.diffusion.task_objective`: `diffusion` (DDPM/DDIM) or `bridge` (a DDBM Brownian bridge from
      the source latent to the target latent, `ddbm.py`).
    - `regressor`: the same U-Net as a deterministic map source -> target (`t = 0`, zero input, MSE):
      the regression baseline of the evaluation, trained on the same pairs.

    With `config.diffusion.residual` the `diffusion` task and the regressor work on the residual latent
    `residual_scale * (E(target) - E(baseline))`, `baseline` the source matched to the target's channels
    (the identity baseline), added back after sampling: the model only learns what the task changes,
    so a weak or early model degrades towards the identity instead of towards noise (residual
    diffusion, as in ResShift, Yue et al. 2023). `measure_residual_scale` gives the scale. (The bridge
    starts from the source already and needs no residual.)

    `init` maps the fresh U-Net parameters to the starting ones (the task's warm start from the
    foundation, `warm_start_task`). The `diffusion` task predicts with `diffusion.task_parameterization`
    (`x0` by default: a zero output is then the identity, see `warm_start_task`), the foundation with
    `diffusion.parameterization`.
    """
    objective = objective_of(name, config)
    unet = build_unet(config, target_channels, source_channels, seed)
    null_ids = unet.null_ids
    graphdef, params = split_model(unet)
    if init is not None:
        params = init(params)
    frozen = {"ae": ae_params, "scale": jnp.asarray(latent_scale, jnp.float32)}
    paired = objective != "synthesis"
    residual = objective in ("diffusion", "regression") and bool(config.diffusion.get("residual", False))
    if residual:
        frozen["residual_scale"] = jnp.asarray(residual_scale, jnp.float32)
    schedule = make_schedule(config.diffusion)
    param = config.diffusion.parameterization
    if objective == "diffusion":  # configs saved before task_parameterization existed trained with `parameterization`
        param = config.diffusion.get("task_parameterization", param)
    sigma = float(config.diffusion.get("bridge_sigma", 1.0))
    z = config.model.latent_channels
    f = config.model.factor
    tma_alpha = float(config.tma.alpha) if paired and config.tma.enabled else 0.0
    consistency_weight = float(config.diffusion.consistency_weight) if not paired else 0.0
    rmas_objective = config.masks.get("objective", "triplet")  # configs saved before it existed trained triplets
    if rmas_objective not in ("completion", "triplet"):
        raise ValueError(f"masks.objective must be 'completion' or 'triplet'; got {rmas_objective!r}")
    completion_prob = float(config.masks.get("completion_prob", 0.0))
    # The mask channel tells which rays of the source channels are known: all for a task's source, none for
    # synthesis under the completion objective; the triplet objective (and configs before it) used ones.
    synthesis_mask = 0.0 if (not paired and rmas_objective == "completion") else 1.0
    drop_prob = float(config.diffusion.prompt_drop_prob) if objective != "regression" else 0.0
    clip_x0 = float(config.diffusion.clip_x0) or None

    def enc(frozen, sino):
        return encode(ae_graphdef, frozen["ae"], sino, frozen["scale"])

    def dec(frozen, latent):
        return decode(ae_graphdef, frozen["ae"], latent, frozen["scale"], target_channels)

    def latent(frozen, batch, name):
        """The latent of `batch[name]`: the cached `<name>_latent` when the batch carries it (the paired
        stages' fixed training pairs are encoded once, `cached_latents`), else encoded now."""
        if f"{name}_latent" in batch:
            return batch[f"{name}_latent"]
        if name == "baseline":
            return enc(frozen, match_channels(batch["source"], target_channels))
        return enc(frozen, batch[name])

    def baseline_latent(frozen, batch):
        return latent(frozen, batch, "baseline")

    def cached_latents(frozen, batch):
        """The latents a paired stage's loss reads (`<name>_latent` fields), to encode each pair once."""
        names = ("target", "source") + (("baseline",) if source_channels != target_channels else ())
        out = {f"{n}_latent": latent(frozen, batch, n) for n in names}
        if "baseline_latent" not in out:
            out["baseline_latent"] = out["source_latent"]
        return out

    def to_model(frozen, batch, x0):  # target latent -> what the model generates
        return (x0 - baseline_latent(frozen, batch)) * frozen["residual_scale"] if residual else x0

    def from_model(frozen, batch, latent):
        return baseline_latent(frozen, batch) + latent / frozen["residual_scale"] if residual else latent

    def condition(frozen, batch, latent_hw, mask=None, source=None):
        """Condition channels: source latent, known-ray mask, TMA. `mask` `(B, A, Bn)` defaults to all
        rays known (tasks) or `synthesis_mask` (foundation); `source` a latent that replaces the task's."""
        B = batch["target"].shape[0]
        h, w = latent_hw
        if source is None and paired:
            source = latent(frozen, batch, "source")
        elif source is None:
            source = jnp.zeros((B, h, w, source_channels * z), jnp.float32)
        if mask is None:
            mask_c = jnp.full((B, h, w, 1), 1.0 if paired else synthesis_mask, jnp.float32)
        else:
            mask_c = _latent_map(mask, latent_hw)
        tma = batch.get("tma") if paired else None
        tma_c = jnp.zeros((B, h, w, 1)) if tma is None else _latent_map(tma, latent_hw)
        return jnp.concatenate([source, mask_c, tma_c], axis=-1)

    def loss_fn(p, frozen, batch, keys):
        unet = nnx.merge(graphdef, p)
        sino_shape = batch["target"].shape[-2:]
        noise_keys, drop_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)  # per sample
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, drop_prob))(drop_keys)
        prompt = drop_prompt(prompt_of(batch, sino_shape), drop, null_ids)
        x0 = latent(frozen, batch, "target") if paired else enc(frozen, batch["target"])
        latent_hw = x0.shape[1:3]
        if not paired and "sino_mask" in batch and rmas_objective == "triplet":
            return _rmas_loss(unet, frozen, batch, prompt, noise_keys, latent_hw)
        if not paired and "sino_mask" in batch:
            view_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(drop_keys)
            return _completion_loss(unet, frozen, batch, prompt, noise_keys, view_keys, latent_hw)
        if not paired:  # synthesis pretraining without RMAS (masks.rmas = False): full sinograms only
            cond = condition(frozen, batch, latent_hw)
            return losses.diffusion_loss(lambda x_t, t: unet(x_t, t, prompt=prompt, cond=cond), noise_keys,
                                         schedule, x0, parameterization=param)
        cond = condition(frozen, batch, latent_hw)
        weight = losses.tma_latent_weight(batch["tma"], latent_hw, tma_alpha) if tma_alpha and "tma" in batch else None

        def predict(x_t, t):
            return unet(x_t, t, prompt=prompt, cond=cond)

        if objective == "bridge":
            x_t, t_model = jax.vmap(lambda k, a, b: ddbm.bridge_training_input(k, a[None], b[None], sigma))(
                noise_keys, x0, baseline_latent(frozen, batch))
            loss = jnp.mean(losses.weighted_mse(predict(x_t[:, 0], t_model[:, 0]), x0, weight))
            return loss, {"bridge": loss, "total": loss}
        x0 = to_model(frozen, batch, x0)
        if objective == "regression":
            loss = jnp.mean(losses.weighted_mse(predict(jnp.zeros_like(x0), jnp.zeros(x0.shape[:1])), x0, weight))
            return loss, {"regression": loss, "total": loss}
        return losses.diffusion_loss(predict, noise_keys, schedule, x0, parameterization=param, weight=weight)

    def _rmas_loss(unet, frozen, batch, prompt, noise_keys, latent_hw):
        """Foundation: the RMAS triplet (full, positive, negative) with the mask as a condition."""
        mask = batch["sino_mask"]
        x0 = enc(frozen, batch["full"])  # S (= P + N exactly, in both RMAS modes)
        views = jnp.stack([x0, enc(frozen, batch["positive"]), enc(frozen, batch["negative"])])
        conds = jnp.concatenate([condition(frozen, batch, latent_hw, m) for m in (None, mask, 1.0 - mask)])
        prompt3 = jax.tree.map(lambda a: jnp.concatenate([a, a, a]), prompt)

        def predict(x_t, t):
            return unet(x_t, t, prompt=prompt3, cond=conds)

        return losses.rmas_diffusion_loss(predict, noise_keys, schedule, views, parameterization=param,
                                          decode=(lambda lat: dec(frozen, lat)) if consistency_weight else None,
                                          sino=batch["full"], consistency_weight=consistency_weight)

    def _completion_loss(unet, frozen, batch, prompt, noise_keys, view_keys, latent_hw):
        """Foundation: each record is synthesis or, with probability `completion_prob`, the completion of
        `S` from one of its views (positive or negative, even odds) given as the source and its rays as
        the mask channel (`losses.completion_loss`)."""
        u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(view_keys)
        complete, positive = u[:, 0] < completion_prob, u[:, 1] < 0.5
        mask = batch["sino_mask"]
        known = jnp.where(complete[:, None, None], jnp.where(positive[:, None, None], mask, 1.0 - mask), 0.0)
        view = jnp.where(positive[:, None, None, None], batch["positive"], batch["negative"])
        source = enc(frozen, view) * complete[:, None, None, None]  # synthesis records: no source at all
        cond = condition(frozen, batch, latent_hw, mask=known, source=source)
        return losses.completion_loss(lambda x_t, t: unet(x_t, t, prompt=prompt, cond=cond), noise_keys, schedule,
                                      enc(frozen, batch["full"]), parameterization=param,
                                      decode=lambda lat: dec(frozen, lat), sino=batch["full"], unseen=1.0 - known,
                                      consistency_weight=consistency_weight)

    def generate(p, frozen, batch, key, sampler: str | None = None, num_steps: int | None = None,
                 eta: float | None = None, guidance: float = 0.0, cfg_scale: float = 1.0):
        """Sinograms `(B, C, n_angles, n_bins)` for `batch` (its `target` gives only the geometry and batch
        size; paired tasks read `source`). `sampler` defaults to the objective's first in `SAMPLERS`.

        `cfg_scale != 1` is classifier-free guidance on the prompt (`guidance.GuidedDenoiser`): each step
        runs the U-Net with the prompt and with the null prompt (same geometry and condition channels) and
        extrapolates, `uncond + cfg_scale * (cond - uncond)`; 0 is the unconditional model. It needs a
        model trained with prompt dropping (`diffusion.prompt_drop_prob > 0`).

        `guidance > 0` (DDIM on a `diffusion` task model, or on the foundation model: the zero-pair arm)
        adds the Poisson data-consistency step of `physics_guidance.py`; the batch must then carry
        `guide_y` (raw low-dose prompts), `guide_gain` and `guide_background`, all `(B, C, A, Bn)` in
        counts (`sampling.add_poisson_data`)."""
        sampler = sampler or SAMPLERS[objective if paired else "diffusion"][0]
        allowed = SAMPLERS[objective if paired else "diffusion"]
        if sampler not in allowed:
            raise ValueError(f"a {name} model trained with the {objective!r} objective samples with {allowed}; "
                             f"got sampler {sampler!r}")
        sino_shape = batch["target"].shape[-2:]
        B = batch["target"].shape[0]
        latent_hw = (sino_shape[0] // f, sino_shape[1] // f)
        kwargs = {"prompt": prompt_of(batch, sino_shape), "cond": condition(frozen, batch, latent_hw)}
        shape = (B,) + latent_hw + (target_channels * z,)
        steps = num_steps or config.diffusion.val_steps
        denoiser, model_params = NNXDenoiser(graphdef), (p, kwargs)
        if cfg_scale != 1.0:
            if sampler == "direct" or not drop_prob:
                raise ValueError(f"classifier-free guidance (cfg_scale {cfg_scale}) needs a diffusion model trained "
                                 f"with prompt dropping; this {name} model has objective {objective!r} and "
                                 f"diffusion.prompt_drop_prob {drop_prob}")
            null = dict(kwargs, prompt=drop_prompt(kwargs["prompt"], jnp.ones((B,), bool), null_ids))
            denoiser = GuidedDenoiser(denoiser)
            model_params = ((p, kwargs), (p, null), jnp.asarray(cfg_scale, jnp.float32))
        if sampler == "direct":
            latent = nnx.merge(graphdef, p)(jnp.zeros(shape), jnp.zeros((B,)), **kwargs)
        elif sampler == "ddbm":
            latent = ddbm.ddbm_sample(denoiser, model_params, key, baseline_latent(frozen, batch), steps,
                                      sigma=sigma, eta=1.0 if eta is None else eta)  # ancestral by default
        elif sampler == "ddpm":
            latent = ddpm.ddpm_sample(denoiser, model_params, key, schedule, shape,
                                      parameterization=param, clip_x0=clip_x0)
        else:
            guide, data = None, None
            if guidance:
                fields = ("guide_y", "guide_gain", "guide_background")
                if objective not in ("diffusion", "synthesis") or any(k not in batch for k in fields):
                    raise ValueError("Poisson guidance needs a diffusion task model or the foundation model, and the "
                                     f"likelihood's {fields} in the batch (sampling.add_poisson_data)")
                if residual:  # the source's latent once, not inside every step's gradient
                    base, rs = baseline_latent(frozen, batch), frozen["residual_scale"]
                    to_sinogram = lambda x0: dec(frozen, base + x0 / rs)  # noqa: E731
                else:
                    to_sinogram = lambda x0: dec(frozen, x0)  # noqa: E731
                guide = physics_guidance.make_poisson_guide(to_sinogram, schedule)
                data = physics_guidance.PoissonData(*(batch[k] for k in fields), jnp.asarray(guidance, jnp.float32))
            latent = ddim.ddim_sample(denoiser, model_params, key, schedule, shape, num_steps=steps,
                                      eta=eta or 0.0, parameterization=param, clip_x0=clip_x0, guide=guide,
                                      guide_params=data)
        return dec(frozen, from_model(frozen, batch, latent) if paired else latent)

    def evaluate(p, frozen, batch, key):
        loss_key, sample_key = jax.random.split(key)
        metrics = {"val_loss": loss_fn(p, frozen, batch, jax.random.split(loss_key, batch["target"].shape[0]))[0]}
        if paired:
            out, target = generate(p, frozen, batch, sample_key), batch["target"]
            metrics["val_psnr"] = jnp.mean(psnr(out, target))
            metrics["val_psnr_source"] = jnp.mean(psnr(match_channels(batch["source"], target_channels), target))
        return metrics

    def preview(p, frozen, batch, key):
        out = generate(p, frozen, batch, key)
        rows = [("target", batch["target"][:, 0]), ("generated", out[:, 0])]
        if paired:
            rows.insert(0, ("source", batch["source"][:, 0]))
        return rows

    best = ("val_psnr", "max") if paired else ("val_loss", "min")
    return Stage(name, graphdef, params, frozen, loss_fn, evaluate, preview, best_metric=best, generate=generate,
                 cached_latents=cached_latents if paired else None)


def foundation_reads_source(recipe: dict) -> bool:
    """Whether a foundation trained with `recipe` (`runs.recipe`) learnt to read the source-condition
    channels: only masked completion feeds them anything but zeros."""
    masks = recipe.get("masks", {})
    return bool(masks.get("rmas", False)) and masks.get("objective") == "completion" and \
        float(masks.get("completion_prob", 0.0)) > 0


def match_channels(source, channels: int):
    """The identity baseline `(B, channels, A, Bn)`: the source itself, or its channel mean split evenly
    over `channels` (a mixture's even split for `tracer_separation`)."""
    if source.shape[1] == channels:
        return source
    return jnp.repeat(source.mean(axis=1, keepdims=True), channels, axis=1) / channels


def measure_residual_scale(ae_graphdef, ae_params, batches, latent_scale: float) -> float:
    """`1 / std` of the residual latents `E(target) - E(baseline)` over a few training batches."""
    res = []
    for b in batches:
        target = jnp.asarray(b["target"])
        base = match_channels(jnp.asarray(b["source"]), target.shape[1])
        res.append(np.asarray(encode(ae_graphdef, ae_params, target, latent_scale)
                              - encode(ae_graphdef, ae_params, base, latent_scale)))
    return float(1.0 / max(np.std(np.concatenate([r.ravel() for r in res])), 1e-6))


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

