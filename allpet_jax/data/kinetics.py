"""Tracer kinetics for the simulator: plasma input, two-tissue compartment model, decay, frame activity.

What it is for: turning a tracer name and a tissue label into the mean activity concentration of that
tissue during a time frame, so that every simulated frame, delayed frame or second tracer is driven by
the same physiology. What it is not: a kinetic-modelling fitting tool (no Patlak, no parameter
estimation), and not a model of the scanner (see `simulate.py`).

Units
-----
- Time `t` in **minutes after injection** of the tracer in question. Half-lives are in `HALF_LIFE_MIN`
  (minutes) and `HALF_LIFE_S` (seconds).
- Rate constants `k2, k3, k4` in 1/min, `K1` in mL/min/mL (tissue), `vB` a volume fraction in [0, 1].
- Concentrations are SUV-normalised: g/mL, i.e. activity concentration divided by (injected activity /
  body weight). `plasma_input` and `tissue_curve` are **decay-corrected to injection** (biology only);
  `frame_activity` applies physical decay and returns the mean *physical* concentration during the frame,
  still per unit injected activity per body weight. Multiply by the injected activity per body weight
  (`INJECTED_MBQ_PER_KG`, MBq/kg = kBq/g ~ kBq/mL) to get kBq/mL.

Model
-----
Plasma input: Feng's model (Feng, Huang & Wang 1993, Int J Biomed Comput 32:95),
`Cp(t) = (A1 (t - tau) - A2 - A3) exp(l1 (t - tau)) + A2 exp(l2 (t - tau)) + A3 exp(l3 (t - tau))` for
`t >= tau`, 0 before; the FDG shape uses Feng's published parameters, the other tracers the same form
with faster or slower clearance, each scaled so its plasma SUV at 60 min matches literature values
(`PLASMA`). Whole blood is taken equal to plasma (a simplification; FDG blood/plasma ~0.9).

Tissue: the reversible two-tissue compartment model (C1 free, C2 bound/metabolised)
`dC1/dt = K1 Cp - (k2 + k3) C1 + k4 C2`, `dC2/dt = k3 C1 - k4 C2`, whose impulse response is
`K1 / (a2 - a1) [(k3 + k4 - a1) e^{-a1 t} + (a2 - k3 - k4) e^{-a2 t}]`, with
`a1,2 = (k2 + k3 + k4 -/+ sqrt((k2 + k3 + k4)^2 - 4 k2 k4)) / 2`. The measured voxel value is
`(1 - vB) (C1 + C2) + vB Cb`. `k3 = k4 = 0` gives the one-tissue model `K1 e^{-k2 t}`; `k2 = k3 = k4 = 0`
gives pure accumulation `K1 * integral(Cp)`, used for urine in the bladder. The convolution of each
exponential with Feng's terms is done **analytically** in a cancellation-free form (`_conv_exp`,
`_conv_texp`), so curves are exact to float32 rounding; the frame integral of the decaying curve is a
Gauss-Legendre quadrature (`FRAME_NODES` nodes on each side of the bolus arrival), exact to ~1e-6 for
these smooth integrands (tested against the closed form in `tests/test_kinetics.py`).

Parameters (`KINETICS`) are plausible literature-like values chosen so the SUVs at each tracer's
standard frame look clinical (FDG at 65 min: grey matter 6.3, white matter 3.2, liver 2.2, blood 1.6,
muscle 0.8, tumour 12; 68Ga-PSMA: kidney 36, liver 5, tumour 23; FDOPA: striatum/cortex 2.2;
11C-methionine: pancreas 17, cortex 1.1; 11C-acetate: myocardium 3.7, bladder 0.15); FDG `k4 = 0`
except in liver (0.006/min, dephosphorylation). They are a simulator's tissue classes, not a validated
kinetic atlas.

Everything here is pure `jax.numpy`, jit-able and vmappable; randomness (inter-subject variability in
`sample_kinetics`) only through explicit `jax.random` keys.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from allpet_jax.data.phantoms import LABELS, Draws

TRACERS = ("18F-FDG", "18F-DOPA", "68Ga-PSMA", "11C-methionine", "11C-acetate")
"""Tracer names; a tracer's id is its index here."""

