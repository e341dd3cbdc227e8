"""The radon demo: a phantom, its PET sinogram, and FBP and OSEM reconstructions in one PNG.

    python -m radon.demo --out out/radon_demo.png [--size 128] [--angles 180] [--counts 3e5] [--seed 0]

The phantom is the modified Shepp-Logan head (Toft's intensities) scaled to a 256 mm field of view, with
a water-like mu-map. Its sinogram follows `radon.pet`: attenuation, Poisson counts at `--counts` total.
FBP reconstructs the attenuation-corrected counts; OSEM uses the full model.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

import radon

TOOL = "radon.demo"  # the program in error lines

# (density, a, b, x0, y0, phi in degrees) in units of the half field of view: the modified Shepp-Logan.
SHEPP_LOGAN = (
    (1.0, 0.69, 0.92, 0.0, 0.0, 0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0),
)


def shepp_logan(geom: radon.Geometry, supersample: int = 4) -> np.ndarray:
    """`(H, W)` float32 phantom, area-averaged over `supersample**2` points per pixel."""
    half = 0.5 * geom.image_shape[1] * geom.pixel_size
    offsets = ((np.arange(supersample) + 0.5) / supersample - 0.5) * geom.pixel_size
    x = (geom.x_mm[None, :, None, None] + offsets[None, None, None, :]) / half
    y = (geom.y_mm[:, None, None, None] + offsets[None, None, :, None]) / half
    image = np.zeros(x.shape[:2] + (supersample, supersample))
    for rho, a, b, x0, y0, phi in SHEPP_LOGAN:
        c, s = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
        u, v = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
        image = image + rho * ((u / a) ** 2 + (v / b) ** 2 <= 1)
    return np.maximum(image.mean(axis=(2, 3)), 0.0).astype(np.float32)  # 1 - 0.8 - 0.2 rounds below 0


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The demo's flags, in `flag_values`: called from `__main__` only, so importing the module defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_string("out", "out/radon_demo.png", "PNG path", **into)
    flags.DEFINE_integer("size", 128, "image side in pixels (and detector bins); the field of view is 256 mm",
                         lower_bound=1, **into)
    flags.DEFINE_integer("angles", 180, "projection angles over [0, pi)", lower_bound=1, **into)
    flags.DEFINE_float("counts", 3e5, "total expected counts in the sinogram", lower_bound=0.0, **into)
    flags.DEFINE_integer("seed", 0, "Poisson noise seed", **into)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Simulate, reconstruct and draw with the flags in `flag_values` (parsed); writes `--out`."""
    if len(argv) > 1:
        _fail(f"unexpected argument(s) {' '.join(argv[1:])}: every input is a --flag (see --help)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, size = flag_values.out, flag_values.size
    start = time.perf_counter()
    geom = radon.Geometry.square(size, n_angles=flag_values.angles, pixel_size=256.0 / size, bin_spacing=256.0 / size)
    activity = shepp_logan(geom)
    mu = 0.0096 * (activity > 0)  # water at 511 keV, 1/mm
    attenuation = radon.attenuation_factors(mu, geom)
    trues = radon.expected_counts(activity, geom, attenuation=attenuation)
    ybar = trues * (flag_values.counts / float(trues.sum()))
    counts = radon.poisson_counts(jax.random.key(flag_values.seed), ybar)
    fbp = radon.fbp(counts / attenuation, geom, filter="hann")
    osem = radon.osem(counts, geom, n_iter=4, n_subsets=12, attenuation=attenuation)
    osem = osem * float(activity.sum() / osem.sum())
    fbp = fbp * float(activity.sum() / fbp.sum())

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [
        (activity, "phantom (activity)"),
        (np.asarray(counts), f"sinogram: {int(np.asarray(counts).sum()):,} counts"),
        (np.asarray(fbp), "FBP (Hann), attenuation-corrected"),
        (np.asarray(osem), "OSEM 4 it x 12 subsets"),
    ]
    for ax, (img, title) in zip(axes, panels):
        if "sinogram" in title:
            ax.imshow(img, cmap="gray_r", aspect="auto")
        else:  # one colour scale for the phantom and both reconstructions
            ax.imshow(img, cmap="hot", vmin=0.0, vmax=float(activity.max()))
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, out)  # never leave a half-written figure under the final name
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


# The project's command-line convention (`allpet_jax.cli`, which radon, the bottom layer, does not import): a
# bad flag is one line, `radon.demo: error: ...`, with exit status 2; --help exits 0.
def _fail(message: str) -> None:
    print(f"{TOOL}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list) -> list:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e} (see --help)")
    except SystemExit as e:  # absl's --help prints the usage, then exits 1: a request met, not an error
        sys.exit(0 if e.code == 1 else e.code)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse_flags)
