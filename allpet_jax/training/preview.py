"""The PNG grid of samples a run writes to its workdir: one row per kind of image, one column per sample."""

from __future__ import annotations

import numpy as np

from allpet_jax.plots import save_figure


def save_grid(rows, path: str, title: str = "", max_columns: int = 6) -> str:
    """`rows`: `[(name, (B, n_angles, n_bins) array), ...]`. Written atomically (temp file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_columns, min(int(np.shape(a)[0]) for _, a in rows))
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n, 2.2 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        images = np.asarray(images)
        vmax = float(np.percentile(images, 99.5)) or 1.0
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c], cmap="gray_r" if "error" not in name else "inferno", vmin=0, vmax=vmax, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=72)