HALF_LIFE_MIN = {"18F": 109.77, "68Ga": 67.71, "11C": 20.364}
"""Physical half-lives in minutes (DDEP/NNDC values)."""
HALF_LIFE_S = {k: v * 60.0 for k, v in HALF_LIFE_MIN.items()}
"""Physical half-lives in seconds."""


def nuclide(tracer: str) -> str:
    """The radionuclide of a tracer name, e.g. `'18F'` for `'18F-FDG'`."""
    return tracer.split("-")[0]


TRACER_HALF_LIFE_MIN = np.array([HALF_LIFE_MIN[nuclide(t)] for t in TRACERS], np.float32)
"""`(n_tracers,)` half-life of each tracer in minutes."""

INJECTED_MBQ_PER_KG = np.array([3.5, 3.0, 2.0, 5.0, 7.0], np.float32)
"""Typical injected activity per body weight (MBq/kg = kBq/g), EANM-guideline-like, per tracer."""

FRAME_START_MIN = np.array([60.0, 80.0, 60.0, 20.0, 10.0], np.float32)
"""Standard uptake time of a static frame (minutes after injection), per tracer."""

FRAME_MIN = 10.0
"""Duration of every simulated frame in minutes (one 2D slice of a static acquisition)."""


class Plasma(NamedTuple):
    """Feng input-function parameters (any matching leading shape). A in SUV (and SUV/min for A1), l in 1/min,
    tau in min."""

    A1: jax.Array
    A2: jax.Array
    A3: jax.Array
    l1: jax.Array
    l2: jax.Array
    l3: jax.Array
    tau: jax.Array


# Feng et al. 1993 FDG parameters (A1 uCi/mL/min, A2, A3 uCi/mL, l in 1/min); only the shape is used.
_FENG_FDG = (851.1225, 21.8798, 20.8113, -4.133859, -0.01043449, -0.1190996)

# Per tracer: (l2, l3) clearance exponents replacing Feng's, and the plasma SUV at 60 min the curve is
# scaled to. FDOPA includes its 3-O-methyl metabolite; 68Ga-PSMA-11 and 11C-acetate clear quickly.
_PLASMA_SHAPE = {
    "18F-FDG": (-0.01043449, -0.1190996, 1.7),
    "18F-DOPA": (-0.0090, -0.1500, 1.0),
    "68Ga-PSMA": (-0.0150, -0.1800, 1.5),
    "11C-methionine": (-0.0100, -0.2000, 0.7),
    "11C-acetate": (-0.0120, -0.3000, 0.4),
}


def _plasma_table() -> np.ndarray:
    """`(n_tracers, 7)` rows (A1, A2, A3, l1, l2, l3, tau) in SUV units, tau = 0.5 min."""
    A1, A2, A3, l1, _, _ = _FENG_FDG
    rows = []
    for t in TRACERS:
        l2, l3, suv60 = _PLASMA_SHAPE[t]
        tail = A2 * math.exp(l2 * 59.5) + A3 * math.exp(l3 * 59.5) + (A1 * 59.5 - A2 - A3) * math.exp(l1 * 59.5)
        s = suv60 / tail
        rows.append((A1 * s, A2 * s, A3 * s, l1, l2, l3, 0.5))
    return np.array(rows, np.float32)


PLASMA = _plasma_table()
"""`(n_tracers, 7)`: Feng parameters (A1, A2, A3, l1, l2, l3, tau) per tracer, SUV-normalised."""


def plasma_params(tracer_id) -> Plasma:
    """The (population) `Plasma` of a tracer id (int or traced int)."""
    row = jnp.asarray(PLASMA)[tracer_id]
    return Plasma(*(row[..., i] for i in range(7)))


