"""The three training stages of ALL-PET as pure functions for the generic train step.

- `autoencoder`: the KL sinogram autoencoder on every sinogram channel of the task's data.
- `foundation`: the latent diffusion model for synthesis, trained on the RMAS/DMM triplet (full,
  positive, negative views) with the positive/negative consistency loss.
- `task`: low-shot fine-tuning for one paired task: the target latent is generated conditioned on the
  source latent (and the TMA map), with the diffusion loss weighted by `1 + alpha * A_sino`.

Autoencoder channels: every sinogram channel is encoded on its own (channels fold into the batch), so
one single-channel autoencoder serves 1-channel sources and 2-channel separation targets; a C-channel
sinogram's latent is the C per-channel latents concatenated on the channel axis, times `latent_scale`.

Each stage gives a `Stage`: the trainable parameters, the frozen ones (autoencoder and latent scale for
the diffusion stages), the loss, a validation function returning `val_psnr`, and a preview for the
sample grid. Nothing here runs a loop; `train.py` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allpet_jax import losses
from allpet_jax.diffusion import ddim, schedules
from allpet_jax.diffusion.model_function import NNXDenoiser
from allpet_jax.models.autoencoder import SinogramAutoencoder
from allpet_jax.models.unet import LatentUNet, Prompt

STAGES = ("autoencoder", "foundation", "task")


@dataclasses.dataclass
class Stage:
    name: str
    graphdef: Any
    params: Any
    frozen: dict
    loss_fn: Callable  # (params, frozen, batch, keys) -> (loss, parts)
    evaluate: Callable  # (params, frozen, batch, key) -> dict of per-batch metrics (incl. val_psnr)
    preview: Callable  # (params, frozen, batch, key) -> (rows of images: [(title, (B, A, Bn)), ...])


def split_model(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(model).__name__} has non-parameter state, which the train step does not carry")
    return graphdef, params


def psnr(pred, target):
    """Per-sample PSNR in dB `(B,)` with the target's own peak as the data range."""
    axes = tuple(range(1, target.ndim))
    mse = jnp.mean((pred - target) ** 2, axis=axes)
    peak = jnp.max(target, axis=axes)
    return 10.0 * jnp.log10(jnp.maximum(peak, 1e-12) ** 2 / jnp.maximum(mse, 1e-20))


# --- autoencoder --------------------------------------------------------------------------------------


