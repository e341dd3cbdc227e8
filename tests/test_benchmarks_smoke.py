"""benchmarks/autoencoder_psnr.py: its lesion-contrast rule and its scoring against hand calculations;
benchmarks/flop_rate.py: the FLOP count the training benchmarks divide by, against a hand count.

The benchmark's training loop is left to the benchmark itself (`--quick` compiles two train steps, a
minute on 2 cores); these checks cover what its table is computed from, in a few seconds.

benchmarks/gpu_check.sh, the prepared GPU-machine check, runs once end to end at the smoke preset (slow).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import radon
from allpet_jax.data.phantoms import LABEL_IDS

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "autoencoder_psnr.py")


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load(_PATH)


@pytest.fixture(scope="module")
def flop_rate():
    return _load(os.path.join(os.path.dirname(_PATH), "flop_rate.py"))


# Batch 2, 6 x 6, 3 -> 4 channels. Per axis, (output, tap) pairs inside the image: 3 x 3 SAME, 6 outputs x 3
# taps less the 2 on the padding = 16; 3 x 3 VALID, 4 x 3 = 12; 5 x 5 SAME, 6 x 5 less 2 x (1 + 2) = 24.
@pytest.mark.parametrize("kernel, padding, taps", [(3, "SAME", 16), (3, "VALID", 12), (5, "SAME", 24)])
def test_conv_flops_xla_against_hand_count(flop_rate, kernel, padding, taps):
    """XLA counts 2 FLOPs per multiply-add and leaves out the taps on SAME padding's zeros."""
    expected = 2 * 2 * 3 * 4 * taps * taps
    assert flop_rate.conv_hand_flops(2, 6, 6, 3, 4, kernel, padding) == expected
    assert flop_rate.conv_xla_flops(2, 6, 6, 3, 4, kernel, padding) == expected


def test_gflop_per_s_by_hand(flop_rate):
    assert flop_rate.gflop_per_s(3e9, 1.5) == pytest.approx(2.0)
    assert flop_rate.gflop_per_s(2 * 2048**3, 0.5) == pytest.approx(34.359738368)  # 2 n^3 / 0.5 s / 1e9


def test_foundation_breakdown_parts_and_rest_add_up_to_the_step():
    breakdown = _load(os.path.join(os.path.dirname(_PATH), "foundation_breakdown.py"))
    measured = {"encode (frozen autoencoder)": (2, 0.010), "U-Net forward + backward": (1, 0.050),
                "decode + backward (decoded-prediction term)": (1, 0.020),
                "loss value and gradient (all of the above)": (1, 0.080), "train step": (1, 0.100)}
    text = breakdown.table(measured, 16)
    # 2 x 10 + 50 + 20 = 90 ms of parts in a 100 ms step: 10 ms (10%) left for the rest
    assert "| encode (frozen autoencoder) | 2 | 10.0 | 20.0 | 20% |" in text
    assert "| rest: optimiser, EMA, loss arithmetic, fusion differences | | | 10.0 | 10% |" in text
    assert "sum to 90.0 ms" in text and "takes 80.0 ms (1.12x)" in text


def test_lesion_ring_and_contrast_by_hand(bench):
    tissue, hot, cold, air = (LABEL_IDS[k] for k in ("soft_tissue", "lesion_hot", "lesion_cold", "background"))
    labels = np.full((2, 20, 20), tissue, np.int32)
    image = np.ones((2, 20, 20))
    labels[0, 8:10, 8:10] = hot  # a 2 x 2 hot lesion
    image[0, 7:11, 7:11] = 3.0  # the guard pixels (Chebyshev distance 1): never in the ring
    image[0, 8:10, 8:10] = 5.0
    labels[0, 5, :], image[0, 5, :] = air, 100.0  # a row of air at distance 3: left out of the ring
    labels[0, 6, 8], image[0, 6, 8] = cold, -50.0  # a cold lesion at distance 2: left out
    image[0, 12, 12] = 2.0  # one ring pixel off the background level
    labels[1] = air  # sample 1: a hot pixel in air has no ring and is dropped
    labels[1, 10, 10] = hot

    lesions = bench.hot_lesion_rings(labels, ring_px=2, guard_px=1)
    assert len(lesions) == 1 and lesions[0][0] == 0
    # Distance 2..3 around a 2 x 2 lesion: the 8 x 8 box less the 4 x 4 box = 48 pixels, less the 8 of the
    # air row inside the box and the cold pixel = 39.
    assert len(lesions[0][1]) == 4 and len(lesions[0][2]) == 39
    contrast, ring = bench.lesion_contrast(image, lesions)
    np.testing.assert_allclose(ring, [40.0 / 39.0])
    np.testing.assert_allclose(contrast, [5.0 - 40.0 / 39.0])


