"""Batch transforms the train step needs from the data pipeline: the TMA sinogram attention map.

`TmaTransform` adds `tma` `(B, n_angles, n_bins)` in [0, 1]: the FBP of channel 0 of the configured
sinogram is segmented without learned parameters (`allpet_jax.attention`; or, with `tma.map='oracle'`,
the simulator's lesion labels stand in for the segmentation), edited with the clinician ROIs of
`config.tma` (`allpet_jax.rois`), and forward-projected. It runs once per batch, jitted, on the
host CPU, before the batch reaches the model.

Every length of the rule and of the ROIs is in mm, so each sample is segmented in its own physical
geometry (`pipeline.sample_geometry`): the simulator's pixel is its region's field of view / image size
(brain 256 mm, body 600 mm), users' files have `data.pixel_size`. A batch is split by geometry (two at
most from the simulator: brain and body) and each part runs through a function jitted for that geometry.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np

import radon
from allpet_jax import attention, rois
from allpet_jax.data import phantoms, pipeline


class TmaTransform:
    """`batch -> dict(batch, tma=...)`; `image_maps(batch)` is the segmentation behind it."""

    def __init__(self, config):
        self.data = config.data
        self.tma_config = attention.TmaConfig.from_config(config.tma)
        self.rois = rois.rois_from_config(config.tma)
        self.key = config.tma.sinogram_key
        self.map = config.tma.get("map", "segmented")
        if self.map not in TMA_MAPS:
            raise ValueError(f"config.tma.map must be one of {TMA_MAPS}; got {self.map!r}")
        if self.map == "oracle" and config.data.source != "simulated":
            raise ValueError("config.tma.map='oracle' reads the simulator's lesion labels; users' files carry none "
                             "(use 'segmented')")
        self._edits = {}  # geometry -> jitted `_edited_sinogram_attention`
        for geom in pipeline.sample_geometries(config.data):  # ROI errors show at start-up, not mid-epoch
            self._edit(geom)

    def geometries(self, batch: dict) -> list[radon.Geometry]:
        """Each sample's geometry in physical mm (`pipeline.sample_geometry` of its prompt's region id)."""
        n = len(batch[self.key])
        prompt = batch.get("prompt")
        regions = [None] * n if prompt is None else np.asarray(prompt)[:, 1].tolist()
        return [pipeline.sample_geometry(self.data, r) for r in regions]

    def __call__(self, batch: dict) -> dict:
        if self.map == "oracle":
            if batch.get("labels") is None:
                raise ValueError("config.tma.map='oracle' needs the batch's lesion labels ('labels', from the simulator)")
            image_attention = oracle_attention(batch["labels"])
        else:
            maps = self.image_maps(batch)
            if not self.rois:
                return dict(batch, tma=maps["sino_attention"])
            image_attention = maps["attention"]
        labels = batch.get("labels") if any(r.kind == "label" for r in self.rois) else None
        with jax.default_device(jax.devices("cpu")[0]):
            edit = lambda geom, *rows: self._edit(geom)(*rows)
            tma = by_geometry(edit, self.geometries(batch), image_attention, labels)
        return dict(batch, tma=tma)

    def image_maps(self, batch: dict, key: str | None = None) -> dict:
        """`attention.attention_maps` of each sample's sinogram (channel 0 of `batch[key]`, default the
        configured `tma.sinogram_key`) in its physical geometry, before the ROI edits: `body`, `tissue`,
        `hyper`, `hypo`, `reference`, `attention`, `image` `(B, H, W)` and `sino_attention`
        `(B, n_angles, n_bins)`, numpy."""
        sino = np.asarray(batch[key or self.key])[:, 0]
        segment = functools.partial(_attention_maps, config=self.tma_config)
        with jax.default_device(jax.devices("cpu")[0]):
            return by_geometry(segment, self.geometries(batch), sino)

    def _edit(self, geom: radon.Geometry) -> Callable:
        if geom not in self._edits:
            rois.check_rois(self.rois, geom)
            self._edits[geom] = jax.jit(functools.partial(_edited_sinogram_attention, geom=geom, roi_list=self.rois))
        return self._edits[geom]

    def __repr__(self) -> str:
        return f"TmaTransform(key={self.key!r}, rois={len(self.rois)}, geometries={len(self._edits)})"


TMA_MAPS = ("segmented", "oracle")


def oracle_attention(labels) -> np.ndarray:
    """The oracle image attention of label maps `(B, H, W)`: 1 on hot and cold lesion pixels, 0 elsewhere."""
    lesion_ids = [phantoms.LABEL_IDS["lesion_hot"], phantoms.LABEL_IDS["lesion_cold"]]
    return np.isin(np.asarray(labels), lesion_ids).astype(np.float32)


def by_geometry(fn: Callable, geoms: Sequence[radon.Geometry], *arrays):
    """`fn(geom, *rows)` for the rows of `arrays` (leading axis: samples) of each distinct geometry in
    `geoms` (one per sample), stitched back into sample order as numpy (any pytree `fn` returns).

    Each part is padded to a power of two rows (at most the batch), repeating its last row, so a jitted
    `fn` compiles a few shapes per geometry, not one per part size. `None` arrays pass through as None.
    """
    n = len(geoms)
    out = None
    for geom in dict.fromkeys(geoms):
        rows = np.flatnonzero([g == geom for g in geoms])
        size = min(1 << (len(rows) - 1).bit_length(), n)
        padded = np.concatenate([rows, np.full(size - len(rows), rows[-1])])
        part = jax.device_get(fn(geom, *(None if a is None else np.asarray(a)[padded] for a in arrays)))
        if out is None:
            out = jax.tree.map(lambda x: np.zeros((n,) + np.shape(x)[1:], np.asarray(x).dtype), part)
        jax.tree.map(lambda o, x: o.__setitem__(rows, np.asarray(x)[: len(rows)]), out, part)
    return out


def _attention_maps(geom, sino, *, config):
    return attention.attention_maps(sino, geom, config)


def _edited_sinogram_attention(image_attention, labels=None, *, geom, roi_list):
    """`A_sino` of the image attention `(N, H, W)` edited by the clinician ROIs."""
    return attention.sinogram_attention(rois.apply_rois(image_attention, roi_list, geom, labels=labels), geom)
