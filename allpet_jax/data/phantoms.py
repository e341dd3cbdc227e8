"""Randomised 2D anatomical slice phantoms: label maps, 511 keV attenuation maps and tissue values.

What it is for: the anatomy of the PET simulator (`simulate.py`). A phantom is drawn from a `jax.random`
key (and nothing else), at any image size, as a set of smooth shapes ("slots") painted in order over a
field of view in mm. What it is not: a voxelised human atlas; shapes are stylised, sized and placed like
the real organs, and randomised enough that no two samples share an anatomy.

Regions (`REGIONS`) and fields of view
--------------------------------------
- `brain`: axial head slice; scalp, skull, CSF, grey-matter ribbon (folded by a random gyral field),
  white matter, medial cortex along the interhemispheric fissure, lateral/third/fourth ventricles,
  caudate, putamen, thalamus, cerebellum and brainstem; which of them appear depends on a random slice
  level `z` in [0, 1] (0: posterior fossa with cerebellum and brainstem, ~0.5: basal ganglia,
  1: centrum semiovale).
- `chest`: body outline with subcutaneous fat, muscle wall, lungs, heart (right heart/atria blood pool,
  left-ventricular myocardium and cavity), ascending and descending aorta, liver dome (low slices),
  vertebra with spinal canal, sternum, scapulae.
- `abdomen`: outline, fat, muscle, liver, stomach, spleen, pancreas, bowel, kidneys, aorta, vena cava,
  vertebra.
- `trunk`: the lower trunk (male pelvis): outline, fat, muscle, iliac/acetabular bone, pubic symphysis,
  sacrum, bladder, prostate, rectum, sigmoid bowel, iliac vessels.
The field of view is `FOV_MM` (brain 256 mm, body 600 mm, as clinical reconstructions), spread over the
larger image side: the physical pixel is `fov_mm / max(H, W)` (2.0 mm for a 128-pixel brain, 4.69 mm for
a 128-pixel body). Image orientation follows `radon.Geometry`: +x (columns) is the patient's left, +y
(row 0 at the top) is anterior, i.e. the radiological convention.

Randomness (all from the key, see `Draws`): a global affine (scale 0.93-1.07 per axis for heads,
0.9-1.1 for trunks, rotation +-6 deg, shift +-5 / +-8 mm); per-organ position, size and orientation
jitter; slice level; fat thickness (5-35 mm); lung density; a smooth random displacement field (sd
3 mm in the head, 6 mm in the trunk, wavelengths 80-300 mm); a smooth boundary-perturbation field (gyri,
organ irregularity; `WIGGLE_GRID`); a multiplicative activity texture (3-10 % sd, `TEXTURE_GRID`); and
lesions: `0..max_hot_lesions` hot and `0..max_cold_lesions` cold, each with its own size (log-uniform
radius, hot 3-15 mm, cold 5-25 mm, capped by the host organ), shape, host (a per-region list: cortex,
lung, liver, spleen, pancreas, bone, lymph nodes beside the heart, aorta or iliac vessels, prostate for
hot; cortex, myocardium, liver, spleen, kidney, prostate, bone for cold) and contrast (set by
`simulate.py`: hot lesions follow tumour kinetics, cold ones scale their host's activity).

Labels and attenuation
----------------------
`LABELS` is the name <-> id table (`LABEL_IDS[name]`); label maps are int32 `(H, W)`. Hot and cold
lesions have their own ids (`lesion_hot`, `lesion_cold`) and are painted last. A pixel's label is the
shape that covers its centre (for `supersample` S > 1, the centre-most sub-pixel); a pixel is lesion
where the union of (possibly overlapping) lesions covers most of it, and every lesion labels at least the
pixel it covers most. `MU_511_PER_MM` gives each label's linear attenuation coefficient at 511 keV in
1/mm (water 0.0096, soft tissue 0.0099, fat 0.0090, lung 0.0030 +- 20 % per sample, skull 0.0170, mixed
pelvic/scapular bone 0.0150, vertebral bone 0.0125, air 0). Hot lesions are soft tissue (0.0099); cold
lesions keep their host's value.

Antialiasing: each shape's coverage of a pixel is its area fraction under a locally straight boundary,
`clip(1/2 - d / pixel, 0, 1)` with `d` the signed distance of the pixel centre to the boundary (exact
for an edge along a pixel axis; the summed coverage of an ellipse is its area to 0.2 %, tested); values
are composited in paint order, so a pixel on an edge holds the area-weighted mix of both tissues.
`supersample=S` evaluates this on an `S x S` sub-grid and averages (area fractions of curved and crossing
edges, at S^2 times the cost). Structures thinner than ~2 pixels are not area-exact, which is why the
thinnest shape is 5 mm across (the medial cortex strip 7 mm).

Everything is `jax.numpy`, jit-able with static image shape, and vmappable over keys.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

LABELS = (
    "background", "soft_tissue", "fat", "scalp", "skull", "csf", "grey_matter", "white_matter",
    "ventricles", "caudate", "putamen", "thalamus", "cerebellum", "brainstem", "lung", "myocardium",
    "blood_pool", "aorta", "liver", "spleen", "kidney", "pancreas", "bowel", "spine", "bone", "bladder",
    "prostate", "lesion_hot", "lesion_cold",
)
"""Label names; a label's id (the value in label maps) is its index here."""
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
"""Label name -> id."""

REGIONS = ("brain", "chest", "abdomen", "trunk")
"""Anatomical regions; a region's id is its index here."""
FOV_MM = {"brain": 256.0, "chest": 600.0, "abdomen": 600.0, "trunk": 600.0}
"""Default field of view in mm across the larger image side, per region."""