def test_score_of_a_scaled_reconstruction(bench):
    """`D(E(x)) = 0.9 x`: PSNR, view MSE ratio and the kept contrast (exactly 0.9: FBP is linear) by hand."""
    size = 16
    geom = radon.Geometry.square(size)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    body = xx**2 + yy**2 <= 6.5**2
    labels = np.where(body, LABEL_IDS["soft_tissue"], LABEL_IDS["background"]).astype(np.int32)[None].repeat(3, 0)
    images = body[None] * rng.uniform(0.8, 1.2, (3, 1, 1))
    for n, (r, c) in enumerate([(6, 6), (8, 5), (5, 9)]):
        labels[n, r:r + 2, c:c + 2] = LABEL_IDS["lesion_hot"]
        images[n, r:r + 2, c:c + 2] = 4.0
    sino = np.asarray(radon.forward(jnp.asarray(images, jnp.float32), geom))[:, None].astype(np.float64)
    mask = (rng.uniform(size=sino.shape) < 0.3).astype(np.float64)
    positive, negative = mask * sino, (1 - mask) * sino

    held_out = bench.HeldOut({"clean": sino.astype(np.float32)}, (positive, negative), geom,
                             bench.hot_lesion_rings(labels), ("ramp", "hann"), min_contrast=0.1)
    r = held_out.score(lambda scale, x: scale * x, 0.9)

    def psnr(x):  # per sample, the sample's own peak, error 0.1 x
        return np.mean([10 * np.log10(s.max() ** 2 / np.mean((0.1 * s) ** 2)) for s in x])

    assert r["psnr_full"] == pytest.approx(psnr(sino), abs=1e-3)
    assert r["psnr_positive"] == pytest.approx(psnr(positive), abs=1e-3)
    assert r["psnr_negative"] == pytest.approx(psnr(negative), abs=1e-3)
    assert r["mse_ratio"] == pytest.approx(0.5 * (np.mean(positive**2) + np.mean(negative**2)) / np.mean(sino**2),
                                           rel=1e-4)
    assert r["n_lesions"] == 3
    np.testing.assert_allclose(r["kept"], 0.9, rtol=1e-4)  # quartiles, per filter