# --- tissue kinetic parameters ---------------------------------------------------------------------------
# (K1 mL/min/mL, k2 1/min, k3 1/min, k4 1/min, vB). Unlisted labels take `soft_tissue`; `background` and
# `lesion_cold` are zero (cold lesions scale their host tissue, see simulate.py); `lesion_hot` is tumour.
_BLOOD = (0.0, 0.0, 0.0, 0.0, 1.0)
_CSF = (0.004, 0.10, 0.0, 0.0, 0.0)
_KINETICS = {
    "18F-FDG": {
        "soft_tissue": (0.030, 0.25, 0.030, 0.0, 0.03), "fat": (0.012, 0.15, 0.005, 0.0, 0.02),
        "scalp": (0.040, 0.30, 0.030, 0.0, 0.03), "skull": (0.030, 0.30, 0.010, 0.0, 0.02), "csf": _CSF,
        "grey_matter": (0.102, 0.13, 0.062, 0.0, 0.04), "white_matter": (0.054, 0.109, 0.045, 0.0, 0.03),
        "ventricles": _CSF, "caudate": (0.110, 0.13, 0.066, 0.0, 0.04), "putamen": (0.115, 0.13, 0.070, 0.0, 0.04),
        "thalamus": (0.100, 0.13, 0.060, 0.0, 0.04), "cerebellum": (0.090, 0.13, 0.050, 0.0, 0.04),
        "brainstem": (0.065, 0.12, 0.045, 0.0, 0.03), "lung": (0.020, 0.20, 0.005, 0.0, 0.15),
        "myocardium": (0.600, 1.20, 0.100, 0.0, 0.10), "blood_pool": _BLOOD, "aorta": _BLOOD,
        "liver": (0.860, 0.98, 0.008, 0.006, 0.20), "spleen": (0.900, 1.30, 0.010, 0.0, 0.20),
        "kidney": (0.500, 0.60, 0.020, 0.0, 0.25), "pancreas": (0.200, 0.40, 0.010, 0.0, 0.05),
        "bowel": (0.100, 0.30, 0.020, 0.0, 0.05), "spine": (0.100, 0.30, 0.020, 0.0, 0.05),
        "bone": (0.040, 0.30, 0.010, 0.0, 0.02), "bladder": (0.120, 0.0, 0.0, 0.0, 0.0),
        "prostate": (0.150, 0.35, 0.020, 0.0, 0.05), "lesion_hot": (0.300, 0.50, 0.150, 0.0, 0.05),
    },
    "18F-DOPA": {
        "soft_tissue": (0.040, 0.12, 0.003, 0.0, 0.03), "fat": (0.010, 0.10, 0.001, 0.0, 0.02),
        "scalp": (0.040, 0.12, 0.003, 0.0, 0.03), "skull": (0.030, 0.15, 0.003, 0.0, 0.02), "csf": _CSF,
        "grey_matter": (0.040, 0.05, 0.002, 0.0, 0.04), "white_matter": (0.030, 0.05, 0.001, 0.0, 0.03),
        "ventricles": _CSF, "caudate": (0.050, 0.06, 0.020, 0.0, 0.04), "putamen": (0.050, 0.06, 0.025, 0.0, 0.04),
        "thalamus": (0.040, 0.05, 0.003, 0.0, 0.04), "cerebellum": (0.040, 0.05, 0.002, 0.0, 0.04),
        "brainstem": (0.035, 0.05, 0.003, 0.0, 0.03), "lung": (0.020, 0.15, 0.002, 0.0, 0.15),
        "myocardium": (0.150, 0.20, 0.005, 0.0, 0.10), "blood_pool": _BLOOD, "aorta": _BLOOD,
        "liver": (0.600, 0.70, 0.003, 0.0, 0.20), "spleen": (0.400, 0.50, 0.002, 0.0, 0.20),
        "kidney": (0.800, 0.40, 0.020, 0.0, 0.25), "pancreas": (0.300, 0.30, 0.030, 0.0, 0.05),
        "bowel": (0.100, 0.20, 0.010, 0.0, 0.05), "spine": (0.050, 0.15, 0.005, 0.0, 0.05),
        "bone": (0.030, 0.15, 0.003, 0.0, 0.02), "bladder": (0.150, 0.0, 0.0, 0.0, 0.0),
        "prostate": (0.050, 0.10, 0.003, 0.0, 0.05), "lesion_hot": (0.200, 0.25, 0.050, 0.0, 0.05),
    },
    "68Ga-PSMA": {
        "soft_tissue": (0.030, 0.12, 0.005, 0.0, 0.03), "fat": (0.010, 0.10, 0.0, 0.0, 0.02),
        "scalp": (0.030, 0.12, 0.005, 0.0, 0.03), "skull": (0.020, 0.15, 0.002, 0.0, 0.02), "csf": _CSF,
        "grey_matter": (0.005, 0.10, 0.0, 0.0, 0.04), "white_matter": (0.004, 0.10, 0.0, 0.0, 0.03),
        "ventricles": _CSF, "caudate": (0.005, 0.10, 0.0, 0.0, 0.04), "putamen": (0.005, 0.10, 0.0, 0.0, 0.04),
        "thalamus": (0.005, 0.10, 0.0, 0.0, 0.04), "cerebellum": (0.005, 0.10, 0.0, 0.0, 0.04),
        "brainstem": (0.005, 0.10, 0.0, 0.0, 0.03), "lung": (0.020, 0.15, 0.002, 0.0, 0.15),
        "myocardium": (0.100, 0.20, 0.005, 0.0, 0.10), "blood_pool": _BLOOD, "aorta": _BLOOD,
        "liver": (0.350, 0.35, 0.030, 0.0, 0.20), "spleen": (0.300, 0.30, 0.035, 0.0, 0.20),
        "kidney": (1.500, 0.50, 0.100, 0.0, 0.25), "pancreas": (0.100, 0.20, 0.010, 0.0, 0.05),
        "bowel": (0.300, 0.30, 0.030, 0.0, 0.05), "spine": (0.050, 0.15, 0.005, 0.0, 0.05),
        "bone": (0.030, 0.15, 0.002, 0.0, 0.02), "bladder": (0.250, 0.0, 0.0, 0.0, 0.0),
        "prostate": (0.100, 0.20, 0.020, 0.0, 0.05), "lesion_hot": (0.300, 0.30, 0.250, 0.0, 0.05),
    },
    "11C-methionine": {
        "soft_tissue": (0.060, 0.10, 0.020, 0.0, 0.03), "fat": (0.015, 0.15, 0.0, 0.0, 0.02),
        "scalp": (0.060, 0.10, 0.020, 0.0, 0.03), "skull": (0.060, 0.10, 0.030, 0.0, 0.02), "csf": _CSF,
        "grey_matter": (0.080, 0.10, 0.020, 0.0, 0.04), "white_matter": (0.055, 0.10, 0.012, 0.0, 0.03),
        "ventricles": _CSF, "caudate": (0.080, 0.10, 0.020, 0.0, 0.04), "putamen": (0.080, 0.10, 0.020, 0.0, 0.04),
        "thalamus": (0.080, 0.10, 0.020, 0.0, 0.04), "cerebellum": (0.080, 0.10, 0.020, 0.0, 0.04),
        "brainstem": (0.065, 0.10, 0.015, 0.0, 0.03), "lung": (0.020, 0.15, 0.005, 0.0, 0.15),
        "myocardium": (0.200, 0.20, 0.050, 0.0, 0.10), "blood_pool": _BLOOD, "aorta": _BLOOD,
        "liver": (0.800, 0.30, 0.100, 0.0, 0.20), "spleen": (0.300, 0.25, 0.050, 0.0, 0.20),
        "kidney": (0.400, 0.20, 0.050, 0.0, 0.25), "pancreas": (0.800, 0.20, 0.300, 0.0, 0.05),
        "bowel": (0.200, 0.30, 0.030, 0.0, 0.05), "spine": (0.100, 0.10, 0.050, 0.0, 0.05),
        "bone": (0.040, 0.15, 0.010, 0.0, 0.02), "bladder": (0.020, 0.0, 0.0, 0.0, 0.0),
        "prostate": (0.080, 0.15, 0.020, 0.0, 0.05), "lesion_hot": (0.250, 0.15, 0.060, 0.0, 0.05),
    },
    "11C-acetate": {
        "soft_tissue": (0.100, 0.20, 0.010, 0.0, 0.03), "fat": (0.020, 0.20, 0.0, 0.0, 0.02),
        "scalp": (0.100, 0.20, 0.010, 0.0, 0.03), "skull": (0.050, 0.30, 0.005, 0.0, 0.02), "csf": _CSF,
        "grey_matter": (0.100, 0.30, 0.010, 0.0, 0.04), "white_matter": (0.070, 0.30, 0.010, 0.0, 0.03),
        "ventricles": _CSF, "caudate": (0.100, 0.30, 0.010, 0.0, 0.04), "putamen": (0.100, 0.30, 0.010, 0.0, 0.04),
        "thalamus": (0.100, 0.30, 0.010, 0.0, 0.04), "cerebellum": (0.100, 0.30, 0.010, 0.0, 0.04),
        "brainstem": (0.080, 0.30, 0.010, 0.0, 0.03), "lung": (0.050, 0.30, 0.010, 0.0, 0.15),
        "myocardium": (0.800, 0.15, 0.0, 0.0, 0.10), "blood_pool": _BLOOD, "aorta": _BLOOD,
        "liver": (0.600, 0.30, 0.020, 0.0, 0.20), "spleen": (0.500, 0.30, 0.020, 0.0, 0.20),
        "kidney": (0.900, 0.30, 0.020, 0.0, 0.25), "pancreas": (0.900, 0.20, 0.050, 0.0, 0.05),
        "bowel": (0.300, 0.30, 0.030, 0.0, 0.05), "spine": (0.100, 0.30, 0.020, 0.0, 0.05),
        "bone": (0.050, 0.30, 0.005, 0.0, 0.02), "bladder": (0.010, 0.0, 0.0, 0.0, 0.0),
        "prostate": (0.200, 0.30, 0.020, 0.0, 0.05), "lesion_hot": (0.800, 0.30, 0.080, 0.0, 0.05),
    },
}


