"""Figures for people: a task's source, output, target and error, in sinogram and image space.

Every function writes one PNG atomically (temporary file, then rename) and returns its path. Columns
are samples; rows are kinds of picture. Sinograms are shown angle down, bin across; images as they lie.
"""

from __future__ import annotations

import numpy as np

from allpet_jax.atomic_write import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 80) -> str:
    """Write `fig` to `path` atomically (`atomic_write.atomic_path`), close it, return `path`."""
    plt = _plt()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def comparison_figure(path: str, rows: list, title: str = "", max_columns: int = 4) -> str:
    """`rows`: `[(name, (N, H, W) array, kind), ...]` with kind `'value'` (grey, shared scale with the
    other value rows), `'error'` (signed, blue-red, symmetric) or `'std'` (inferno, from 0)."""
    plt = _plt()
    n = min(max_columns, min(int(np.shape(a)[0]) for _, a, _ in rows))
    values = [np.asarray(a[:n]) for _, a, kind in rows if kind == "value"]
    vmax = float(np.percentile(np.concatenate([v.ravel() for v in values]), 99.5)) if values else 1.0
    fig, axes = plt.subplots(len(rows), n, figsize=(2.4 * n, 2.3 * len(rows)), squeeze=False)
    for r, (name, images, kind) in enumerate(rows):
        images = np.asarray(images[:n])
        if kind == "error":
            lim = float(np.percentile(np.abs(images), 99.5)) or 1.0
            style = {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}
        elif kind == "std":
            style = {"cmap": "inferno", "vmin": 0.0, "vmax": float(np.percentile(images, 99.5)) or 1.0}
        else:
            style = {"cmap": "gray_r", "vmin": 0.0, "vmax": vmax or 1.0}
        for c in range(n):
            ax = axes[r, c]
            im = ax.imshow(images[c], aspect="auto", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
        fig.colorbar(im, ax=axes[r, n - 1], fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def task_rows(source, output, target=None, std=None, channel: int = 0) -> list:
    """Rows for `comparison_figure` from `(N, C, ...)` arrays: source, output, target, output - target
    and the per-pixel standard deviation over samples when given."""
    rows = []
    if source is not None:
        rows.append(("source", np.asarray(source)[:, min(channel, np.shape(source)[1] - 1)], "value"))
    rows.append(("output", np.asarray(output)[:, channel], "value"))
    if target is not None:
        rows.append(("target", np.asarray(target)[:, channel], "value"))
        rows.append(("output - target", np.asarray(output)[:, channel] - np.asarray(target)[:, channel], "error"))
    if std is not None:
        rows.append(("std over samples", np.asarray(std)[:, channel], "std"))
    return rows
