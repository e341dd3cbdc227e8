"""Clinician regions of interest (ROIs) that add to or suppress the TMA image attention.

DESIGN.md 2.4. A ROI is one edit of the image attention `A_img` `(..., H, W)`:

* `add`: `A <- max(A, weight * region)`; `suppress`: `A <- A * (1 - weight * region)`
  (`weight` in [0, 1], default 1: `suppress` with weight 1 zeroes the region).

Edits are applied in the order given; the sinogram attention is then recomputed from the edited map
(`allpet_jax.attention.sinogram_attention`). A region is one of:

* a shape in mm, in the geometry's coordinates (x to the right, y up, origin at the image centre; a
  pixel belongs to the shape when its centre does):
  `{"op": "add", "shape": "circle", "center_mm": [x, y], "radius_mm": r}`,
  `{"op": "add", "shape": "ellipse", "center_mm": [x, y], "semi_axes_mm": [a, b], "angle_deg": 30}`
  (`a` along the direction `angle_deg` counter-clockwise from +x), or
  `{"op": "add", "shape": "box", "center_mm": [x, y], "size_mm": [width, height]}` (axis-aligned);
* a label-mask file: `{"op": "add", "file": "lesion.npy", "value": 3}`: a `.npy` (read with
  `allow_pickle=False`, laid out `(H, W)` like the images, row 0 at the top) or a NIfTI slice (read
  with `allpet_jax.data.loaders.read_nifti`, which reorients the voxels exactly as NIfTI activity
  images are read, so a label mask drawn on the same scan lines up with it). The region is
  the pixels equal to `value`, or every non-zero pixel without `value`. A relative path is taken
  relative to the JSON file that names it;
* a label name, for data that carry a label map (`labels` from the simulator):
  `{"op": "suppress", "label": "bladder"}`, looked up in the phantoms' label table.

Every entry may also carry `"weight"` and a free-text `"note"`. ROIs come from `config.tma.rois` (a
list of such dicts) and/or `config.tma.roi_file` (a JSON file holding the list, or `{"rois": [...]}`):
`rois_from_config`. Specs are checked when read and again against a geometry: a shape whose centre is
outside the field of view or that covers no pixel, an unknown label (the message lists the known
ones), malformed JSON (file, line and column), unknown or missing keys all raise `ValueError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import radon

OPS = ("add", "suppress")
SHAPES = ("circle", "ellipse", "box")
_COMMON = {"op", "weight", "note"}
_KEYS = {
    "circle": {"shape", "center_mm", "radius_mm"},
    "ellipse": {"shape", "center_mm", "semi_axes_mm", "angle_deg"},
    "box": {"shape", "center_mm", "size_mm"},
    "label": {"label"},
    "file": {"file", "value"},
}
_OPTIONAL = {"angle_deg", "value", "weight", "note"}


@dataclasses.dataclass(frozen=True)
class Roi:
    """One checked ROI edit (see the module docstring). `kind` is a shape name, "label" or "file";
    `params` holds the kind's numbers as tuples; `where` names the spec's origin for messages."""

    op: str
    kind: str
    params: tuple[tuple[str, Any], ...]
    weight: float = 1.0
    where: str = "ROI"

    def get(self, name, default=None):
        return dict(self.params).get(name, default)


# ---------------------------------------------------------------------------------------------------
# Reading specs


def parse_rois(spec, *, where: str = "config", base_dir: str | None = None) -> tuple[Roi, ...]:
    """Check a list of ROI dicts (or `{"rois": [...]}`) and return them as `Roi`s.

    `where` names the origin in error messages; `base_dir` resolves relative `file` paths.
    """
    if isinstance(spec, Mapping):
        extra = sorted(set(spec) - {"rois"})
        if extra or "rois" not in spec:
            raise ValueError(f"{where}: unknown top-level key(s) {extra}; expected only 'rois' (a list of ROIs)")
        spec = spec["rois"]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"{where}: ROIs must be a list of ROI objects (or {{'rois': [...]}}); got {type(spec).__name__}")
    return tuple(_parse_one(item, f"{where}, ROI #{n}", base_dir) for n, item in enumerate(spec))


def load_rois(path) -> tuple[Roi, ...]:
    """Read and check the ROIs of a JSON file (a list of ROI objects, or `{"rois": [...]}`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"ROI file {path!r} does not exist") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"ROI file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return parse_rois(spec, where=f"ROI file {path!r}", base_dir=os.path.dirname(os.path.abspath(path)))


