"""Projector throughput: this project's `radon.forward`/`radon.adjoint` against scikit-image and ASTRA (CPU).

    python benchmarks/radon_bench.py [--size 128] [--angles 180] [--repeats 7] [--batches 1,32]

Prints one Markdown table: images per second (median of `--repeats` timed runs after a warm-up/compile),
the speed-up over ASTRA's single-image throughput, and, for our jitted calls, compile time and the
compiled memory (XLA memory analysis: arguments + outputs + temporaries). Peers run in the same process
on the same inputs. ASTRA (`pip install astra-toolbox`) is optional: without it its rows are skipped.
Timing is for information; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import radon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.flop_rate import median_seconds  # noqa: E402


def ours(op: str, batch: int, geom: radon.Geometry, repeats: int):
    fn = radon.forward if op == "forward" else radon.adjoint
    shape = (batch,) + (geom.image_shape if op == "forward" else geom.sino_shape)
    x = jax.random.uniform(jax.random.key(0), shape)
    jitted = jax.jit(fn, static_argnums=1)
    start = time.perf_counter()
    compiled = jitted.lower(x, geom).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    mem_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    seconds = median_seconds(lambda: compiled(x).block_until_ready(), repeats)
    return seconds, compile_s, mem_mb


def skimage_peer(op: str, batch: int, geom: radon.Geometry, repeats: int):
    from skimage.transform import iradon
    from skimage.transform import radon as sk_radon

    degrees = np.rad2deg(geom.theta)
    rng = np.random.default_rng(0)
    if op == "forward":
        images = rng.random((batch,) + geom.image_shape)

        def run():
            for im in images:
                sk_radon(im, degrees, circle=False)

    else:
        sinos = rng.random((batch, geom.n_bins, geom.n_angles))  # scikit-image's layout

        def run():
            for s in sinos:
                iradon(s, degrees, output_size=geom.image_shape[0], filter_name=None, circle=False)

    return median_seconds(run, repeats)


def astra_peer(op: str, batch: int, geom: radon.Geometry, repeats: int):
    import astra

    H, W = geom.image_shape
    half_w, half_h = W * geom.pixel_size / 2, H * geom.pixel_size / 2
    vol = astra.create_vol_geom(H, W, -half_w, half_w, -half_h, half_h)
    proj = astra.create_proj_geom("parallel", geom.bin_spacing, geom.n_bins, geom.theta)
    pid = astra.create_projector("linear", proj, vol)
    rng = np.random.default_rng(0)
    if op == "forward":
        data = rng.random((batch,) + geom.image_shape).astype(np.float32)
        call = astra.create_sino
    else:
        data = rng.random((batch,) + geom.sino_shape).astype(np.float32)
        call = astra.create_backprojection

    def run():
        for d in data:
            ident, _ = call(d, pid)
            astra.data2d.delete(ident)

    try:
        return median_seconds(run, repeats)
    finally:
        astra.projector.delete(pid)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--angles", type=int, default=180)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    geom = radon.Geometry.square(args.size, n_angles=args.angles)
    batches = [int(b) for b in args.batches.split(",")]
    try:
        import astra  # noqa: F401

        have_astra = True
    except ImportError:
        have_astra = False

    print(f"# radon_bench: {args.size}x{args.size} image, {args.angles} angles, {args.size} bins, float32, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, median of {args.repeats}")
    print()
    print("| op | batch | system | images/s | vs ASTRA 1-image | compile s | compiled MB |")
    print("|---|---|---|---|---|---|---|")
    for op in ("forward", "adjoint"):
        astra_single = astra_peer(op, 1, geom, args.repeats) if have_astra else None
        for batch in batches:
            rows = []
            s, compile_s, mem_mb = ours(op, batch, geom, args.repeats)
            rows.append(("allpet radon (jax)", s, f"{compile_s:.2f}", f"{mem_mb:.1f}"))
            if have_astra:
                rows.append(("ASTRA cpu `linear`", astra_single if batch == 1 else astra_peer(op, batch, geom, args.repeats), "", ""))
            rows.append(("scikit-image", skimage_peer(op, batch, geom, max(3, args.repeats // 2)), "", ""))
            for name, seconds, c, m in rows:
                ips = batch / seconds
                ratio = f"{ips * astra_single:.1f}x" if astra_single else "n/a"
                print(f"| {op} | {batch} | {name} | {ips:.1f} | {ratio} | {c} | {m} |")
    if not have_astra:
        print("\nASTRA rows skipped: `pip install astra-toolbox` (the `bench` extra) to include them.")


if __name__ == "__main__":
    main()
