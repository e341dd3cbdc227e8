"""What each latent U-Net stage learns and how its model samples: one small object per training objective.

- `Synthesis`: the foundation without RMAS views (`masks.rmas = False`): denoising of full-sinogram
  latents from the prompt alone.
- `Completion`: the foundation on RMAS views (`masks.objective = 'completion'`): each record is synthesis
  or, with probability `completion_prob`, the completion of `S` from one of its views given as the
  source, its rays as the mask channel (`losses.completion_loss`).
- `Triplet`: the foundation on the paper's RMAS triplet (full, positive, negative views, the mask as a
  condition) with the `P + N = S` consistency term (`losses.rmas_diffusion_loss`).
- `PairedDiffusion`: the task stage's `diffusion` objective, DDPM/DDIM conditioned on the source latent
  (and the TMA map); with `residual` it generates the residual latent `residual_scale * (E(target) -
  E(baseline))` and adds the baseline back (residual diffusion, as in ResShift, Yue et al. 2023).
- `Bridge`: the task stage's `bridge` objective, a DDBM Brownian bridge from the source latent to the
  target latent (`diffusion/ddbm.py`).
- `Regression`: the latent `regressor`, the same U-Net as a deterministic map (zero input, `t = 0`, MSE),
  on the residual with `residual` as above.

One interface (`Objective`): `loss(params, frozen, batch, keys) -> (loss, parts)` is a `Stage.loss_fn`
(`keys` one per sample), and `generate(params, frozen, batch, key, sampler=None, num_steps=None,
eta=None, guidance=0.0, cfg_scale=1.0)` gives sinograms `(B, C, n_angles, n_bins)`. `frozen` is
`frozen_state(...)`: the autoencoder's parameters, the latent scale and, for residual objectives, the
residual scale. Paired objectives also read precomputed `<name>_latent` batch fields (`cached_latents`).

Random streams: each sample's key splits into a noise key (the loss's step and noise, or the bridge's
time and noise) and a drop key (classifier-free guidance's prompt dropping; completion draws its view
choice from `fold_in(drop_key, 1)`), so every number a sample sees follows from its own key.

Not here: reading the config and building the U-Net (`stages.py`), the losses (`losses.py`), the
samplers (`diffusion/`), the latent space (`models/latent.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from allpet_jax import losses
from allpet_jax.diffusion import ddbm, ddim, ddpm, physics_guidance
from allpet_jax.diffusion.guidance import GuidedDenoiser, drop_ids
from allpet_jax.diffusion.model_function import NNXDenoiser, SkipDenoiser, skip_variance
from allpet_jax.diffusion.schedules import Schedule, skip_offset
from allpet_jax.models import latent
from allpet_jax.models.conditioning import condition_channels
from allpet_jax.models.unet import Prompt

SAMPLERS = {"diffusion": ("ddim", "ddpm"), "bridge": ("ddbm",), "regression": ("direct",)}
"""The samplers each objective's model can be sampled with (synthesis: those of `diffusion`)."""
GUIDE_FIELDS = ("guide_y", "guide_gain", "guide_background")
"""The batch fields of the Poisson likelihood that guided sampling reads (`sampling.add_poisson_data`)."""


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


def prompt_of(batch, sino_shape) -> Prompt:
    """The model prompt from `batch['prompt']` `(B, 3)` (tracer, region and task ids: indices into
    `TRACERS`, `REGIONS`, `TASKS`) and the sinogram geometry `(n_angles, n_bins)`."""
    ids = jnp.asarray(batch["prompt"], jnp.int32)
    B = ids.shape[0]
    geometry = jnp.broadcast_to(jnp.asarray(sino_shape, jnp.float32), (B, 2))
    return Prompt(tracer=ids[:, 0], region=ids[:, 1], task=ids[:, 2], geometry=geometry)


