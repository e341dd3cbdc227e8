"""Paired PET sinograms for the six ALL-PET tasks, simulated from random phantoms with clinical physics.

`simulate_pair(key, task, geom, **options)` draws one phantom (`phantoms.py`), its tracer kinetics
(`kinetics.py`), and measures it with a 2D PET scanner model; the result is a dict of float32 jax arrays
(int32 where stated):

- `source` `(C_src, n_angles, n_bins)`, `target` `(C_tgt, n_angles, n_bins)`: the task's pair;
- `target_clean`: the noise-free expectation of `target` (same shape);
- `image` `(C_tgt, H, W)`: the activity of the target frame(s), kBq/mL (mean over the frame, not decay
  corrected), before detector blur;
- `mu` `(H, W)`: 511 keV attenuation map, 1/mm; `labels` `(H, W)` int32 (`phantoms.LABELS` ids);
- `prompt` int32 `[tracer_id, region_id, task_id]` (indices into `TRACERS`, `REGIONS`, `TASKS`);
- `dose` `()`: the dose fraction of the source (1 except `low_dose`);
- `count_scale` `(C_tgt,)`: counts per (kBq/mL x mm), so that
  `target_clean[c] = count_scale[c] * psf(radon.forward(image[c], geom))`, where `psf` is the Gaussian
  detector blur along the bins (`resolution_mm` FWHM). FBP of `target / count_scale` estimates `image`.
  `geom`'s sizes only fix a ratio: the physical geometry of a sample, in mm, is
  `physical_geometry(geom, region)` (pixel `phantoms.FOV_MM[region] / max(H, W)`).
With `diagnostics=True` also, for the acquisitions behind source and target: `source_counts`,
`target_counts` `(3,)`, their expected detected trues, scatter and randoms (what the realism numbers
below are measured from); `source_prompts`, `target_prompts` `(C, n_angles, n_bins)`, the Poisson
prompts (for `tracer_separation` targets: each tracer's true counts), and `source_mean`, `target_mean`
their Poisson means; `normalisation` (`eta`) and `attenuation` (`a`), `(n_angles, n_bins)`; and
`source_scatter`, `source_randoms`, `target_scatter`, `target_randoms` `(C, n_angles, n_bins)`, the
expected scatter `s` and randoms `r` of each acquisition in the units of the model below (before `eta`),
so that `source_mean == eta * (a * t_src + source_scatter + source_randoms)` and likewise for the target,
with `t_src = dose * target_clean` for `low_dose` and `t_src = target_clean` for `attenuation_correction`
(the same acquisition). `synthesis` has no source acquisition (all zeros), and `tracer_separation`'s
source is the mixture (`t_src = sum of target_clean`) while its target channels are each tracer's trues
alone, whose scatter and randoms are zero.

Sinogram convention: corrected counts
-------------------------------------
The scanner records prompts `y ~ Poisson(eta * (a * t + s + r))` per bin and frame: trues `t` (line
integrals of activity x scanner sensitivity x frame duration, blurred by the detector response),
attenuation factors `a = exp(-R mu)`, crystal-pair efficiencies `eta`, scatter `s` and randoms `r`.
**Every returned sinogram is the prompts corrected the way clinical reconstructions correct them, using
the exact expected `eta`, `r`, `s` and `a`** (perfect corrections; the noise is the prompts' Poisson
noise, amplified by the corrections and with the randoms' and scatter's variance in it):

    corrected = (y / eta - r - s) / a          (its mean is t: "trues, attenuation-corrected")

so every sinogram is in counts, non-negative in expectation but not sample by sample, and FBP of it gives
the activity. The single exception is the `attenuation_correction` source, which is *non-attenuation-
corrected* (NAC) data: `y / eta - r`, normalised and randoms-corrected but neither attenuation- nor
scatter-corrected (scatter correction needs the attenuation map), as in clinical NAC images. Sinograms
are not decay corrected: a delayed frame has fewer counts, as measured.

Tasks (`TASKS`, named in `allpet_jax/tasks.py`) and their pairs; source and target come from the same phantom
-------------------------------------------------------------------------------------------------------------
- `synthesis`: target = one full-dose frame; source = zeros (1 channel): generation is conditioned on
  the prompt only.
- `low_dose`: source = a separate acquisition at dose fraction `d` (default drawn from
  `DOSE_FRACTIONS` = 1/4, 1/10, 1/20, 1/50, 1/100: trues and scatter x d, randoms x d^2 since the randoms
  rate goes with the singles rate squared), corrected and divided by `d` (dose-normalised, so its mean
  equals the target's); target = the full-dose frame.
- `attenuation_correction`: source = NAC data of one frame; target = the same counts fully corrected.
- `delayed_frame`: source = the standard frame (e.g. FDG 60-70 min p.i.); target = a frame 60 min later
  (120-130 min) of the same injection: decay and washout/uptake change counts and contrast (tumours keep
  accumulating FDG, liver washes out). 18F and 68Ga tracers only.
- `tracer_conversion`: source = an 18F-FDG scan; target = a second-tracer scan of the same anatomy
  (`tracer`, default 18F-DOPA for the brain, 68Ga-PSMA or 18F-DOPA for the body), each at its standard
  uptake time and injected activity, with independent noise.
- `tracer_separation`: one acquisition of a dual-tracer study: 18F-FDG injected at 0 min and an 11C tracer
  (`tracer`, default 11C-methionine for the brain, 11C-methionine or 11C-acetate for the body) injected
  40 min later, frame 60-70 min after FDG (20-30 min after the 11C tracer). Source = the corrected
  mixture (1 channel); target = the two tracers' own corrected true counts in that same acquisition
  (channel 0 FDG, channel 1 the 11C tracer), so that target channels + background noise = source.
  The prompt's tracer id is the second tracer (for `tracer_conversion`, the target tracer).

Count levels and background (defaults, each drawn per sample; override with options)
-------------------------------------------------------------------------------------
- Trues: the full-dose reference acquisition (the source frame; the mixture in `tracer_separation`) has
  `counts` expected detected trues per 2D slice, log-uniform in `COUNTS_RANGE` = 1e5-1e6 (a clinical
  static frame of one direct slice). Every other frame of the sample follows from the physics at the same
  scanner sensitivity: activity, decay and injected dose. Measured over 64 samples per task: a frame
  60 min later has 0.64x the counts (5-95 %: 0.49-0.87x); the conversion target 0.52x the FDG scan's
  (0.15-1.9x: brain FDOPA ~0.17x, abdominal 68Ga-PSMA with its kidneys up to ~2x).
- Scatter: a smooth, wide sinogram: the attenuated trues blurred along the bins by a Gaussian of FWHM
  `SCATTER_FWHM_MM` (brain 100 mm, body 150 mm), so it extends past the body like real scatter tails;
  scatter fraction SF = S / (T + S) (NEMA NU 2 definition) uniform in `SCATTER_FRACTION_RANGE`: brain
  15-25 %, body 30-40 % (3D whole-body PET).
- Randoms: smooth and nearly uniform over the whole sinogram (delayed-window coincidences come from
  the whole field of view), with a mild bump over the object (singles are higher there): shape
  `1 + blur(R mu) / max`; randoms fraction RF = R / (T + S + R) of the reference acquisition uniform in
  `RANDOMS_FRACTION_RANGE` 10-30 %, other acquisitions scaled with the squared trues ratio (low dose:
  d^2).
- Normalisation `eta`: a ring of `2 n_angles` crystals in blocks of 8, crystal efficiencies = block
  profile (edge crystals -12 %, next -5 %) x 4 % random variation, `eta = eps_i eps_j g(s)` for the two
  crystals of each line of response with a mild radial geometric factor `g`, normalised to mean 1
  (the diagonal stripe pattern of real PET sinograms).
- Detector response: Gaussian blur along the bins, FWHM `resolution_mm` (default 4.5 mm, clinical
  PET/CT); `image` is the unblurred truth.
- Attenuation factors `a = exp(-R(mu))` of the returned `mu`, projected together with the activities
  (central lines of response: body ~0.02-0.1, head ~0.18-0.21; minimum ~0.01 in the pelvis).
- Measured with `diagnostics=True` (64 samples per task, 128x128, 128 angles): full-dose trues median
  2.4e5-3.3e5 per slice by region (5-95 %: 1.2e5-8.9e5); SF brain 0.16-0.24, body 0.31-0.40; RF of
  the reference 0.11-0.29; low-dose sources at 1/4-1/100: 2e3-1.6e5 trues, RF 0.2-9 %; delayed
  frames RF 0.07-0.26; conversion targets RF 0.03-0.42 (randoms follow their activity squared).

Options (keyword arguments, all static Python values; None = drawn from the key)
--------------------------------------------------------------------------------
`region` (name), `tracer` (name, see above), `dose` (low_dose: fraction in (0, 1]), `counts`,
`scatter_fraction`, `randoms_fraction`, `lesions` (bool), `max_hot_lesions`, `max_cold_lesions`,
`fov_mm` (default region's `phantoms.FOV_MM`), `resolution_mm`, `supersample`, `diagnostics`.
Invalid names or values raise `ValueError` naming the valid choices.

Speed: the whole sample is one jit-able, vmappable function of the key for a static `task`, `geom` and
options; randomness only through the key. Poisson sampling uses `poisson` below (exact inversion for
means < 16, a Cornish-Fisher-corrected normal quantile above, total-variation distance < 1.3e-3 from
Poisson), since `jax.random.poisson` is ~20x slower on CPU here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from allpet_jax.data import kinetics, phantoms
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import LABEL_IDS, REGIONS
from allpet_jax.tasks import TASKS
from radon.geometry import Geometry
from radon.projector import forward

DOSE_FRACTIONS = (1 / 4, 1 / 10, 1 / 20, 1 / 50, 1 / 100)
"""Dose fractions drawn for `low_dose` when `dose` is not given."""
COUNTS_RANGE = (1e5, 1e6)
"""Expected detected trues of the full-dose reference acquisition per 2D slice (log-uniform)."""
SCATTER_FRACTION_RANGE = {"brain": (0.15, 0.25), "chest": (0.30, 0.40), "abdomen": (0.30, 0.40), "trunk": (0.30, 0.40)}
"""Scatter fraction S / (T + S), uniform in this range per region."""
RANDOMS_FRACTION_RANGE = (0.10, 0.30)
"""Randoms fraction R / (T + S + R) of the full-dose reference acquisition, uniform in this range."""
SCATTER_FWHM_MM = {"brain": 100.0, "chest": 150.0, "abdomen": 150.0, "trunk": 150.0}
"""Width (FWHM, mm along the detector) of the Gaussian that turns attenuated trues into scatter."""
DELAY_MIN = 60.0
"""`delayed_frame`: the target frame starts this many minutes after the source frame."""
SECOND_TRACER_DELAY_MIN = 40.0
"""`tracer_separation`: the 11C tracer is injected this many minutes after 18F-FDG."""

# Which tracers are drawn by default in which region (rows REGIONS, columns TRACERS).
DEFAULT_TRACERS = {
    "brain": ("18F-FDG", "18F-DOPA", "11C-methionine"),
    "chest": ("18F-FDG", "68Ga-PSMA", "11C-methionine", "11C-acetate"),
    "abdomen": ("18F-FDG", "18F-DOPA", "68Ga-PSMA", "11C-methionine", "11C-acetate"),
    "trunk": ("18F-FDG", "68Ga-PSMA", "11C-methionine", "11C-acetate"),
}
# Tracers each task accepts for `tracer` (and draws from, within DEFAULT_TRACERS / the pair defaults).
_TASK_TRACERS = {
    "synthesis": TRACERS,
    "low_dose": TRACERS,
    "attenuation_correction": TRACERS,
    "delayed_frame": ("18F-FDG", "18F-DOPA", "68Ga-PSMA"),
    "tracer_conversion": ("18F-DOPA", "68Ga-PSMA", "11C-methionine", "11C-acetate"),
    "tracer_separation": ("11C-methionine", "11C-acetate"),
}
_PAIR_DEFAULTS = {
    "tracer_conversion": {"brain": ("18F-DOPA",), "chest": ("68Ga-PSMA",), "abdomen": ("18F-DOPA", "68Ga-PSMA"),
                          "trunk": ("68Ga-PSMA",)},
    "tracer_separation": {"brain": ("11C-methionine",), "chest": ("11C-methionine", "11C-acetate"),
                          "abdomen": ("11C-methionine", "11C-acetate"), "trunk": ("11C-methionine", "11C-acetate")},
}
_FDG = TRACERS.index("18F-FDG")

DIAGNOSTICS = ("source_counts", "target_counts", "source_prompts", "target_prompts", "source_mean", "target_mean",
               "normalisation", "attenuation", "source_scatter", "source_randoms", "target_scatter", "target_randoms")
"""The keys `simulate_pair` adds with `diagnostics=True`."""

_OPTIONS = ("region", "tracer", "dose", "counts", "scatter_fraction", "randoms_fraction", "lesions",
            "max_hot_lesions", "max_cold_lesions", "fov_mm", "resolution_mm", "supersample", "diagnostics")


# --- Poisson sampling ----------------------------------------------------------------------------------

_POISSON_SMALL = 16.0
_POISSON_TERMS = 48  # P(X >= 48 | mean 16) < 1e-10


def poisson(key, mean):
    """Poisson counts with the given non-negative `mean` (any shape), float32, one uniform per count.

    Means below 16: exact inversion of the CDF (the first `k` with `u <= F(k)`, by the pmf recursion,
    in unrolled blocks so XLA fuses them). Means of 16 and above: the Cornish-Fisher expansion of the Poisson
    quantile to third order, `k = ceil(m + sqrt(m) w(z) - 1/2)` with `z` the normal quantile of `u`;
    its total-variation distance from Poisson is 1.3e-3 at a mean of 16 and falls as 1/m. Randomness only
    through `key`.
    """
    mean = jnp.asarray(mean, jnp.float32)
    u = jax.random.uniform(key, mean.shape, minval=1e-7, maxval=1.0)
    m_small = jnp.minimum(mean, _POISSON_SMALL)

    def step(i, state):  # k counts the CDF values below u
        k, p, F = state
        k = k + (u > F)
        p = p * m_small / i.astype(jnp.float32)
        return k, p, F + p

    p0 = jnp.exp(-m_small)
    k, _, _ = jax.lax.fori_loop(1, _POISSON_TERMS, step, (jnp.zeros_like(mean), p0, p0), unroll=8)
    # float32 rounding can leave F just below 1; cap such rare draws at a 6-sigma quantile.
    k = jnp.minimum(k, m_small + 6.0 * jnp.sqrt(m_small) + 6.0)
    m = jnp.maximum(mean, _POISSON_SMALL)
    z = ndtri(u)
    g1, g2 = jax.lax.rsqrt(m), 1.0 / m
    w = z + (z * z - 1.0) * g1 / 6.0 + (z**3 - 3.0 * z) * g2 / 24.0 - (2.0 * z**3 - 5.0 * z) * g1 * g1 / 36.0
    big = jnp.maximum(jnp.ceil(m + jnp.sqrt(m) * w - 0.5), 0.0)
    return jnp.where(mean < _POISSON_SMALL, k, big)


# --- scanner model -------------------------------------------------------------------------------------


def _gaussian_matrix(n, sigma_bins):
    """`(n, n)` Gaussian blur along the bins (sigma in bins, traced), each row normalised by the full
    Gaussian's sum."""
    d = jnp.arange(n, dtype=jnp.float32)
    sigma = jnp.maximum(sigma_bins, 1e-3)
    w = jnp.exp(-0.5 * ((d[:, None] - d[None, :]) / sigma) ** 2)
    # Normalise by the full Gaussian's sum, not the truncated row's, so what blurs off the edge is lost.
    full = jnp.sum(jnp.exp(-0.5 * (jnp.arange(-3 * n, 3 * n + 1, dtype=jnp.float32) / sigma) ** 2))
    return w / full


