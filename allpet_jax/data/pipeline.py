"""The Grain input pipeline: sample indices -> shuffled batches -> one read per batch -> normalised dicts.

    grain.MapDataset.range(start, stop)          # this JAX process's slice of the split's index space
      .shuffle(seed=seed)                        # seeded; a new permutation every epoch
      .repeat(num_epochs)                        # None: forever
      .batch(batch_size, drop_remainder=True)    # batches of sample indices
      .map(ReadBatch(source))                    # source.read_batch(indices): the batch's samples, stacked
      .map(normalisation)                        # counts -> normalised scale (below)
      .map(t) for t in extra_transforms          # hook for later stages, e.g. RMAS masking
      .to_iter_dataset(grain.ReadOptions(num_threads, prefetch_buffer_size))

Batching indices before reading (rather than mapping samples, then batching) gives every source one
call per batch: shards are read shard by shard with one fancy index, and the batch-level transforms
(normalisation, RMAS masks) run vectorised over the batch. Because a batch only names indices, sample
`i` is still a pure function of `(seed, split, i)`, and the iterator's state is one integer:
`get_state`/`set_state` restore it exactly, so it can be checkpointed with the model.

Throughput (`benchmarks/pipeline_bench.py`): the simulator, not Grain, sets the speed of a cold
on-the-fly epoch; later epochs come from `SimulatedSource`'s in-memory cache, and `config.data.cache_dir`
keeps shards on disk across runs. Both serve well over 200 samples/s at 128 x 128 / 128 angles.

Batches are dicts of numpy arrays with a leading batch axis: `source`, `target` (normalised), the other
fields the source provides (`target_clean`, `image`, `mu`, `labels`, `prompt`, ...), and `index`, each
sample's index in the split. `extra_transforms` are callables `batch dict -> batch dict`; they see
`index`, so per-sample randomness can be derived from `(seed, index)` without state.

Normalisation
-------------
`source / source_scale` and `target / target_scale` (`target_clean` uses `target_scale`); the inverse
is `Normalisation.to_counts`. The two scales are dataset constants, estimated once from the *training*
split as the 99.5th percentile of the field's values pooled over its first 64 samples, so normalised
sinograms lie mostly in [0, 1] and the relative count levels between samples (which set the Poisson
noise level) are kept. Constants rather than per-sample scales because a generated target has no
measured counts to take a per-sample scale from. `image`, `mu` and `labels` are left in physical units.

Multi-process: `batch_size` is the global batch. Every process draws the same shuffled index batches
and reads only its rows of each (`process_rows`: process `p` of `P` takes rows `[p * b, (p + 1) * b)`
with `b = batch_size // P`), so the global batch, and hence training, is the same whatever the process
count. Evaluation splits (no `drop_remainder`) are read whole by every process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import grain
import numpy as np

from allpet_jax.data import simulate, sources
from allpet_jax.data.phantoms import REGIONS
from radon import Geometry

NORMALISATION_SAMPLES = 64
NORMALISATION_PERCENTILE = 99.5


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Divide sinograms by dataset constants (counts per unit); `to_counts` maps model outputs back."""

    source_scale: float
    target_scale: float

    def __post_init__(self):
        for name in ("source_scale", "target_scale"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"Normalisation.{name} must be a finite positive number of counts; got {value!r}")

    def scale(self, field: str) -> float:
        return self.source_scale if field == "source" else self.target_scale

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        for field in ("source", "target", "target_clean"):
            if field in out:
                out[field] = (np.asarray(out[field], np.float32) / np.float32(self.scale(field))).astype(np.float32)
        return out

    def to_counts(self, x, field: str = "target"):
        """Inverse of the normalisation of `field` ('source', 'target' or 'target_clean')."""
        return x * self.scale(field)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate_normalisation(
    source, n: int = NORMALISATION_SAMPLES, percentile: float = NORMALISATION_PERCENTILE, chunk: int = 32
) -> Normalisation:
    """Scales from the first `n` samples of a (training) source: the `percentile` of each field's values.

    A source field that is missing (target-only files) or all zero (the simulator's `synthesis` task,
    whose source is zeros) takes the target scale.
    """
    count = min(n, len(source))
    if count == 0:
        raise ValueError("cannot estimate the normalisation from an empty source")
    values = {"source": [], "target": []}
    for start in range(0, count, chunk):
        batch = source.read_batch(np.arange(start, min(count, start + chunk)))
        for field in values:
            if field in batch:
                values[field].append(np.asarray(batch[field], np.float32).ravel())
    scales = {f: float(np.percentile(np.concatenate(v), percentile)) for f, v in values.items() if v}
    if not scales.get("target", 0.0) > 0:
        raise ValueError(f"the targets of the first {count} samples are (almost) all zero ({scales}); cannot normalise them")
    source_scale = scales.get("source", 0.0)
    return Normalisation(source_scale=source_scale if source_scale > 0 else scales["target"], target_scale=scales["target"])


