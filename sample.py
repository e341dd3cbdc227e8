"""Run a trained ALL-PET model: sinograms, FBP/OSEM reconstructions, figures and (K > 1) uncertainty maps.

    python sample.py --workdir workdir --task low_dose                         # the simulator's test split
    python sample.py --workdir workdir --task low_dose --input scan.npz --source_variable source
    python sample.py --workdir workdir --task synthesis --prompt tracer=FDG,region=brain --num_samples 4
    python sample.py --checkpoint workdir/task --task low_dose --sampler ddim --steps 50 --num_samples 8 --mat
    python sample.py --workdir workdir --task low_dose --guidance 0.1      # Poisson data consistency
    python sample.py --workdir workdir --task synthesis --prompt region=brain --cfg_scale 2   # classifier-free guidance
    python sample.py --workdir workdir --task low_dose --guidance 0.1 --input scan.npz --dose 0.1

The stage comes from `--checkpoint` (a stage directory) or `--workdir` (`foundation` for synthesis,
`task` otherwise; `--stage regressor` or `--stage pixel_regressor` for the regression baselines, whose
only sampler is `direct`). Paired tasks read `--input` (any format of `allpet_jax.data.loaders`, checked
against the checkpoint's geometry) or, by default, `--num_inputs` N samples of the simulator's held-out test
split (which also gives targets, so error maps are drawn); synthesis samples N prompts. Each input gets
`--num_samples` K outputs (`--n`, the old name of `--num_inputs`, works until the next release).
`--guidance` needs the raw prompts and physics of each input (`allpet_jax.data.sources.PHYSICS_FIELDS`):
the simulator provides them; an `--input` `.npz`/`.mat` file must hold them as variables `prompts`,
`normalisation`, `attenuation`, `scatter`, `randoms` and `dose` (or pass `--dose`).

Writes to `--out` (default `WORKDIR/samples/<task>`): `outputs.npz` (`output` `(K, N, C, A, B)` in
counts, `source`, `target`, FBP and OSEM images, and for K > 1 the per-pixel `mean` and `std` over the
K samples, in sinogram and image space), `outputs.mat` with `--mat`, and PNG figures. Everything is
written into a temporary directory that replaces `--out` only when complete. An existing `--out` is
replaced only with `--overwrite`, and only when sample.py wrote it and it holds nothing else (its owner
file, `allpet_jax.atomic_write.OWNER_FILE`, lists what it wrote); that is checked before sampling. A bad
flag or input is one line, `sample.py: error: ...`, and exit status 2 (`allpet_jax.cli`).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from allpet_jax import atomic_write, cli, plots, sampling, tasks

FLAGS = flags.FLAGS
TOOL = "sample.py"  # the program in error lines and the owner named in --out's owner file (atomic_write.OWNER_FILE)
RENAMED = {"n": "num_inputs"}  # old flag: new name; the old one is an alias until the next release


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """This CLI's flags, in `flag_values`: called from `__main__` only, so importing sample.py defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", "", "training run directory (holds autoencoder/, foundation/, task/, ...)", **into)
    flags.DEFINE_string("checkpoint", "", "a stage directory (WORKDIR/<stage>) instead of --workdir", **into)
    flags.DEFINE_string("pretrained", "", "exported weights instead of a run: a name in weights/ (e.g. "
                                          "workstation_foundation) or an .npz path (allpet_jax/export.py)", **into)
    flags.DEFINE_string("stage", "", "stage under --workdir: default foundation (synthesis) or task; 'regressor' or "
                                      "'pixel_regressor'", **into)
    flags.DEFINE_string("task", tasks.LOW_DOSE, "the task; must be the one the checkpoint was trained for", **into)
    flags.DEFINE_string("input", "", "source sinogram file(s): .npy/.npz/.mat/NIfTI; default: the simulator's test "
                                      "split", **into)
    flags.DEFINE_string("source_variable", "", "variable name inside .npz/.mat inputs (default: the only/'source' "
                                                "one)", **into)
    flags.DEFINE_integer("num_inputs", 8, "N, the inputs without --input: simulated test samples, or synthesis "
                                          "prompts; each gets --num_samples outputs", **into)
    flags.DEFINE_string("out", "", "output directory (default WORKDIR/samples/<task>)", **into)
    flags.DEFINE_bool("overwrite", False, "replace an existing --out that sample.py wrote (one holding any other "
                                           "file is refused)", **into)
    flags.DEFINE_string("sampler", "", "ddim, ddpm, ddbm or direct (default: the model's objective's first)", **into)
    flags.DEFINE_integer("steps", 50, "sampler steps (DDIM/DDBM; DDPM always runs every training step)", **into)
    flags.DEFINE_float("eta", None, "DDIM/DDBM stochasticity (default 0 for DDIM, 1 for DDBM)", **into)
    flags.DEFINE_integer("n_angles", 0, "synthesis: output angles (default: the training geometry)", **into)
    flags.DEFINE_integer("n_bins", 0, "synthesis: output radial bins (default: the training geometry)", **into)
    flags.DEFINE_string("prompt", "", "tracer and region, e.g. tracer=FDG,region=brain (synthesis, and --input files; "
                                       "unset = the unconditional prompt)", **into)
    flags.DEFINE_string("roi", "", "JSON file of clinician ROIs for TMA (models trained with TMA)", **into)
    flags.DEFINE_integer("num_samples", 1, "K samples per input; K > 1 also writes mean and std (uncertainty)", **into)
    flags.DEFINE_integer("seed", 0, "sampling seed", **into)
    flags.DEFINE_bool("mat", False, "also write outputs.mat", **into)
    flags.DEFINE_float("guidance", 0.0, "low_dose: Poisson likelihood step on the raw prompts during DDIM (0 = off; "
                                        "try 0.05-0.2)", **into)
    flags.DEFINE_float("cfg_scale", 1.0, "classifier-free guidance on the prompt: uncond + s * (cond - uncond); "
                                         "1 = off, 0 = unconditional (diffusion models trained with prompt dropping)",
                       **into)
    flags.DEFINE_float("dose", 0.0, "low_dose with --input and --guidance: the source's dose fraction (default: the "
                                    "file's 'dose' variable)", **into)
    cli.define_renamed(RENAMED, flag_values)