def _blur_bins(sino, sigma_bins):
    return sino @ _gaussian_matrix(sino.shape[-1], sigma_bins).T


_PROJECT_CHUNK = 16


def _chunked_forward(x, geom: Geometry):
    """`radon.forward` of `(..., H, W)` in chunks of `_PROJECT_CHUNK` images: on CPU its cost per image
    grows with the batch beyond ~16 images (measured 2.7 ms/image in chunks of 16 vs 7 ms/image for 64
    at once, 128x128, 128 angles)."""
    lead = x.shape[:-2]
    flat = x.reshape((-1,) + geom.image_shape)
    n = flat.shape[0]
    if n <= _PROJECT_CHUNK:
        return forward(x, geom)
    flat = jnp.pad(flat, ((0, (-n) % _PROJECT_CHUNK), (0, 0), (0, 0)))
    chunks = flat.reshape((-1, _PROJECT_CHUNK) + geom.image_shape)
    sinos = jax.lax.map(lambda c: forward(c, geom), chunks)
    return sinos.reshape((-1,) + geom.sino_shape)[:n].reshape(lead + geom.sino_shape)


@functools.lru_cache(maxsize=32)
def _projector(geom: Geometry):
    """`radon.forward` for `geom` that stays a batched projection under `jax.vmap`.

    The projector handles leading axes natively (batch moved next to the pixels); vmapping it instead
    turns its gathers into batched gathers, measured ~3x slower. So the vmap rule projects the stacked
    batch, in chunks (`_chunked_forward`). (Not differentiable; the simulator needs no gradients.)
    """

    @jax.custom_batching.custom_vmap
    def project(x):
        return _chunked_forward(x, geom)

    @project.def_vmap
    def _(axis_size, in_batched, x):
        return project(x), True

    return project


