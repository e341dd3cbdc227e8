"""From a trained stage to sinograms, reconstructions and files: what `sample.py` and the evaluation share.

- `load_for_task`: the trained stage for a task (`foundation` for `synthesis`, `task` for the paired
  tasks, or any stage directory), refused with a clear error when it was trained for another task.
- Inputs: `simulated_inputs` reads a split of the simulator with the checkpoint's data config (the
  held-out `test` split by default; its seeds never overlap training, see `data/sources.py`);
  `file_inputs` reads users' files with the loaders' checks (shape, finite, and non-negative unless the
  model was trained on corrected sinograms);
  `synthesis_inputs` builds prompts and a geometry for synthesis. With `physics=True` both also give
  the raw data `sources.PHYSICS_FIELDS` (prompts, eta, a, scatter, randoms) that guidance and clinical
  OSEM need.
- `add_poisson_data`: the Poisson likelihood of the raw low-dose prompts for guided sampling, for a
  `low_dose` model or the foundation model (the zero-pair arm).
- `generate`: `K` samples per input, in chunks of the training batch size (one compiled program),
  returned in counts (the training normalisation undone).
- `reconstruct`: FBP and OSEM of (corrected) sinograms in counts; `clinical_osem`: OSEM of the raw
  prompts with the full scanner model, the clinical image baseline.
- `write_outputs`: `.npz` (and `.mat`) plus figures, written into a fresh temporary directory that is
  renamed into place only when everything is written, so a failed run leaves nothing half-written.

Arrays are numpy, sinograms `(N, C, n_angles, n_bins)` in counts, images `(N, C, H, W)`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import radon
from allpet_jax import tasks
from allpet_jax.data import loaders, pipeline, sources
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import REGIONS
from allpet_jax.training import checkpointing, runs


PRETRAINED_OUT = "allpet_outputs"
"""Where sample.py and evaluate write by default for --pretrained weights: <cwd>/allpet_outputs/<name>/..."""


def load_for_task(task: str, workdir: str = "", checkpoint: str = "", stage: str = "",
                  best: bool = False, pretrained: str = "") -> runs.TrainedStage:
    """The trained stage that runs `task`: `checkpoint` (a stage directory) if given, else
    `workdir/<stage>` with `stage` defaulting to the one that serves the task (`tasks.STAGE_OF_TASK`:
    `foundation` for synthesis, `task` otherwise); with `best`, its checkpoint with the best validation
    metric instead of the latest (`runs.load_trained`); or the exported weights `pretrained` (`export.load`)."""
    tasks.task_id(task)  # an unknown name fails here, with the list of tasks
    if sum(map(bool, (workdir or checkpoint, pretrained))) != 1:
        raise ValueError("give one of --workdir (a training run), --checkpoint (a stage directory) or --pretrained "
                         "(exported weights)")
    if pretrained:
        from allpet_jax import export

        trained = export.load(pretrained)
        directory = trained.directory
    else:
        directory = checkpoint or os.path.join(workdir, stage or tasks.STAGE_OF_TASK[task])
        trained = runs.load_trained(directory, best=best)
    if trained.name == "autoencoder":
        raise checkpointing.CheckpointMismatchError(
            f"{directory} holds the autoencoder stage, which does not generate; pass a foundation, task or "
            "regressor stage directory")
    if trained.meta["task"] != task:
        raise checkpointing.CheckpointMismatchError(
            f"the checkpoint in {directory} was trained for task {trained.meta['task']!r}, not {task!r}; "
            f"train that task (python train.py --config.data.task={task}) or pass its --workdir")
    return trained


def geometry_of(trained: runs.TrainedStage, n_angles: int = 0, n_bins: int = 0) -> radon.Geometry:
    """The checkpoint's geometry, optionally with another number of angles/bins (same pixel and bin size)."""
    data = trained.config.data.copy_and_resolve_references()
    data.n_angles = n_angles or data.n_angles
    data.n_bins = n_bins or data.n_bins
    return pipeline.geometry_from_config(data)