_MU = {
    "background": 0.0, "soft_tissue": 0.0099, "fat": 0.0090, "scalp": 0.0099, "skull": 0.0170,
    "csf": 0.0096, "grey_matter": 0.0099, "white_matter": 0.0099, "ventricles": 0.0096, "caudate": 0.0099,
    "putamen": 0.0099, "thalamus": 0.0099, "cerebellum": 0.0099, "brainstem": 0.0099, "lung": 0.0030,
    "myocardium": 0.0101, "blood_pool": 0.0101, "aorta": 0.0101, "liver": 0.0102, "spleen": 0.0101,
    "kidney": 0.0100, "pancreas": 0.0099, "bowel": 0.0095, "spine": 0.0125, "bone": 0.0150,
    "bladder": 0.0096, "prostate": 0.0100, "lesion_hot": 0.0099, "lesion_cold": 0.0099,
}
MU_511_PER_MM = np.array([_MU[name] for name in LABELS], np.float32)
"""`(n_labels,)` linear attenuation coefficient at 511 keV in 1/mm, per label."""


def region_id(region) -> int:
    """The id of a region name (or a valid id); `ValueError` naming the choices otherwise."""
    if isinstance(region, (int, np.integer)) and not isinstance(region, bool) and 0 <= region < len(REGIONS):
        return int(region)
    if isinstance(region, str) and region in REGIONS:
        return REGIONS.index(region)
    raise ValueError(f"region must be one of {REGIONS} (or its index); got {region!r}")


# --- slot tables ----------------------------------------------------------------------------------------
# One row per shape, painted in order: (group, label, cx, cy, a, b, rot_deg, form (h2c, h2s, h4c, bend,
# egg), wiggle_mm, jitter_mm, jitter_size, jitter_deg, z_window, fat_pad). Canonical mm, +x patient
# left, +y anterior. Shapes of one group (e.g. the concentric layers of the head, the heart) move, scale
# and turn together about the group's first shape; jitter_* add per-shape variation on top.
_ALWAYS = (-1.0, 2.0)
_NOH = (0.0, 0.0, 0.0, 0.0, 0.0)


def _row(group, label, cx, cy, a, b, rot=0.0, harm=_NOH, wig=0.0, jit=2.0, jsize=0.06, jrot=5.0,
         z=_ALWAYS, fat=0.0):
    return dict(group=group, label=label, c=(cx, cy), ax=(a, b), rot=rot, harm=harm, wig=wig, jit=jit,
                jsize=jsize, jrot=jrot, z=z, fat=fat)