def normalisation_tables(geom: Geometry):
    """Static crystal indices `(2, n_angles, n_bins)` of each line of response and its radial factor."""
    theta = geom.theta[:, None]
    s = geom.s_mm[None, :]
    radius = 1.25 * max(np.abs(geom.s_mm).max(), 1e-6) + geom.bin_spacing
    beta = np.arccos(np.clip(s / radius, -1.0, 1.0))
    n_crystals = 2 * geom.n_angles
    idx = [np.floor(np.mod(theta + sgn * beta, 2 * np.pi) / (2 * np.pi) * n_crystals).astype(np.int32) % n_crystals
           for sgn in (1.0, -1.0)]
    radial = (1.0 - 0.08 * (s / radius) ** 2) * np.ones_like(theta)
    return np.stack(idx), radial.astype(np.float32), n_crystals


_BLOCK = np.array([0.88, 0.95, 1.0, 1.0, 1.0, 1.0, 0.95, 0.88], np.float32)


def normalisation(z, geom: Geometry):
    """Crystal-pair efficiencies `eta` `(n_angles, n_bins)`, mean 1, from `z` `(2 n_angles,)` standard
    normal numbers (one per crystal: 4 % efficiency variation on top of the block profile)."""
    idx, radial, n_crystals = normalisation_tables(geom)
    eps = jnp.asarray(np.resize(_BLOCK, n_crystals)) * jnp.exp(0.04 * z)
    eta = eps[idx[0]] * eps[idx[1]] * radial
    return eta / jnp.mean(eta)