def simulated_inputs(trained: runs.TrainedStage, n: int, split: str = "test", start: int = 0, *,
                     physics: bool = False, indices=None) -> dict:
    """Samples `start .. start + n - 1` (or the given `indices`, `n` of them) of a simulated split with the
    checkpoint's data config, in counts; with `physics`, also `sources.PHYSICS_FIELDS` (the config's
    `data.physics` is set on a copy)."""
    wanted = list(range(start, start + n)) if indices is None else [int(i) for i in indices]
    data = trained.config.data.copy_and_resolve_references()
    data.cache_dir = ""
    data.source = "simulated"
    data.physics = bool(physics)
    end = max(wanted, default=-1) + 1
    if split == "test":  # sample i is a pure function of (seed, 'test', i): the split extends as far as asked
        data.n_test = max(int(data.n_test), end)
    size = pipeline.split_size(data, split)
    if not wanted or min(wanted) < 0 or end > size:
        raise ValueError(f"the {split} split has {size} samples; asked for {len(wanted)} of indices "
                         f"{min(wanted, default=0)}..{end - 1}")
    source = pipeline.make_source(data, split, progress=False)
    return {k: np.asarray(v) for k, v in source.read_batch(wanted).items()}


def file_inputs(trained: runs.TrainedStage, path: str, variable: str = "", prompt: str = "", *,
                physics: bool = False) -> dict:
    """Source sinograms from a file (any loader format) checked against the checkpoint's geometry: one
    sinogram `(C, A, B)` / `(A, B)` or a stack `(N, C, A, B)` (a NIfTI image is forward-projected);
    finite; and non-negative unless the model was trained on corrected sinograms, which dip below zero:
    the simulator's (`data.source='simulated'`, cached shards included) or files with `data.allow_negative`.
    With `physics`, also the variables of `sources.PHYSICS_FIELDS` and `dose` that a `.npz`/`.mat` file
    holds (`sources.read_physics`; for a stack, each with the same leading axis `N`); absent ones are left out."""
    geom = geometry_of(trained)
    data = trained.config.data
    allow_negative = data.source == "simulated" or bool(data.get("allow_negative", False))
    try:
        if loaders.file_format(path) == "nifti":  # an image: checked and forward-projected by the loader
            source = loaders.load_sinogram(path, geom, allow_negative=allow_negative)[None]
        else:
            raw = loaders.read_array(path, variable or None)
            stack = raw if raw.ndim == 4 else raw[None]
            source = np.stack([loaders.check_sinogram(x, geom, path, "source sinogram", allow_negative) for x in stack])
    except loaders.NegativeValuesError as e:  # the loader's remedy is a training option; name the user's own
        raise loaders.DataFileError(
            path, f"{e.found}, but this model was trained on uncorrected, non-negative sinograms and takes only "
            "those: pass the uncorrected sinogram, or sample with a model trained on corrected (randoms/scatter-"
            "subtracted) sinograms (--checkpoint or --workdir)") from e
    channels = trained.meta.get("channels", {}).get("source", 1)
    if source.shape[1] != channels:
        raise loaders.DataFileError(path, f"source sinogram has {source.shape[1]} channel(s); the {trained.meta['task']} "
                                          f"model expects {channels}")
    ids = parse_prompt(prompt, trained.meta["task"])
    inputs = {"source": source, "prompt": np.tile(ids[None], (source.shape[0], 1))}
    if physics and loaders.file_format(path) != "nifti":
        target_channels = trained.meta.get("channels", {}).get("target", 1)
        stacked = raw.ndim == 4
        found = sources.read_physics(path, geom, channels, target_channels, n=source.shape[0] if stacked else None)
        inputs.update({k: v if stacked else np.asarray(v)[None] for k, v in found.items()})
    return inputs