_BRAIN = [
    _row("head", "scalp", 0, 0, 71, 90, harm=(0, 0, 0, 0, 0.08), jit=0, jsize=0.04, jrot=0),
    _row("head", "skull", 0, 0, 66, 85, harm=(0, 0, 0, 0, 0.08), jit=0, jsize=0, jrot=0),
    _row("head", "csf", 0, 0, 59.5, 78.5, harm=(0, 0, 0, 0, 0.08), jit=0, jsize=0, jrot=0),
    _row("head", "grey_matter", 0, 0, 57.5, 76.5, harm=(0, 0, 0, 0, 0.08), wig=1.5, jit=0, jsize=0, jrot=0),
    _row("head", "white_matter", 0, -2, 48.5, 66, harm=(0, 0, 0, 0, 0.08), wig=5.0, jit=1, jsize=0.05, jrot=0),
    _row("head", "grey_matter", 0, 0, 3.5, 74, wig=1.0, jit=0.5, jsize=0, jrot=1),
    _row("head", "ventricles", -8, 6, 5, 20, rot=-12, jit=1.5, jsize=0.2, z=(0.3, 0.85)),
    _row("head", "ventricles", 8, 6, 5, 20, rot=12, jit=1.5, jsize=0.2, z=(0.3, 0.85)),
    _row("head", "ventricles", 0, -6, 2.5, 9, jit=1, jsize=0.15, jrot=3, z=(0.35, 0.6)),
    _row("head", "caudate", -13, 16, 5.5, 8.5, rot=-20, jit=1.5, jsize=0.1, z=(0.35, 0.75)),
    _row("head", "caudate", 13, 16, 5.5, 8.5, rot=20, jit=1.5, jsize=0.1, z=(0.35, 0.75)),
    _row("head", "putamen", -24, 2, 5.5, 14, rot=-8, jit=1.5, jsize=0.1, z=(0.35, 0.62)),
    _row("head", "putamen", 24, 2, 5.5, 14, rot=8, jit=1.5, jsize=0.1, z=(0.35, 0.62)),
    _row("head", "thalamus", -9, -12, 7.5, 10, rot=10, jit=1.5, jsize=0.1, z=(0.35, 0.62)),
    _row("head", "thalamus", 9, -12, 7.5, 10, rot=-10, jit=1.5, jsize=0.1, z=(0.35, 0.62)),
    _row("head", "cerebellum", -23, -55, 26, 20, rot=-15, wig=1.5, jit=2, jsize=0.08, z=(-1, 0.32)),
    _row("head", "cerebellum", 23, -55, 26, 20, rot=15, wig=1.5, jit=2, jsize=0.08, z=(-1, 0.32)),
    _row("head", "brainstem", 0, -28, 13, 12, jit=1.5, jsize=0.08, z=(-1, 0.32)),
    _row("head", "ventricles", 0, -40, 4, 3, jit=1, jsize=0.15, z=(-1, 0.3)),
]
_CHEST = [
    _row("body", "fat", 0, 0, 155, 105, harm=(0, 0, -0.04, 0, 0.04), wig=2, jit=0, jsize=0.06, jrot=0, fat=1),
    _row("body", "soft_tissue", 0, 0, 155, 105, harm=(0, 0, -0.04, 0, 0.04), wig=2, jit=0, jsize=0, jrot=0),
    _row("body", "lung", -68, 5, 50, 78, rot=8, harm=(0, 0, -0.03, 0.25, 0.1), wig=2.5, jit=4, jsize=0.07),
    _row("body", "lung", 70, 0, 48, 76, rot=-8, harm=(0, 0, -0.03, -0.25, 0.1), wig=2.5, jit=4, jsize=0.07),
    _row("heart", "blood_pool", 12, 22, 50, 40, rot=-30, jit=6, jsize=0.08, jrot=8, z=(0.12, 0.8)),
    _row("heart", "myocardium", 32, 8, 37, 30, rot=-35, jit=1.5, jsize=0.04, z=(0.12, 0.8)),
    _row("heart", "blood_pool", 34, 9, 24, 18, rot=-35, jit=1, jsize=0.08, z=(0.12, 0.8)),
    _row("body", "aorta", 22, -55, 12, 12, jit=3, jsize=0.1),
    _row("body", "aorta", -5, 35, 14, 14, jit=3, jsize=0.1, z=(0.7, 2)),
    _row("body", "liver", -60, -10, 55, 60, rot=110, harm=(0, 0, 0, 0, -0.2), wig=2, jit=5, jsize=0.1, z=(-1, 0.3)),
    _row("spine", "spine", 0, -72, 19, 17, harm=(0, 0, -0.04, 0, 0), jit=3, jsize=0.06, jrot=4),
    _row("spine", "bone", 0, -98, 20, 9, jit=0.5, jsize=0.05, jrot=2),
    _row("spine", "soft_tissue", 0, -90, 7, 6, jit=0.5, jsize=0.05, jrot=2),
    _row("body", "bone", 0, 97, 15, 6, jit=2, jsize=0.1),
    _row("body", "bone", -115, -70, 8, 40, rot=60, jit=6, jsize=0.1, jrot=8),
    _row("body", "bone", 115, -70, 8, 40, rot=-60, jit=6, jsize=0.1, jrot=8),
]
_ABDOMEN = [
    _row("body", "fat", 0, 0, 150, 110, harm=(0, 0, -0.04, 0, 0.04), wig=2, jit=0, jsize=0.06, jrot=0, fat=1),
    _row("body", "soft_tissue", 0, 0, 150, 110, harm=(0, 0, -0.04, 0, 0.04), wig=2, jit=0, jsize=0, jrot=0),
    _row("body", "liver", -55, 12, 72, 80, rot=105, harm=(0, 0.03, 0, 0, -0.25), wig=2.5, jit=5, jsize=0.1),
    _row("body", "bowel", 55, 45, 40, 26, rot=-25, wig=2, jit=6, jsize=0.15, jrot=10, z=(0.5, 2)),
    _row("body", "spleen", 95, -20, 27, 48, rot=-35, wig=1.5, jit=5, jsize=0.12, z=(0.3, 2)),
    _row("body", "bowel", -5, 62, 45, 20, wig=3, jit=8, jsize=0.15, jrot=10, z=(-1, 0.6)),
    _row("body", "pancreas", 25, 2, 48, 10, rot=15, wig=1.5, jit=4, jsize=0.1, jrot=8, z=(0.3, 0.8)),
    _row("body", "kidney", -58, -50, 27, 38, rot=30, harm=(0, 0, 0, 0.2, 0), jit=4, jsize=0.08, z=(-1, 0.7)),
    _row("body", "kidney", 60, -48, 27, 38, rot=-30, harm=(0, 0, 0, -0.2, 0), jit=4, jsize=0.08, z=(-1, 0.7)),
    _row("body", "aorta", 12, -42, 11, 11, jit=2, jsize=0.1),
    _row("body", "aorta", -20, -35, 13, 10, jit=2, jsize=0.1),
    _row("spine", "spine", 0, -70, 22, 19, harm=(0, 0, -0.04, 0, 0), jit=3, jsize=0.06, jrot=4),
    _row("spine", "bone", 0, -98, 22, 10, jit=0.5, jsize=0.05, jrot=2),
    _row("spine", "soft_tissue", 0, -88, 7, 6, jit=0.5, jsize=0.05, jrot=2),
]
_TRUNK = [
    _row("body", "fat", 0, 0, 165, 108, harm=(0, 0, -0.05, 0, 0.03), wig=2, jit=0, jsize=0.06, jrot=0, fat=1),
    _row("body", "soft_tissue", 0, 0, 165, 108, harm=(0, 0, -0.05, 0, 0.03), wig=2, jit=0, jsize=0, jrot=0),
    _row("body", "bone", -88, -10, 30, 40, rot=-15, wig=1, jit=4, jsize=0.08),
    _row("body", "bone", 88, -10, 30, 40, rot=15, wig=1, jit=4, jsize=0.08),
    _row("body", "bone", -15, 78, 22, 9, rot=25, jit=3, jsize=0.1),
    _row("body", "bone", 15, 78, 22, 9, rot=-25, jit=3, jsize=0.1),
    _row("body", "bone", 0, -72, 35, 14, harm=(0, 0, 0, 0.3, 0), jit=3, jsize=0.1),
    _row("body", "bladder", 0, 35, 38, 30, harm=(0, 0, -0.03, 0, 0), jit=5, jsize=0.25, jrot=8),
    _row("body", "prostate", 0, 2, 19, 15, jit=3, jsize=0.12),
    _row("body", "bowel", 0, -30, 17, 14, jit=3, jsize=0.15),
    _row("body", "bowel", -45, 45, 22, 16, wig=2, jit=8, jsize=0.15, jrot=15),
    _row("body", "aorta", -58, 35, 7, 7, jit=3, jsize=0.1),
    _row("body", "aorta", 58, 35, 7, 7, jit=3, jsize=0.1),
]
_REGION_ROWS = (_BRAIN, _CHEST, _ABDOMEN, _TRUNK)

