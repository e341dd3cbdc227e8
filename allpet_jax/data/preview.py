"""Preview one simulated pair: source and target sinograms, their FBP images, and the ground truth.

    python -m allpet_jax.data.preview --task low_dose --out preview.png [--seed 0] [--size 128]
        [--angles N] [--region brain] [--tracer 18F-FDG]

Rows: one per sinogram channel (source channels, then target channels): the sinogram (angles down,
bins across) and its Hann-filtered FBP. The last row shows the noise-free target's FBP, the true
activity `image`, the attenuation map and the label map. Writes a PNG with matplotlib's Agg backend
(no display needed). It is a look at the data, not an evaluation.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from allpet_jax import cli
from allpet_jax.tasks import TASKS

TOOL = "allpet_jax.data.preview"  # the program in error lines


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


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """This CLI's flags, in `flag_values`: called from `__main__` only, so importing the module defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_enum("task", None, TASKS, "the task whose pair to draw", **into)
    flags.DEFINE_string("out", None, "output PNG path", **into)
    flags.DEFINE_integer("seed", 0, "simulation seed", **into)
    flags.DEFINE_integer("size", 128, "image side and number of bins", lower_bound=1, **into)
    flags.DEFINE_integer("angles", None, "number of angles (default: --size)", lower_bound=1, **into)
    flags.DEFINE_string("region", None, "phantom region (default: the simulator's draw)", **into)
    flags.DEFINE_string("tracer", None, "tracer (default: the simulator's draw)", **into)
    for name in ("task", "out"):
        flags.mark_flag_as_required(name, flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Simulate the pair the flags in `flag_values` (parsed) describe and write its figure to `--out`."""
    del argv
    import jax

    import radon
    from allpet_jax.data.simulate import simulate_pair

    task = flag_values.task
    geom = radon.Geometry.square(flag_values.size, flag_values.angles)
    options = {k: v for k, v in (("region", flag_values.region), ("tracer", flag_values.tracer)) if v is not None}
    sample = jax.jit(lambda key: simulate_pair(key, task, geom, **options))(jax.random.key(flag_values.seed))
    fig = preview_figure(sample, geom, task)
    fig.savefig(flag_values.out, dpi=80)
    print(f"wrote {flag_values.out}")


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags)