# --- options -------------------------------------------------------------------------------------------


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


def _number(name, value, lo, hi, *, lo_open=False, integer=False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value) == int(value)
    if ok:
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in {'(' if lo_open else '['}{lo}, {hi}]; got {value!r}")
    return int(value) if integer else float(value)


def _check(task, geom, options):
    _choice("task", task, TASKS)
    if not isinstance(geom, Geometry):
        raise ValueError(f"geom must be a radon.Geometry; got {type(geom).__name__}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown simulate_pair option(s) {unknown}; valid options are {_OPTIONS}")
    o = dict(region=None, tracer=None, dose=None, counts=None, scatter_fraction=None, randoms_fraction=None,
             lesions=True, max_hot_lesions=4, max_cold_lesions=3, fov_mm=None, resolution_mm=4.5, supersample=1,
             diagnostics=False)
    o.update(options)
    if o["region"] is not None:
        _choice("region", o["region"], REGIONS)
    if o["tracer"] is not None:
        _choice(f"tracer for task {task!r}", o["tracer"], _TASK_TRACERS[task])
    if o["dose"] is not None:
        if task != "low_dose":
            raise ValueError(f"dose applies to task 'low_dose' only; got dose={o['dose']!r} for task {task!r}")
        o["dose"] = _number("dose (fraction of the full dose)", o["dose"], 0.0, 1.0, lo_open=True)
    if o["counts"] is not None:
        o["counts"] = _number("counts (expected trues per slice)", o["counts"], 0.0, 1e12, lo_open=True)
    for name in ("scatter_fraction", "randoms_fraction"):
        if o[name] is not None:
            o[name] = _number(name, o[name], 0.0, 0.9)
    if not isinstance(o["lesions"], (bool, np.bool_)):
        raise ValueError(f"lesions must be True or False; got {o['lesions']!r}")
    for name in ("max_hot_lesions", "max_cold_lesions"):
        o[name] = _number(name, o[name], 0, 16, integer=True)
    if o["fov_mm"] is not None:
        o["fov_mm"] = _number("fov_mm", o["fov_mm"], 0.0, 1e4, lo_open=True)
    o["resolution_mm"] = _number("resolution_mm (FWHM)", o["resolution_mm"], 0.0, 100.0)
    o["supersample"] = _number("supersample", o["supersample"], 1, 8, integer=True)
    return o