# Lesion hosts per region: (slot index, r_min, r_max as a fraction of the host's semi-axes, weight).
_HOT_HOSTS = (
    [(3, 0.0, 0.85, 3.0), (11, 0.0, 0.6, 0.5), (12, 0.0, 0.6, 0.5), (15, 0.0, 0.7, 0.5)],
    [(2, 0.0, 0.8, 2.0), (3, 0.0, 0.8, 2.0), (4, 0.95, 1.25, 1.0), (10, 0.0, 0.6, 1.0), (9, 0.0, 0.7, 0.5)],
    [(2, 0.0, 0.8, 3.0), (4, 0.0, 0.7, 1.0), (6, 0.0, 0.6, 0.5), (9, 1.3, 1.9, 1.0), (11, 0.0, 0.6, 1.0)],
    [(8, 0.0, 0.7, 3.0), (2, 0.0, 0.7, 1.0), (11, 1.5, 2.5, 1.0), (12, 1.5, 2.5, 1.0), (6, 0.0, 0.6, 0.5)],
)
_COLD_HOSTS = (
    [(3, 0.4, 0.9, 1.0)],
    [(5, 0.72, 0.92, 3.0), (9, 0.0, 0.7, 1.0)],
    [(2, 0.0, 0.75, 3.0), (4, 0.0, 0.6, 1.0), (7, 0.0, 0.6, 1.0), (8, 0.0, 0.6, 1.0)],
    [(8, 0.0, 0.6, 1.0), (2, 0.0, 0.6, 1.0), (3, 0.0, 0.6, 1.0)],
)
# Lesion radius ranges in mm (log-uniform), per region, hot then cold.
_HOT_RADIUS_MM = np.array([(3.0, 12.0), (4.0, 15.0), (4.0, 15.0), (4.0, 14.0)], np.float32)
_COLD_RADIUS_MM = np.array([(5.0, 18.0), (5.0, 25.0), (5.0, 25.0), (5.0, 20.0)], np.float32)

# Boundary wiggle and activity texture are white noise on a coarse grid over the field of view, upsampled
# (cubic): cells of fov/24 (10.7 mm brain, 25 mm body: gyri and organ irregularity) and fov/20.
WIGGLE_GRID = 24
TEXTURE_GRID = 20

N_SLOTS = max(len(rows) for rows in _REGION_ROWS)
"""Anatomy shapes per phantom (regions with fewer are padded with empty shapes)."""


def _tables():
    n_reg = len(REGIONS)
    groups = [sorted({r["group"] for r in rows}, key=[r["group"] for r in rows].index) for rows in _REGION_ROWS]
    n_groups = max(len(g) for g in groups)
    t = {
        "label": np.zeros((n_reg, N_SLOTS), np.int32),
        "centre": np.zeros((n_reg, N_SLOTS, 2), np.float32),
        "axes": np.full((n_reg, N_SLOTS, 2), 1e-3, np.float32),
        "rot": np.zeros((n_reg, N_SLOTS), np.float32),
        "harm": np.zeros((n_reg, N_SLOTS, 5), np.float32),
        "wig": np.zeros((n_reg, N_SLOTS), np.float32),
        "jit": np.zeros((n_reg, N_SLOTS, 3), np.float32),
        "zwin": np.tile(np.array([-1.0, 2.0], np.float32), (n_reg, N_SLOTS, 1)),
        "fat": np.zeros((n_reg, N_SLOTS), np.float32),
        "used": np.zeros((n_reg, N_SLOTS), np.float32),
        "group": np.zeros((n_reg, N_SLOTS), np.int32),
        "pivot": np.zeros((n_reg, N_SLOTS, 2), np.float32),
    }
    for ri, rows in enumerate(_REGION_ROWS):
        pivots = {}
        for si, r in enumerate(rows):
            pivots.setdefault(r["group"], r["c"])
            t["label"][ri, si] = LABEL_IDS[r["label"]]
            t["centre"][ri, si] = r["c"]
            t["axes"][ri, si] = r["ax"]
            t["rot"][ri, si] = math.radians(r["rot"])
            t["harm"][ri, si] = r["harm"]
            t["wig"][ri, si] = r["wig"]
            t["jit"][ri, si] = (r["jit"], r["jsize"], math.radians(r["jrot"]))
            t["zwin"][ri, si] = r["z"]
            t["fat"][ri, si] = r["fat"]
            t["used"][ri, si] = 1.0
            t["group"][ri, si] = groups[ri].index(r["group"])
            t["pivot"][ri, si] = pivots[r["group"]]

    def hosts(table):
        n = max(len(h) for h in table)
        arr = np.zeros((n_reg, n, 4), np.float32)
        for ri, h in enumerate(table):
            for hi, row in enumerate(h):
                arr[ri, hi] = row
        return arr

    t["hot_hosts"] = hosts(_HOT_HOSTS)
    t["cold_hosts"] = hosts(_COLD_HOSTS)
    return t, n_groups


_T, _N_GROUPS = _tables()
_FOV = np.array([FOV_MM[r] for r in REGIONS], np.float32)


# --- random draws ---------------------------------------------------------------------------------------