def _kinetics_table() -> np.ndarray:
    table = np.zeros((len(TRACERS), len(LABELS), 5), np.float32)
    for ti, tracer in enumerate(TRACERS):
        params = _KINETICS[tracer]
        for li, label in enumerate(LABELS):
            if label in ("background", "lesion_cold"):
                continue
            table[ti, li] = params.get(label, params["soft_tissue"])
    return table


KINETICS = _kinetics_table()
"""`(n_tracers, n_labels, 5)`: (K1, k2, k3, k4, vB) of every tissue label (`phantoms.LABELS`) per tracer."""


class Kinetics(NamedTuple):
    """Two-tissue compartment parameters (any matching leading shape): K1 mL/min/mL, k2-k4 1/min, vB."""

    K1: jax.Array
    k2: jax.Array
    k3: jax.Array
    k4: jax.Array
    vB: jax.Array


def kinetics_params(tracer_id) -> Kinetics:
    """Population `Kinetics` `(n_labels,)` of every label for a tracer id (int or traced int)."""
    rows = jnp.asarray(KINETICS)[tracer_id]
    return Kinetics(*(rows[..., i] for i in range(5)))


# --- curves ---------------------------------------------------------------------------------------------

def _h(y):
    """(1 - e^-y) / y for y >= 0 (1 at 0), without cancellation."""
    small = y < 1e-3
    ys = jnp.where(small, 1.0, y)
    return jnp.where(small, 1.0 - y / 2 + y * y / 6, -jnp.expm1(-ys) / ys)