def rois_from_config(tma) -> tuple[Roi, ...]:
    """The ROIs of a `config.tma` section: `tma.rois` (list of dicts) followed by those of `tma.roi_file`."""
    rois = ()
    listed = tma.get("rois") if hasattr(tma, "get") else None
    if listed:
        rois += parse_rois([_plain(r) for r in listed], where="config.tma.rois")
    path = tma.get("roi_file") if hasattr(tma, "get") else None
    if path:
        rois += load_rois(path)
    return rois


def _plain(x):
    """ConfigDict/FrozenConfigDict -> dict, recursively (lists and tuples kept)."""
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _parse_one(item, where: str, base_dir: str | None) -> Roi:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: each ROI must be an object with an 'op' and a region; got {item!r}")
    item = dict(item)
    op = item.get("op")
    if op not in OPS:
        raise ValueError(f"{where}: 'op' must be one of {OPS}; got {op!r}")
    kinds = [k for k in ("shape", "label", "file") if k in item]
    if len(kinds) != 1:
        raise ValueError(
            f"{where}: give exactly one region key of 'shape' {SHAPES}, 'label' (a label name) or 'file' "
            f"(a label-mask .npy/.nii); got {kinds or 'none'} in keys {sorted(item)}"
        )
    kind = item["shape"] if kinds[0] == "shape" else kinds[0]
    if kinds[0] == "shape" and kind not in SHAPES:
        raise ValueError(f"{where}: unknown shape {kind!r}; known shapes: {SHAPES}")
    allowed = _KEYS[kind] | _COMMON
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ValueError(f"{where} ({kind}): unknown key(s) {unknown}; allowed keys: {sorted(allowed)}")
    missing = sorted(k for k in _KEYS[kind] - _OPTIONAL if k not in item)
    if missing:
        raise ValueError(f"{where} ({kind}): missing key(s) {missing}; a {kind} needs {sorted(_KEYS[kind] - _OPTIONAL)}")
    weight = _number(item.get("weight", 1.0), "weight", where)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"{where}: 'weight' must be in [0, 1]; got {weight}")

    params: dict[str, Any] = {}
    if kind in SHAPES:
        params["center_mm"] = _pair(item["center_mm"], "center_mm", where)
        if kind == "circle":
            params["radius_mm"] = _positive(item["radius_mm"], "radius_mm", where)
        elif kind == "ellipse":
            a, b = _pair(item["semi_axes_mm"], "semi_axes_mm", where)
            params["semi_axes_mm"] = (_positive(a, "semi_axes_mm[0]", where), _positive(b, "semi_axes_mm[1]", where))
            params["angle_deg"] = _number(item.get("angle_deg", 0.0), "angle_deg", where)
        else:
            w, h = _pair(item["size_mm"], "size_mm", where)
            params["size_mm"] = (_positive(w, "size_mm[0]", where), _positive(h, "size_mm[1]", where))
    elif kind == "label":
        if not isinstance(item["label"], str) or not item["label"]:
            raise ValueError(f"{where}: 'label' must be a label name (a string); got {item['label']!r}")
        params["label"] = item["label"]
    else:
        path = item["file"]
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}: 'file' must be a path to a .npy or .nii/.nii.gz label mask; got {path!r}")
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not (path.endswith(".npy") or path.endswith(".nii") or path.endswith(".nii.gz")):
            raise ValueError(f"{where}: label-mask file {path!r} must be .npy, .nii or .nii.gz")
        if not os.path.exists(path):
            raise ValueError(f"{where}: label-mask file {path!r} does not exist")
        params["file"] = path
        if "value" in item:
            value = item["value"]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{where}: 'value' must be an integer label value; got {value!r}")
            params["value"] = value
    return Roi(op=op, kind=kind, params=tuple(params.items()), weight=weight, where=where)