def _draw_region_tracer(draws, task, region, tracer):
    """Region id and tracer id (traced ints): given ones fixed, the rest drawn from the defaults."""
    task_tracers = _TASK_TRACERS[task]

    def default_set(reg_name):
        if task in _PAIR_DEFAULTS:
            return _PAIR_DEFAULTS[task][reg_name]
        return tuple(t for t in DEFAULT_TRACERS[reg_name] if t in task_tracers)

    allowed = np.zeros((len(REGIONS), len(TRACERS)), bool)
    for ri, reg_name in enumerate(REGIONS):
        for t in default_set(reg_name):
            allowed[ri, TRACERS.index(t)] = True
    if region is not None:
        reg = jnp.int32(REGIONS.index(region))
    else:
        ok = allowed[:, TRACERS.index(tracer)] if tracer is not None else allowed.any(axis=1)
        if not ok.any():  # a tracer no region uses by default: any region
            ok = np.ones(len(REGIONS), bool)
        reg = draws.categorical(jnp.where(jnp.asarray(ok), 0.0, -jnp.inf))
    if tracer is not None:
        trc = jnp.int32(TRACERS.index(tracer))
    else:
        logits = jnp.where(jnp.asarray(allowed)[reg], 0.0, -jnp.inf)
        trc = draws.categorical(logits)
    return reg, trc