def parse_prompt(text: str, task: str = tasks.SYNTHESIS) -> np.ndarray:
    """`"tracer=FDG,region=brain"` -> ids `[tracer, region, task]`. Tracer names match `TRACERS` by full
    name or by the part after the isotope (`FDG` = `18F-FDG`), case-insensitively. An empty `text` is
    the unconditional prompt (every id null, as the model saw it with classifier-free dropping); a key
    left out is null (`len(TRACERS)`, `len(REGIONS)`: the U-Net's null rows)."""
    if not text.strip():
        return np.array([len(TRACERS), len(REGIONS), tasks.NULL_TASK], np.int32)
    ids = {"tracer": len(TRACERS), "region": len(REGIONS)}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise ValueError(f"--prompt items are key=value (tracer=..., region=...); got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key == "tracer":
            names = {t.lower(): i for i, t in enumerate(TRACERS)}
            names.update({t.split("-", 1)[-1].lower(): i for i, t in enumerate(TRACERS)})
            if value.lower() not in names:
                raise ValueError(f"unknown tracer {value!r}; choose one of {TRACERS}")
            ids["tracer"] = names[value.lower()]
        elif key == "region":
            if value.lower() not in REGIONS:
                raise ValueError(f"unknown region {value!r}; choose one of {REGIONS}")
            ids["region"] = REGIONS.index(value.lower())
        else:
            raise ValueError(f"unknown --prompt key {key!r}; use tracer and region")
    return np.array([ids["tracer"], ids["region"], tasks.task_id(task)], np.int32)


def synthesis_inputs(trained: runs.TrainedStage, n: int, prompt: np.ndarray, geom: radon.Geometry) -> dict:
    channels = trained.meta.get("channels", {}).get("target", 1)
    return {"prompt": np.tile(prompt[None], (n, 1)),
            "geometry_only": np.zeros((n, channels) + geom.sino_shape, np.float32)}


def model_batch(trained: runs.TrainedStage, inputs: dict, roi_file: str = "", from_files: bool = False) -> dict:
    """The normalised batch the model reads: `source` (paired), a `target` placeholder that carries the
    geometry, `prompt`, and `tma` when the stage was trained with TMA (with the clinician ROIs of
    `roi_file` applied on top of the training config's). TMA measures its mm in each input's physical
    pixel (`pipeline.sample_geometry`): `from_files` inputs (`file_inputs`) have the checkpoint's
    `data.pixel_size`, simulated ones their region's field of view / image size."""
    norm = trained.normalisation
    cfg = trained.config
    if "source" in inputs:
        source = np.asarray(inputs["source"], np.float32) / np.float32(norm.source_scale)
        channels = trained.meta.get("channels", {}).get("target", 1)
        batch = {"source": source, "target": np.zeros((source.shape[0], channels) + source.shape[2:], np.float32)}
    else:
        batch = {"target": inputs["geometry_only"]}
    batch["prompt"] = np.asarray(inputs["prompt"], np.int32)
    if roi_file and not cfg.tma.enabled:
        raise ValueError(f"--roi needs a model trained with TMA (--config.tma.enabled=true); {trained.directory} "
                         "was trained without it, so ROIs would have no effect")
    if cfg.tma.enabled and "source" in batch:
        from allpet_jax.training.transforms import TmaTransform

        tma_cfg = cfg.copy_and_resolve_references()
        tma_cfg.data.source = "files" if from_files else "simulated"  # the inputs' origin, not the training data's
        if roi_file:
            tma_cfg.tma.roi_file = roi_file
        batch = TmaTransform(tma_cfg)(dict(batch, labels=inputs.get("labels")) if "labels" in inputs else batch)
        batch.pop("labels", None)
    return batch


@functools.lru_cache(maxsize=8)
def _compiled_generate(stage_generate, sampler, num_steps, eta, guidance, cfg_scale=1.0, decode=True):
    extra = {} if decode else {"decode": False}  # only latent stages take `decode`
    return jax.jit(lambda p, fz, b, k: stage_generate(p, fz, b, k, sampler, num_steps, eta, guidance, cfg_scale, **extra))


GUIDANCE_FIELDS = ("prompts", "normalisation", "attenuation", "scatter", "randoms", "dose")
"""What `add_poisson_data` reads from the inputs (see `sources.PHYSICS_FIELDS`)."""


def add_poisson_data(trained: runs.TrainedStage, batch: dict, inputs: dict, dose=None) -> dict:
    """`batch` plus the Poisson likelihood of the raw low-dose prompts that guided sampling reads
    (`diffusion/physics_guidance.py`): with the inputs' physics fields (`GUIDANCE_FIELDS`),

        guide_y = prompts                                   (B, C, A, Bn)  raw low-dose prompts y
        guide_gain = eta * a * dose * target_scale          (B, C, A, Bn)  counts per model unit
        guide_background = eta * (scatter + randoms)        (B, C, A, Bn)  expected background prompts

    so `lambda = guide_gain * decoded + guide_background = eta * (a * dose * t_hat + s + r)` with
    `t_hat = target_scale * decoded` the full-dose trues in counts. `trained` is a `low_dose` task model,
    or the foundation (`synthesis`) model: the zero-pair arm, the foundation prior guided by low-dose
    prompts with no paired training (its own `target_scale` applies, and prompts carrying the `low_dose`
    task id get the `synthesis` id it was trained with). `dose`: per-sample fractions, overriding the
    inputs' `dose`. Missing physics raise one `ValueError` naming them and how to provide them.
    """
    task = trained.meta["task"]
    if task not in (tasks.LOW_DOSE, tasks.SYNTHESIS):
        raise ValueError(f"Poisson guidance is for low_dose data, with a low_dose model or the foundation (synthesis) "
                         f"model (the zero-pair arm); the checkpoint's task is {task!r}")
    low_dose = tasks.task_id(tasks.LOW_DOSE)
    if "prompt" in inputs:
        ids = np.asarray(inputs["prompt"])[:, 2]
        other = sorted({tasks.TASKS[i] for i in ids.tolist() if i < len(tasks.TASKS) and i != low_dose})
        if other:
            raise ValueError(f"Poisson guidance measures low-dose prompts; these inputs are of task(s) {other} "
                             "(simulate them with a low_dose model's config: simulated_inputs(low_dose_model, n, "
                             "physics=True))")
    given = dict(inputs, dose=inputs.get("dose") if dose is None else dose)
    missing = [k for k in GUIDANCE_FIELDS if given.get(k) is None]
    if missing:
        raise ValueError(
            "Poisson guidance needs the raw prompts and the physics factors of each input; missing: "
            f"{', '.join(missing)} (add them to the input .npz/.mat file as variables of those names, shaped as "
            "sources.PHYSICS_FIELDS documents, with the dose fraction as 'dose' or --dose; or use the simulator "
            "with data.physics: simulated_inputs(..., physics=True))")
    n = batch["prompt"].shape[0]
    y = np.asarray(given["prompts"], np.float32)
    channels = trained.meta.get("channels", {}).get("target", 1)
    if y.ndim != 4 or y.shape[0] != n or y.shape[1] != channels:
        raise ValueError(f"prompts have shape {y.shape}; expected (N, C, A, B) = ({n}, {channels}, ...) for the batch "
                         f"of {n} inputs and the {task} model's {channels} channel(s)")
    factor = lambda name: np.asarray(given[name], np.float32).reshape((n, 1) + y.shape[2:])
    eta = factor("normalisation")
    d = np.broadcast_to(np.asarray(given["dose"], np.float32).reshape(-1), (n,)).reshape(n, 1, 1, 1)
    gain = eta * factor("attenuation") * d * np.float32(trained.normalisation.target_scale)
    background = eta * (np.asarray(given["scatter"], np.float32) + np.asarray(given["randoms"], np.float32))
    out = dict(batch, guide_y=y, guide_gain=np.broadcast_to(gain, y.shape).astype(np.float32),
               guide_background=np.broadcast_to(background, y.shape).astype(np.float32))
    if task == tasks.SYNTHESIS:
        prompt = np.array(batch["prompt"], np.int32)
        prompt[prompt[:, 2] == low_dose, 2] = tasks.task_id(tasks.SYNTHESIS)
        out["prompt"] = prompt
    return out


def generate(trained: runs.TrainedStage, batch: dict, key, *, sampler: str | None = None, num_steps: int | None = None,
             eta: float | None = None, num_samples: int = 1, chunk: int = 0, guidance: float = 0.0,
             progress: str | bool = True, cfg_scale: float = 1.0, latents: bool = False) -> np.ndarray:
    """`(num_samples, N, C, A, B)` sinograms in counts (with `latents`, the sampled latents
    `(num_samples, N, h, w, C * z)` of a latent stage instead, undecoded: `decode` turns a foundation's into
    the same sinograms; a residual task's are residuals of its source's latent, which `decode` alone does not
    add). Sample `k` of the chunk starting at input `lo`
    uses `fold_in(fold_in(key, k), lo)`: the same key, inputs and `chunk` reproduce the same samples.
    `progress` shows a tqdm bar on stderr over the `num_samples * N` sinograms, with the sample and chunk
    being drawn (the first chunk includes compilation): a string is its description, True a plain
    "sampling", False or "" no bar. `guidance` is the Poisson data-consistency scale, `cfg_scale` the
    classifier-free guidance scale (1 = off)."""
    from tqdm import tqdm

    n = batch["prompt"].shape[0]
    chunk = chunk or int(trained.config.data.batch_size)
    n_chunks = -(-n // chunk)
    if latents and trained.stage.decode is None:
        raise ValueError(f"the {trained.name} stage has no latent space to return")
    fn = _compiled_generate(trained.stage.generate, sampler, num_steps, eta, guidance, cfg_scale, not latents)
    outs = []
    description = progress if isinstance(progress, str) else "sampling"
    with tqdm(total=num_samples * n, desc=description, unit="sino", disable=not progress, leave=True,
              dynamic_ncols=True) as bar:
        for k in range(num_samples):
            parts = []
            for j, lo in enumerate(range(0, n, chunk)):
                bar.set_postfix_str(f"sample {k + 1}/{num_samples}, chunk {j + 1}/{n_chunks}")
                idx = np.arange(lo, lo + chunk).clip(max=n - 1)  # pad the last chunk: one compiled shape
                sub = {f: jnp.asarray(v[idx]) for f, v in batch.items()}
                out = fn(trained.state.ema, trained.state.frozen, sub,
                         jax.random.fold_in(jax.random.fold_in(key, k), lo))
                parts.append(np.asarray(out)[: min(chunk, n - lo)])
                bar.update(parts[-1].shape[0])
            outs.append(np.concatenate(parts))
    return np.stack(outs) if latents else np.stack(outs) * np.float32(trained.normalisation.target_scale)


def _in_chunks(fn, x, chunk: int) -> np.ndarray:
    """`fn` over `x` in chunks of `chunk` along the first axis, the last padded (one compiled shape)."""
    n = x.shape[0]
    parts = [np.asarray(fn(jnp.asarray(x[np.arange(lo, lo + chunk).clip(max=n - 1)])))[: min(chunk, n - lo)]
             for lo in range(0, n, chunk)]
    return np.concatenate(parts)


def encode(trained: runs.TrainedStage, sinos, chunk: int = 0) -> np.ndarray:
    """The latents `(N, h, w, C * z)` of sinograms `(N, C, A, B)` in counts, as the latent stage `trained`
    diffuses them (the frozen autoencoder's posterior mean at the stage's latent scale)."""
    if trained.stage.encode is None:
        raise ValueError(f"the {trained.name} stage has no latent space to encode into")
    frozen, scale = trained.state.frozen, np.float32(trained.normalisation.target_scale)
    fn = jax.jit(lambda x: trained.stage.encode(frozen, x / scale))
    return _in_chunks(fn, np.asarray(sinos, np.float32), chunk or int(trained.config.data.batch_size))


def decode(trained: runs.TrainedStage, latents, chunk: int = 0) -> np.ndarray:
    """Sinograms `(N, C, A, B)` in counts of latents `(N, h, w, C * z)` (the inverse direction of `encode`; the
    autoencoder's decoder alone, without a residual objective's source)."""
    if trained.stage.decode is None:
        raise ValueError(f"the {trained.name} stage has no latent space to decode from")
    frozen, scale = trained.state.frozen, np.float32(trained.normalisation.target_scale)
    fn = jax.jit(lambda z: trained.stage.decode(frozen, z) * scale)
    return _in_chunks(fn, np.asarray(latents, np.float32), chunk or int(trained.config.data.batch_size))


def reconstruct(sino, geom: radon.Geometry, fbp_filter: str = "hann", osem_iter: int = 4, osem_subsets: int = 8) -> dict:
    """FBP and OSEM images `(..., H, W)` of sinograms in counts `(..., n_angles, n_bins)` (OSEM of the
    non-negative part: the sinograms are corrected prompts, so their model is `R x` with no background)."""
    sino = jnp.asarray(sino, jnp.float32)
    subsets = min(osem_subsets, geom.n_angles)
    return {"fbp": np.asarray(radon.fbp(sino, geom, filter=fbp_filter)),
            "osem": np.asarray(radon.osem(jnp.maximum(sino, 0.0), geom, n_iter=osem_iter, n_subsets=subsets))}


def clinical_osem(prompts, geom: radon.Geometry, *, normalisation, attenuation, scatter, randoms, n_iter: int = 4,
                  n_subsets: int = 8) -> np.ndarray:
    """OSEM of raw prompts with the full scanner model: the clinical image baseline (DESIGN.md 2.7).

    Runs `radon.osem` on `y ~ Poisson(eta * a * R(x) + eta * (s + r))`: multiplicative factors `eta * a`
    and additive background `eta * (s + r)`, no clipping and no pre-correction of the data.

    Args:
      prompts: raw prompts `(..., C, n_angles, n_bins)` (e.g. the `prompts` physics field).
      normalisation, attenuation: `eta`, `a` `(..., n_angles, n_bins)`, shared by the channels (or with the
        channel axis, like `prompts`).
      scatter, randoms: expected `s`, `r` like `prompts`, before `eta` (the simulator's units).
      n_iter, n_subsets: OSEM passes and angle subsets (at most `n_angles`).

    Returns:
      `(..., C, H, W)`: activity x count scale, i.e. `R(x)` matches the trues in counts. For the simulator's
      data divide by `count_scale * dose` to get kBq/mL (the source acquisition of `low_dose` has `dose`
      times the full-dose counts; elsewhere `dose` is 1). The detector blur is not modelled, as in
      `reconstruct`.
    """
    y = jnp.asarray(prompts, jnp.float32)
    eta, a = (jnp.asarray(v, jnp.float32) for v in (normalisation, attenuation))
    if y.ndim >= 3 and eta.ndim == y.ndim - 1:  # one factor map for the channels
        eta, a = eta[..., None, :, :], a[..., None, :, :]
    background = eta * (jnp.asarray(scatter, jnp.float32) + jnp.asarray(randoms, jnp.float32))
    return np.asarray(radon.osem(y, geom, n_iter, min(n_subsets, geom.n_angles), attenuation=a, normalisation=eta,
                                 background=background))


def write_outputs(out_dir: str, arrays: dict, *, mat: bool = False, figures=(), overwrite: bool = False,
                  tool: str = "sample.py") -> str:
    """Write `arrays` to `out_dir/outputs.npz` (and `outputs.mat`) and each `(name, fig_fn)` in `figures`
    (`fig_fn(path)` writes a PNG), all into a temporary directory that replaces `out_dir` at the end
    (`atomic_write.replacing_dir`). An existing `out_dir` is replaced only with `overwrite`, and only when
    `tool` wrote it and it holds nothing else; otherwise one `OutputDirectoryError` line, nothing touched.
    Returns `out_dir` made absolute."""
    from allpet_jax import atomic_write

    with atomic_write.replacing_dir(out_dir, tool, replace=overwrite) as tmp:
        np.savez_compressed(os.path.join(tmp, "outputs.npz"), **arrays)
        if mat:
            from scipy.io import savemat

            savemat(os.path.join(tmp, "outputs.mat"), arrays, do_compression=True)
        for name, fig_fn in figures:
            fig_fn(os.path.join(tmp, name))
    return os.path.abspath(out_dir)
