"""RMAS and DMM: random Radon masks that split a sinogram into a positive and a negative view.

DESIGN.md 2.3. An *image mask* `m` `(H, W)` is the union of `k` cells of a `G x G` grid laid over the
image (the geometry's field of view); the *Dynamic Multi-Mask* (DMM) distribution draws `k` and which
cells. The *sinogram mask* is the set of rays that cross the image mask,

    M = 1[R(m) > tau_mm],

where `R(m)` (`radon.forward` of the 0/1 mask) is the length in mm of each ray's intersection with the
masked cells, so `tau_mm` is a length in mm: a ray counts as crossing the mask when it runs more than
`tau_mm` through it. With the default 0.5 mm (small against a cell's chord) `M` holds every ray through
a cell plus the projector's interpolation blur, rays up to about half a pixel beyond the cell's edge,
where `R(m)` falls linearly to zero; a larger `tau_mm` keeps only rays that cross deeper. Because `m` is a
union of cells, `R(m)` is computed as a sum of per-cell sinograms tabulated once per geometry (a small
matrix product instead of a projection); by linearity it equals `radon.forward(m)` up to float rounding.

Two ways to make the views of a sinogram `S`:

* `mode="mask"`: `P = M * S`, `N = (1 - M) * S`, `S` = the batch's sinogram (measured, noisy).
  `M` is 0/1, so `P + N == S` holds bit for bit.
* `mode="split"` (needs the image `x`): the physically exact split `P = R(m * x)`,
  `N = R((1 - m) * x)`. Here the full view is *defined* as `S := P + N`, which is `R(x)` up to float32
  rounding, i.e. the noise-free line integrals of the known image and not the batch's measured
  sinogram (that one is left untouched under its own key). So `P + N == S` again holds exactly.

DMM distributions (`MaskConfig`):

* count `k`: `"fixed"` (`k = n_cells`), `"uniform"` (`k ~ U{1, ..., max_cells}`), `"poisson"`
  (`k ~ Poisson(mean_cells)` clipped to `[1, G*G]`: a draw of 0 becomes 1 and a draw above `G*G`
  becomes `G*G`, so `P(k=1) = P_pois(0) + P_pois(1)`; the mass moved is `exp(-mean)` at the bottom).
* layout: `"uniform"` (every cell equally likely), `"clustered"` (cells near a centre drawn uniformly
  over the grid, with log-weight `-d^2 / (2 cluster_sigma_cells^2)`, `d` the distance of a cell's centre
  from it in cell widths), `"activity"` (cell weight `(mean activity in the cell / the largest cell
  mean)^activity_power`, cells without activity only after all others; activity from the
  Hann-filtered FBP of the sinogram inside the field-of-view disc, negative values clipped, or from
  the known image). The `k` cells are drawn without
  replacement with these weights (Gumbel top-k, which is exactly successive weighted sampling without
  replacement).

Counting: sample `i` of an epoch is `(base sinogram i // K, mask seed i % K)` with
`K = masks_per_sinogram` (`split_index`, `RmasSource`), and its mask is drawn from
`fold_in(fold_in(key, base), seed)`, so it depends on `(key, i)` only, never on batching or shuffling.
500 base sinograms with `K = 400` give 200,000 distinct `(sinogram, mask seed)` samples without storing
any. Whether the *masks* are distinct depends on the DMM support: with `k = 1` there are only `G*G`
masks, so a sinogram's 400 seeds repeat masks; `tests/test_masks.py` measures it.

`make_rmas(geom, config)` returns the one jit-compiled function `(key, batch) -> batch` that draws the
masks of a whole batch (vmapped over samples) and adds the views. This module does not decide how
the model uses the views (DESIGN.md 2.3, last point: the trainer does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import radon

COUNTS = ("fixed", "uniform", "poisson")
LAYOUTS = ("uniform", "clustered", "activity")
ACTIVITY_SOURCES = ("fbp", "image")
MODES = ("mask", "split")
PIPELINE_KEYS = ("enabled", "device", "rmas", "objective", "completion_prob")  # config.masks keys read by the pipeline hook or train.py, not MaskConfig
_RMAS_TAG = 0x524D4153  # "RMAS": branches the mask keys off the dataset seed, apart from the simulator's

# Keys `make_rmas` adds to a batch, with their shapes for a batch of N samples.
OUTPUT_KEYS = {
    "image_mask": "(N, H, W) float32 0/1",
    "sino_mask": "(N, n_angles, n_bins) float32 0/1",
    "n_cells": "(N,) int32",
    "positive": "(N, ..., n_angles, n_bins)",
    "negative": "(N, ..., n_angles, n_bins)",
    "full": "(N, ..., n_angles, n_bins)",
}


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """The RMAS/DMM settings (hashable, so it is a static argument of `jax.jit`).

    Args:
      grid: `G`, cells per side of the grid over the image.
      count: distribution of the number of cells `k`: one of `COUNTS`.
      n_cells: `k` for `count="fixed"`.
      max_cells: upper end of `count="uniform"` (`k ~ U{1..max_cells}`).
      mean_cells: mean of `count="poisson"` (clipped to `[1, G*G]`).
      layout: where the cells fall: one of `LAYOUTS`.
      cluster_sigma_cells: spread of `layout="clustered"`, in cell widths.
      activity_from: `"fbp"` (FBP of the sinogram) or `"image"` (the batch's image) for `layout="activity"`.
      activity_power: exponent on the normalised cell activity (0 = uniform over the cells with any
        activity, larger = hotter cells; cells without activity come last).
      tau_mm: a ray belongs to the sinogram mask when its intersection with the mask exceeds this (mm).
      mode: `"mask"` (`P = M*S`) or `"split"` (`P = R(m*x)`, needs the image).
      masks_per_sinogram: `K`, mask seeds per base sinogram (`split_index`, `RmasSource`).
      sinogram_key: batch key of `S` `(N, ..., n_angles, n_bins)`.
      image_key: batch key of the image `(N, ..., H, W)` (split mode and `activity_from="image"`).
    """

    grid: int = 8
    count: str = "uniform"
    n_cells: int = 1
    max_cells: int = 4
    mean_cells: float = 3.0
    layout: str = "uniform"
    cluster_sigma_cells: float = 1.0
    activity_from: str = "fbp"
    activity_power: float = 1.0
    tau_mm: float = 0.5
    mode: str = "mask"
    masks_per_sinogram: int = 400
    sinogram_key: str = "target"
    image_key: str = "image"

    def __post_init__(self):
        _require(_is_int(self.grid) and self.grid >= 1, "grid", "a positive integer", self.grid)
        _require(self.count in COUNTS, "count", f"one of {COUNTS}", self.count)
        _require(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}", self.layout)
        _require(self.activity_from in ACTIVITY_SOURCES, "activity_from", f"one of {ACTIVITY_SOURCES}", self.activity_from)
        _require(self.mode in MODES, "mode", f"one of {MODES}", self.mode)
        cells = self.grid * self.grid
        _require(_is_int(self.n_cells) and 1 <= self.n_cells <= cells, "n_cells", f"an integer in [1, grid^2 = {cells}]", self.n_cells)
        _require(_is_int(self.max_cells) and 1 <= self.max_cells <= cells, "max_cells", f"an integer in [1, grid^2 = {cells}]", self.max_cells)
        _require(float(self.mean_cells) > 0, "mean_cells", "a positive mean", self.mean_cells)
        _require(float(self.cluster_sigma_cells) > 0, "cluster_sigma_cells", "a positive spread in cells", self.cluster_sigma_cells)
        _require(float(self.activity_power) >= 0, "activity_power", "a non-negative exponent", self.activity_power)
        _require(float(self.tau_mm) >= 0, "tau_mm", "a non-negative length in mm", self.tau_mm)
        _require(_is_int(self.masks_per_sinogram) and self.masks_per_sinogram >= 1, "masks_per_sinogram", "a positive integer", self.masks_per_sinogram)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "MaskConfig":
        """From a `config.masks` section (ConfigDict or dict). `PIPELINE_KEYS` belong to the pipeline and
        are ignored here; any other unknown key is an error."""
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        for key in PIPELINE_KEYS:
            items.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"config.masks has unknown key(s) {unknown}; known keys: {sorted(known | set(PIPELINE_KEYS))}")
        return cls(**items)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"MaskConfig.{name} must be {expected}; got {got!r}")


# ---------------------------------------------------------------------------------------------------
# Counting: sample index -> (base sinogram, mask seed)


def split_index(i, masks_per_sinogram: int):
    """Sample index `i` (int or integer array) -> `(base sinogram index, mask seed)` = `divmod(i, K)`."""
    return divmod(i, masks_per_sinogram)


def sample_key(key, base_index, mask_seed):
    """The key a sample's mask is drawn from: `fold_in(fold_in(key, base_index), mask_seed)`."""
    return jax.random.fold_in(jax.random.fold_in(key, base_index), mask_seed)


class RmasSource:
    """Random-access source of `len(base) * K` records (`K = masks_per_sinogram`): record `i` is
    `base[i // K]` (whose `index` is the base sinogram's index) plus `mask_seed = i % K` and
    `sample_index = i` (int64), from which `make_rmas` draws the record's mask.

    `base` is a source of `allpet_jax.data.sources` (or anything with `__len__` and `__getitem__`
    returning dict records; `read_batch` is used when the base has it). Records of one base sinogram
    are regenerated for each of its K seeds; put a cache in front of an expensive base.
    """

    def __init__(self, base, masks_per_sinogram: int):
        if not _is_int(masks_per_sinogram) or masks_per_sinogram < 1:
            raise ValueError(f"masks_per_sinogram must be a positive integer; got {masks_per_sinogram!r}")
        self.base = base
        self.masks_per_sinogram = int(masks_per_sinogram)

    def __len__(self) -> int:
        return len(self.base) * self.masks_per_sinogram

    def __getitem__(self, i) -> dict:
        batch = self.read_batch([i])
        return {k: v[0] for k, v in batch.items()}

    def read_batch(self, indices) -> dict:
        """Records `indices` stacked along a new leading axis."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"RmasSource index out of range [0, {len(self)}): {idx.tolist()}")
        base_index, mask_seed = split_index(idx, self.masks_per_sinogram)
        if hasattr(self.base, "read_batch"):
            batch = dict(self.base.read_batch(base_index))
        else:
            records = [self.base[int(b)] for b in base_index]
            batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]} if records else {}
        batch["index"] = base_index
        batch["mask_seed"] = mask_seed
        batch["sample_index"] = idx
        return batch

    def __repr__(self) -> str:
        return f"RmasSource(base={self.base!r}, masks_per_sinogram={self.masks_per_sinogram})"


# ---------------------------------------------------------------------------------------------------
# Grid cells


def cell_index(geom: radon.Geometry, grid: int) -> np.ndarray:
    """Cell of every pixel, `(H, W)` int32 in `[0, grid^2)`, row-major (cell `r * grid + c`, row 0 at the top).

    Cell boundaries fall on whole pixels: pixel row `i` is in cell row `floor(i * grid / H)`, so cells
    differ by at most one pixel when `H` is not a multiple of `grid`.
    """
    H, W = geom.image_shape
    rows = (np.arange(H) * grid) // H
    cols = (np.arange(W) * grid) // W
    return (rows[:, None] * grid + cols[None, :]).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _cell_sinograms_np(geom: radon.Geometry, grid: int) -> np.ndarray:
    cells = cell_index(geom, grid)
    onehot = (cells[None] == np.arange(grid * grid)[:, None, None]).astype(np.float32)
    return np.asarray(radon.forward(jnp.asarray(onehot), geom)).reshape(grid * grid, -1)


def cell_sinograms(geom: radon.Geometry, grid: int) -> jax.Array:
    """`R` of every cell's 0/1 indicator, `(grid^2, n_angles * n_bins)` float32 (mm), computed once."""
    return jnp.asarray(_cell_sinograms_np(geom, grid))


def cells_to_image(cells, geom: radon.Geometry, grid: int):
    """Cell selection `(..., grid^2)` -> image mask `(..., H, W)`."""
    return jnp.take(cells, jnp.asarray(cell_index(geom, grid)), axis=-1)


# ---------------------------------------------------------------------------------------------------
# DMM: one sample


def draw_count(key, config: MaskConfig):
    """Number of cells `k`, int32 scalar, from `config.count`."""
    total = config.grid * config.grid
    if config.count == "fixed":
        return jnp.int32(config.n_cells)
    if config.count == "uniform":
        return jax.random.randint(key, (), 1, config.max_cells + 1, dtype=jnp.int32)
    k = jax.random.poisson(key, config.mean_cells, dtype=jnp.int32)
    return jnp.clip(k, 1, total)


def cell_log_weights(key, config: MaskConfig, cell_activity=None):
    """Log-weight of each cell `(grid^2,)` under `config.layout` (`cell_activity` `(grid^2,)` for "activity")."""
    G = config.grid
    if config.layout == "uniform":
        return jnp.zeros((G * G,), jnp.float32)
    if config.layout == "clustered":
        centre = jax.random.uniform(key, (2,), maxval=G)  # (row, col) in cell widths
        r, c = np.divmod(np.arange(G * G), G)
        d2 = (r + 0.5 - centre[0]) ** 2 + (c + 0.5 - centre[1]) ** 2
        return -d2 / (2.0 * config.cluster_sigma_cells**2)
    a = jnp.maximum(cell_activity, 0.0)
    a = a / jnp.maximum(jnp.max(a), jnp.finfo(jnp.float32).tiny)
    # Empty cells get a log-weight far below any active one (yet finite, so the Gumbel noise still
    # orders them at random): they are drawn only once every active cell is taken.
    return jnp.where(a > 0, config.activity_power * jnp.log(jnp.maximum(a, 1e-30)), -1e4)


def draw_cells(key, config: MaskConfig, cell_activity=None):
    """One DMM draw: selected cells `(grid^2,)` float32 0/1 and their number `k` (int32)."""
    k_count, k_layout, k_gumbel = jax.random.split(key, 3)
    k = draw_count(k_count, config)
    scores = cell_log_weights(k_layout, config, cell_activity) + jax.random.gumbel(k_gumbel, (config.grid**2,))
    rank = jnp.argsort(jnp.argsort(-scores))  # Gumbel top-k = weighted sampling without replacement
    return (rank < k).astype(jnp.float32), k


@functools.partial(jax.jit, static_argnames="config")
def draw_many(keys, config: MaskConfig, cell_activity=None):
    """`draw_cells` for each key of `keys` `(N,)` (and `cell_activity` `(N, grid^2)` for "activity"):
    cells `(N, grid^2)` float32 0/1 and counts `(N,)` int32. Jit-compiled and vmapped."""
    if cell_activity is None:
        return jax.vmap(lambda k: draw_cells(k, config))(keys)
    return jax.vmap(lambda k, a: draw_cells(k, config, a))(keys, cell_activity)


def cell_means(image, geom: radon.Geometry, grid: int):
    """Mean of `image` `(..., H, W)` over each cell -> `(..., grid^2)`."""
    cells = cell_index(geom, grid).reshape(-1)
    onehot = (cells[:, None] == np.arange(grid * grid)[None, :]).astype(np.float32)
    onehot /= onehot.sum(axis=0, keepdims=True)
    flat = image.reshape(image.shape[:-2] + (-1,))
    return flat @ jnp.asarray(onehot)


# ---------------------------------------------------------------------------------------------------
# The batched RMAS step


def make_rmas(geom: radon.Geometry, config: MaskConfig) -> Callable[[jax.Array, dict], dict]:
    """The jit-compiled RMAS step `(key, batch) -> batch` for a fixed geometry and config.

    `batch[config.sinogram_key]` is `(N, ..., n_angles, n_bins)` (a channel axis is allowed), and, for
    split mode or activity from the image, `batch[config.image_key]` is `(N, ..., H, W)`.

    Keys: if the batch carries `index` `(N,)` (every `allpet_jax.data.sources` source adds it; under
    `RmasSource` it is the base sinogram's index), sample `n`'s mask is drawn from
    `sample_key(key, index[n], mask_seed[n])` (`mask_seed` 0 when absent), so it depends on the sample
    and `key` only, never on the batch it sits in. Without `RmasSource`, pass a key that changes per
    epoch to give a sample new masks. Without `index` the keys are `jax.random.split(key, N)`.
    Returns the batch with `OUTPUT_KEYS` added (other keys untouched).
    """
    if not isinstance(config, MaskConfig):
        raise TypeError(f"make_rmas needs a MaskConfig; got {type(config).__name__} (use MaskConfig.from_config)")
    table = cell_sinograms(geom, config.grid)
    step = _jitted_step(geom, config)

    def rmas(key, batch):
        _check_batch(batch, geom, config)
        inputs = {k: batch[k] for k in _input_keys(config) if k in batch}
        return {**batch, **step(key, inputs, table)}

    return rmas


def _input_keys(config: MaskConfig) -> tuple[str, ...]:
    """The batch fields the jitted step reads (the rest of the batch never enters it)."""
    image = (config.image_key,) if _needs_image(config) else ()
    return (config.sinogram_key, *image, "index", "mask_seed")


@functools.lru_cache(maxsize=32)
def _jitted_step(geom: radon.Geometry, config: MaskConfig):
    return jax.jit(functools.partial(_rmas, geom=geom, config=config))


def _needs_image(config: MaskConfig) -> bool:
    return config.mode == "split" or (config.layout == "activity" and config.activity_from == "image")


def _check_batch(batch, geom, config) -> None:
    for name, trailing, needed in (
        (config.sinogram_key, geom.sino_shape, True),
        (config.image_key, geom.image_shape, _needs_image(config)),
    ):
        if not needed:
            continue
        if name not in batch:
            raise ValueError(f"RMAS needs batch[{name!r}]; the batch has keys {sorted(batch)}")
        shape = np.shape(batch[name])
        if len(shape) < 3 or tuple(shape[-2:]) != tuple(trailing):
            raise ValueError(f"RMAS: batch[{name!r}] must be (N, ..., {trailing[0]}, {trailing[1]}); got shape {shape}")


def _rmas(key, batch, table, *, geom: radon.Geometry, config: MaskConfig):
    sino = batch[config.sinogram_key]
    n = sino.shape[0]
    if "index" in batch:
        seed = batch.get("mask_seed", jnp.zeros_like(batch["index"]))
        keys = jax.vmap(sample_key, in_axes=(None, 0, 0))(key, batch["index"], seed)
    else:
        keys = jax.random.split(key, n)

    activity = None
    if config.layout == "activity":
        if config.activity_from == "image":
            img = batch[config.image_key]
        else:
            # Hann-windowed, and only inside the disc every angle sees: outside it FBP holds truncation
            # streaks that would pull cells into empty corners.
            r2 = geom.x_mm[None, :] ** 2 + geom.y_mm[:, None] ** 2
            img = radon.fbp(sino, geom, "hann") * jnp.asarray(r2 <= geom.fov_radius_mm**2, jnp.float32)
        img = img.reshape((n, -1) + geom.image_shape).sum(axis=1)  # channels pooled
        activity = cell_means(img, geom, config.grid)
    cells, k = draw_many(keys, config, activity)

    image_mask = cells_to_image(cells, geom, config.grid)  # (N, H, W)
    length_mm = (cells @ table).reshape((n,) + geom.sino_shape)  # R(m), mm
    sino_mask = (length_mm > config.tau_mm).astype(jnp.float32)
    out = dict(image_mask=image_mask, sino_mask=sino_mask, n_cells=k)

    if config.mode == "mask":
        m = sino_mask.reshape((n,) + (1,) * (sino.ndim - 3) + geom.sino_shape).astype(sino.dtype)
        out.update(positive=m * sino, negative=(1 - m) * sino, full=sino)
    else:
        x = batch[config.image_key]
        mi = image_mask.reshape((n,) + (1,) * (x.ndim - 3) + geom.image_shape).astype(x.dtype)
        views = radon.forward(jnp.stack([mi * x, (1 - mi) * x]), geom)
        positive, negative = views[0], views[1]
        out.update(positive=positive, negative=negative, full=positive + negative)
    return out


# ---------------------------------------------------------------------------------------------------
# Grain pipeline step


class RmasTransform:
    """Grain map transform for batches of numpy arrays (after `.batch`): adds the RMAS `OUTPUT_KEYS`.

    The masks are drawn from `fold_in(key(seed), "RMAS")` and each sample's `(index, mask_seed)` (see
    `make_rmas`), so a sample's mask is a pure function of `(seed, sample)`. The jitted step runs once per
    batch on `device` (a platform name such as "cpu", default, which keeps it off the accelerator the
    model trains on, or None for JAX's default device); outputs come back as numpy arrays.
    """

    def __init__(self, geom: radon.Geometry, config: MaskConfig, seed: int = 0, device: str | None = "cpu"):
        self.geom, self.config, self.seed, self.device = geom, config, int(seed), device or None
        self._rmas = make_rmas(geom, config)

    def __call__(self, batch: dict) -> dict:
        device = jax.devices(self.device)[0] if self.device else None
        with jax.default_device(device) if device is not None else _no_context():
            key = jax.random.fold_in(jax.random.key(self.seed), _RMAS_TAG)
            out = self._rmas(key, batch)  # reads only the fields it needs
            new = jax.device_get({k: out[k] for k in OUTPUT_KEYS})
        return {**batch, **{k: np.asarray(v) for k, v in new.items()}}

    def __repr__(self) -> str:
        return f"RmasTransform(config={self.config!r}, seed={self.seed}, device={self.device!r})"


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
