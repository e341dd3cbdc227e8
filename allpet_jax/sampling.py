"""From a trained stage to sinograms, reconstructions and files: what `sample.py` and the evaluation share.

- `load_for_task`: the trained stage for a task (`foundation` for `synthesis`, `task` for the paired
  tasks, or any stage directory), refused with a clear error when it was trained for another task.
- Inputs: `simulated_inputs` reads a split of the simulator with the checkpoint's data config (the
  held-out `test` split by default; its seeds never overlap training, see `data/sources.py`);
  `file_inputs` reads users' files with the loaders' checks (shape, finite, non-negative);
  `synthesis_inputs` builds prompts and a geometry for synthesis.
- `generate`: `K` samples per input, in chunks of the training batch size (one compiled program),
  returned in counts (the training normalisation undone).
- `reconstruct`: FBP and OSEM of sinograms in counts.
- `write_outputs`: `.npz` (and `.mat`) plus figures, written into a fresh temporary directory that is
  renamed into place only when everything is written, so a failed run leaves nothing half-written.

Arrays are numpy, sinograms `(N, C, n_angles, n_bins)` in counts, images `(N, C, H, W)`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import radon
from allpet_jax.data import loaders, pipeline
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import REGIONS
from allpet_jax.data.simulate import TASKS
from allpet_jax.training import checkpointing, runs

STAGE_OF_TASK = {"synthesis": "foundation"}
"""The stage directory that serves a task (`task` for every paired task)."""


def load_for_task(task: str, workdir: str = "", checkpoint: str = "", stage: str = "") -> runs.TrainedStage:
    """The trained stage that runs `task`: `checkpoint` (a stage directory) if given, else
    `workdir/<stage>` with `stage` defaulting to `foundation` for synthesis and `task` otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if not (workdir or checkpoint):
        raise ValueError("give --workdir (a training run) or --checkpoint (a stage directory)")
    directory = checkpoint or os.path.join(workdir, stage or STAGE_OF_TASK.get(task, "task"))
    trained = runs.load_trained(directory)
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


def simulated_inputs(trained: runs.TrainedStage, n: int, split: str = "test", start: int = 0) -> dict:
    """Samples `start .. start + n - 1` of a simulated split with the checkpoint's data config, in counts."""
    data = trained.config.data.copy_and_resolve_references()
    data.cache_dir = ""
    data.source = "simulated"
    size = pipeline.split_size(data, split)
    if not 1 <= n or start + n > size:
        raise ValueError(f"the {split} split has {size} samples; asked for {n} from {start}")
    source = pipeline.make_source(data, split, progress=False)
    return {k: np.asarray(v) for k, v in source.read_batch(list(range(start, start + n))).items()}


def file_inputs(trained: runs.TrainedStage, path: str, variable: str = "", prompt: str = "") -> dict:
    """Source sinograms from a file (any loader format) checked against the checkpoint's geometry: one
    sinogram `(C, A, B)` / `(A, B)` or a stack `(N, C, A, B)` (a NIfTI image is forward-projected);
    finite; non-negative unless the run was trained with `data.allow_negative`."""
    geom = geometry_of(trained)
    allow_negative = bool(trained.config.data.get("allow_negative", False))
    if loaders.file_format(path) == "nifti":  # an image: checked and forward-projected by the loader
        source = loaders.load_sinogram(path, geom, allow_negative=allow_negative)[None]
    else:
        raw = loaders.read_array(path, variable or None)
        stack = raw if raw.ndim == 4 else raw[None]
        source = np.stack([loaders.check_sinogram(x, geom, path, "source sinogram", allow_negative) for x in stack])
    channels = trained.meta.get("channels", {}).get("source", 1)
    if source.shape[1] != channels:
        raise loaders.DataFileError(path, f"source sinogram has {source.shape[1]} channel(s); the {trained.meta['task']} "
                                          f"model expects {channels}")
    ids = parse_prompt(prompt, trained.meta["task"])
    return {"source": source, "prompt": np.tile(ids[None], (source.shape[0], 1))}


def parse_prompt(text: str, task: str = "synthesis") -> np.ndarray:
    """`"tracer=FDG,region=brain"` -> ids `[tracer, region, task]`. Tracer names match `TRACERS` by full
    name or by the part after the isotope (`FDG` = `18F-FDG`), case-insensitively. An empty `text` is
    the unconditional prompt (every id null, as the model saw it with classifier-free dropping); a key
    left out is null (`len(TRACERS)`, `len(REGIONS)`: the U-Net's null rows)."""
    if not text.strip():
        return np.array([len(TRACERS), len(REGIONS), len(TASKS)], np.int32)
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
    return np.array([ids["tracer"], ids["region"], TASKS.index(task)], np.int32)


def synthesis_inputs(trained: runs.TrainedStage, n: int, prompt: np.ndarray, geom: radon.Geometry) -> dict:
    channels = trained.meta.get("channels", {}).get("target", 1)
    return {"prompt": np.tile(prompt[None], (n, 1)),
            "geometry_only": np.zeros((n, channels) + geom.sino_shape, np.float32)}