def main(argv, flag_values: flags.FlagValues = FLAGS):
    """Sample with the flags in `flag_values` (parsed); `cli.run` turns the errors into one line."""
    del argv
    logging.set_verbosity(logging.WARNING)
    if flag_values.num_samples < 1 or flag_values.num_inputs < 1 or flag_values.steps < 1:
        raise app.UsageError(f"--num_samples, --num_inputs and --steps must be >= 1; got {flag_values.num_samples}, "
                             f"{flag_values.num_inputs} and {flag_values.steps}")
    if sum(map(bool, (flag_values.workdir or flag_values.checkpoint, flag_values.pretrained))) != 1:
        raise ValueError("give one of --workdir (a training run), --checkpoint (a stage directory) or --pretrained "
                         "(exported weights, e.g. workstation_foundation)")
    run_dir = (flag_values.workdir or os.path.dirname(os.path.abspath(flag_values.checkpoint)) if not flag_values.pretrained
               else os.path.join(sampling.PRETRAINED_OUT, os.path.basename(flag_values.pretrained).removesuffix(".npz")))
    # Checked now, not after minutes of sampling: a refusal costs nothing and touches nothing.
    out = atomic_write.check_output_dir(flag_values.out or os.path.join(run_dir, "samples", flag_values.task), TOOL,
                                        replace=flag_values.overwrite)
    trained = sampling.load_for_task(flag_values.task, flag_values.workdir, flag_values.checkpoint, flag_values.stage,
                                     pretrained=flag_values.pretrained)
    synthesis = not tasks.is_paired(flag_values.task)
    if (flag_values.n_angles or flag_values.n_bins) and not synthesis:
        raise app.UsageError("--n_angles/--n_bins set the geometry of synthesis; paired tasks keep the input's")
    if flag_values.dose and not (flag_values.input and flag_values.guidance):
        raise app.UsageError("--dose gives the dose fraction of --input files for --guidance; the simulator knows "
                             "each sample's own")
    geom = sampling.geometry_of(trained, flag_values.n_angles, flag_values.n_bins)

    if synthesis:
        inputs = sampling.synthesis_inputs(trained, flag_values.num_inputs, sampling.parse_prompt(flag_values.prompt), geom)
    elif flag_values.input:
        inputs = sampling.file_inputs(trained, flag_values.input, flag_values.source_variable, flag_values.prompt,
                                      physics=bool(flag_values.guidance))
    else:
        inputs = sampling.simulated_inputs(trained, flag_values.num_inputs, physics=bool(flag_values.guidance))
    batch = sampling.model_batch(trained, inputs, flag_values.roi, from_files=bool(flag_values.input))
    if flag_values.guidance:
        batch = sampling.add_poisson_data(trained, batch, inputs, flag_values.dose or None)

    t0 = time.perf_counter()
    outputs = sampling.generate(trained, batch, jax.random.key(flag_values.seed), sampler=flag_values.sampler or None,
                                num_steps=flag_values.steps, eta=flag_values.eta, num_samples=flag_values.num_samples,
                                guidance=flag_values.guidance, cfg_scale=flag_values.cfg_scale,
                                progress=f"{flag_values.task} ({flag_values.sampler or 'default sampler'}, "
                                         f"{flag_values.steps} steps)")
    wall = time.perf_counter() - t0
    print(f"generated {outputs.shape[0]} x {outputs.shape[1]} sinograms {outputs.shape[2:]} in {wall:.1f} s "
          f"(sampler {flag_values.sampler or 'default'}, {flag_values.steps} steps, compile included)", flush=True)

    arrays = {"output": outputs, "prompt": batch["prompt"]}
    if "source" in inputs:
        arrays["source"] = np.asarray(inputs["source"], np.float32)
    if "target" in inputs:
        arrays["target"] = np.asarray(inputs["target"], np.float32)
    shown = outputs.mean(axis=0) if flag_values.num_samples > 1 else outputs[0]
    recon = {name: sampling.reconstruct(arrays[name], geom) for name in ("source", "target") if name in arrays}
    recon["output"] = sampling.reconstruct(outputs, geom)
    for name, images in recon.items():
        for method, image in images.items():
            arrays[f"{name}_{method}"] = image
    std = None
    if flag_values.num_samples > 1:
        std = outputs.std(axis=0)
        arrays.update(mean=shown, std=std, fbp_mean=recon["output"]["fbp"].mean(axis=0),
                      fbp_std=recon["output"]["fbp"].std(axis=0), osem_mean=recon["output"]["osem"].mean(axis=0),
                      osem_std=recon["output"]["osem"].std(axis=0))

    def image_of(name, method):
        images = recon[name][method]
        return images.mean(axis=0) if name == "output" and flag_values.num_samples > 1 else (
            images[0] if name == "output" else images)

    title = f"{flag_values.task}, {trained.name} step {trained.step}"
    figures = [("sinograms.png", lambda p: plots.comparison_figure(
        p, plots.task_rows(arrays.get("source"), shown, arrays.get("target"), std), title + ": sinograms"))]
    for method in ("fbp", "osem"):
        image_std = arrays.get(f"{method}_std")
        figures.append((f"{method}.png", lambda p, m=method, s=image_std: plots.comparison_figure(
            p, plots.task_rows(image_of("source", m) if "source" in recon else None, image_of("output", m),
                               image_of("target", m) if "target" in recon else None, s),
            f"{title}: {m.upper()}")))
    path = sampling.write_outputs(out, arrays, mat=flag_values.mat, figures=figures, overwrite=flag_values.overwrite,
                                  tool=TOOL)
    print(f"wrote {path}: outputs.npz{' + outputs.mat' if flag_values.mat else ''}, "
          + ", ".join(name for name, _ in figures), flush=True)


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, renamed=RENAMED)