def drop_prompt(prompt: Prompt, drop_keys, drop_prob: float, null_ids) -> Prompt:
    """Classifier-free guidance training: each sample's prompt with probability `drop_prob` replaced by
    the null prompt (`LatentUNet.null_ids`), one draw per sample from its key in `drop_keys` `(B,)` shared
    by its three ids; the geometry is never dropped."""
    def drop(ids, null_id):
        return jax.vmap(lambda k, i: drop_ids(k, i, drop_prob, null_id))(drop_keys, ids)

    tracer, region, task = (drop(ids, n) for ids, n in zip(prompt[:3], null_ids))
    return prompt._replace(tracer=tracer, region=region, task=task)


def null_prompt(prompt: Prompt, null_ids) -> Prompt:
    """`prompt` with every id null (the unconditional model of classifier-free guidance), same geometry."""
    tracer, region, task = (jnp.full_like(ids, n) for ids, n in zip(prompt[:3], null_ids))
    return prompt._replace(tracer=tracer, region=region, task=task)


def split_keys(keys):
    """Per-sample keys `(B,)` -> `(noise_keys, drop_keys)`, each `(B,)`."""
    noise_keys, drop_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    return noise_keys, drop_keys


def tma_weight(batch, latent_hw, alpha: float):
    """The loss weight `1 + alpha * A` on the latent grid (`losses.tma_latent_weight`) when `alpha` is
    on and the batch carries a TMA map, else None."""
    return losses.tma_latent_weight(batch["tma"], latent_hw, alpha) if alpha and "tma" in batch else None


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Objective:
    """What every latent objective shares: the U-Net and the frozen autoencoder, the prompt, and the
    sampling frame of `generate` (sampler check, condition channels, classifier-free guidance, decoding).

    Subclasses give `name`, `samplers`, `loss`, `condition` and `sample_latent`.
    """

    name: ClassVar[str]
    samplers: ClassVar[tuple[str, ...]]
    paired: ClassVar[bool]

    stage: str  # the stage's name, for error messages
    unet: Any  # the U-Net's graphdef (`nnx.split`)
    null_ids: tuple[int, int, int]  # `LatentUNet.null_ids`
    autoencoder: Any  # the autoencoder's graphdef
    target_channels: int  # sinogram channels generated
    source_channels: int  # sinogram channels of the source condition
    latent_channels: int  # z per sinogram channel
    factor: int  # the autoencoder's downsampling
    drop_prob: float  # classifier-free guidance: prompts dropped in training
    val_steps: int  # default sampler steps

    # --- the latent space ---------------------------------------------------------------------------

    def frozen_state(self, ae_params, latent_scale: float, residual_scale: float = 1.0) -> dict:
        """The frozen inputs of `loss` and `generate`: the autoencoder's parameters, the latent scale and,
        for a residual objective (`Paired.residual`), the residual scale."""
        return {"ae": ae_params, "scale": jnp.asarray(latent_scale, jnp.float32)}

    def encode(self, frozen, sino):
        return latent.encode(self.autoencoder, frozen["ae"], sino, frozen["scale"])

    def decode(self, frozen, z):
        return latent.decode(self.autoencoder, frozen["ae"], z, frozen["scale"], self.target_channels)

    def latent_grid(self, sino_shape) -> tuple[int, int]:
        return (sino_shape[0] // self.factor, sino_shape[1] // self.factor)

    def to_sinogram(self, frozen, batch):
        """`latent -> sinograms`: what the model generates, decoded."""
        return lambda z: self.decode(frozen, z)

    def training_prompt(self, batch, drop_keys) -> Prompt:
        return drop_prompt(prompt_of(batch, batch["target"].shape[-2:]), drop_keys, self.drop_prob, self.null_ids)

    # --- the interface --------------------------------------------------------------------------------

    def loss(self, params, frozen, batch, keys):
        raise NotImplementedError

    def condition(self, frozen, batch, latent_hw):
        """The U-Net's condition channels for generating `batch` (`conditioning.condition_channels`)."""
        raise NotImplementedError

    def sample_latent(self, denoiser, model_params, key, frozen, batch, shape, sampler, num_steps, eta, guidance):
        """A latent of `shape` from the model wrapped as `denoiser(model_params, x_t, t)`."""
        raise NotImplementedError

    def denoiser(self, params, kwargs):
        """`(denoise_fn, model_params)` for the samplers: the U-Net with the call keywords `kwargs`."""
        return NNXDenoiser(self.unet), (params, kwargs)

    def generate(self, params, frozen, batch, key, sampler: str | None = None, num_steps: int | None = None,
                 eta: float | None = None, guidance: float = 0.0, cfg_scale: float = 1.0, *, decode: bool = True):
        """Sinograms `(B, C, n_angles, n_bins)` for `batch` (its `target` gives only the geometry and batch
        size; paired objectives read `source`). `sampler` defaults to the first of `samplers`.

        `cfg_scale != 1` is classifier-free guidance on the prompt (`guidance.GuidedDenoiser`): each step
        runs the U-Net with the prompt and with the null prompt (same geometry and condition channels) and
        extrapolates, `uncond + cfg_scale * (cond - uncond)`; 0 is the unconditional model. It needs a
        model trained with prompt dropping (`diffusion.prompt_drop_prob > 0`).

        `guidance > 0` (DDIM on a `diffusion` task model, or on the foundation model: the zero-pair arm)
        adds the Poisson data-consistency step of `physics_guidance.py`; the batch must then carry
        `guide_y` (raw low-dose prompts), `guide_gain` and `guide_background`, all `(B, C, A, Bn)` in
        counts (`sampling.add_poisson_data`). The other samplers do not read it.

        `decode=False` returns the sampled latent `(B, h, w, C * z)` instead (before `to_sinogram`)."""
        sampler = sampler or self.samplers[0]
        if sampler not in self.samplers:
            raise ValueError(f"a {self.stage} model trained with the {self.name!r} objective samples with "
                             f"{self.samplers}; got sampler {sampler!r}")
        sino_shape = batch["target"].shape[-2:]
        B = batch["target"].shape[0]
        latent_hw = self.latent_grid(sino_shape)
        kwargs = {"prompt": prompt_of(batch, sino_shape), "cond": self.condition(frozen, batch, latent_hw)}
        denoiser, model_params = self.denoiser(params, kwargs)
        if cfg_scale != 1.0:
            if sampler == "direct" or not self.drop_prob:
                raise ValueError(f"classifier-free guidance (cfg_scale {cfg_scale}) needs a diffusion model trained "
                                 f"with prompt dropping; this {self.stage} model has objective {self.name!r} and "
                                 f"diffusion.prompt_drop_prob {self.drop_prob}")
            _, uncond = self.denoiser(params, dict(kwargs, prompt=null_prompt(kwargs["prompt"], self.null_ids)))
            denoiser = GuidedDenoiser(denoiser)
            model_params = (model_params, uncond, jnp.asarray(cfg_scale, jnp.float32))
        shape = (B,) + latent_hw + (self.target_channels * self.latent_channels,)
        z = self.sample_latent(denoiser, model_params, key, frozen, batch, shape, sampler,
                               num_steps or self.val_steps, eta, guidance)
        return self.to_sinogram(frozen, batch)(z) if decode else z


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Denoising:
    """The DDPM/DDIM side of an objective: its noise schedule, prediction target and samplers, with the
    optional Poisson data-consistency step in DDIM."""

    schedule: Schedule
    parameterization: str  # 'eps', 'x0' or 'v'
    clip_x0: float | None  # clip predicted clean latents while sampling; None = off

    def sample_latent(self, denoiser, model_params, key, frozen, batch, shape, sampler, num_steps, eta, guidance):
        if sampler == "ddpm":
            return ddpm.ddpm_sample(denoiser, model_params, key, self.schedule, shape,
                                    parameterization=self.parameterization, clip_x0=self.clip_x0)
        guide, data = None, None
        if guidance:
            if any(k not in batch for k in GUIDE_FIELDS):
                raise ValueError("Poisson guidance needs a diffusion task model or the foundation model, and the "
                                 f"likelihood's {GUIDE_FIELDS} in the batch (sampling.add_poisson_data)")
            guide = physics_guidance.make_poisson_guide(self.to_sinogram(frozen, batch), self.schedule)
            data = physics_guidance.PoissonData(*(batch[k] for k in GUIDE_FIELDS), jnp.asarray(guidance, jnp.float32))
        return ddim.ddim_sample(denoiser, model_params, key, self.schedule, shape, num_steps=num_steps,
                                eta=eta or 0.0, parameterization=self.parameterization, clip_x0=self.clip_x0,
                                guide=guide, guide_params=data)


# --- the foundation: synthesis ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Synthesis(Denoising, Objective):
    """Synthesis from a prompt: no source (zeros), the mask channel at `known_rays`, no TMA. Its loss is
    plain denoising of the full sinograms' latents (the RMAS-off ablation)."""

    name: ClassVar[str] = "synthesis"
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS["diffusion"]
    paired: ClassVar[bool] = False

    # The mask channel of a synthesis record: which rays of the (absent) source count as known. 0 under
    # the completion objective (synthesis is completion from nothing), 1 under the triplet (the full view).
    known_rays: float
    consistency_weight: float = 0.0  # the decoded-prediction term of the RMAS objectives; 0 = off

    def condition(self, frozen, batch, latent_hw, source=None, mask=None):
        """Condition channels: `source` (a latent, default none) and `mask` (a sinogram ray mask, default
        `known_rays`)."""
        B = batch["target"].shape[0]
        return condition_channels(B, latent_hw, self.source_channels * self.latent_channels, source=source,
                                  mask=self.known_rays if mask is None else mask)

    def loss(self, params, frozen, batch, keys):
        unet = nnx.merge(self.unet, params)
        noise_keys, drop_keys = split_keys(keys)
        prompt = self.training_prompt(batch, drop_keys)
        x0 = self.encode(frozen, batch["target"])
        cond = self.condition(frozen, batch, x0.shape[1:3])
        return losses.diffusion_loss(lambda x_t, t: unet(x_t, t, prompt=prompt, cond=cond), noise_keys,
                                     self.schedule, x0, parameterization=self.parameterization)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Completion(Synthesis):
    """Synthesis or masked completion per record: with probability `completion_prob` the record completes
    `S` from one of its RMAS views (positive or negative, even odds), given as the source latent with its
    rays as the mask channel; otherwise it is synthesis (no source, no known ray). The target is always
    the full latent; the decoded term supervises the rays the condition did not show."""

    known_rays: float = 0.0
    completion_prob: float

    def loss(self, params, frozen, batch, keys):
        unet = nnx.merge(self.unet, params)
        noise_keys, drop_keys = split_keys(keys)
        prompt = self.training_prompt(batch, drop_keys)
        view_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(drop_keys)
        u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(view_keys)
        complete, positive = u[:, 0] < self.completion_prob, u[:, 1] < 0.5
        mask = batch["sino_mask"]
        known = jnp.where(complete[:, None, None], jnp.where(positive[:, None, None], mask, 1.0 - mask), 0.0)
        view = jnp.where(positive[:, None, None, None], batch["positive"], batch["negative"])
        source = self.encode(frozen, view) * complete[:, None, None, None]  # synthesis records: no source at all
        x0 = self.encode(frozen, batch["full"])
        cond = self.condition(frozen, batch, x0.shape[1:3], source=source, mask=known)
        return losses.completion_loss(lambda x_t, t: unet(x_t, t, prompt=prompt, cond=cond), noise_keys,
                                      self.schedule, x0, parameterization=self.parameterization,
                                      decode=lambda z: self.decode(frozen, z), sino=batch["full"], unseen=1.0 - known,
                                      consistency_weight=self.consistency_weight)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Triplet(Synthesis):
    """The RMAS triplet: the full sinogram `S` and its positive and negative views, each denoised with its
    ray mask as the condition (all ones for `S`), sharing one step, plus `|| D(x0_P) + D(x0_N) - S ||^2`."""

    known_rays: float = 1.0

    def loss(self, params, frozen, batch, keys):
        unet = nnx.merge(self.unet, params)
        noise_keys, drop_keys = split_keys(keys)
        prompt = self.training_prompt(batch, drop_keys)
        mask = batch["sino_mask"]
        x0 = self.encode(frozen, batch["full"])  # S (= P + N exactly, in both RMAS modes)
        views = jnp.stack([x0, self.encode(frozen, batch["positive"]), self.encode(frozen, batch["negative"])])
        latent_hw = x0.shape[1:3]
        conds = jnp.concatenate([self.condition(frozen, batch, latent_hw, mask=m) for m in (None, mask, 1.0 - mask)])
        prompt3 = jax.tree.map(lambda a: jnp.concatenate([a, a, a]), prompt)
        decode = (lambda z: self.decode(frozen, z)) if self.consistency_weight else None
        return losses.rmas_diffusion_loss(lambda x_t, t: unet(x_t, t, prompt=prompt3, cond=conds), noise_keys,
                                          self.schedule, views, parameterization=self.parameterization,
                                          decode=decode, sino=batch["full"],
                                          consistency_weight=self.consistency_weight)


# --- paired tasks ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Paired(Objective):
    """A source -> target map: the source latent, a mask of ones (every ray of the source is known) and the
    TMA map as the condition; the loss weighted by `1 + tma_alpha * A` where the batch carries TMA.

    With `residual` the model works on `residual_scale * (E(target) - E(baseline))`, `baseline` the
    source matched to the target's channels (`latent.match_channels`, the identity baseline): a weak or
    early model degrades towards the identity instead of towards noise."""

    paired: ClassVar[bool] = True

    tma_alpha: float = 0.0
    residual: bool = False

    def frozen_state(self, ae_params, latent_scale: float, residual_scale: float = 1.0) -> dict:
        frozen = super().frozen_state(ae_params, latent_scale)
        if self.residual:
            frozen["residual_scale"] = jnp.asarray(residual_scale, jnp.float32)
        return frozen

    def latent(self, frozen, batch, name):
        """The latent of `batch[name]` (`target`, `source` or `baseline`): the cached `<name>_latent` when
        the batch carries it (`cached_latents`), else encoded now."""
        if f"{name}_latent" in batch:
            return batch[f"{name}_latent"]
        if name == "baseline":
            return self.encode(frozen, latent.match_channels(batch["source"], self.target_channels))
        return self.encode(frozen, batch[name])

    def cached_latents(self, frozen, batch):
        """The latents the loss reads (`<name>_latent` fields), so a fixed training pair is encoded once."""
        names = ("target", "source") + (("baseline",) if self.source_channels != self.target_channels else ())
        out = {f"{n}_latent": self.latent(frozen, batch, n) for n in names}
        if "baseline_latent" not in out:
            out["baseline_latent"] = out["source_latent"]
        return out

    def condition(self, frozen, batch, latent_hw):
        B = batch["target"].shape[0]
        return condition_channels(B, latent_hw, self.source_channels * self.latent_channels,
                                  source=self.latent(frozen, batch, "source"), mask=1.0, tma=batch.get("tma"))

    def to_model(self, frozen, batch, x0):
        """The target latent as the model generates it."""
        if not self.residual:
            return x0
        return (x0 - self.latent(frozen, batch, "baseline")) * frozen["residual_scale"]

    def to_sinogram(self, frozen, batch):
        if not self.residual:
            return super().to_sinogram(frozen, batch)
        base, scale = self.latent(frozen, batch, "baseline"), frozen["residual_scale"]  # once, not at every use
        return lambda z: self.decode(frozen, base + z / scale)

    def predictor(self, params, frozen, batch, prompt, latent_hw):
        """`(x_t, t) -> output` of the U-Net with `batch`'s condition channels."""
        unet = nnx.merge(self.unet, params)
        cond = self.condition(frozen, batch, latent_hw)
        return lambda x_t, t: unet(x_t, t, prompt=prompt, cond=cond)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class PairedDiffusion(Denoising, Paired):
    """The task's `diffusion` objective: DDPM/DDIM of the target (or residual) latent given the source."""

    name: ClassVar[str] = "diffusion"
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS["diffusion"]

    skip_rate: float = 0.0  # > 0: the learned skip (`SkipDenoiser`) on the `v` output, its gate times this rate
    min_snr: float = 0.0  # > 0: the loss's min-SNR-gamma weighting (`losses.min_snr_weight`)

    def __post_init__(self):
        if self.skip_rate and self.parameterization != "v":
            raise ValueError(f"the learned skip (diffusion.task_skip_open_steps) works on a 'v' output; "
                             f"got diffusion.task_parameterization {self.parameterization!r}")

    def denoiser(self, params, kwargs):
        denoiser, model_params = super().denoiser(params, kwargs)
        if not self.skip_rate:
            return denoiser, model_params
        return SkipDenoiser(denoiser, self.skip_rate), (model_params, self.schedule)

    def predictor(self, params, frozen, batch, prompt, latent_hw):
        predict = super().predictor(params, frozen, batch, prompt, latent_hw)
        if not self.skip_rate:
            return predict
        sigma2 = skip_variance(params, self.skip_rate)
        return lambda x_t, t: predict(x_t, t) + skip_offset(self.schedule, x_t, t, sigma2)

    def loss(self, params, frozen, batch, keys):
        noise_keys, drop_keys = split_keys(keys)
        x0 = self.latent(frozen, batch, "target")
        predict = self.predictor(params, frozen, batch, self.training_prompt(batch, drop_keys), x0.shape[1:3])
        loss, parts = losses.diffusion_loss(predict, noise_keys, self.schedule, self.to_model(frozen, batch, x0),
                                            parameterization=self.parameterization,
                                            weight=tma_weight(batch, x0.shape[1:3], self.tma_alpha),
                                            min_snr=self.min_snr)
        if self.skip_rate:
            parts = dict(parts, skip_variance=skip_variance(params, self.skip_rate))
        return loss, parts


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Bridge(Paired):
    """The task's `bridge` objective: a DDBM bridge of noise scale `sigma` from the source (baseline)
    latent at `t = 1` to the target latent at `t = 0`, the U-Net predicting the target (`ddbm.py`)."""

    name: ClassVar[str] = "bridge"
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS["bridge"]

    sigma: float

    def loss(self, params, frozen, batch, keys):
        noise_keys, drop_keys = split_keys(keys)
        x0 = self.latent(frozen, batch, "target")
        predict = self.predictor(params, frozen, batch, self.training_prompt(batch, drop_keys), x0.shape[1:3])
        return losses.bridge_loss(predict, noise_keys, x0, self.latent(frozen, batch, "baseline"), sigma=self.sigma,
                                  weight=tma_weight(batch, x0.shape[1:3], self.tma_alpha))

    def sample_latent(self, denoiser, model_params, key, frozen, batch, shape, sampler, num_steps, eta, guidance):
        return ddbm.ddbm_sample(denoiser, model_params, key, self.latent(frozen, batch, "baseline"), num_steps,
                                sigma=self.sigma, eta=1.0 if eta is None else eta)  # ancestral by default


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Regression(Paired):
    """The latent regressor: one U-Net pass from a zero input at `t = 0`, trained with the MSE to the
    target (or residual) latent; deterministic, so it has no prompt dropping and no sampling loop."""

    name: ClassVar[str] = "regression"
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS["regression"]

    def loss(self, params, frozen, batch, keys):
        x0 = self.to_model(frozen, batch, self.latent(frozen, batch, "target"))
        prompt = prompt_of(batch, batch["target"].shape[-2:])
        predict = self.predictor(params, frozen, batch, prompt, x0.shape[1:3])
        return losses.regression_loss(predict(jnp.zeros_like(x0), jnp.zeros(x0.shape[:1])), x0,
                                      tma_weight(batch, x0.shape[1:3], self.tma_alpha))

    def sample_latent(self, denoiser, model_params, key, frozen, batch, shape, sampler, num_steps, eta, guidance):
        return denoiser(model_params, jnp.zeros(shape), jnp.zeros(shape[:1]))