class ReadBatch:
    """Grain map transform: an array of sample indices -> `source.read_batch(indices)`."""

    def __init__(self, source):
        self.source = source

    def __call__(self, indices) -> dict:
        return self.source.read_batch(indices)


def process_rows(batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The rows of each global batch of `batch_size` that this JAX process reads."""
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}); got {process_index}")
    if batch_size % process_count:
        raise ValueError(f"the global batch_size={batch_size} must be divisible by the {process_count} processes")
    rows = batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


class TakeRows:
    """Grain map transform: a global batch of sample indices -> this process's rows of it."""

    def __init__(self, rows: slice):
        self.rows = rows

    def __call__(self, indices):
        return indices[self.rows]


def make_pipeline(
    source,
    *,
    batch_size: int,
    normalisation: Normalisation,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    extra_transforms: Sequence[Callable[[dict], dict]] = (),
    num_threads: int = 2,
    prefetch: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The Grain pipeline over `source` (see the module docstring); iterate it with `iter(...)`.

    Args:
      source: a source with `__len__` and `read_batch` (`sources.SimulatedSource`, `ShardSource`, ...).
      batch_size: samples per global batch (this process reads `batch_size // process_count` of them).
      normalisation: `Normalisation` applied to every batch (estimate it from the training split).
      seed: shuffle seed in [0, 2**32).
      shuffle: False for evaluation (batches in index order).
      num_epochs: passes over the data; None repeats forever, reshuffling every epoch.
      drop_remainder: drop a final partial batch (always True for training, so shapes are static).
      extra_transforms: callables `batch -> batch` applied after normalisation, in order.
      num_threads: Grain reader threads (0 reads in the calling thread).
      prefetch: batches read ahead.
      process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if drop_remainder and len(source) < batch_size:
        raise ValueError(
            f"the source has {len(source)} samples, fewer than batch_size={batch_size}, so there would be no "
            "batches; lower the batch size or add samples"
        )
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if drop_remainder:  # training: this process's rows of each global batch (evaluation reads everything)
        ds = ds.map(TakeRows(process_rows(batch_size, process_index, process_count)))
    ds = ds.map(ReadBatch(source))
    ds = ds.map(normalisation)
    for transform in extra_transforms:
        ds = ds.map(transform)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


# --- from a config ------------------------------------------------------------------------------------


def geometry_from_config(data) -> Geometry:
    """The `radon.Geometry` of a `config.data` section."""
    return Geometry(
        image_shape=(data.image_size, data.image_size),
        n_angles=data.n_angles,
        n_bins=data.n_bins,
        pixel_size=data.pixel_size,
        bin_spacing=data.bin_spacing,
    )


def sample_geometry(data, region_id: int | None = None) -> Geometry:
    """The geometry, in physical mm, of one sample of `config.data`: what TMA's lengths and the clinician
    ROIs are measured in.

    - Users' files (`data.source == 'files'`): `geometry_from_config`, i.e. `data.pixel_size` and
      `data.bin_spacing` mm (the loaders check NIfTI voxel sizes against them).
    - The simulator (`'simulated'`, its cached shards included) takes only their ratio and sets the pixel
      per region, `phantoms.FOV_MM[region] / image_size` (brain 256 mm, body 600 mm):
      `simulate.physical_geometry` of `region_id` (an index into `phantoms.REGIONS`, the second id of a
      sample's `prompt`), else of `data.simulation.region`; `data.simulation.fov_mm`, when set, applies to
      every region.
    """
    geom = geometry_from_config(data)
    if data.source == "files":
        return geom
    if data.source != "simulated":
        raise ValueError(f"data.source must be 'simulated' or 'files'; got {data.source!r}")
    simulation = data.get("simulation") or {}
    fov_mm = simulation.get("fov_mm")
    if region_id is not None:
        if not 0 <= int(region_id) < len(REGIONS):
            raise ValueError(f"region id {region_id} is not an index into {REGIONS}; a simulated sample's prompt "
                             "carries its region as its second id (the null id only appears after prompt dropping)")
        region = REGIONS[int(region_id)]
    else:
        region = simulation.get("region")
    if region is None and fov_mm is None:
        raise ValueError("the simulator's pixel size depends on the region, and neither a region id (the batch's "
                         "prompt) nor data.simulation.region / data.simulation.fov_mm gives it")
    return simulate.physical_geometry(geom, region, fov_mm)


def sample_geometries(data) -> tuple[Geometry, ...]:
    """Every distinct geometry (physical mm) `sample_geometry` gives for `config.data`: one for files, a
    fixed region or a fixed `fov_mm`; otherwise one per distinct field of view of `phantoms.REGIONS`."""
    simulation = data.get("simulation") or {}
    if data.source == "files" or simulation.get("region") is not None or simulation.get("fov_mm") is not None:
        return (sample_geometry(data),)
    return tuple(dict.fromkeys(sample_geometry(data, r) for r in range(len(REGIONS))))


def split_size(data, split: str) -> int:
    return {"train": data.n_train, "val": data.n_val, "test": data.n_test}[split]


def make_source(data, split: str, *, simulate: Callable | None = None, progress: bool = True):
    """The source of one split described by `config.data`.

    - `data.source == 'simulated'` and no `data.cache_dir`: `SimulatedSource`, simulated on the fly.
    - with `data.cache_dir`: shards in `cache_dir/<split>`; made there first if the directory has no
      complete manifest, and refused if it holds a different dataset (task, seed, geometry, ...).
    - `data.source == 'files'`: `FileSource` over `data.path` (and `data.source_path`). If the path has
      `train`/`val`/`test` subfolders each split reads its own; otherwise the sorted files are cut into
      consecutive blocks of `n_train`, `n_val`, `n_test` files (fewer where the files run out).

    With `data.physics` every sample also carries `sources.PHYSICS_FIELDS` (raw prompts, eta, a, scatter,
    randoms; in counts, untouched by the normalisation): always from the simulator, and from files where
    they hold those variables.
    """
    geom = geometry_from_config(data)
    if data.source == "files":
        return _file_source(data, split, geom)
    if data.source != "simulated":
        raise ValueError(f"data.source must be 'simulated' or 'files'; got {data.source!r}")
    options = {k: v for k, v in (data.get("simulation") or {}).items() if v is not None}  # None: drawn per sample
    simulated = sources.SimulatedSource(
        data.task, geom, split_size(data, split), data.seed, split,
        cache_bytes=0 if data.cache_dir else 2 << 30,  # shards are the cache when cache_dir is set
        simulate=simulate, physics=bool(data.get("physics", False)), **options,
    )
    if not data.cache_dir:
        return simulated
    directory = os.path.join(data.cache_dir, split)
    manifest = os.path.join(directory, sources.MANIFEST)
    if not (os.path.exists(manifest) and sources.read_manifest_file(manifest).get("complete")):
        sources.write_shards(directory, simulated, shard_size=data.get("shard_size", 64), progress=progress)
    shards = sources.ShardSource(directory)
    expected = simulated.manifest_header()
    if shards.manifest_header() != expected:
        diff = [k for k in expected if shards.manifest[k] != expected[k]]
        raise ValueError(
            f"{directory} holds a different dataset than the config asks for ({', '.join(diff)} differ); point "
            "data.cache_dir at a new directory or delete this one"
        )
    return shards


def _file_source(data, split: str, geom: Geometry):
    if not data.path:
        raise ValueError("data.source='files' needs data.path (a directory, glob or file of sinograms/images)")
    kwargs = dict(
        target_variable=data.target_variable or None,
        source_variable=data.source_variable or None,
        file_format=data.format,
        allow_negative=data.allow_negative,
        physics=bool(data.get("physics", False)),
    )
    split_dir = os.path.join(data.path, split) if os.path.isdir(data.path) else ""
    if split_dir and os.path.isdir(split_dir):
        source_dir = os.path.join(data.source_path, split) if data.source_path else None
        return sources.FileSource(split_dir, geom, source_files=source_dir, **kwargs)
    every = sources.FileSource(data.path, geom, source_files=data.source_path or None, **kwargs)
    first = {"train": 0, "val": data.n_train, "test": data.n_train + data.n_val}[split]
    stop = min(len(every), first + split_size(data, split))
    return sources.take(every, range(min(first, stop), stop))


def normalisation_from_config(data, *, simulate: Callable | None = None) -> Normalisation:
    """`data.source_scale`/`data.target_scale` if both are set (> 0), else estimated from the train split."""
    if data.source_scale > 0 and data.target_scale > 0:
        return Normalisation(float(data.source_scale), float(data.target_scale))
    return estimate_normalisation(make_source(data, "train", simulate=simulate))


def pipeline_from_config(data, split: str, *, normalisation: Normalisation | None = None, extra_transforms=(), simulate=None,
                         masks=None):
    """`(iter_dataset, normalisation)` for one split of `config.data`; training shuffles and repeats forever,
    'val'/'test' read each sample once in order (keeping a final partial batch). `masks` is the
    `config.masks` section: with `masks.enabled`, RMAS is added by `rmas_hook` (below)."""
    source = make_source(data, split, simulate=simulate)
    if normalisation is None:
        normalisation = normalisation_from_config(data, simulate=simulate)
    source, extra_transforms = rmas_hook(masks, data, split, source, extra_transforms)
    train = split == "train"
    dataset = make_pipeline(
        source,
        batch_size=data.batch_size,
        normalisation=normalisation,
        seed=data.seed,
        shuffle=train,
        num_epochs=None if train else 1,
        drop_remainder=train,
        extra_transforms=extra_transforms,
        num_threads=data.num_threads,
        prefetch=data.prefetch,
    )
    return dataset, normalisation


# --- RMAS hook (DESIGN.md 2.3; the masks themselves are allpet_jax/masks.py) ----------------------------


def rmas_hook(masks_config, data, split: str, source, extra_transforms=()):
    """`(source, extra_transforms)` with RMAS when `masks_config.enabled` (unchanged otherwise).

    The training split is wrapped in `masks.RmasSource`, so it has `len(source) * masks_per_sinogram`
    samples and sample `i` is (base sinogram `i // K`, mask seed `i % K`); 'val'/'test' keep their samples
    (mask seed 0). `masks.RmasTransform` then runs first among the extra transforms, once per batch (after
    normalisation, so the views are in the model's scale), with keys from `data.seed`.
    """
    if masks_config is None or not masks_config.get("enabled", False):
        return source, tuple(extra_transforms)
    from allpet_jax import masks

    config = masks.MaskConfig.from_config(masks_config)
    if split == "train":
        source = masks.RmasSource(source, config.masks_per_sinogram)
    transform = masks.RmasTransform(
        geometry_from_config(data), config, seed=data.seed, device=masks_config.get("device", "cpu") or None
    )
    return source, (transform, *extra_transforms)