class Draws:
    """Many small random numbers from one `jax.random.uniform` call on `key`, handed out in order.

    Each `jax.random` call compiles its own counter-based hash, and a phantom needs a few hundred numbers
    in dozens of shapes: drawing them from one vector keeps compile time down (seconds, not tens of
    seconds). Deterministic: the same key and the same sequence of requests give the same numbers.
    """

    def __init__(self, key, n: int):
        self._u = jax.random.uniform(key, (n,), minval=1e-7, maxval=1.0)
        self._z = None
        self._n, self._i = n, 0

    def _take(self, values, shape):
        size = int(np.prod(shape, dtype=np.int64))
        if self._i + size > self._n:
            raise RuntimeError(f"Draws exhausted: {self._n} numbers, {self._i + size} requested")
        out = values[self._i : self._i + size].reshape(shape)
        self._i += size
        return out

    def uniform(self, shape=(), minval=0.0, maxval=1.0):
        return minval + (maxval - minval) * self._take(self._u, shape)

    def normal(self, shape=()):
        if self._z is None:  # one normal quantile over the whole vector: its code is inlined once
            self._z = ndtri(self._u)
        return self._take(self._z, shape)

    def integers(self, shape, n):
        """Uniform integers in `0..n-1` (`n` may be traced)."""
        return jnp.minimum(jnp.floor(self.uniform(shape) * n), n - 1).astype(jnp.int32)

    def categorical(self, logits, shape=()):
        """Indices into the last axis of `logits` (unnormalised log-probabilities), by the Gumbel trick."""
        gumbel = -jnp.log(-jnp.log(self.uniform(tuple(shape) + (logits.shape[-1],))))
        return jnp.argmax(logits + gumbel, axis=-1).astype(jnp.int32)


# --- sampled anatomy ------------------------------------------------------------------------------------


class Shapes(NamedTuple):
    """Shapes in canonical mm, leading axis = shape: label id, centre (x, y), semi-axes (a, b), rotation
    (rad), form (h2c, h2s, h4c, bend, egg: see `_coverage`), boundary wiggle amplitude (mm), presence 0/1."""

    label: jax.Array
    centre: jax.Array
    axes: jax.Array
    rot: jax.Array
    harm: jax.Array
    wig: jax.Array
    present: jax.Array


class Field(NamedTuple):
    """A random field of plane waves `sum_m amp_m sin(kx_m x + ky_m y + phase_m)` (k in rad/mm)."""

    amp: jax.Array
    kx: jax.Array
    ky: jax.Array
    phase: jax.Array


class Anatomy(NamedTuple):
    """One sampled phantom before rasterisation (a pytree of small arrays; vmappable)."""

    region: jax.Array  # () int32
    pixel_mm: jax.Array  # () physical pixel size in mm
    shapes: Shapes  # (N_SLOTS,)
    hot: Shapes  # (max_hot,) hot lesions (label lesion_hot)
    cold: Shapes  # (max_cold,) cold lesions (label lesion_cold)
    affine: jax.Array  # (5,) shift x, shift y (mm), rotation (rad), scale x, scale y
    warp: Field  # (2, M) displacement field, x and y components (mm)
    wiggle: jax.Array  # (WIGGLE_GRID, WIGGLE_GRID) white noise, upsampled to the boundary perturbation
    texture: jax.Array  # (TEXTURE_GRID, TEXTURE_GRID) white noise, upsampled to the activity texture
    texture_sd: jax.Array  # () relative sd of the activity texture
    level: jax.Array  # () slice level z in [0, 1]
    lung_mu: jax.Array  # () lung attenuation in 1/mm


def _smoothstep(x):
    x = jnp.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _random_field(draws: Draws, shape, n_modes, wavelength_mm, amplitude):
    """`n_modes` plane waves of random direction, phase and wavelength (log-uniform in `wavelength_mm`,
    scalars or traced), normalised so the field's sd over space is `amplitude` `shape`."""
    lo, hi = wavelength_mm
    wl = lo * jnp.exp(draws.uniform(shape + (n_modes,)) * jnp.log(hi / lo))
    ang = draws.uniform(shape + (n_modes,), maxval=2 * jnp.pi)
    k = 2 * jnp.pi / wl
    phase = draws.uniform(shape + (n_modes,), maxval=2 * jnp.pi)
    w = draws.normal(shape + (n_modes,))
    # A plane wave has variance 1/2 over space, so sum(amp^2) / 2 = amplitude^2.
    amp = jnp.asarray(amplitude)[..., None] * w * math.sqrt(2.0) / jnp.sqrt(jnp.sum(w * w, axis=-1, keepdims=True))
    return Field(amp, k * jnp.cos(ang), k * jnp.sin(ang), phase)


def _jittered_shapes(draws: Draws, reg, level, fat_mm):
    """The region's shapes with group and per-shape jitter applied, in canonical mm."""
    tab = {k: jnp.asarray(v)[reg] for k, v in _T.items() if k not in ("hot_hosts", "cold_hosts")}
    n = N_SLOTS
    # Group motion: the jitter of a group's first shape moves the whole group about its pivot.
    first = jnp.argmax(tab["group"][None, :] == jnp.arange(_N_GROUPS)[:, None], axis=1)  # (G,)
    gj = tab["jit"][first]  # (G, 3)
    gpos = draws.normal((_N_GROUPS, 2)) * gj[:, :1]
    gsize = jnp.exp(draws.normal((_N_GROUPS,)) * gj[:, 1])
    grot = draws.normal((_N_GROUPS,)) * gj[:, 2]
    g = tab["group"]
    is_first = (jnp.arange(n) == first[g]).astype(jnp.float32)
    # Per-shape jitter (not for a group's first shape, which carries the group's jitter).
    spos = draws.normal((n, 2)) * tab["jit"][:, :1] * (1 - is_first)[:, None]
    ssize = jnp.exp(draws.normal((n,)) * tab["jit"][:, 1] * (1 - is_first))
    srot = draws.normal((n,)) * tab["jit"][:, 2] * (1 - is_first)
    c, s = jnp.cos(grot[g]), jnp.sin(grot[g])
    rel = (tab["centre"] - tab["pivot"]) * gsize[g][:, None]
    rel = jnp.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], axis=-1)
    centre = tab["pivot"] + gpos[g] + rel + spos
    # Slice level: shapes outside their z window vanish, and shrink smoothly near its edges.
    z0, z1 = tab["zwin"][:, 0], tab["zwin"][:, 1]
    w = _smoothstep((level - z0) / 0.08 + 1.0) * _smoothstep((z1 - level) / 0.08 + 1.0)
    size = gsize[g] * ssize * jnp.sqrt(jnp.maximum(w, 1e-6))
    axes = tab["axes"] * size[:, None] + fat_mm * tab["fat"][:, None]
    present = tab["used"] * (w > 0.05)
    return Shapes(tab["label"], centre, jnp.maximum(axes, 1e-3), tab["rot"] + grot[g] + srot, tab["harm"],
                  tab["wig"], present)


