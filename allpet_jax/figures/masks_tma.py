"""The RMAS/DMM and TMA figure: masks, views, attention maps and a clinician ROI edit on one phantom.

    python -m allpet_jax.figures.masks_tma --out masks_tma.png [--size 128] [--seed 0]

Rows: (1) image masks of 1, 2 and 6 cells of the 8 x 8 grid over the phantom (activity-weighted layout); (2) their sinogram masks
`M = 1[R(m) > tau]` and the full sinogram `S`; (3) the views `P = M * S` and `N = (1 - M) * S` (mask
mode) and `P = R(m x)`, `N = R((1 - m) x)` (exact image split) for the 6-cell mask; (4) TMA of the FBP of
`S`: hyper (red) and hypo (blue) outlines with the lesion labels (dashed), the image attention, and
the sinogram attention of the hot and of the cold part alone (each a sinusoidal band); (5) the
attention before and after a ROI edit (a circle added, the hot lesion's box suppressed), in the image
and in the sinogram. The phantom is a `simulate_pair` brain sample (full-dose `target`, 1e6 counts) in
which TMA finds a hot and a cold lesion, when the simulator is installed; otherwise a built-in ellipse
phantom.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import radon
from allpet_jax import attention, cli, masks, rois

TOOL = "allpet_jax.figures.masks_tma"  # the program in error lines


def ellipse_phantom(geom: radon.Geometry):
    """A body ellipse with a lung-like region, one hot and one cold lesion: `(image, labels, table)`."""
    X, Y = np.meshgrid(geom.x_mm, geom.y_mm)
    r = geom.fov_radius_mm
    labels = np.zeros(geom.image_shape, np.int32)
    labels[(X / (0.8 * r)) ** 2 + (Y / (0.6 * r)) ** 2 <= 1] = 1
    labels[((X + 0.4 * r) / (0.2 * r)) ** 2 + ((Y - 0.1 * r) / (0.3 * r)) ** 2 <= 1] = 2
    labels[(X - 0.35 * r) ** 2 + (Y - 0.15 * r) ** 2 <= (0.07 * r) ** 2] = 3
    labels[(X - 0.05 * r) ** 2 + (Y + 0.3 * r) ** 2 <= (0.1 * r) ** 2] = 4
    values = np.array([0.0, 1.0, 0.25, 4.0, 0.2], np.float32)
    table = {"background": 0, "soft_tissue": 1, "lung": 2, "lesion_hot": 3, "lesion_cold": 4}
    return values[labels], labels, table


def simulated_phantom(geom: radon.Geometry, seed: int, tries: int = 64):
    """The first `simulate_pair` brain sample (from `seed`, at the top of the simulator's count range)
    in which TMA finds part of a hot and part of a cold lesion: `(image, labels, table, sinogram)`, or
    None without the simulator. (Most samples have one or the other; see benchmarks/tma_quality.py.)"""
    try:
        from allpet_jax.data import phantoms
        from allpet_jax.data.simulate import simulate_pair
    except ImportError:
        return None
    hot, cold = phantoms.LABEL_IDS["lesion_hot"], phantoms.LABEL_IDS["lesion_cold"]
    # The brain's field of view (256 mm) matches the default 128 x 2 mm geometry, so mm are true mm.
    sim = jax.jit(lambda k: simulate_pair(k, "low_dose", geom, region="brain", dose=0.1, counts=1e6))
    out = None
    for i in range(tries):
        out = jax.device_get(sim(jax.random.fold_in(jax.random.key(seed), i)))
        labels, sino = np.asarray(out["labels"]), np.asarray(out["target"])[0]
        maps = attention.attention_maps(jnp.asarray(sino), geom)
        if np.any(np.asarray(maps["hyper"]) & (labels == hot)) and np.any(np.asarray(maps["hypo"]) & (labels == cold)):
            break
    return np.asarray(out["image"])[0], labels, dict(phantoms.LABEL_IDS), sino


def figure(geom: radon.Geometry, image, labels, label_table, sino=None, seed: int = 0):
    """The figure (a matplotlib `Figure`) for one phantom `image` `(H, W)`, its `labels` and sinogram.

    `sino` defaults to the noise-free `R(image)`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image, np.float32)
    sino = np.asarray(radon.forward(jnp.asarray(image), geom)) if sino is None else np.asarray(sino, np.float32)
    key = jax.random.key(seed)
    batch = {"target": jnp.asarray(sino)[None, None], "image": jnp.asarray(image)[None, None], "index": jnp.zeros(1, jnp.int32)}
    views = []
    for k in (1, 2, 6):  # activity-weighted layout, so the cells fall on the body
        config = masks.MaskConfig(count="fixed", n_cells=k, layout="activity")
        views.append(masks.make_rmas(geom, config)(key, batch))
    split = masks.make_rmas(geom, masks.MaskConfig(count="fixed", n_cells=6, layout="activity", mode="split"))(key, batch)

    maps = {k: np.asarray(v) for k, v in attention.attention_maps(jnp.asarray(sino), geom).items()}
    hot_map = np.where(maps["hyper"], maps["attention"], 0.0)
    cold_map = np.where(maps["hypo"], maps["attention"], 0.0)
    hot_sino, cold_sino = (np.asarray(attention.sinogram_attention(jnp.asarray(m), geom)) for m in (hot_map, cold_map))

    hot_id, cold_id = label_table["lesion_hot"], label_table["lesion_cold"]
    ys, xs = np.nonzero(labels == hot_id)
    x_mm, y_mm = geom.x_mm, geom.y_mm
    hot_box = [float(x_mm[xs].mean()), float(y_mm[ys].mean())]
    half = geom.fov_radius_mm
    edit = rois.parse_rois([
        {"op": "add", "shape": "circle", "center_mm": [-0.3 * half, -0.35 * half], "radius_mm": 0.1 * half, "note": "clinician adds"},
        {"op": "suppress", "shape": "box", "center_mm": hot_box, "size_mm": [0.3 * half, 0.3 * half], "note": "clinician suppresses"},
    ], where="figure")
    edited = np.asarray(rois.apply_rois(maps["attention"], edit, geom))
    edited_sino = np.asarray(attention.sinogram_attention(jnp.asarray(edited), geom))

    fig, axes = plt.subplots(5, 4, figsize=(13, 16.5))
    extent_img = [x_mm[0], x_mm[-1], y_mm[-1], y_mm[0]]
    s = geom.s_mm
    extent_sino = [s[0], s[-1], np.degrees(geom.theta[-1]), 0.0]

    def show_image(ax, data, title, cmap="gray", vmin=None, vmax=None):
        ax.imshow(data, cmap=cmap, extent=extent_img, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (mm)", fontsize=7)
        ax.set_ylabel("y (mm)", fontsize=7)

    def show_sino(ax, data, title, cmap="gray", vmin=None, vmax=None):
        ax.imshow(data, cmap=cmap, extent=extent_sino, aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("s (mm)", fontsize=7)
        ax.set_ylabel("theta (deg)", fontsize=7)

    for col, (k, out) in enumerate(zip((1, 2, 6), views)):
        show_image(axes[0, col], image, f"image mask m, {k} cell{'s' if k > 1 else ''}")
        axes[0, col].imshow(np.ma.masked_equal(np.asarray(out["image_mask"][0]), 0), cmap="autumn", alpha=0.6, extent=extent_img)
        show_sino(axes[1, col], np.asarray(out["sino_mask"][0]), f"sinogram mask M = 1[R(m) > {masks.MaskConfig.tau_mm} mm]", vmin=0, vmax=1)
    show_image(axes[0, 3], maps["image"], "FBP of S (TMA input)")
    show_sino(axes[1, 3], sino, "full sinogram S")
    six = views[2]
    vmax = float(sino.max())
    show_sino(axes[2, 0], np.asarray(six["positive"][0, 0]), "positive P = M * S", vmax=vmax)
    show_sino(axes[2, 1], np.asarray(six["negative"][0, 0]), "negative N = (1 - M) * S", vmax=vmax)
    vmax_split = float(np.asarray(split["full"]).max())  # R(x): activity x mm, not counts
    show_sino(axes[2, 2], np.asarray(split["positive"][0, 0]), "split P = R(m x)", vmax=vmax_split)
    show_sino(axes[2, 3], np.asarray(split["negative"][0, 0]), "split N = R((1 - m) x)", vmax=vmax_split)

    show_image(axes[3, 0], maps["image"], "coarse segmentation")
    for mask, colour in ((maps["hyper"], "red"), (maps["hypo"], "deepskyblue")):
        axes[3, 0].contour(x_mm, y_mm, mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0)
    for lid in (hot_id, cold_id):
        axes[3, 0].contour(x_mm, y_mm, (labels == lid).astype(float), levels=[0.5], colors="yellow", linewidths=0.8, linestyles="--")
    show_image(axes[3, 1], maps["attention"], "image attention A_img", cmap="inferno", vmin=0, vmax=1)
    show_sino(axes[3, 2], hot_sino, "A_sino of the hyper (hot) part", cmap="inferno", vmin=0, vmax=1)
    show_sino(axes[3, 3], cold_sino, "A_sino of the hypo (cold) part", cmap="inferno", vmin=0, vmax=1)

    show_image(axes[4, 0], maps["attention"], "A_img before ROI edit", cmap="inferno", vmin=0, vmax=1)
    show_image(axes[4, 1], edited, "after: circle added, hot box suppressed", cmap="inferno", vmin=0, vmax=1)
    show_sino(axes[4, 2], maps["sino_attention"], "A_sino before", cmap="inferno", vmin=0, vmax=1)
    show_sino(axes[4, 3], edited_sino, "A_sino after", cmap="inferno", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    fig.suptitle("RMAS / DMM masks and views (rows 1-3), TMA maps and a clinician ROI edit (rows 4-5)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """This CLI's flags, in `flag_values`: called from `__main__` only, so importing the module (as the tour
    notebook does) defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_string("out", "masks_tma.png", "PNG path", **into)
    flags.DEFINE_integer("size", 128, "image size, angles and bins", lower_bound=1, **into)
    flags.DEFINE_float("pixel_mm", 2.0, "pixel and bin size in mm (ellipse phantom)", **into)
    flags.DEFINE_integer("seed", 0, "phantom and mask seed", **into)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Draw the figure the flags in `flag_values` (parsed) describe and write it to `--out`."""
    del argv
    seed, pixel_mm = flag_values.seed, flag_values.pixel_mm
    geom = radon.Geometry.square(flag_values.size, flag_values.size, pixel_size=pixel_mm, bin_spacing=pixel_mm)
    simulated = simulated_phantom(geom, seed)
    if simulated is None:
        image, labels, table = ellipse_phantom(geom)
        fig = figure(geom, image, labels, table, seed=seed)
    else:
        image, labels, table, sino = simulated
        fig = figure(geom, image, labels, table, sino=sino, seed=seed)
    fig.savefig(flag_values.out, dpi=110)
    print(f"wrote {flag_values.out}")


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags)
