"""Train-step throughput and compiled memory for each preset, stage and device count.

    python benchmarks/train_bench.py                                  # smoke and cpu: timed; default: memory
    python benchmarks/train_bench.py --presets default --time_default # also time the paper-scale step

Each row builds the stage's real loss (autoencoder; foundation with RMAS triplets and the consistency
term; task with TMA weights; the latent `regressor` through the frozen autoencoder; the sinogram-space
`pixel_regressor`, whose presets are sized to the latent regressor's GFLOP/step) with freshly initialised
models, on random sinograms of the preset's geometry and global batch (`stages.random_batch`; the data
pipeline has its own benchmark), maps the step over a mesh of `n` devices with `jax.shard_map` exactly as
`train.py` does, and reports:

- `MiB/device`: XLA's memory analysis of the compiled step per device (arguments + outputs +
  temporaries), the number `--config.train.memory_budget_gb` is checked against;
- `micro for B GiB`: the split (micro-batch x count) `memory.choose_micro_batch` picks for a budget of
  B GiB per device (`--budgets_gib`, default 8; 24 is the paper's GPU), and its memory per device;
- `samples/s`: global batch / median step time over `--steps` steps after one warm-up step;
- `GFLOP/s`: XLA's FLOPs per step (`GFLOP/step/device`, from `cost_analysis()`, times the devices) / the
  same median step time, and `% of peak`: that over the best float32 sgemm rate measured at the start of
  the run (numpy and jitted `jax.numpy`, printed above the table). Host CPU devices share one machine, so
  their sum is set against one peak; GPUs each against their own. Above the table one line checks XLA's
  count for a convolution against a hand count (2 FLOPs per multiply-add; taps on SAME padding are not
  counted); `benchmarks/flop_rate.py` says what the count includes (the AdamW update and elementwise ops,
  not transcendentals).

Several devices are host CPU devices (`--xla_force_host_platform_device_count`) sharing the same cores,
so their rows show the per-device memory falling, not a speed-up. On a GPU machine run it as is.
"""

from __future__ import annotations

import argparse
import os
import sys

DEVICES = 4
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from allpet_jax.training import memory, pixel_regressor, stages  # noqa: E402
from benchmarks import flop_rate  # noqa: E402
from allpet_jax.training import step as S  # noqa: E402
from configs import base  # noqa: E402

BUDGETS_GIB = (8.0,)  # --budgets_gib; 24 is the paper's GPU


def build(cfg, stage: str):
    cfg.tma.enabled = stage == "task"
    if stage == "pixel_regressor":
        return pixel_regressor.pixel_regressor_stage(cfg, 1, 1, cfg.seed)
    ae = stages.autoencoder_stage(cfg, cfg.seed)
    if stage == "autoencoder":
        return ae
    return stages.diffusion_stage(stage, cfg, ae.graphdef, ae.params, 1.0, 1, 1, cfg.seed)


def bench(preset: str, stage: str, n_dev: int, steps: int, timed: bool, budgets=BUDGETS_GIB) -> dict:
    cfg = base.get_config(preset)
    batch_size = cfg.data.batch_size
    stage_obj = build(cfg, stage)
    tx = S.make_optimizer(cfg.train.learning_rate, total_steps=1000, warmup_steps=10)
    mesh = S.make_mesh(n_dev)
    state = jax.device_put(S.init_state(stage_obj.params, tx, cfg.seed, stage_obj.frozen), S.replicated(mesh))
    example = stages.random_batch(cfg, stage, batch_size)
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=S.batch_sharding(mesh)), example)

    compiled_by_split = {}

    def compile_step(n_micro):
        if n_micro not in compiled_by_split:
            step = S.data_parallel_step(mesh, loss_fn=stage_obj.loss_fn, tx=tx, n_micro=n_micro,
                                        ema_decay=cfg.train.ema_decay)
            compiled_by_split[n_micro] = step.lower(state, spec).compile()
        return compiled_by_split[n_micro]

    t0 = time.perf_counter()
    compiled = compile_step(1)
    compile_s = time.perf_counter() - t0
    whole = memory.estimate(compiled, batch_size // n_dev, 1)
    fits = []
    for budget in budgets:
        try:
            n_micro, fit = memory.choose_micro_batch(compile_step, batch_size // n_dev, budget)
            fits.append(f"{fit.micro_batch} x {n_micro}: {fit.total_bytes / 2**20:.0f} MiB")
        except ValueError:
            fits.append("does not fit")
    row = {"preset": preset, "stage": stage, "devices": n_dev, "batch": batch_size,
           "params": sum(int(np.size(x)) for x in jax.tree.leaves(stage_obj.params)),
           "mib": whole.total_bytes / 2**20, "gflop": (whole.flops or 0) / 1e9, "fits": fits,
           "compile_s": compile_s, "samples_s": float("nan"), "gflop_s": float("nan")}
    if timed:
        times = []
        for i in range(steps + 1):
            batch = jax.device_put(stages.random_batch(cfg, stage, batch_size, step=i), S.batch_sharding(mesh))
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        step_s = float(np.median(times[1:]))
        row["samples_s"] = batch_size / step_s
        row["gflop_s"] = flop_rate.gflop_per_s(n_dev * (whole.flops or 0), step_s)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="smoke,cpu,default")
    parser.add_argument("--stages", default="autoencoder,foundation,task,regressor,pixel_regressor")
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    parser.add_argument("--time_default", action="store_true", help="also time the paper-scale preset")
    parser.add_argument("--budgets_gib", default=",".join(f"{b:g}" for b in BUDGETS_GIB),
                        help="memory budgets per device for the micro-batch columns, e.g. 8,24")
    args = parser.parse_args()
    budgets = tuple(float(b) for b in args.budgets_gib.split(","))
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices ({jax.devices()[0].device_kind}); "
          f"memory per device from XLA's analysis of the compiled step\n")
    print(flop_rate.conv_check() + "\n", flush=True)
    peaks = flop_rate.sgemm_gflop_per_s()
    peak = max(peaks.values())
    print(flop_rate.describe_peak(peaks) + "\n", flush=True)
    header = ("preset", "stage", "devices", "global batch", "params", "MiB/device", "GFLOP/step/device",
              "GFLOP/s", f"% of peak ({peak:.0f} GFLOP/s per chip)",
              *(f"micro for {b:g} GiB" for b in budgets), "compile s", "samples/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset in args.presets.split(","):
        for stage in args.stages.split(","):
            for n_dev in (int(n) for n in args.devices.split(",")):
                timed = preset != "default" or args.time_default
                r = bench(preset, stage, n_dev, args.steps, timed, budgets)
                samples = f"{r['samples_s']:.1f}" if timed else "not timed"
                chips = 1 if jax.default_backend() == "cpu" else n_dev  # host CPU devices share the cores
                rate = (f"{r['gflop_s']:.1f} | {100 * r['gflop_s'] / (chips * peak):.1f} %" if timed
                        else "not timed | -")
                print(f"| {r['preset']} | {r['stage']} | {r['devices']} | {r['batch']} | {r['params']:,} | "
                      f"{r['mib']:.0f} | {r['gflop']:.1f} | {rate} | {' | '.join(r['fits'])} | "
                      f"{r['compile_s']:.1f} | {samples} |", flush=True)


if __name__ == "__main__":
    main()