def _lesions(key, reg, shapes: Shapes, kind: str, n_max: int, enabled):
    """`n_max` lesion shapes of `kind` ('hot' or 'cold') placed in random host organs of `shapes`."""
    if n_max == 0:
        z = jnp.zeros((0,))
        return Shapes(jnp.zeros((0,), jnp.int32), jnp.zeros((0, 2)), jnp.ones((0, 2)), z, jnp.zeros((0, 5)), z, z)
    hosts = jnp.asarray(_T[f"{kind}_hosts"])[reg]  # (n_hosts, 4)
    radius_range = jnp.asarray(_HOT_RADIUS_MM if kind == "hot" else _COLD_RADIUS_MM)[reg]
    draws = Draws(key, 8 * n_max + 1 + n_max * hosts.shape[0])
    count = draws.integers((), n_max + 1)
    logits = jnp.where(hosts[:, 3] > 0, jnp.log(jnp.maximum(hosts[:, 3], 1e-9)), -jnp.inf)
    h = draws.categorical(logits, (n_max,))
    slot = hosts[h, 0].astype(jnp.int32)
    r_lo, r_hi = hosts[h, 1], hosts[h, 2]
    # A point in the host's (rotated) ellipse at a radius fraction in [r_lo, r_hi], uniform in area.
    u = draws.uniform((n_max,))
    rf = jnp.sqrt(r_lo**2 + u * (r_hi**2 - r_lo**2))
    ang = draws.uniform((n_max,), maxval=2 * jnp.pi)
    ha, hb = shapes.axes[slot, 0], shapes.axes[slot, 1]
    hr = shapes.rot[slot]
    lx, ly = rf * ha * jnp.cos(ang), rf * hb * jnp.sin(ang)
    centre = shapes.centre[slot] + jnp.stack(
        [jnp.cos(hr) * lx - jnp.sin(hr) * ly, jnp.sin(hr) * lx + jnp.cos(hr) * ly], axis=-1)
    lo, hi = radius_range[0], radius_range[1]
    # Inside a host the lesion fits in it; around one (r_hi > 1, e.g. lymph nodes) it need not.
    hi_host = jnp.where(r_hi > 1.0, hi, jnp.maximum(0.45 * jnp.minimum(ha, hb), lo))
    radius = jnp.minimum(lo * jnp.exp(draws.uniform((n_max,)) * jnp.log(hi / lo)), hi_host)
    ecc = draws.uniform((n_max,), minval=0.75, maxval=1.0)
    rot = draws.uniform((n_max,), maxval=jnp.pi)
    present = (jnp.arange(n_max) < count).astype(jnp.float32) * shapes.present[slot] * enabled
    label = jnp.full((n_max,), LABEL_IDS[f"lesion_{kind}"], jnp.int32)
    return Shapes(label, centre, jnp.stack([radius, radius * ecc], -1), rot, jnp.zeros((n_max, 5)),
                  jnp.full((n_max,), 0.5), present)


def sample_anatomy(key, region, *, fov_mm=None, image_size=128, lesions=True, max_hot_lesions=4,
                   max_cold_lesions=3) -> Anatomy:
    """Draw one phantom's anatomy from `key`.

    Args:
      key: a `jax.random` key (the only source of randomness).
      region: region id (int, may be traced) or name.
      fov_mm: field of view across the larger image side in mm; None for the region's `FOV_MM`.
      image_size: the larger image side in pixels (sets the physical pixel size `fov_mm / image_size`).
      lesions: draw lesions (False: none; the anatomy from the same key is unchanged either way).
      max_hot_lesions, max_cold_lesions: static upper bounds; the counts are uniform in `0..max`.
    """
    reg = jnp.asarray(region if isinstance(region, jax.Array) else region_id(region), jnp.int32)
    fov = jnp.asarray(_FOV)[reg] if fov_mm is None else jnp.asarray(fov_mm, jnp.float32)
    k_anat, k_hot, k_cold = jax.random.split(key, 3)
    draws = Draws(k_anat, 2048)
    level = draws.uniform()
    fat_mm = jnp.where(reg == 0, 0.0, draws.uniform(minval=5.0, maxval=35.0))
    shapes = _jittered_shapes(draws, reg, level, fat_mm)
    a = draws.uniform((5,), minval=-1.0, maxval=1.0)
    body = (reg > 0).astype(jnp.float32)
    # Heads vary less than trunks and must stay inside the 256 mm brain field of view.
    spread = jnp.array([5.0, 5.0, math.radians(6.0), 0.07, 0.07]) + body * jnp.array([3.0, 3.0, 0.0, 0.03, 0.03])
    affine = spread * a + jnp.array([0, 0, 0, 1.0, 1.0])
    warp_wl = (80.0 + 70.0 * body, 200.0 + 100.0 * body)
    warp_amp = jnp.array([3.0, 3.0]) * (1.0 + body)
    warp = _random_field(draws, (2,), 6, warp_wl, warp_amp)
    wiggle = draws.normal((WIGGLE_GRID, WIGGLE_GRID))
    texture = draws.normal((TEXTURE_GRID, TEXTURE_GRID))
    tex_sd = draws.uniform(minval=0.03, maxval=0.10)
    enabled = jnp.float32(1.0 if lesions else 0.0)
    hot = _lesions(k_hot, reg, shapes, "hot", max_hot_lesions, enabled)
    cold = _lesions(k_cold, reg, shapes, "cold", max_cold_lesions, enabled)
    lung_mu = _MU["lung"] * draws.uniform(minval=0.8, maxval=1.2)
    return Anatomy(reg, fov / image_size, shapes, hot, cold, affine, warp, wiggle, texture, tex_sd, level, lung_mu)