# --- the simulator -------------------------------------------------------------------------------------


def _frame_values(tracer_id, t0, key, tracer_scale):
    """Label activities `(n_labels,)` in kBq/mL for the frame `[t0, t0 + FRAME_MIN]` (min after this
    tracer's injection), and the hot lesions' `(n_hot,)` (tumour kinetics x per-lesion scale)."""
    kin, plasma = kinetics.sample_kinetics(key, tracer_id)
    half = jnp.asarray(kinetics.TRACER_HALF_LIFE_MIN)[tracer_id]
    dose = jnp.asarray(kinetics.INJECTED_MBQ_PER_KG)[tracer_id]
    suv = kinetics.frame_activity(t0, t0 + kinetics.FRAME_MIN, kin, plasma, half)
    values = suv * dose
    return values, values[LABEL_IDS["lesion_hot"]] * tracer_scale


def _scatter_randoms(att, eta, sigma_scatter_bins, randoms_shape, sf, randoms_total):
    """Scatter (with fraction `sf` of trues + scatter) and randoms (summing to `randoms_total` detected)."""
    blurred = _blur_bins(att, sigma_scatter_bins)
    trues = jnp.sum(eta * att)
    scatter = blurred * (sf / (1.0 - sf)) * trues / jnp.maximum(jnp.sum(eta * blurred), 1e-20)
    randoms = randoms_shape * randoms_total / jnp.sum(eta * randoms_shape)
    return scatter, randoms


def physical_geometry(geom: Geometry, region: str | None, fov_mm: float | None = None) -> Geometry:
    """The geometry, in physical mm, of what `simulate_pair(key, task, geom, region=region, fov_mm=fov_mm)`
    returns: `geom` with pixel `fov_mm / max(H, W)` mm (`fov_mm` default `phantoms.FOV_MM[region]`, as
    `phantoms.sample_anatomy` sets it) and bin spacing `geom.bin_spacing` scaled by the same factor (the
    simulator takes only the ratio of `geom`'s sizes), so `radon.forward(mu, physical_geometry(...))` is the
    sample's `-log(attenuation)` and lengths in mm (TMA, clinician ROIs) are true mm. Angles are kept.
    `region` may be None when `fov_mm` is given (every region then has that field of view).
    """
    if fov_mm is None:
        fov = phantoms.FOV_MM[_choice("region", region, REGIONS)]
    else:
        fov = _number("fov_mm", fov_mm, 0.0, 1e4, lo_open=True)
    pixel_mm = fov / max(geom.image_shape)
    return dataclasses.replace(geom, pixel_size=pixel_mm, bin_spacing=geom.bin_spacing * pixel_mm / geom.pixel_size)


