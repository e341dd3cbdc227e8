"""Why a trained latent diffusion model's samples fall short: the checks behind docs/RESULTS.md's "Why the samples
look like blocks, and a defect in the EMA" (session 13), on the workstation plan's run directories.

    python benchmarks/sampler_diagnostics.py --foundation RUNS/f_plain_s2 --task RUNS/ds500 [--n 64]

1. *Spread by noise level* (foundation): real latents (`sampling.encode` of held-out sinograms) noised to a
   fraction of the schedule, then denoised by DDIM (25 steps, eta 0) with the model, with the config's clip of
   predicted clean latents and without: the standard deviation ratio of the result to the real latents
   (`generation.latent_statistics`; 1 for a model that keeps the distribution) and its relative MSE to them.
2. *EMA against the raw parameters* (foundation): the Frechet distance of `--n` generated sinograms (DDIM 50)
   from the checkpoint's EMA parameters and from its raw ones, against `--n` held-out real ones.
3. *EMA, raw parameters and the clip* (task): the sinogram PSNR against the clean target of one DDIM-20 sample
   per test input, each variant paired by input against the checkpoint as it samples (EMA, config's clip),
   with a normal 95% interval.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from allpet_jax import generation, metrics, sampling, tasks
from allpet_jax.diffusion import schedules
from allpet_jax.training.objectives import prompt_of


def variant(trained, clip="config", raw=False):
    """`trained` sampling with another clip of predicted clean latents (None: off) and/or its raw parameters."""
    objective = trained.stage.generate.__self__
    if clip != "config":
        objective = dataclasses.replace(objective, clip_x0=clip)
    state = trained.state._replace(ema=trained.state.params) if raw else trained.state
    return dataclasses.replace(trained, state=state, stage=dataclasses.replace(trained.stage, generate=objective.generate))


def spread_by_noise_level(trained, n: int, fractions=(0.1, 0.3, 0.5, 0.7, 0.9, 0.999), steps: int = 25):
    held = sampling.simulated_inputs(trained, n)
    batch = sampling.model_batch(trained, {"prompt": held["prompt"], "geometry_only": np.zeros_like(held["target"])})
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    objective, frozen = trained.stage.generate.__self__, trained.state.frozen
    real = jnp.asarray(sampling.encode(trained, held["target"]))
    shape = batch["target"].shape[-2:]
    kwargs = {"prompt": prompt_of(batch, shape), "cond": objective.condition(frozen, batch, objective.latent_grid(shape))}
    denoise, model_params = objective.denoiser(trained.state.ema, kwargs)
    schedule = objective.schedule
    alpha_bar = np.asarray(schedule.alpha_bar)

    @jax.jit
    def clean_estimate(x, t):
        tt = jnp.full((n,), t, jnp.int32)
        return schedules.to_x0_eps(schedule, objective.parameterization, denoise(model_params, x, tt), x, tt)[0]

    print("| from (share of the schedule) | clip | std ratio | relative MSE to the real latents |\n|---|---|---|---|")
    for fraction in fractions:
        t0 = int(fraction * (schedule.num_steps - 1))
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), t0), real.shape)
        start = jnp.sqrt(alpha_bar[t0]) * real + jnp.sqrt(1 - alpha_bar[t0]) * noise
        for clip in (objective.clip_x0, None):
            x, ts = start, np.round(np.linspace(0, t0, steps)).astype(int)[::-1]
            for i, t in enumerate(ts):  # DDIM, eta 0, down to the clean estimate
                x0 = clean_estimate(x, int(t))
                x0 = jnp.clip(x0, -clip, clip) if clip else x0
                eps = (x - jnp.sqrt(alpha_bar[t]) * x0) / jnp.sqrt(1 - alpha_bar[t])
                ab_next = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
                x = jnp.sqrt(ab_next) * x0 + jnp.sqrt(1 - ab_next) * eps
            ratio = generation.latent_statistics(np.asarray(x), np.asarray(real), None)["std_ratio"]
            mse = float(jnp.mean((x - real) ** 2) / jnp.var(real))
            print(f"| {fraction:g} | {clip} | {ratio:.2f} | {mse:.2f} |", flush=True)


def ema_against_raw(trained, n: int):
    geom = sampling.geometry_of(trained)
    held = sampling.simulated_inputs(trained, n)
    batch = sampling.model_batch(trained, {"prompt": held["prompt"], "geometry_only": np.zeros_like(held["target"])})
    reference = generation.generation_features(held["target"][:, 0], geom)
    print("| parameters | Frechet distance |\n|---|---|")
    for name, raw in (("EMA", False), ("raw", True)):
        generated = sampling.generate(variant(trained, raw=raw), batch, jax.random.key(0), num_steps=50, progress=False)
        print(f"| {name} | {generation.frechet(generation.generation_features(generated[0][:, 0], geom), reference):.2f} |",
              flush=True)


def task_variants(trained, n: int):
    inputs = sampling.simulated_inputs(trained, n)
    batch = sampling.model_batch(trained, inputs)
    clean = np.asarray(inputs["target_clean"], np.float32)[:, 0]

    def psnr(t):
        out = sampling.generate(t, batch, jax.random.key(0), num_steps=20, progress=False)[0][:, 0]
        return np.asarray(metrics.psnr(out, clean))

    base = psnr(trained)
    print(f"as sampled (EMA, clip {trained.stage.generate.__self__.clip_x0}): sinogram PSNR {base.mean():.2f} dB\n")
    print("| variant | sinogram PSNR, dB | minus as sampled [95%] | share better |\n|---|---|---|---|")
    for name, t in (("EMA, no clip", variant(trained, clip=None)), ("raw parameters", variant(trained, raw=True)),
                    ("raw parameters, no clip", variant(trained, clip=None, raw=True))):
        p = psnr(t)
        d = p - base
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        print(f"| {name} | {p.mean():.2f} | {d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] | "
              f"{np.mean(d > 0):.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--foundation", default="", help="a run directory with a trained foundation")
    parser.add_argument("--task", default="", help="a run directory with a trained low_dose task")
    parser.add_argument("--n", type=int, default=64, help="test inputs per check")
    args = parser.parse_args()
    if not (args.foundation or args.task):
        parser.error("expected --foundation and/or --task run directories; got neither")
    if args.foundation:
        foundation = sampling.load_for_task(tasks.SYNTHESIS, args.foundation, best=True)
        spread_by_noise_level(foundation, args.n)
        print()
        ema_against_raw(foundation, args.n)
        print()
    if args.task:
        task_variants(sampling.load_for_task(tasks.LOW_DOSE, args.task, best=True), args.n)


if __name__ == "__main__":
    main()