# --- rasterisation --------------------------------------------------------------------------------------


def _field_on_grid(field: Field, x, y):
    """Evaluate a field on the grid `x` `(W,)`, `y` `(H,)` -> `(H, W)`: each plane wave splits into two
    separable terms, `sin(a + b) = sin a cos b + cos a sin b`, so this is one small matmul."""
    ax = field.kx[:, None] * x[None, :] + field.phase[:, None]  # (M, W)
    by = field.ky[:, None] * y[None, :]  # (M, H)
    fx = jnp.concatenate([jnp.sin(ax), jnp.cos(ax)])  # (2M, W)
    fy = jnp.concatenate([jnp.cos(by), jnp.sin(by)]) * jnp.concatenate([field.amp, field.amp])[:, None]
    return jnp.einsum("mh,mw->hw", fy, fx)


def _smooth_noise(noise, shape):
    """Cubic upsampling of coarse white noise to `shape`, rescaled to unit sd over the image."""
    field = jax.image.resize(noise, shape, method="cubic")
    field = field - jnp.mean(field)
    return field / (jnp.std(field) + 1e-6)


def _shape_table(shapes: Shapes, pixel):
    """Per-shape scalars `(n, 14)` for `_coverage`: everything that does not depend on the pixel."""
    c, s = jnp.cos(shapes.rot), jnp.sin(shapes.rot)
    ia, ib = 1.0 / shapes.axes[:, 0], 1.0 / shapes.axes[:, 1]
    h = shapes.harm
    return jnp.stack([
        shapes.centre[:, 0], shapes.centre[:, 1], c * ia, s * ia, c * ib, s * ib, ia, ib,
        h[:, 0], h[:, 1], h[:, 2], h[:, 3], h[:, 4], shapes.wig,
    ], axis=-1), shapes.present, 1.0 / pixel


def _coverage(X, Y, wig_field, row, inv_pixel):
    """Area fraction `(H, W)` of one shape (a `_shape_table` row) at each pixel.

    In the shape's frame `u, v` (semi-axes 1) the boundary is `u'^2 + v^2 = r^2` with the bent, egg-shaped
    abscissa `u' = u (1 + egg v) + bend v^2` (bean shapes, heads wider at the back) and the radius
    `r = 1 + h2c cos 2t + h2s sin 2t + h4c cos 4t` (squarer or rounder outlines). The signed distance is the
    first-order `(q - r^2) / |grad q|` with `q = u'^2 + v^2`, only accurate near the boundary, which is
    the only place the clipped coverage uses it. All polynomial but one reciprocal and one rsqrt, since
    this runs for every shape at every pixel.
    """
    cx, cy, ca, sa, cb, sb, ia, ib, h2c, h2s, h4c, bend, egg, wig = (row[i] for i in range(14))
    dx, dy = X - cx, Y - cy
    u = ca * dx + sa * dy
    v = cb * dy - sb * dx
    up = u * (1.0 + egg * v) + bend * v * v
    u2, v2 = up * up, v * v
    q = u2 + v2
    iq = 1.0 / (q + 1e-12)
    c2, s2 = (u2 - v2) * iq, 2.0 * up * v * iq
    r = 1.0 + h2c * c2 + h2s * s2 + h4c * (c2 * c2 - s2 * s2)
    g2 = (up * ia) ** 2 + (v * ib) ** 2  # |grad q|^2 / 4 in 1/mm^2
    dist = 0.5 * (q - r * r) * jax.lax.rsqrt(g2 + 1e-12) - wig * wig_field
    return jnp.clip(0.5 - dist * inv_pixel, 0.0, 1.0)