def _g(y):
    """(y - 1 + e^-y) / y^2 for y >= 0 (1/2 at 0)."""
    small = y < 0.05
    ys = jnp.where(small, 1.0, y)
    series = 0.5 - y / 6 + y * y / 24 - y**3 / 120
    return jnp.where(small, series, (ys + jnp.expm1(-ys)) / (ys * ys))


def _conv_exp(p, q, t):
    """`int_0^t e^{p s} e^{q (t - s)} ds` for real p, q, t >= 0, stable for any p - q."""
    hi, lo = jnp.maximum(p, q), jnp.minimum(p, q)
    return jnp.exp(hi * t) * t * _h((hi - lo) * t)


def _conv_texp(p, q, t):
    """`int_0^t s e^{p s} e^{q (t - s)} ds`, stable for any p - q."""
    hi, lo = jnp.maximum(p, q), jnp.minimum(p, q)
    y = (hi - lo) * t
    # p >= q: e^{pt} t^2 g(y); p < q: t * conv_exp - conv_texp(q, p) = e^{qt} t^2 (h(y) - g(y)).
    weight = jnp.where(p >= q, _g(y), _h(y) - _g(y))
    return jnp.exp(hi * t) * t * t * weight


def plasma_input(t, plasma: Plasma):
    """Feng plasma curve `Cp(t)` (SUV, decay-corrected) at times `t` (min after injection)."""
    s = jnp.maximum(t - plasma.tau, 0.0)
    cp = (plasma.A1 * s - plasma.A2 - plasma.A3) * jnp.exp(plasma.l1 * s)
    cp = cp + plasma.A2 * jnp.exp(plasma.l2 * s) + plasma.A3 * jnp.exp(plasma.l3 * s)
    return jnp.where(t > plasma.tau, cp, 0.0)


