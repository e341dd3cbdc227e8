"""TMA, transparent medical attention: where in the image, and so where in the sinogram, to look hardest.

DESIGN.md 2.4. A parameter-free coarse segmentation (fixed rules, nothing learned) of the image, by
default the FBP of the source sinogram, marks hypermetabolic and hypometabolic regions; the image
attention `A_img` `(..., H, W)` in [0, 1] is forward-projected into the sinogram attention
`A_sino = R(A_img) / max R(A_img)` `(..., n_angles, n_bins)` in [0, 1] (a lesion becomes a sinusoidal
band along `s = x cos(theta) + y sin(theta)`). Clinician ROIs edit `A_img` (`allpet_jax.rois`) before the
projection. `save_map_png` writes a map as an image so a person can inspect it.

The segmentation rule (constants in `TmaConfig`; lengths in mm of the geometry, levels as ratios; tuned
with `benchmarks/tma_quality.py --tune` on simulated seeds apart from the ones that benchmark reports):

1. Image `x` = FBP with a Hann window. Unit of uptake: the median of `x` smoothed at `body_sigma_mm`
   over its foreground (pixels above 5 % of its 99th percentile, inside the field-of-view disc). Every
   later threshold is a ratio to this or to a local average, so the result is invariant to a global
   scaling of the data (dose, units, calibration).
2. Body: the smoothed `x` above `body_threshold`, opened by a square of `body_opening_mm` (cuts the thin
   noise streaks that FBP of low counts leaves outside the body), holes filled (what the image border
   cannot reach through the background is body: lungs and ventricles belong to it) and kept inside
   the disc that every projection angle sees (`geom.fov_radius_mm`).
3. `xs` = `x` smoothed at `lesion_sigma_mm`. Local reference uptake `ref` = Gaussian average of `xs` over
   the body at `reference_sigma_mm` (normalised convolution, so the background outside does not drag it
   down), computed twice: the second pass averages `xs` clipped to `[0.5, 1.5] * ref` of the first, so a
   lesion does not raise its own reference. `level` = median of `xs` over the body.
4. Hyper: `xs > hyper_ratio * ref`, `xs > hyper_floor * level` and `xs - ref > hot_z * noise` inside
   the body. The floor keeps low-uptake tissue such as lung from being flagged for noise that is large
   against its small reference; `noise` is the local RMS of the pixel-scale residual (`x` minus `x`
   smoothed over one pixel, averaged over the body at `reference_sigma_mm`), so the excess must also
   stand out of the noise: at low dose fewer pixels are flagged instead of more.
5. Hypo, "well below the reference inside tissue that should take up tracer": with `xc` = `x` smoothed
   at `cold_sigma_mm` (cold lesions are larger, and missing counts are noisier than extra ones),
   *uptake* = `xc >= tissue_fraction * level` in the body eroded by `edge_mm` (the blurred outline is
   not a defect); *tissue* = uptake closed by a square of `closing_mm` (holes up to about
   `2 * closing_mm` across, i.e. lesion-sized defects, are filled; lungs, bowel gas and the background
   are not); hypo = tissue where `xc < hypo_ratio * tissue_ref` and `tissue_ref - xc > cold_z * noise`,
   with `tissue_ref` the Gaussian average of `xc` over the uptake pixels only (`reference_sigma_mm`),
   so neither the defect nor a neighbouring lung lowers it.
6. `A_img` = 1 on hyper or hypo pixels, with a Gaussian feather of `feather_mm` outside them.

What this is not: a lesion detector with a guarantee. It is a cheap, inspectable prior that flags
regions that differ strongly from their surroundings, including physiological ones (bladder, heart,
kidneys); `benchmarks/tma_quality.py` measures how it does against the phantoms' lesion labels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import radon


CALLER_KEYS = ("enabled", "sinogram_key", "alpha", "condition", "roi_file", "rois", "map")
"""`config.tma` keys that are not segmentation constants (read by the trainer and `rois.rois_from_config`)."""


@dataclasses.dataclass(frozen=True)
class TmaConfig:
    """Constants of the segmentation rule (module docstring). Lengths in mm, levels as ratios."""

    fbp_filter: str = "hann"
    fbp_cutoff: float = 1.0
    body_sigma_mm: float = 6.0
    body_threshold: float = 0.25
    body_opening_mm: float = 8.0
    lesion_sigma_mm: float = 3.5
    reference_sigma_mm: float = 10.0
    hyper_ratio: float = 1.5
    hyper_floor: float = 2.0
    hot_z: float = 2.0
    cold_sigma_mm: float = 5.0
    tissue_fraction: float = 0.3
    edge_mm: float = 10.0
    closing_mm: float = 20.0
    hypo_ratio: float = 0.6
    cold_z: float = 1.5
    feather_mm: float = 1.5

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fbp_filter":
                if value not in radon.FILTERS:
                    raise ValueError(f"TmaConfig.fbp_filter must be one of {radon.FILTERS}; got {value!r}")
                continue
            if not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"TmaConfig.{f.name} must be a finite non-negative number; got {value!r}")
        if self.hypo_ratio >= 1.0 or self.hyper_ratio <= 1.0:
            raise ValueError(
                f"TmaConfig needs hypo_ratio < 1 < hyper_ratio (below / above the local reference); "
                f"got hypo_ratio={self.hypo_ratio}, hyper_ratio={self.hyper_ratio}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TmaConfig":
        """From a `config.tma` section. `CALLER_KEYS` belong to the trainer and `rois.rois_from_config`
        and are skipped here; any other key that is not a rule constant is an error (a typo)."""
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known - set(CALLER_KEYS))
        if unknown:
            raise ValueError(f"config.tma has unknown key(s) {unknown}; known keys: {sorted(known | set(CALLER_KEYS))}")
        return cls(**{k: v for k, v in items.items() if k in known})


# ---------------------------------------------------------------------------------------------------
# Small image operators (constant matrices per geometry, so they are cheap matmuls under jit)


@functools.lru_cache(maxsize=64)
def _gaussian_matrix(n: int, sigma_px: float) -> np.ndarray:
    """`(n, n)` Gaussian smoothing along one axis with zero padding (rows sum to <= 1 near the edges)."""
    if sigma_px <= 0:
        return np.eye(n, dtype=np.float32)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma_px) ** 2) * (np.abs(d) <= 4 * sigma_px + 1)
    return (k / k[n // 2].sum()).astype(np.float32)  # interior rows sum to 1


def gaussian_blur(x, geom: radon.Geometry, sigma_mm: float):
    """Separable Gaussian smoothing of `x` `(..., H, W)` with `sigma_mm`, zero outside the image."""
    H, W = geom.image_shape
    kh = jnp.asarray(_gaussian_matrix(H, sigma_mm / geom.pixel_size))
    kw = jnp.asarray(_gaussian_matrix(W, sigma_mm / geom.pixel_size))
    return jnp.einsum("ij,...jk,lk->...il", kh, x, kw)


def _masked_blur(x, weight, geom, sigma_mm):
    """Normalised convolution: Gaussian average of `x` over pixels where `weight` > 0."""
    num = gaussian_blur(x * weight, geom, sigma_mm)
    den = gaussian_blur(weight, geom, sigma_mm)
    return num / jnp.maximum(den, 1e-6)


@functools.lru_cache(maxsize=64)
def _band_matrix(n: int, radius_px: int) -> np.ndarray:
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    return (np.abs(d) <= radius_px).astype(np.float32)


def _dilate(mask, radius_px: int):
    """Binary dilation of `mask` `(..., H, W)` bool by a `(2r+1)^2` square: a box sum (two small matrix
    products, exact on 0/1 values) is positive exactly where the square meets the mask."""
    if radius_px <= 0:
        return mask
    H, W = mask.shape[-2:]
    bh, bw = jnp.asarray(_band_matrix(H, radius_px)), jnp.asarray(_band_matrix(W, radius_px))
    return jnp.einsum("ij,...jk,lk->...il", bh, mask.astype(jnp.float32), bw) > 0.5


def masked_quantile(x, weight, q: float, iterations: int = 30):
    """The `q`-quantile of `x` `(N, H, W)` over pixels with `weight` > 0, per image -> `(N,)`.

    Bisection on the value (each step counts the pixels below the midpoint), which on CPU is several
    times faster than sorting 10^4-10^5 pixels per image; 30 halvings of the value range are below
    float32 resolution. Exactly scale-equivariant under scaling by powers of two, and to float rounding otherwise.
    """
    inside = weight > 0
    total = jnp.maximum(jnp.sum(inside, axis=(-2, -1)), 1)
    lo = jnp.min(jnp.where(inside, x, jnp.inf), axis=(-2, -1))
    hi = jnp.max(jnp.where(inside, x, -jnp.inf), axis=(-2, -1))
    lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = jnp.sum(inside & (x <= mid[:, None, None]), axis=(-2, -1)) / total
        return jnp.where(below < q, mid, lo), jnp.where(below < q, hi, mid)

    _, hi = lax.fori_loop(0, iterations, halve, (lo, hi))
    return hi


@functools.lru_cache(maxsize=16)
def _fov_disc(geom: radon.Geometry) -> np.ndarray:
    """Pixels whose centre lies within `geom.fov_radius_mm` of the centre (every angle sees them)."""
    r2 = geom.x_mm[None, :] ** 2 + geom.y_mm[:, None] ** 2
    return r2 <= geom.fov_radius_mm**2


def _fill_holes(mask):
    """`mask` plus every region not connected to the image border through `~mask` (4-neighbourhood)."""
    H, W = mask.shape[-2:]
    background = ~mask
    border = jnp.zeros(mask.shape, bool).at[..., 0, :].set(True).at[..., -1, :].set(True)
    border = border.at[..., :, 0].set(True).at[..., :, -1].set(True)
    outside0 = border & background

    def grow(state):
        outside, _ = state
        shifted = (
            outside
            | jnp.pad(outside[..., 1:, :], [(0, 0)] * (mask.ndim - 2) + [(0, 1), (0, 0)])
            | jnp.pad(outside[..., :-1, :], [(0, 0)] * (mask.ndim - 2) + [(1, 0), (0, 0)])
            | jnp.pad(outside[..., :, 1:], [(0, 0)] * (mask.ndim - 2) + [(0, 0), (0, 1)])
            | jnp.pad(outside[..., :, :-1], [(0, 0)] * (mask.ndim - 2) + [(0, 0), (1, 0)])
        )
        new = shifted & background
        return new, jnp.any(new != outside)

    outside, _ = lax.while_loop(lambda s: s[1], grow, (outside0, jnp.array(True)))
    return ~outside


# ---------------------------------------------------------------------------------------------------
# Segmentation and maps


def segment(image, geom: radon.Geometry, config: TmaConfig = TmaConfig()) -> dict:
    """Coarse hyper/hypo segmentation of `image` `(..., H, W)` (activity, e.g. an FBP).

    Returns a dict of `(..., H, W)` arrays: `body`, `tissue`, `hyper`, `hypo` (bool), `reference`
    (local reference uptake, in units of the image's 99th percentile) and `attention` (`A_img`,
    float32 in [0, 1]). Jit-compatible; batched over leading axes.
    """
    x = jnp.asarray(image, jnp.float32)
    lead = x.shape[:-2]
    features = segmentation_features(x.reshape((-1,) + geom.image_shape), geom, config)
    out = classify(features, geom, config)
    return {k: v.reshape(lead + geom.image_shape) for k, v in out.items()}


def segmentation_features(images, geom: radon.Geometry, config: TmaConfig = TmaConfig()) -> dict:
    """Steps 1-3 of the rule for images `(N, H, W)`: `xs`, `reference`, `tissue_reference`, `level`
    `(N, 1, 1)`, `body`, `inner` (the body eroded by `edge_mm`) and `tissue`. Depends on the smoothing
    lengths and `tissue_fraction`, not on the ratios, so the ratios can be tuned on features computed
    once (`benchmarks/tma_quality.py --tune`)."""
    fov = jnp.asarray(_fov_disc(geom))  # outside it FBP has only truncation streaks
    smooth = gaussian_blur(images, geom, config.body_sigma_mm)
    peak = masked_quantile(smooth, jnp.broadcast_to(fov, smooth.shape), 0.99)
    foreground = fov & (smooth > 0.05 * peak[:, None, None])
    scale = masked_quantile(smooth, foreground, 0.5)  # typical uptake: the unit of every threshold
    scale = jnp.where(scale > 0, scale, 1.0)[:, None, None]
    flat, smooth = images / scale, smooth / scale
    opening = _pixels(config.body_opening_mm, geom)  # cuts thin noise streaks off the outline
    body = _fill_holes(_dilate(~_dilate(~(smooth > config.body_threshold), opening), opening)) & fov
    weight = body.astype(jnp.float32)
    xs = gaussian_blur(flat, geom, config.lesion_sigma_mm)
    ref = _masked_blur(xs, weight, geom, config.reference_sigma_mm)
    ref = _masked_blur(jnp.clip(xs, 0.5 * ref, 1.5 * ref), weight, geom, config.reference_sigma_mm)
    level = masked_quantile(xs, weight, 0.5)
    level = jnp.where(jnp.any(body, axis=(-2, -1)), level, 1.0)[:, None, None]
    inner = ~_dilate(~body, _pixels(config.edge_mm, geom))
    xc = gaussian_blur(flat, geom, config.cold_sigma_mm)  # cold lesions are larger and need more smoothing
    uptake = inner & (xc >= config.tissue_fraction * level)
    closing = _pixels(config.closing_mm, geom)
    tissue = inner & ~_dilate(~_dilate(uptake, closing), closing)  # uptake with holes up to ~2*closing_mm filled
    tissue_ref = _masked_blur(xc, uptake.astype(jnp.float32), geom, config.reference_sigma_mm)
    # Local noise: RMS of the high-pass residual (x minus x smoothed over one pixel), averaged over the body.
    residual = flat - gaussian_blur(flat, geom, geom.pixel_size)
    noise = jnp.sqrt(_masked_blur(residual**2, weight, geom, config.reference_sigma_mm))
    return dict(xs=xs, xc=xc, reference=ref, tissue_reference=tissue_ref, level=level, body=body, inner=inner,
                tissue=tissue, noise=noise)


def _pixels(length_mm: float, geom: radon.Geometry) -> int:
    return int(round(length_mm / geom.pixel_size))


def classify(features: dict, geom: radon.Geometry, config: TmaConfig = TmaConfig()) -> dict:
    """Steps 4-5 of the rule on `segmentation_features`: `body`, `tissue`, `hyper`, `hypo`, `reference`,
    `attention`."""
    xs, ref, level, body, tissue = (features[k] for k in ("xs", "reference", "level", "body", "tissue"))
    noise, xc, tref = features["noise"], features["xc"], features["tissue_reference"]
    hyper = body & (xs > config.hyper_ratio * ref) & (xs > config.hyper_floor * level) & (xs - ref > config.hot_z * noise)
    hypo = tissue & (xc < config.hypo_ratio * tref) & (tref - xc > config.cold_z * noise)
    flagged = (hyper | hypo).astype(jnp.float32)
    attention = jnp.clip(jnp.maximum(flagged, gaussian_blur(flagged, geom, config.feather_mm)), 0.0, 1.0)
    return dict(body=body, tissue=tissue, hyper=hyper, hypo=hypo, reference=ref, attention=attention)


def sinogram_attention(image_attention, geom: radon.Geometry):
    """`A_sino = R(A_img) / max R(A_img)` per map: `(..., H, W)` -> `(..., n_angles, n_bins)` in [0, 1].

    A map with no attention gives zeros. The normalisation is per map, so editing one region rescales
    the whole sinogram map; the unnormalised `radon.forward(A_img)` changes only on rays through the edit.
    """
    proj = radon.forward(jnp.asarray(image_attention, jnp.float32), geom)
    peak = jnp.max(proj, axis=(-2, -1), keepdims=True)
    return jnp.where(peak > 0, jnp.clip(proj, 0.0, None) / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("geom", "config"))
def attention_maps(sino, geom: radon.Geometry, config: TmaConfig = TmaConfig()) -> dict:
    """TMA of sinograms `sino` `(..., n_angles, n_bins)`: `segment(FBP(sino))` plus `image` (the
    FBP) and `sino_attention` (`A_sino`). Jit-compiled; batched over leading axes."""
    image = radon.fbp(sino, geom, config.fbp_filter, config.fbp_cutoff)
    maps = segment(image, geom, config)
    maps["image"] = image
    maps["sino_attention"] = sinogram_attention(maps["attention"], geom)
    return maps


@functools.partial(jax.jit, static_argnames=("geom", "config"))
def attention_maps_from_image(image, geom: radon.Geometry, config: TmaConfig = TmaConfig()) -> dict:
    """TMA of known images `(..., H, W)` (no FBP): `segment(image)` plus `sino_attention`."""
    maps = segment(image, geom, config)
    maps["sino_attention"] = sinogram_attention(maps["attention"], geom)
    return maps


def save_map_png(array, path, cmap: str = "inferno", vmin: float | None = 0.0, vmax: float | None = 1.0) -> str:
    """Write a 2-D map `(H, W)` or `(n_angles, n_bins)` to `path` as a PNG (one pixel per value, row 0
    at the top, i.e. as `radon` lays images out). Returns the path."""
    import matplotlib.image

    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"save_map_png needs one 2-D map; got shape {arr.shape} (index a batch first)")
    matplotlib.image.imsave(path, arr, cmap=cmap, vmin=vmin, vmax=vmax)
    return str(path)