def render(anatomy: Anatomy, image_shape, values, *, hot_values=None, cold_factors=None, textured=None,
           supersample: int = 1):
    """Rasterise an anatomy: label map and value channels.

    Args:
      anatomy: from `sample_anatomy`.
      image_shape: static `(H, W)`.
      values: `(n_labels, K)` value of every label in each of `K` channels (e.g. activity, mu).
      hot_values: `(max_hot, K)` value of each hot lesion per channel (replaces the tissue); default:
        the `lesion_hot` row of `values`.
      cold_factors: `(max_cold, K)` factor each cold lesion applies to its host per channel (1 leaves the
        channel unchanged); default 1 (cold lesions then only mark the label map).
      textured: `(K,)` 0/1 which channels get the random texture (activities yes, mu no); default none.
      supersample: static S >= 1, sub-pixels per side.

    Returns:
      `(labels (H, W) int32, channels (K, H, W) float32)`.
    """
    H, W = image_shape
    S = int(supersample)
    if S < 1:
        raise ValueError(f"supersample must be an integer >= 1; got {supersample!r}")
    values = jnp.asarray(values, jnp.float32)
    K = values.shape[-1]
    n_hot, n_cold = anatomy.hot.label.shape[0], anatomy.cold.label.shape[0]
    hot_values = values[LABEL_IDS["lesion_hot"]][None].repeat(n_hot, 0) if hot_values is None else hot_values
    cold_factors = jnp.ones((n_cold, K)) if cold_factors is None else cold_factors
    textured = jnp.zeros((K,)) if textured is None else jnp.asarray(textured, jnp.float32)

    # Physical sub-pixel grid (radon.Geometry convention), then the inverse global affine and the warp.
    sub = anatomy.pixel_mm / S
    x = (jnp.arange(W * S) - (W * S - 1) / 2) * sub
    y = ((H * S - 1) / 2 - jnp.arange(H * S)) * sub
    tx, ty, rot, sx, sy = (anatomy.affine[i] for i in range(5))
    xs, ys = x - tx, y - ty
    cr, sr = jnp.cos(rot), jnp.sin(rot)
    warp_x = _field_on_grid(Field(*(f[0] for f in anatomy.warp)), x, y)
    warp_y = _field_on_grid(Field(*(f[1] for f in anatomy.warp)), x, y)
    X = (cr * xs[None, :] + sr * ys[:, None]) / sx + warp_x
    Y = (cr * ys[:, None] - sr * xs[None, :]) / sy + warp_y
    wig = _smooth_noise(anatomy.wiggle, (H * S, W * S))
    pixel = sub / jnp.sqrt(sx * sy)  # sub-pixel size in canonical mm

    # Every shape is one step of a scan that composites `V <- V + cov ((m - 1) V + v)` per channel:
    # m = 0, v = value paints a tissue (or a hot lesion) over what is below; m = f, v = 0 scales it (cold
    # lesions). Textures apply to tissues only, before the lesions are painted.
    def composite(chans, cov, m, v):
        return chans + cov[None] * ((m - 1.0)[:, None, None] * chans + v[:, None, None])

    def paint(carry, item):
        labels, chans = carry
        row, present, label, m, v = item
        cov = _coverage(X, Y, wig, row, inv_px) * present
        return (jnp.where(cov > 0.5, label, labels), composite(chans, cov, m, v)), None

    def paint_lesion(carry, item):
        # Lesions may overlap: a pixel is lesion where their union covers most of it (`union` is the
        # composited coverage), and a lesion smaller than a pixel still labels the pixel it covers most.
        labels, chans, union = carry
        row, present, label, m, v = item
        cov = _coverage(X, Y, wig, row, inv_px) * present
        union = union + cov * (1.0 - union)
        mark = (cov > 0.0) & ((union > 0.5) | (cov >= jnp.max(cov)))
        return (jnp.where(mark, label, labels), composite(chans, cov, m, v), union), None

    shapes = anatomy.shapes
    rows, present, inv_px = _shape_table(shapes, pixel)
    n = shapes.label.shape[0]
    items = (rows, present, shapes.label, jnp.zeros((n, K)), values[shapes.label])
    carry = (jnp.zeros((H * S, W * S), jnp.int32), jnp.zeros((K, H * S, W * S), jnp.float32))
    (labels, chans), _ = jax.lax.scan(paint, carry, items)
    tex = 1.0 + anatomy.texture_sd * _smooth_noise(anatomy.texture, (H * S, W * S))
    chans = chans * jnp.where(textured[:, None, None] > 0, tex[None], 1.0)
    les = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), anatomy.cold, anatomy.hot)
    if les.label.shape[0]:
        rows, present, _ = _shape_table(les, pixel)
        m = jnp.concatenate([cold_factors, jnp.zeros((n_hot, K))])
        v = jnp.concatenate([jnp.zeros((n_cold, K)), hot_values])
        carry = (labels, chans, jnp.zeros((H * S, W * S), jnp.float32))
        (labels, chans, _), _ = jax.lax.scan(paint_lesion, carry, (rows, present, les.label, m, v))
    if S > 1:
        chans = chans.reshape(K, H, S, W, S).mean(axis=(2, 4))
        labels = labels[S // 2 :: S, S // 2 :: S]
    return labels, chans


def mu_values(anatomy: Anatomy):
    """`(n_labels,)` attenuation (1/mm at 511 keV) of each label for this anatomy (its lung density)."""
    return jnp.asarray(MU_511_PER_MM).at[LABEL_IDS["lung"]].set(anatomy.lung_mu)


class Phantom(NamedTuple):
    """A rasterised phantom: `labels` `(H, W)` int32 (ids of `LABELS`), `mu` `(H, W)` in 1/mm at 511 keV,
    `anatomy` (the sampled parameters, to render activities of the same phantom)."""

    labels: jax.Array
    mu: jax.Array
    anatomy: Anatomy


def phantom(key, image_shape, region=None, *, fov_mm=None, lesions=True, max_hot_lesions=4,
            max_cold_lesions=3, supersample=1) -> Phantom:
    """Draw and rasterise one phantom: its label map and attenuation map (see the module docstring).

    `region`: a name from `REGIONS`, an id (int, or an int array, e.g. under `vmap`), or None to draw
    one uniformly from the key. `image_shape` `(H, W)` is static.
    """
    H, W = _check_shape(image_shape)
    if not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise ValueError(f"supersample must be an integer >= 1; got {supersample!r}")
    if region is None:
        k_reg, key = jax.random.split(key)
        region = Draws(k_reg, 1).integers((), len(REGIONS))
    elif not isinstance(region, jax.Array):  # a traced or concrete id array passes through
        region = region_id(region)
    anatomy = sample_anatomy(key, region, fov_mm=fov_mm, image_size=max(H, W), lesions=lesions,
                             max_hot_lesions=max_hot_lesions, max_cold_lesions=max_cold_lesions)
    mu = mu_values(anatomy)
    labels, chans = render(anatomy, (H, W), mu[:, None], supersample=supersample,
                           hot_values=jnp.full((max_hot_lesions, 1), _MU["lesion_hot"]))
    return Phantom(labels, chans[0], anatomy)


def _check_shape(image_shape):
    shape = tuple(image_shape)
    if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"image_shape must be two positive integers (H, W); got {image_shape!r}")
    return int(shape[0]), int(shape[1])