def _eigen(kin: Kinetics):
    """Rates a1 <= a2 and weights w1, w2 of the impulse response `K1 (w1 e^{-a1 t} + w2 e^{-a2 t})`."""
    S = kin.k2 + kin.k3 + kin.k4
    root = jnp.sqrt(jnp.maximum(S * S - 4.0 * kin.k2 * kin.k4, 0.0))
    a2 = 0.5 * (S + root)
    a1 = 2.0 * kin.k2 * kin.k4 / jnp.where(S + root > 0, S + root, 1.0)  # a1 a2 = k2 k4, no cancellation
    distinct = root > 1e-7
    w1 = jnp.where(distinct, (kin.k3 + kin.k4 - a1) / jnp.where(distinct, root, 1.0), 1.0)
    w2 = jnp.where(distinct, (a2 - kin.k3 - kin.k4) / jnp.where(distinct, root, 1.0), 0.0)
    return a1, a2, w1, w2


def tissue_curve(t, kin: Kinetics, plasma: Plasma):
    """Voxel concentration `(1 - vB)(C1 + C2) + vB Cp` (SUV, decay-corrected) at times `t` (min).

    `t` broadcasts against the parameter shapes (e.g. `t` `(n, 1)` with `(n_labels,)` parameters).
    """
    a1, a2, w1, w2 = _eigen(kin)
    s = jnp.maximum(t - plasma.tau, 0.0)
    c1 = -(plasma.A2 + plasma.A3)

    def conv(a):  # (Cp conv e^{-a t})(t), analytically, term by term
        return (
            plasma.A1 * _conv_texp(plasma.l1, -a, s)
            + c1 * _conv_exp(plasma.l1, -a, s)
            + plasma.A2 * _conv_exp(plasma.l2, -a, s)
            + plasma.A3 * _conv_exp(plasma.l3, -a, s)
        )

    ct = kin.K1 * (w1 * conv(a1) + w2 * conv(a2))
    return (1.0 - kin.vB) * ct + kin.vB * plasma_input(t, plasma)


