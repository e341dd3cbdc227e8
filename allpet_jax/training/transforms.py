"""Batch transforms the train step needs from the data pipeline: the TMA sinogram attention map.

`TmaTransform` adds `tma` `(B, n_angles, n_bins)` in [0, 1]: the FBP of channel 0 of the configured
sinogram is segmented without learned parameters (`allpet_jax.attention`), edited with the clinician
ROIs of `config.tma` (`allpet_jax.rois`), and forward-projected. It runs once per batch, jitted, on the
host CPU, before the batch reaches the model.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from allpet_jax import attention, rois
from allpet_jax.data.pipeline import geometry_from_config


class TmaTransform:
    def __init__(self, config):
        self.geom = geometry_from_config(config.data)
        self.tma_config = attention.TmaConfig.from_config(config.tma)
        self.rois = rois.rois_from_config(config.tma)
        rois.check_rois(self.rois, self.geom)
        self.key = config.tma.sinogram_key
        self._maps = jax.jit(functools.partial(_attention, geom=self.geom, config=self.tma_config, roi_list=self.rois))

    def __call__(self, batch: dict) -> dict:
        sino = np.asarray(batch[self.key])[:, 0]
        labels = batch.get("labels") if any(r.kind == "label" for r in self.rois) else None
        with jax.default_device(jax.devices("cpu")[0]):
            tma = self._maps(sino, labels=labels)
        return dict(batch, tma=np.asarray(tma))

    def __repr__(self) -> str:
        return f"TmaTransform(key={self.key!r}, rois={len(self.rois)})"


def _attention(sino, labels=None, *, geom, config, roi_list):
    maps = attention.attention_maps(sino, geom, config)
    if not roi_list:
        return maps["sino_attention"]
    edited = rois.apply_rois(maps["attention"], roi_list, geom, labels=labels)
    return attention.sinogram_attention(edited, geom)