def model_batch(trained: runs.TrainedStage, inputs: dict, roi_file: str = "") -> dict:
    """The normalised batch the model reads: `source` (paired), a `target` placeholder that carries the
    geometry, `prompt`, and `tma` when the stage was trained with TMA (with the clinician ROIs of
    `roi_file` applied on top of the training config's)."""
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
        if roi_file:
            tma_cfg.tma.roi_file = roi_file
        batch = TmaTransform(tma_cfg)(dict(batch, labels=inputs.get("labels")) if "labels" in inputs else batch)
        batch.pop("labels", None)
    return batch


@functools.lru_cache(maxsize=8)
def _compiled_generate(stage_generate, sampler, num_steps, eta, guidance):
    return jax.jit(lambda p, fz, b, k: stage_generate(p, fz, b, k, sampler, num_steps, eta, guidance))


def add_poisson_data(trained: runs.TrainedStage, batch: dict, inputs: dict, dose=None) -> dict:
    """`batch` plus what the Poisson guidance reads: the measured low-dose counts `dose * source` (the
    simulator's low-dose source is dose-normalised; clipped at 0) and counts per model unit
    `dose * target_scale`. `dose`: per-sample fractions, default the inputs' `dose` field."""
    if trained.meta["task"] != "low_dose":
        raise ValueError(f"Poisson guidance is for low_dose, whose source measures the target at a lower dose; "
                         f"the checkpoint's task is {trained.meta['task']!r}")
    dose = inputs.get("dose") if dose is None else dose
    if dose is None:
        raise ValueError("Poisson guidance needs the dose fraction of each input (--dose for files)")
    n = batch["prompt"].shape[0]
    dose = np.broadcast_to(np.asarray(dose, np.float32).reshape(-1), (n,)).reshape(n, 1, 1, 1)
    counts = np.maximum(np.asarray(inputs["source"], np.float32), 0.0) * dose
    scale = dose * np.float32(trained.normalisation.target_scale)
    return dict(batch, guide_counts=counts.astype(np.float32), guide_scale=scale.astype(np.float32))


def generate(trained: runs.TrainedStage, batch: dict, key, *, sampler: str | None = None, num_steps: int | None = None,
             eta: float | None = None, num_samples: int = 1, chunk: int = 0, guidance: float = 0.0) -> np.ndarray:
    """`(num_samples, N, C, A, B)` sinograms in counts. Sample `k` of the chunk starting at input `lo`
    uses `fold_in(fold_in(key, k), lo)`: the same key, inputs and `chunk` reproduce the same samples."""
    n = batch["prompt"].shape[0]
    chunk = chunk or int(trained.config.data.batch_size)
    fn = _compiled_generate(trained.stage.generate, sampler, num_steps, eta, guidance)
    outs = []
    for k in range(num_samples):
        parts = []
        for lo in range(0, n, chunk):
            idx = np.arange(lo, lo + chunk).clip(max=n - 1)  # pad the last chunk: one compiled shape
            sub = {f: jnp.asarray(v[idx]) for f, v in batch.items()}
            out = fn(trained.state.ema, trained.state.frozen, sub, jax.random.fold_in(jax.random.fold_in(key, k), lo))
            parts.append(np.asarray(out)[: min(chunk, n - lo)])
        outs.append(np.concatenate(parts))
    return np.stack(outs) * np.float32(trained.normalisation.target_scale)


def reconstruct(sino, geom: radon.Geometry, fbp_filter: str = "hann", osem_iter: int = 4, osem_subsets: int = 8) -> dict:
    """FBP and OSEM images `(..., H, W)` of sinograms in counts `(..., n_angles, n_bins)` (OSEM of the
    non-negative part: the sinograms are corrected prompts, so their model is `R x` with no background)."""
    sino = jnp.asarray(sino, jnp.float32)
    subsets = min(osem_subsets, geom.n_angles)
    return {"fbp": np.asarray(radon.fbp(sino, geom, filter=fbp_filter)),
            "osem": np.asarray(radon.osem(jnp.maximum(sino, 0.0), geom, n_iter=osem_iter, n_subsets=subsets))}


def write_outputs(out_dir: str, arrays: dict, *, mat: bool = False, figures=(), overwrite: bool = False) -> str:
    """Write `arrays` to `out_dir/outputs.npz` (and `outputs.mat`) and each `(name, fig_fn)` in `figures`
    (`fig_fn(path)` writes a PNG), all into a temporary directory renamed to `out_dir` at the end."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another --out or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        np.savez_compressed(os.path.join(tmp, "outputs.npz"), **arrays)
        if mat:
            from scipy.io import savemat

            savemat(os.path.join(tmp, "outputs.mat"), arrays, do_compression=True)
        for name, fig_fn in figures:
            fig_fn(os.path.join(tmp, name))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