def build_autoencoder(model_cfg, seed: int) -> SinogramAutoencoder:
    return SinogramAutoencoder(
        in_channels=1,
        latent_channels=model_cfg.latent_channels,
        factor=model_cfg.factor,
        channels=tuple(model_cfg.ae_channels),
        num_res_blocks=model_cfg.ae_res_blocks,
        rngs=nnx.Rngs(seed),
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


def autoencoder_stage(config, seed: int) -> Stage:
    model = build_autoencoder(config.model, seed)
    graphdef, params = split_model(model)
    kl_weight = config.model.kl_weight
    reconstruction = config.model.reconstruction

    def sinograms(batch):
        parts = [_channels_to_batch(batch["target"])]
        if "source" in batch:
            parts.append(_channels_to_batch(batch["source"]))
        return jnp.concatenate(parts)

    def loss_fn(p, frozen, batch, keys):
        model = nnx.merge(graphdef, p)
        sino = sinograms(batch)
        reps = sino.shape[0] // keys.shape[0]
        per_key = jnp.concatenate([keys] * reps)

        def one(s, k):  # per sample, so the latent noise follows the sample's own key
            return losses.autoencoder_loss(model, s[None], k, reconstruction=reconstruction, kl_weight=kl_weight)

        loss, parts = jax.vmap(one)(sino, per_key)
        return jnp.mean(loss), jax.tree.map(jnp.mean, parts)

    def reconstruct(p, batch):
        model = nnx.merge(graphdef, p)
        sino = sinograms(batch)
        return model(sino)[0], sino

    def evaluate(p, frozen, batch, key):
        recon, sino = reconstruct(p, batch)
        return {"val_psnr": jnp.mean(psnr(recon, sino)), "val_l1": jnp.mean(jnp.abs(recon - sino))}

    def preview(p, frozen, batch, key):
        recon, sino = reconstruct(p, batch)
        return [("input", sino[:, 0]), ("reconstruction", recon[:, 0]), ("|error|", jnp.abs(recon - sino)[:, 0])]

    return Stage("autoencoder", graphdef, params, {}, loss_fn, evaluate, preview)


def measure_latent_scale(ae_graphdef, ae_params, batches) -> float:
    """`1 / std` of the autoencoder's latents over a few training batches (Rombach et al. 2022)."""
    latents = [np.asarray(encode(ae_graphdef, ae_params, jnp.asarray(b["target"]), 1.0)) for b in batches]
    return float(1.0 / max(np.std(np.concatenate([x.ravel() for x in latents])), 1e-6))


# --- latent diffusion ----------------------------------------------------------------------------------


def build_unet(config, target_channels: int, source_channels: int, seed: int) -> LatentUNet:
    m = config.model
    z = m.latent_channels
    return LatentUNet(
        latent_channels=target_channels * z,
        cond_channels=source_channels * z + 2,  # source latent, RMAS mask, TMA map
        channels=tuple(m.unet_channels),
        num_res_blocks=m.unet_res_blocks,
        attention_levels=tuple(m.attention_levels),
        num_heads=m.num_heads,
        rngs=nnx.Rngs(seed),
    )


def make_schedule(diffusion_cfg):
    if diffusion_cfg.schedule == "cosine":
        return schedules.cosine_schedule(diffusion_cfg.num_steps)
    if diffusion_cfg.schedule == "linear":
        return schedules.linear_schedule(diffusion_cfg.num_steps)
    raise ValueError(f"diffusion.schedule must be 'cosine' or 'linear'; got {diffusion_cfg.schedule!r}")


def prompt_of(batch, sino_shape, drop_key=None, drop_prob: float = 0.0, null_id: int = 0) -> Prompt:
    """The model prompt from `batch['prompt']` `(B, 3)` (tracer, region, task ids, each + 1 so that 0 is
    the null id of classifier-free guidance) and the sinogram geometry."""
    ids = jnp.asarray(batch["prompt"], jnp.int32) + 1
    if drop_key is not None and drop_prob > 0:
        drop = jax.random.bernoulli(drop_key, drop_prob, ids.shape[:1])
        ids = jnp.where(drop[:, None], null_id, ids)
    B = ids.shape[0]
    geometry = jnp.broadcast_to(jnp.asarray(sino_shape, jnp.float32), (B, 2))
    return Prompt(tracer=ids[:, 0], region=ids[:, 1], task=ids[:, 2], geometry=geometry)


def _latent_map(sino_map, latent_hw):
    from allpet_jax.models.conditioning import sinogram_map_to_latent

    return sinogram_map_to_latent(sino_map, latent_hw)


def diffusion_stage(name: str, config, ae_graphdef, ae_params, latent_scale: float, target_channels: int,
                    source_channels: int, seed: int, unet_params=None) -> Stage:
    """`foundation` (synthesis on RMAS triplets) or `task` (paired, conditioned on the source)."""
    unet = build_unet(config, target_channels, source_channels, seed)
    graphdef, params = split_model(unet)
    if unet_params is not None:
        params = unet_params
    frozen = {"ae": ae_params, "scale": jnp.asarray(latent_scale, jnp.float32)}
    schedule = make_schedule(config.diffusion)
    param = config.diffusion.parameterization
    z = config.model.latent_channels
    paired = name == "task"
    tma_alpha = float(config.tma.alpha) if paired and config.tma.enabled else 0.0
    consistency_weight = float(config.diffusion.consistency_weight) if not paired else 0.0
    drop_prob = float(config.diffusion.prompt_drop_prob)

    def enc(frozen, sino):
        return encode(ae_graphdef, frozen["ae"], sino, frozen["scale"])

    def condition(frozen, batch, latent_hw, mask=None):
        B = batch["target"].shape[0]
        h, w = latent_hw
        if paired:
            source = enc(frozen, batch["source"])
        else:
            source = jnp.zeros((B, h, w, source_channels * z), jnp.float32)
        mask_c = jnp.ones((B, h, w, 1)) if mask is None else _latent_map(mask, latent_hw)
        tma = batch.get("tma") if paired else None
        tma_c = jnp.zeros((B, h, w, 1)) if tma is None else _latent_map(tma, latent_hw)
        return jnp.concatenate([source, mask_c, tma_c], axis=-1)

    def loss_fn(p, frozen, batch, keys):
        unet = nnx.merge(graphdef, p)
        sino_shape = batch["target"].shape[-2:]
        sample_noise = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # (B, 3) per-sample keys
        prompt = prompt_of(batch, sino_shape)
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, drop_prob))(sample_noise[:, 2])
        prompt = prompt._replace(**{f: jnp.where(drop, 0, getattr(prompt, f)) for f in ("tracer", "region", "task")})
        x0 = enc(frozen, batch["target"])
        latent_hw = x0.shape[1:3]
        if paired:
            cond = condition(frozen, batch, latent_hw)
            weight = None
            if tma_alpha and "tma" in batch:
                weight = losses.tma_latent_weight(batch["tma"], latent_hw, tma_alpha)
            return _per_sample_diffusion(unet, schedule, param, x0, cond, prompt, sample_noise, weight)
        # Foundation: the RMAS triplet (full, positive, negative) with the mask as a condition.
        mask = batch["sino_mask"]
        x0 = enc(frozen, batch["full"])  # S (= P + N exactly, in both RMAS modes)
        views = jnp.stack([x0, enc(frozen, batch["positive"]), enc(frozen, batch["negative"])])
        conds = jnp.concatenate([condition(frozen, batch, latent_hw, m) for m in (None, mask, 1.0 - mask)])
        prompt3 = jax.tree.map(lambda a: jnp.concatenate([a, a, a]), prompt)

        def predict(x_t, t):
            return unet(x_t, t, prompt=prompt3, cond=conds)

        def dec(latent):
            return decode(ae_graphdef, frozen["ae"], latent, frozen["scale"], target_channels)

        return losses.rmas_diffusion_loss(predict, sample_noise[0, 0], schedule, views, parameterization=param,
                                          decode=dec if consistency_weight else None, sino=batch["full"],
                                          consistency_weight=consistency_weight)

    def generate(p, frozen, batch, key):
        sino_shape = batch["target"].shape[-2:]
        B = batch["target"].shape[0]
        f = config.model.factor
        latent_hw = (sino_shape[0] // f, sino_shape[1] // f)
        kwargs = {"prompt": prompt_of(batch, sino_shape), "cond": condition(frozen, batch, latent_hw)}
        shape = (B,) + latent_hw + (target_channels * z,)
        latent = ddim.ddim_sample(NNXDenoiser(graphdef), (p, kwargs), key, schedule, shape,
                                  num_steps=config.diffusion.val_steps, eta=0.0, parameterization=param,
                                  clip_x0=config.diffusion.clip_x0 or None)
        return decode(ae_graphdef, frozen["ae"], latent, frozen["scale"], target_channels)

    def evaluate(p, frozen, batch, key):
        out = generate(p, frozen, batch, key)
        target = batch["target"]
        metrics = {"val_psnr": jnp.mean(psnr(out, target))}
        if paired:
            metrics["val_psnr_source"] = jnp.mean(psnr(_match_channels(batch["source"], target), target))
        return metrics

    def preview(p, frozen, batch, key):
        out = generate(p, frozen, batch, key)
        rows = [("target", batch["target"][:, 0]), ("generated", out[:, 0])]
        if paired:
            rows.insert(0, ("source", batch["source"][:, 0]))
        return rows

    return Stage(name, graphdef, params, frozen, loss_fn, evaluate, preview)


def _match_channels(source, target):
    """The identity baseline: the source repeated (or split evenly) over the target's channels."""
    if source.shape[1] == target.shape[1]:
        return source
    return jnp.repeat(source.mean(axis=1, keepdims=True), target.shape[1], axis=1) / target.shape[1]


def _per_sample_diffusion(unet, schedule, param, x0, cond, prompt, sample_keys, weight):
    B = x0.shape[0]
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_steps))(sample_keys[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(sample_keys[:, 1])
    x_t = schedules.q_sample(schedule, x0, t, noise)
    out = unet(x_t, t, prompt=prompt, cond=cond)
    target = schedules.training_target(schedule, param, x0, t, noise)
    loss = jnp.mean(losses.weighted_mse(out, target, weight))
    return loss, {"diffusion": loss, "total": loss}
