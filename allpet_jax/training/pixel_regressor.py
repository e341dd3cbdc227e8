"""The pixel-space U-Net regressor: the evaluation's strong deterministic baseline (DESIGN.md 2.7).

A `LatentUNet` run directly on the normalised sinograms (channels last, `(B, A, Bn, C)`) maps the
source to the target in one pass: zero input, `t = 0`, the source as condition channels, the prompt
ids as in the other stages (never dropped). There is no autoencoder, so unlike the latent `regressor`
(`objectives.Regression`) its output is not capped by the autoencoder's reconstruction ceiling.

It predicts the residual `target - match_channels(source)`; the U-Net's output convolution starts at
zero, so the untrained model is exactly the identity baseline (DESIGN.md 2.5, "warm start begins at
the identity"). Training minimises the MSE to the normalised target (`train.sinogram_loss="ramp"`: as
the image sees it, `losses.ramp_mse`), weighted by `1 + alpha * A_sino` when the batch carries a TMA map
(which is already at sinogram resolution here).

What it is not: a generative model. It has one sampler, `direct`, and no guidance.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from allpet_jax import losses
from allpet_jax.models.latent import match_channels
from allpet_jax.models.unet import LatentUNet
from allpet_jax.training import objectives, stages

NAME = "pixel_regressor"
CONFIG_FIELDS = ("pixel_unet_channels", "pixel_attention_levels")
"""The `config.model` fields only this stage reads (its U-Net's widths and attention levels)."""


def build_pixel_unet(config, target_channels: int, source_channels: int, seed: int) -> LatentUNet:
    """The U-Net on sinograms `(B, A, Bn, target_channels)` conditioned on the source `(B, A, Bn,
    source_channels)`: `model.pixel_unet_channels` and `model.pixel_attention_levels`, with the latent
    U-Net's `unet_res_blocks` and `num_heads`."""
    m = config.model
    return stages.prompted_unet(m, target_channels, source_channels, m.pixel_unet_channels, m.pixel_attention_levels,
                                seed)


def _check_geometry(config) -> None:
    levels = len(config.model.pixel_unet_channels)
    m = 2 ** (levels - 1)
    sino_shape = (int(config.data.n_angles), int(config.data.n_bins))
    if sino_shape[0] % m or sino_shape[1] % m:
        raise ValueError(f"the pixel regressor's U-Net has {levels} levels (model.pixel_unet_channels), so it needs "
                         f"n_angles and n_bins divisible by {m}; the data has {sino_shape}. Use fewer levels or "
                         "another sinogram size.")


def pixel_regressor_stage(config, target_channels: int, source_channels: int, seed: int) -> stages.Stage:
    """The `pixel_regressor` stage for sinograms with `target_channels` / `source_channels` channels.

    `config` is the stage's config (`runs.stage_config`); `frozen` is `{}` (nothing is pretrained)."""
    _check_geometry(config)
    graphdef, params = stages.split_model(build_pixel_unet(config, target_channels, source_channels, seed))
    tma_alpha = float(config.tma.alpha) if config.tma.enabled else 0.0
    samplers = objectives.SAMPLERS[objectives.objective_of(NAME, config)]
    sinogram_loss = config.train.get("sinogram_loss", "mse")  # configs saved before it existed

    def baseline(batch):
        return match_channels(batch["source"], target_channels)

    def residual(p, batch):
        """The predicted residual `(B, A, Bn, target_channels)` (channels last, normalised units)."""
        source = jnp.moveaxis(batch["source"], 1, -1)
        B = source.shape[0]
        unet = nnx.merge(graphdef, p)
        zeros = jnp.zeros(source.shape[:-1] + (target_channels,), source.dtype)
        prompt = objectives.prompt_of(batch, source.shape[1:3])
        return unet(zeros, jnp.zeros((B,)), prompt=prompt, cond=source)

    def loss_of(res, batch):
        target = jnp.moveaxis(batch["target"] - baseline(batch), 1, -1)
        # the map is at sinogram resolution: the "latent" grid is the sinogram
        return losses.regression_loss(res, target, objectives.tma_weight(batch, target.shape[1:3], tma_alpha),
                                      sinogram_loss, bin_axis=2)

    def loss_fn(p, frozen, batch, keys):
        return loss_of(residual(p, batch), batch)

    def generate(p, frozen, batch, key, sampler: str | None = None, num_steps: int | None = None,
                 eta: float | None = None, guidance: float = 0.0, cfg_scale: float = 1.0):
        """Normalised sinograms `(B, target_channels, A, Bn)` for `batch` (reads `source` and `prompt`).
        Deterministic: `key`, `num_steps` and `eta` are unused."""
        if (sampler or samplers[0]) not in samplers:
            raise ValueError(f"the {NAME} model is a deterministic regressor and samples with {samplers} "
                             f"(or None); got sampler {sampler!r}")
        if guidance:
            raise ValueError(f"the {NAME} model has no sampling loop to guide; use guidance=0 (got {guidance!r})")
        if cfg_scale != 1.0:
            raise ValueError(f"the {NAME} model is not trained with prompt dropping, so it has no classifier-free "
                             f"guidance; use cfg_scale=1 (got {cfg_scale!r})")
        return baseline(batch) + jnp.moveaxis(residual(p, batch), -1, 1)

    def evaluate(p, frozen, batch, key):
        res = residual(p, batch)
        out, target = baseline(batch) + jnp.moveaxis(res, -1, 1), batch["target"]
        return {"val_loss": loss_of(res, batch)[0], "val_psnr": jnp.mean(stages.psnr(out, target)),
                "val_psnr_source": jnp.mean(stages.psnr(baseline(batch), target))}

    def preview(p, frozen, batch, key):
        out = generate(p, frozen, batch, key)
        return [("source", batch["source"][:, 0]), ("target", batch["target"][:, 0]), ("generated", out[:, 0])]

    return stages.Stage(NAME, graphdef, params, {}, loss_fn, evaluate, preview, best_metric=("val_psnr", "max"),
                        generate=generate)