def _number(value, name, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {name!r} must be a finite number; got {value!r}")
    return float(value)


def _positive(value, name, where) -> float:
    value = _number(value, name, where)
    if value <= 0:
        raise ValueError(f"{where}: {name!r} must be a positive length in mm; got {value}")
    return value


def _pair(value, name, where) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{where}: {name!r} must be two numbers [x, y] in mm; got {value!r}")
    return (_number(value[0], f"{name}[0]", where), _number(value[1], f"{name}[1]", where))


# ---------------------------------------------------------------------------------------------------
# Regions


def shape_region(roi: Roi, geom: radon.Geometry) -> np.ndarray:
    """The pixels of a shape ROI, `(H, W)` float32 0/1 (pixel centres inside the shape)."""
    H, W = geom.image_shape
    x = geom.x_mm[None, :]
    y = geom.y_mm[:, None]
    cx, cy = roi.get("center_mm")
    half_w, half_h = W * geom.pixel_size / 2, H * geom.pixel_size / 2
    if not (-half_w <= cx <= half_w and -half_h <= cy <= half_h):
        raise ValueError(
            f"{roi.where} ({roi.kind}): centre ({cx:g}, {cy:g}) mm lies outside the field of view x in "
            f"[{-half_w:g}, {half_w:g}] mm, y in [{-half_h:g}, {half_h:g}] mm (origin at the image centre, x right, "
            "y up); coordinates are in mm, not pixels"
        )
    dx, dy = x - cx, y - cy
    if roi.kind == "circle":
        inside = dx**2 + dy**2 <= roi.get("radius_mm") ** 2
    elif roi.kind == "ellipse":
        a, b = roi.get("semi_axes_mm")
        t = math.radians(roi.get("angle_deg"))
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    else:
        w, h = roi.get("size_mm")
        inside = (np.abs(dx) <= w / 2) & (np.abs(dy) <= h / 2)
    inside = np.broadcast_to(inside, (H, W))
    if not inside.any():
        raise ValueError(
            f"{roi.where} ({roi.kind}): covers no pixel centre (pixels are {geom.pixel_size:g} mm); make it larger"
        )
    return inside.astype(np.float32)


def file_region(roi: Roi, geom: radon.Geometry) -> np.ndarray:
    """The pixels of a label-mask-file ROI, `(H, W)` float32 0/1."""
    path = roi.get("file")
    try:
        if path.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
        else:
            from allpet_jax.data.loaders import read_nifti

            data = read_nifti(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{roi.where}: cannot read label-mask file {path!r}: {e}") from None
    data = np.asarray(data)
    if data.ndim == 3 and 1 in (data.shape[0], data.shape[-1]):
        data = data.reshape(data.shape[:2] if data.shape[-1] == 1 else data.shape[1:])
    if data.shape != tuple(geom.image_shape):
        raise ValueError(
            f"{roi.where}: label mask {path!r} has shape {data.shape}; expected the image shape {geom.image_shape}"
        )
    value = roi.get("value")
    region = data != 0 if value is None else data == value
    if not region.any():
        raise ValueError(
            f"{roi.where}: label mask {path!r} has no pixel "
            + ("that is non-zero" if value is None else f"equal to {value} (values present: {np.unique(data)[:20].tolist()})")
        )
    return region.astype(np.float32)


def default_label_table() -> dict[str, int]:
    """The phantoms' label name -> id table (`allpet_jax.data.phantoms.LABEL_IDS`)."""
    from allpet_jax.data import phantoms

    return dict(phantoms.LABEL_IDS)


def label_id(roi: Roi, label_table: Mapping[str, int]) -> int:
    name = roi.get("label")
    if name not in label_table:
        raise ValueError(f"{roi.where}: unknown label {name!r}; known labels: {sorted(label_table)}")
    return int(label_table[name])


def check_rois(rois: Sequence[Roi], geom: radon.Geometry, label_table: Mapping[str, int] | None = None) -> None:
    """Check every ROI against a geometry (and label names against `label_table` when given)."""
    for roi in rois:
        if roi.kind in SHAPES:
            shape_region(roi, geom)
        elif roi.kind == "file":
            file_region(roi, geom)
        elif label_table is not None:
            label_id(roi, label_table)


def apply_rois(attention, rois: Sequence[Roi], geom: radon.Geometry, labels=None, label_table=None):
    """Edit the image attention `(..., H, W)` with `rois` in order; jit-compatible (regions of shapes
    and files are constants; label regions come from `labels` `(..., H, W)` int). Returns the edited map.
    """
    out = jnp.asarray(attention, jnp.float32)
    for roi in rois:
        if roi.kind in SHAPES:
            region = jnp.asarray(shape_region(roi, geom))
        elif roi.kind == "file":
            region = jnp.asarray(file_region(roi, geom))
        else:
            if labels is None:
                raise ValueError(f"{roi.where}: label ROI {roi.get('label')!r} needs the data's label map (labels=...)")
            table = default_label_table() if label_table is None else label_table
            region = (jnp.asarray(labels) == label_id(roi, table)).astype(jnp.float32)
        if roi.op == "add":
            out = jnp.maximum(out, roi.weight * region)
        else:
            out = out * (1.0 - roi.weight * region)
    return out