FRAME_NODES = 12
_GL_X, _GL_W = np.polynomial.legendre.leggauss(FRAME_NODES)


def frame_activity(t0, t1, kin: Kinetics, plasma: Plasma, half_life_min):
    """Mean physical concentration over the frame `[t0, t1]` min: `(1/(t1-t0)) int C(t) 2^{-t/T_half} dt`.

    SUV units (per injected activity per body weight, not decay-corrected). `t0, t1, half_life_min` are
    scalars (or broadcast with the parameters); the result has the parameters' broadcast shape. The
    frame is split at the bolus arrival `tau`, and each part integrated with `FRAME_NODES`-point
    Gauss-Legendre quadrature of the analytic curve.
    """
    t0 = jnp.asarray(t0, jnp.float32)
    t1 = jnp.asarray(t1, jnp.float32)
    lam = math.log(2.0) / jnp.asarray(half_life_min, jnp.float32)
    split = jnp.clip(plasma.tau, t0, t1)
    x, w = jnp.asarray(_GL_X, jnp.float32), jnp.asarray(_GL_W, jnp.float32)
    # Both parts' nodes in one evaluation of the curve: (..., 2 * FRAME_NODES).
    nodes = jnp.concatenate([(0.5 * (split + t0))[..., None] + (0.5 * (split - t0))[..., None] * x,
                             (0.5 * (t1 + split))[..., None] + (0.5 * (t1 - split))[..., None] * x], axis=-1)
    weights = jnp.concatenate([(0.5 * (split - t0))[..., None] * w, (0.5 * (t1 - split))[..., None] * w], axis=-1)
    expand = lambda p: jnp.asarray(p)[..., None]
    kin_e = Kinetics(*(expand(p) for p in kin))
    plasma_e = Plasma(*(expand(p) for p in plasma))
    values = tissue_curve(nodes, kin_e, plasma_e) * jnp.exp(-expand(lam) * nodes)
    total = jnp.sum(values * weights, axis=-1)
    return total / (t1 - t0)


def sample_kinetics(key, tracer_id, *, variability: float = 1.0):
    """Subject-specific `(Kinetics (n_labels,), Plasma)` for a tracer: population values times log-normal
    inter-subject factors (K1 sd 15%, k3 sd 20%, bladder K1 sd 50%, FDG myocardial k3 sd 80%; plasma
    amplitudes sd 15%, slow clearance sd 15%, bolus arrival 0.2-0.8 min). `variability=0` gives the
    population values."""
    n = len(LABELS)
    draws = Draws(key, 2 * n + 5)
    kin = kinetics_params(tracer_id)
    sd_k3 = jnp.full((n,), 0.20).at[LABELS.index("myocardium")].set(jnp.where(tracer_id == 0, 0.8, 0.2))
    sd_k1 = jnp.full((n,), 0.15).at[LABELS.index("bladder")].set(0.5)
    f1 = jnp.exp(variability * sd_k1 * draws.normal((n,)))
    f3 = jnp.exp(variability * sd_k3 * draws.normal((n,)))
    kin = kin._replace(K1=kin.K1 * f1, k3=kin.k3 * f3)
    p = plasma_params(tracer_id)
    fa = jnp.exp(variability * 0.15 * draws.normal((3,)))
    fl = jnp.exp(variability * 0.15 * draws.normal())
    tau = 0.5 + variability * draws.uniform(minval=-0.3, maxval=0.3)
    p = p._replace(A1=p.A1 * fa[0], A2=p.A2 * fa[1], A3=p.A3 * fa[2], l2=p.l2 * fl, tau=tau)
    return kin, p