@pytest.mark.slow
def test_gpu_check_script_at_the_smoke_preset(tmp_path):
    """The GPU check's commands at tiny shapes on CPU: the benchmark table, then 20 foundation steps, all in its
    log. One benchmark stage; the training ends by its steps, so a cold compilation cache only takes longer."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # the device tool's OUT would redirect the outputs
    env.update(GPU_CHECK_PRESET="smoke", GPU_CHECK_BUDGET_S="400", GPU_CHECK_FOUNDATION_STEPS="20", SKIP_INSTALL="1", GPU_CHECK_OUT=str(tmp_path),
               GPU_CHECK_BENCH_STAGES="autoencoder", GPU_CHECK_BENCH_S="60", GPU_CHECK_PYTHON=sys.executable,
               JAX_PLATFORMS="cpu")
    script = os.path.join(os.path.dirname(_PATH), "gpu_check.sh")
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=480)
    log = (tmp_path / "gpu_check.log").read_text()
    assert out.returncode == 0, log[-4000:] + out.stderr[-2000:]
    assert "| preset | stage | devices | global batch |" in log and "| smoke | autoencoder | 1 |" in log
    after = log[log.index("foundation/metrics.jsonl (last lines"):]
    lines = [json.loads(line) for line in after.splitlines() if line.startswith("{")]
    assert any(r["split"] == "train" and r["samples_per_s"] > 0 for r in lines)
    assert log.rstrip().splitlines()[-1].startswith("gpu_check: OK; preset smoke;")


def test_conv_bench_table_by_hand():
    conv = _load(os.path.join(os.path.dirname(_PATH), "conv_bench.py"))
    assert conv.gflop(8, 32, 64, 64) == pytest.approx(2 * 8 * 32 * 32 * 64 * 64 * 9 / 1e9)
    flops = conv.gflop(2, 4, 3, 5)  # 2 B H W Cin Cout 9 = 8640 FLOPs
    ours = {"times": {"4:3:5": [flops / 100, flops / 50, flops / 25]}}  # 100, 50 and 25 GFLOP/s
    theirs = [{"times": {"4:3:5": [flops / 200, flops / 50, flops / 50]}},  # the passes pooled by their median
              {"times": {"4:3:5": [flops / 200, flops / 50, flops / 50]}}]
    text = conv.table(2, ours, theirs)
    assert "| 2 x 4 x 4, 3 -> 5 | forward | 100 | 200 | 0.50x |" in text
    assert "| 2 x 4 x 4, 3 -> 5 | weight gradient | 25 | 50 | 0.50x |" in text
    # all three: 3 x flops in (1/100 + 1/50 + 1/25) x flops seconds per GFLOP = 0.07 (ours), against
    # 1/200 + 1/50 + 1/50 = 0.045 (theirs): 43 and 67 GFLOP/s, 0.045 / 0.07 = 0.64x
    assert "| all three | 43 | 67 | 0.64x |" in text


def test_memorisation_power_copier_against_closed_form():
    """A copier with no error sits on its training sinogram (ratio 0). With white error of norm e, in many
    dimensions nearly orthogonal to every difference, its distance to its source is e and to a held-out
    sinogram at distance d about sqrt(d^2 + e^2); so the ratio is e / sqrt(d^2 + e^2)."""
    import jax

    power = _load(os.path.join(os.path.dirname(_PATH), "memorisation_power.py"))
    rng = np.random.default_rng(0)
    train = 1.0 + rng.random((2, 20000))  # unit-total scaling divides each by about 30000
    held = train + rng.normal(size=train.shape) * 0.01  # each training sinogram's held-out twin
    d = np.linalg.norm(power.generation._unit_total(held) - power.generation._unit_total(train), axis=1).mean()
    assert power.copier_ratios(train, held, 0.0, 8, jax.random.key(0)) == pytest.approx(np.zeros(8), abs=1e-4)  # d^2 expanded: float64 rounding
    ratio = power.copier_ratios(train, held, d, 64, jax.random.key(1))
    assert np.median(ratio) == pytest.approx(1 / np.sqrt(2), rel=0.02)


def test_unet_bench_without_parts():
    """`--without` names the parts both sides lose, in one order; an unknown part is one clear error."""
    bench = _load(os.path.join(os.path.dirname(_PATH), "unet_bench.py"))
    assert bench.parse_args(["--without", "all"]).without == "groupnorm,silu,attention,adamw"
    assert bench.parse_args(["--without", "silu,groupnorm"]).without == "groupnorm,silu"
    assert bench.parse_args([]).without == ""
    assert bench.parse_args([]).clip_norm == 0.0 and bench.parse_args(["--clip-norm", "1"]).clip_norm == 1.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--without", "silu,dropout"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--clip-norm", "-1"])


def test_resblock_bench_table_by_hand():
    sys.path.insert(0, os.path.dirname(_PATH))  # resblock_bench imports conv_bench's helpers
    try:
        bench = _load(os.path.join(os.path.dirname(_PATH), "resblock_bench.py"))
    finally:
        sys.path.remove(os.path.dirname(_PATH))
    n = len(bench.BLOCKS)
    ours = {"times": [0.010] * n}
    theirs = [{"times": [0.005] * n}, {"times": [0.015] * n}]  # pooled: the median of 5 and 15 ms is 10 ms
    text = bench.table(8, ours, theirs)
    assert "| 8 x 32 x 32, 64 -> 64 | 10.00 | 10.00 | 1.00x |" in text
    theirs = [{"times": [0.008] * n}, {"times": [0.008] * n}]  # theirs 8 ms against our 10: we run at 0.80x
    assert "| 8 x 8 x 8, 512 -> 256 | 10.00 | 8.00 | 0.80x |" in bench.table(8, ours, theirs)
    with pytest.raises(SystemExit, match="--cores expects 1 to the"):
        bench.pin_cores(bench.parse_args(["--cores", str(len(os.sched_getaffinity(0)) + 1)]))
