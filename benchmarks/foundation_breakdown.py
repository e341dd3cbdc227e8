"""Where a foundation train step's time goes: autoencoder encodes, the U-Net pass, the decode of the
decoded-prediction term, and the rest (optimiser, EMA, loss arithmetic).

    python benchmarks/foundation_breakdown.py [--preset workstation] [--repeats 7]

The foundation's completion objective (`objectives.Completion`) does, per step and batch: two encodes
by the frozen autoencoder (the RMAS view and the full sinogram), one U-Net forward and backward on the
latents with the view as a condition, and, when `diffusion.consistency_weight > 0`, one decode of the clean
estimate with its backward (the gradient flows through the frozen decoder to the U-Net). Each part is
jitted alone at the preset's batch and shapes and timed (median of `--repeats` after a warm-up); the
whole loss's value and gradient and the whole train step (`step.data_parallel_step` on one device, as
`train.py` runs it) are timed in the same run. `rest` is the step minus the parts, so the parts and
the rest add up to the step; a part timed alone can differ from its share inside the fused step, so
the parts' sum against the loss's value-and-gradient is printed as a check. One process, one device,
random sinograms (`stages.random_batch`); the data pipeline (RMAS masks on the host) is not in it.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from allpet_jax.training import objectives, stages  # noqa: E402
from allpet_jax.training import step as S  # noqa: E402
from benchmarks.flop_rate import median_seconds  # noqa: E402
from configs import base  # noqa: E402


def parts(preset: str, repeats: int) -> dict:
    """{name: (calls per step, seconds per call)} for the parts, plus the loss and the whole step."""
    cfg = base.get_config(preset)
    B = cfg.data.batch_size
    ae = stages.autoencoder_stage(cfg, cfg.seed)
    unet = stages.build_unet(cfg, 1, 1, cfg.seed)
    graphdef, params = stages.split_model(unet)
    objective = stages.make_objective("foundation", cfg, graphdef, unet.null_ids, ae.graphdef, 1, 1)
    frozen = objective.frozen_state(ae.params, 1.0)
    batch = jax.tree.map(jnp.asarray, stages.random_batch(cfg, "foundation", B))
    keys = jax.random.split(jax.random.key(0), B)

    encode = jax.jit(lambda s: objective.encode(frozen, s))
    x0 = encode(batch["full"])
    hw = x0.shape[1:3]
    cond = objective.condition(frozen, batch, hw, source=x0, mask=batch["sino_mask"])
    prompt = objectives.prompt_of(batch, batch["target"].shape[-2:])
    t = jnp.arange(B, dtype=jnp.int32) * (objective.schedule.num_steps // B)

    def unet_loss(p, x):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, prompt=prompt, cond=cond)))

    unet_step = jax.jit(jax.value_and_grad(unet_loss))
    decode_step = jax.jit(jax.value_and_grad(lambda z: jnp.mean(jnp.square(objective.decode(frozen, z) - batch["full"]))))
    loss_step = jax.jit(jax.value_and_grad(lambda p: objective.loss(p, frozen, batch, keys)[0]))

    tx = S.make_optimizer(cfg.train.learning_rate, total_steps=1000, warmup_steps=10)
    mesh = S.make_mesh(1)
    state = jax.device_put(S.init_state(params, tx, cfg.seed, frozen), S.replicated(mesh))
    step = S.data_parallel_step(mesh, loss_fn=lambda p, f, b, k: objective.loss(p, f, b, k), tx=tx, n_micro=1,
                                ema_decay=cfg.train.ema_decay)
    placed = jax.device_put(batch, S.batch_sharding(mesh))

    out = {"encode (frozen autoencoder)": (2, median_seconds(lambda: encode(batch["full"]), repeats)),
           "U-Net forward + backward": (1, median_seconds(lambda: unet_step(params, x0), repeats))}
    if objective.consistency_weight > 0:
        out["decode + backward (decoded-prediction term)"] = (1, median_seconds(lambda: decode_step(x0), repeats))
    out["loss value and gradient (all of the above)"] = (1, median_seconds(lambda: loss_step(params), repeats))
    holder = [state]  # the step donates its state: each call takes the last one's

    def train_step():
        holder[0], metrics = step(holder[0], placed)
        return metrics["loss"]

    out["train step"] = (1, median_seconds(train_step, repeats))
    return out


def table(measured: dict, batch: int) -> str:
    """Markdown rows: each part's calls, ms per call, ms per step and share of the step; the rest; the check."""
    step_s = measured["train step"][1]
    loss_s = measured["loss value and gradient (all of the above)"][1]
    part_names = [n for n in measured if n not in ("train step", "loss value and gradient (all of the above)")]
    lines = ["| part | calls per step | ms per call | ms per step | share of the step |", "|---|---|---|---|---|"]
    total = 0.0
    for name in part_names:
        calls, s = measured[name]
        total += calls * s
        lines.append(f"| {name} | {calls} | {1e3 * s:.1f} | {1e3 * calls * s:.1f} | {calls * s / step_s:.0%} |")
    rest = step_s - total
    lines.append(f"| rest: optimiser, EMA, loss arithmetic, fusion differences | | | {1e3 * rest:.1f} | {rest / step_s:.0%} |")
    lines.append(f"| **train step** (batch {batch}) | 1 | {1e3 * step_s:.1f} | {1e3 * step_s:.1f} | 100% |")
    lines.append("")
    lines.append(f"Check: the parts timed alone sum to {1e3 * total:.1f} ms; the loss's value and gradient, jitted "
                 f"whole, takes {1e3 * loss_s:.1f} ms ({total / loss_s:.2f}x).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="workstation")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = base.get_config(args.preset)
    print(f"backend {jax.default_backend()}, preset {args.preset}, batch {cfg.data.batch_size}, "
          f"{cfg.data.n_angles}x{cfg.data.n_bins} sinograms; median of {args.repeats}\n", flush=True)
    print(table(parts(args.preset, args.repeats), cfg.data.batch_size))


if __name__ == "__main__":
    main()
