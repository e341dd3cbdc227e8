"""FLOP rates for the training benchmarks: achieved GFLOP/s, the machine's sgemm peak beside it, and a
check of where the FLOP count comes from. Used by `train_bench.py` and `unet_bench.py`.

Where the count comes from: `compiled.cost_analysis()["flops"]`, XLA's cost analysis of the optimised,
compiled step (HloCostAnalysis), per device program. Nothing is run to get it. What it includes,
measured on JAX 0.10's CPU backend:

- a multiply-add in a matmul or convolution is 2 FLOPs (`conv_check` measures this every run);
- convolution taps that land on SAME padding's zeros are not counted: a 3 x 3 SAME convolution on
  32 x 32 counts 94 x 94 of the 96 x 96 (output, tap) pairs, 4 % under `2 B H W Cin Cout kh kw`, more
  at smaller sizes. A backend that multiplies by the padding's zeros does more work than counted, so
  utilisation from this count can be slightly conservative;
- every elementwise arithmetic op is 1 FLOP per element, so the optimiser's update (AdamW's moments,
  the EMA) and the arithmetic of normalisation and activations are in the count (SiLU: 4 per element);
- `exp`, `log`, `sqrt`, `rsqrt`, `tanh` are not: XLA counts them apart as `transcendentals` (SiLU's
  exp is one).

So "achieved GFLOP/s" is XLA's FLOPs per step / median step seconds, and utilisation is that over the
best float32 matmul rate measured in the same run (`sgemm_gflop_per_s`): numpy's BLAS and XLA's
jitted `jnp.matmul` on the default device. It is not a profiler: it cannot say which op is slow.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

SGEMM_N = 2048  # 2 n^3 = 17.2 GFLOP: a fraction of a second on a few CPU cores; small for a big GPU
CONV_CHECK = dict(batch=8, height=32, width=32, c_in=64, c_out=64, kernel=3, padding="SAME")


def gflop_per_s(flops: float, seconds: float) -> float:
    """Achieved rate in GFLOP/s: `flops` (per step) done in `seconds` (per step)."""
    return flops / seconds / 1e9


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` calls after one warm-up call (compile, BLAS threads,
    caches), each waited for with `jax.block_until_ready` (numpy results pass through)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def sgemm_gflop_per_s(n: int = SGEMM_N, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an `(n, n) @ (n, n)` float32 matmul (2 n^3 FLOPs), median of `repeats`, in numpy and in
    jitted `jax.numpy` on the default device."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n, n), dtype=np.float32)
    matmul = jax.jit(jnp.matmul)
    a_dev, b_dev = jax.device_put(a), jax.device_put(b)
    flops = 2.0 * n**3
    return {"numpy": gflop_per_s(flops, median_seconds(lambda: a @ b, repeats)),
            "jax.numpy": gflop_per_s(flops, median_seconds(lambda: matmul(a_dev, b_dev),
                                                            repeats))}


def describe_peak(peaks: dict[str, float], n: int = SGEMM_N) -> str:
    """The reference rows, as a Markdown table: the sgemm rates measured in this run."""
    rows = "\n".join(f"| sgemm {n} x {n} float32, {name} | {rate:.1f} |" for name, rate in peaks.items())
    return f"| peak reference (measured in this run) | GFLOP/s |\n|---|---|\n{rows}"


def _taps_inside(size: int, kernel: int, padding: str) -> int:
    """(output, kernel tap) pairs along one axis, stride 1, whose input lies inside the image."""
    out, before = (size, (kernel - 1) // 2) if padding == "SAME" else (size - kernel + 1, 0)
    return sum(0 <= o - before + t < size for o in range(out) for t in range(kernel))


def conv_hand_flops(batch, height, width, c_in, c_out, kernel, padding) -> int:
    """2 FLOPs for each multiply-add whose input is inside the image (taps on the padding are left out)."""
    return 2 * batch * c_in * c_out * _taps_inside(height, kernel, padding) * _taps_inside(width, kernel, padding)


def conv_xla_flops(batch, height, width, c_in, c_out, kernel, padding) -> float:
    """XLA's `cost_analysis()["flops"]` for one compiled NHWC `conv_general_dilated`, stride 1."""
    x = jax.ShapeDtypeStruct((batch, height, width, c_in), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, c_in, c_out), jnp.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    cost = jax.jit(conv).lower(x, w).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per device program
    return float(cost["flops"])


def conv_check() -> str:
    """One line: XLA's FLOPs for one convolution (`CONV_CHECK`) against the hand count, measured now."""
    s = CONV_CHECK
    xla, hand = conv_xla_flops(**s), conv_hand_flops(**s)
    with_padding = 2 * s["batch"] * s["height"] * s["width"] * s["c_in"] * s["c_out"] * s["kernel"] ** 2
    return (f"FLOP count check, one conv {s['batch']} x {s['height']} x {s['width']}, {s['c_in']} -> {s['c_out']} "
            f"channels, {s['kernel']} x {s['kernel']} {s['padding']}: XLA {xla / 1e6:.2f} MFLOP "
            f"{'=' if xla == hand else '!='} hand count {hand / 1e6:.2f} MFLOP (multiply-adds inside the image), "
            f"{xla / (hand / 2):.2f} FLOPs per multiply-add; 2 B H W Cin Cout kh kw, padding's taps too, "
            f"= {with_padding / 1e6:.2f} MFLOP")
