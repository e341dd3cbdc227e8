"""Preview one simulated pair: source and target sinograms, their FBP images, and the ground truth.

    python -m allpet_jax.data.preview --task low_dose --out preview.png [--seed 0] [--size 128]
        [--angles N] [--region brain] [--tracer 18F-FDG]

Rows: one per sinogram channel (source channels, then target channels): the sinogram (angles down,
bins across) and its Hann-filtered FBP. The last row shows the noise-free target's FBP, the true
activity `image`, the attenuation map and the label map. Writes a PNG with matplotlib's Agg backend
(no display needed). It is a look at the data, not an evaluation.
"""

from __future__ import annotations

import argparse

import numpy as np


def preview_figure(sample: dict, geom, task: str):
    """A matplotlib figure of one `simulate_pair` sample (numpy or jax arrays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import radon
    from allpet_jax.data.kinetics import TRACERS
    from allpet_jax.data.phantoms import LABELS, REGIONS

    s = {k: np.asarray(v) for k, v in sample.items()}
    tracer, region, _ = (int(i) for i in s["prompt"])
    rows = [(f"source[{c}]", s["source"][c]) for c in range(s["source"].shape[0])]
    rows += [(f"target[{c}]", s["target"][c]) for c in range(s["target"].shape[0])]
    fig, axes = plt.subplots(len(rows) + 1, 4, figsize=(13, 3.2 * (len(rows) + 1)), squeeze=False)
    for (name, sino), ax in zip(rows, axes):
        image = np.asarray(radon.fbp(sino, geom, filter="hann"))
        ax[0].imshow(sino, cmap="magma", aspect="auto")
        ax[0].set_title(f"{name} sinogram ({sino.sum():.3g} counts)")
        ax[1].imshow(np.clip(image, 0, None), cmap="magma", vmax=np.percentile(image, 99.7))
        ax[1].set_title(f"{name} FBP (Hann)")
        for a in ax[2:]:
            a.set_visible(False)
    last = axes[-1]
    clean = np.asarray(radon.fbp(s["target_clean"][0], geom, filter="hann"))
    last[0].imshow(np.clip(clean, 0, None), cmap="magma", vmax=np.percentile(clean, 99.7))
    last[0].set_title("target_clean[0] FBP")
    last[1].imshow(s["image"][0], cmap="magma", vmax=np.percentile(s["image"][0], 99.7))
    last[1].set_title("image[0] (kBq/mL)")
    last[2].imshow(s["mu"], cmap="gray", vmin=0, vmax=0.018)
    last[2].set_title("mu (1/mm, 511 keV)")
    last[3].imshow(s["labels"], cmap="tab20", vmin=0, vmax=len(LABELS) - 1, interpolation="nearest")
    last[3].set_title("labels")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    dose = float(s.get("dose", 1.0))
    fig.suptitle(f"{task}: {TRACERS[tracer]}, {REGIONS[region]}" + (f", dose {dose:.3g}" if dose != 1.0 else ""))
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="one of allpet_jax.tasks.TASKS")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side and number of bins")
    p.add_argument("--angles", type=int, default=None, help="number of angles (default: --size)")
    p.add_argument("--region", default=None)
    p.add_argument("--tracer", default=None)
    args = p.parse_args(argv)

    import jax

    import radon
    from allpet_jax.data.simulate import simulate_pair
    from allpet_jax.tasks import TASKS

    if args.task not in TASKS:
        p.error(f"--task must be one of {TASKS}; got {args.task!r}")
    geom = radon.Geometry.square(args.size, args.angles)
    options = {k: v for k, v in (("region", args.region), ("tracer", args.tracer)) if v is not None}
    try:
        sample = jax.jit(lambda key: simulate_pair(key, args.task, geom, **options))(jax.random.key(args.seed))
    except ValueError as e:
        p.error(str(e))
    fig = preview_figure(sample, geom, args.task)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
