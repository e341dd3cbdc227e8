"""XLA:CPU settings for our models: convolutions and matrix products through XNNPACK.

jaxlib 0.10 sends convolutions and dots on the CPU through YNNPACK by default, and the weight gradients
of some convolutions through Eigen. XNNPACK runs them faster on the 2-core AMD EPYC (AVX2) this project is
measured on: a 3x3 convolution's forward and both gradients, 8 x 32 x 32 x 64 channels, at 108 GFLOP/s
against 35-47, and the latent U-Net's train step 1.36x faster at 64-128-256 (1.88 -> 1.39 s per batch of 8;
0.67x -> 0.90x of PyTorch/diffusers in the same quiet run; `benchmarks/unet_bench.py` prints both rows).
The alternatives, each timed in one quiet window against the same baseline: Eigen alone (YNNPACK off)
0.9x; YNNPACK with its element-wise and reduce fusions 1.2x; XNNPACK for element-wise and reductions too,
or its greedy graph fusion, no better than convolutions and dots alone; `xla_cpu_enable_fast_math` and a
256-bit vector width no change. The projectors (gathers and element-wise work) run at the same speed
either way, within the machine's run-to-run spread (`benchmarks/radon_bench.py` three times in one quiet
window: XNNPACK, XLA's defaults, XNNPACK).

On Intel CPUs PyTorch runs its convolutions through oneDNN. jaxlib 0.10.2 has oneDNN compiled in, but only
dots can reach it
(`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT` makes
`__onednn_fusion` dots). Its convolution rewriter is gated off in this build: XLA runs it only when
`IsOneDnnCompatible`, which needs `ENABLE_ONEDNN_ASYNC`. With `--xla_cpu_experimental_onednn_custom_call=true`
the compiled step still holds plain `convolution`s (checked in the optimised HLO, session 11). Writing a 3x3
convolution as patches times a matrix, so that oneDNN's or XNNPACK's dot takes it, runs at 39-46 GFLOP/s
against 102 for XNNPACK's convolution (forward and both gradients, 8 x 32 x 32 x 64; one run on a loaded
Intel Xeon). So no flag of this jaxlib gives our convolutions PyTorch's library, and none is needed: on a
quiet Intel Xeon XNNPACK's 3x3 convolutions, forward and both gradients, run at 246-280 GFLOP/s, 80-90% of
sgemm (session 12), and a Winograd F(2x2, 3x3) convolution through its dots is slower. On one core
they match oneDNN's; what PyTorch keeps over us is how a small convolution spreads over two cores: at
8 x 8 x 256 and batch 8 ours gain 1.45x from the second core, oneDNN's 1.74x (at batch 32 ours gain 1.75x),
and the U-Net's residual blocks at the 16 x 16 and 8 x 8 levels gain 1.5-1.7x against PyTorch's 1.9x
(`benchmarks/conv_bench.py --cores 1`, `benchmarks/resblock_bench.py --cores 1` against their defaults,
session 15). No flag of this jaxlib changed that: XNNPACK's graph fusion modes, YNNPACK dots (the README's
train-step section lists what was tried).

`apply()` runs when `allpet_jax` is imported, before any computation creates XLA's CPU client (which reads
`XLA_FLAGS` once). It changes nothing when:
- `XLA_FLAGS` already chooses a library for these ops (the user's choice wins);
- `ALLPET_XLA_DEFAULTS=1` asks for XLA's own defaults (the benchmarks' baseline rows);
- jaxlib is not 0.10.x: the flags are experimental, and an unknown flag in `XLA_FLAGS` aborts the process;
- a backend already exists (the flags would be read too late; jax was used before `allpet_jax` was imported).

The flags change only which library computes a float32 product, so results move by rounding (about 1e-6
relative); `tests/test_xla_cpu.py` checks the U-Net's output and gradients against a second run with XLA's
defaults.
"""

from __future__ import annotations

import importlib.metadata
import os

FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
)
TESTED_JAXLIB = "0.10."


def apply(environ=os.environ) -> bool:
    """Add `FLAGS` to `environ["XLA_FLAGS"]` unless one of the module doc's conditions holds; True if added."""
    current = environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in current or "xnn_fusion_type" in current or environ.get("ALLPET_XLA_DEFAULTS") == "1":
        return False
    try:
        if not importlib.metadata.version("jaxlib").startswith(TESTED_JAXLIB):
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    environ["XLA_FLAGS"] = " ".join([current, *FLAGS]).strip()
    return True