def simulate_pair(key, task: str, geom: Geometry, **options) -> dict:
    """One simulated `(source, target)` pair of `task` and its ground truth (see the module docstring).

    Args:
      key: a `jax.random` key; the sample is a pure function of it (and of `task`, `geom`, `options`).
      task: one of `TASKS`.
      geom: the `radon.Geometry` of image and sinogram (static); its `pixel_size`/`bin_spacing` only
        fix the sampling ratio: the physical pixel is `fov_mm / max(H, W)` (see `phantoms`).
      **options: see the module docstring; static Python values.
    """
    o = _check(task, geom, options)
    H, W = geom.image_shape
    A, B = geom.sino_shape
    k_draws, k_anat, k_kin0, k_kin1, k_noise = jax.random.split(key, 5)
    n_hot, n_cold = o["max_hot_lesions"], o["max_cold_lesions"]
    draws = phantoms.Draws(k_draws, 2 * len(REGIONS) + 2 * len(TRACERS) + 8 + 2 * n_hot + n_cold + 2 * A)
    reg, trc = _draw_region_tracer(draws, task, o["region"], o["tracer"])

    anatomy = phantoms.sample_anatomy(k_anat, reg, fov_mm=o["fov_mm"], image_size=max(H, W), lesions=o["lesions"],
                                      max_hot_lesions=n_hot, max_cold_lesions=n_cold)

    # Per-lesion contrast: hot lesions scale the tumour curve (log-normal, sd 0.5, 0.3-3x); a second
    # tracer sees each lesion with an independent extra factor. Cold lesions keep 10-60 % of the host.
    hot_scale = jnp.clip(jnp.exp(0.5 * draws.normal((n_hot,))), 0.3, 3.0)
    hot_scale2 = hot_scale * jnp.clip(jnp.exp(0.5 * draws.normal((n_hot,))), 0.2, 5.0)
    cold_factor = draws.uniform((n_cold,), minval=0.1, maxval=0.6)

    # Activity channels of the task: (tracer id, frame start in min after that tracer's injection).
    t_std = jnp.asarray(kinetics.FRAME_START_MIN)[trc]
    t_fdg = float(kinetics.FRAME_START_MIN[_FDG])
    if task == "delayed_frame":
        chans = [(trc, t_std, k_kin0, hot_scale), (trc, t_std + DELAY_MIN, k_kin0, hot_scale)]
    elif task == "tracer_conversion":
        chans = [(_FDG, t_fdg, k_kin0, hot_scale), (trc, t_std, k_kin1, hot_scale2)]
    elif task == "tracer_separation":
        chans = [(_FDG, t_fdg, k_kin0, hot_scale), (trc, t_fdg - SECOND_TRACER_DELAY_MIN, k_kin1, hot_scale2)]
    else:
        chans = [(trc, t_std, k_kin0, hot_scale)]
    n_act = len(chans)
    stacked = [jnp.stack([jnp.asarray(c[i]) for c in chans]) for i in range(4)]
    vals, hots = jax.vmap(_frame_values)(*stacked)  # one copy of the kinetics code for all channels
    mu_vals = phantoms.mu_values(anatomy)
    values = jnp.concatenate([vals.T, mu_vals[:, None]], axis=-1)  # (L, n_act + 1)
    hot_values = jnp.concatenate([hots.T, jnp.full((n_hot, 1), phantoms.MU_511_PER_MM[LABEL_IDS["lesion_hot"]])], -1)
    cold_factors = jnp.concatenate([jnp.repeat(cold_factor[:, None], n_act, 1), jnp.ones((n_cold, 1))], -1)
    textured = jnp.array([1.0] * n_act + [0.0])
    labels, rendered = phantoms.render(anatomy, (H, W), values, hot_values=hot_values, cold_factors=cold_factors,
                                       textured=textured, supersample=o["supersample"])
    activity, mu = rendered[:n_act], rendered[n_act]

    # Scanner: geometry units -> mm, detector blur, attenuation, normalisation, scatter and randoms.
    mm = anatomy.pixel_mm / geom.pixel_size  # physical mm per geometry unit
    bin_mm = geom.bin_spacing * mm
    sigma_psf = o["resolution_mm"] / (2.3548 * bin_mm)
    lines = _projector(geom)(rendered) * mm  # activities and mu in one projection, physical mm
    proj = _blur_bins(lines[:n_act], sigma_psf)  # (n_act, A, B) kBq/mL x mm, detector-blurred
    mu_int = lines[n_act]  # R(mu), dimensionless
    att = jnp.exp(-mu_int)
    eta = normalisation(draws.normal((2 * A,)), geom)
    sf_lo = jnp.asarray([SCATTER_FRACTION_RANGE[r][0] for r in REGIONS])[reg]
    sf_hi = jnp.asarray([SCATTER_FRACTION_RANGE[r][1] for r in REGIONS])[reg]
    sf = draws.uniform(minval=sf_lo, maxval=sf_hi) if o["scatter_fraction"] is None else o["scatter_fraction"]
    rf = (draws.uniform(minval=RANDOMS_FRACTION_RANGE[0], maxval=RANDOMS_FRACTION_RANGE[1])
          if o["randoms_fraction"] is None else o["randoms_fraction"])
    lo, hi = COUNTS_RANGE
    counts = (lo * jnp.exp(draws.uniform() * math.log(hi / lo))) if o["counts"] is None else o["counts"]
    sigma_scatter = jnp.asarray([SCATTER_FWHM_MM[r] for r in REGIONS])[reg] / (2.3548 * bin_mm)
    r_shape = _blur_bins(mu_int, sigma_scatter)
    r_shape = 1.0 + r_shape / jnp.maximum(jnp.max(r_shape), 1e-20)

    # Sensitivity: the reference acquisition (channel 0; the mixture when tracers are separated) has
    # `counts` detected trues; all other acquisitions of the sample use the same counts per activity.
    ref_att = att * (jnp.sum(proj, 0) if task == "tracer_separation" else proj[0])
    sens = counts / jnp.sum(eta * ref_att)
    trues_free = sens * proj  # (n_act, A, B) expected attenuation-corrected trues
    trues_att = att * trues_free
    ref_trues = counts
    ref_scatter_total = sf / (1.0 - sf) * ref_trues
    ref_randoms_total = rf / (1.0 - rf) * (ref_trues + ref_scatter_total)

    def background(att_trues):
        """Scatter and randoms of an acquisition with these attenuated trues (randoms ~ trues^2)."""
        ratio = jnp.sum(eta * att_trues) / ref_trues
        return _scatter_randoms(att_trues, eta, sigma_scatter, r_shape, sf, ref_randoms_total * ratio**2)

    def corrected(y, scatter, randoms):
        return (y / eta - scatter - randoms) / att

    def totals(att_trues, scatter, randoms):
        return jnp.stack([jnp.sum(eta * att_trues), jnp.sum(eta * scatter), jnp.sum(eta * randoms)])

    # The Poisson means of every acquisition of the task, sampled in one call; `src`/`tgt` index the
    # acquisitions behind the source and target (for the diagnostics).
    dose = jnp.float32(1.0)
    if task == "tracer_separation":
        mixture = jnp.sum(trues_att, 0)
        s, r = background(mixture)
        means = eta * jnp.stack([trues_att[0], trues_att[1], s + r])
        y = poisson(k_noise, means)
        source = corrected(y[0] + y[1] + y[2], s, r)[None]
        target = y[:2] / (eta * att)  # each tracer's own true counts in this acquisition, corrected
        target_clean, image = trues_free, activity
        src_counts = tgt_counts = totals(mixture, s, r)
        src_y, src_mean, tgt_y, tgt_mean = jnp.sum(y, 0)[None], jnp.sum(means, 0)[None], y[:2], means[:2]
        src_bg = (s[None], r[None])
        tgt_bg = (jnp.zeros_like(tgt_mean), jnp.zeros_like(tgt_mean))  # each tracer's trues alone
    else:
        s0, r0 = background(trues_att[0])
        acq = [trues_att[0] + s0 + r0]
        if task == "low_dose":
            if o["dose"] is None:
                dose = jnp.asarray(DOSE_FRACTIONS, jnp.float32)[draws.integers((), len(DOSE_FRACTIONS))]
            else:
                dose = jnp.float32(o["dose"])
            # A lower injected dose: trues and scatter scale with it, randoms with its square.
            ya, sd, rd = dose * trues_att[0], dose * s0, dose * dose * r0
            acq.append(ya + sd + rd)
        elif task in ("delayed_frame", "tracer_conversion"):
            s1, r1 = background(trues_att[1])
            acq.append(trues_att[1] + s1 + r1)
        means = eta * jnp.stack(acq)
        y = poisson(k_noise, means)
        first = corrected(y[0], s0, r0)[None]
        tgt_counts = src_counts = totals(trues_att[0], s0, r0)
        target, target_clean, image = first, trues_free[:1], activity[:1]
        src, tgt = 0, 0
        src_bg = tgt_bg = (s0[None], r0[None])
        if task == "synthesis":
            source, src_counts = jnp.zeros_like(first), jnp.zeros(3)
        elif task == "attenuation_correction":
            source = (y[0] / eta - r0)[None]  # NAC: normalisation- and randoms-corrected only
        elif task == "low_dose":
            source = corrected(y[1], sd, rd)[None] / dose
            src_counts, src = totals(ya, sd, rd), 1
            src_bg = (sd[None], rd[None])
        else:  # delayed_frame, tracer_conversion
            source, target = first, corrected(y[1], s1, r1)[None]
            target_clean, image = trues_free[1:], activity[1:]
            tgt_counts, tgt = totals(trues_att[1], s1, r1), 1
            tgt_bg = (s1[None], r1[None])
        src_y, src_mean, tgt_y, tgt_mean = y[src][None], means[src][None], y[tgt][None], means[tgt][None]
        if task == "synthesis":
            src_y, src_mean = jnp.zeros_like(src_y), jnp.zeros_like(src_mean)
            src_bg = (jnp.zeros_like(src_mean), jnp.zeros_like(src_mean))

    n_tgt = target.shape[0]
    out = {
        "source": source.astype(jnp.float32),
        "target": target.astype(jnp.float32),
        "target_clean": target_clean.astype(jnp.float32),
        "image": image.astype(jnp.float32),
        "mu": mu.astype(jnp.float32),
        "labels": labels.astype(jnp.int32),
        "prompt": jnp.stack([trc, reg, jnp.int32(TASKS.index(task))]).astype(jnp.int32),
        "dose": jnp.asarray(dose, jnp.float32),
        "count_scale": jnp.full((n_tgt,), sens * mm, jnp.float32),
    }
    if o["diagnostics"]:
        out.update(
            source_counts=src_counts.astype(jnp.float32),
            target_counts=tgt_counts.astype(jnp.float32),
            source_prompts=src_y, source_mean=src_mean, target_prompts=tgt_y, target_mean=tgt_mean,
            normalisation=eta, attenuation=att,
            source_scatter=src_bg[0], source_randoms=src_bg[1], target_scatter=tgt_bg[0], target_randoms=tgt_bg[1],
        )
    return out
