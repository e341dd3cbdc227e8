"""The workstation experiments (docs/RESULTS.md, "The paper's claims at the workstation budget"): a plan of
runs that tests the paper's generation, downstream and attention claims, run one at a time in the
background and resumed where it was interrupted.

    nohup python -m allpet_jax.workstation --root ~/allpet_runs/ws > ws.log 2>&1 &   # start, or resume
    python -m allpet_jax.workstation --root ~/allpet_runs/ws --show                     # the plan and what is done

Every item is a directory under `--root` holding ordinary `train.py` workdirs, so each can be evaluated,
sampled or resumed by hand. Stages an item does not train are symbolic links to the item that did
(`ds500/foundation -> ../f_rmas_s0/foundation`), which is where `train.py` and `evaluate` look for them.
An item's `done.json` records its commands and wall time; an interrupted item runs its commands again:
`train.py` resumes from its last checkpoint (every 250 steps), and an evaluation starts over. After each
item the runner starts itself again, so it picks up a plan extended meanwhile.

The plan takes longer than one sitting, and a later sitting may be on a fresh machine. With `--archive DIR`
(the repository keeps one: docs/ws_runs) each finished item's records (`done.json`, each trained stage's
metrics, each scoring's results.json, results.md and grid.png; no checkpoints) are copied there, an item
archived with the same commands counts as done, and `python -m allpet_jax.claims --root DIR` reports from
it. An item that links to a stage whose own item did not finish under `--root` first trains that stage with
its item's train command, resuming any checkpoint there (same seed and data; the archived scores are not
repeated):

    nohup python -m allpet_jax.workstation --root ~/allpet_runs/ws --archive docs/ws_runs > ws.log 2>&1 &
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

from absl import flags

from allpet_jax import cli
from allpet_jax.atomic_write import atomic_path, claim_output_dir, write_text
from allpet_jax.experiments import ROOT, _call, machine
from allpet_jax.training.metrics import FILE as METRICS_FILE

TOOL = "allpet_jax.workstation"
PRESET = "workstation"
DONE = "done.json"
RECORDS = ("results.json", "results.md", "grid.png")  # what a scoring leaves that the report reads
RUNS = "<runs>"  # the root, as done.json's commands name it


@dataclasses.dataclass(frozen=True)
class Item:
    name: str  # its directory under the root
    what: str  # one line for the plan table
    minutes: int  # planned wall time on 2 cores
    train: tuple = ()  # train.py overrides; () = nothing to train
    links: tuple = ()  # (stage, item) pairs: <name>/<stage> -> ../<item>/<stage>
    scores: tuple = ()  # (module, *args): `python -m <module> --workdir <name> <args>`, each with an --out under <name>


DRFS = {4: 0.25, 20: 0.05, 100: 0.01}  # dose reduction factor: dose fraction (RED reports these three)


def _low_dose_eval(drf: int, zero_pair: bool = False) -> tuple:
    """`evaluate` of low_dose at one DRF: 256 test samples, 8 DDIM-20 samples each, every row post-filtered
    with its validation-tuned Gaussian; with `zero_pair`, also the foundation prior with Poisson guidance 1."""
    return ("allpet_jax.evaluate", "--task", "low_dose", "--dose", f"{DRFS[drf]:g}", "--steps", "20", "--num_samples", "8", "--guidance=",
            f"--zero_pair_guidance={1 if zero_pair else ''}", "--out", f"eval/low_dose_drf{drf}")


LESIONS = ("allpet_jax.evaluate", "--task", "low_dose", "--dose", "0.05", "--min_lesion_radius_px", "2", "--num_inputs",
           "400", "--steps", "20", "--num_samples", "8", "--guidance=", "--zero_pair_guidance=", "--out",
           "eval/lesions_drf20")
"""The TMA claim's scoring: 400 lesion-rich test slices (a lesion of radius >= 2 px; about 24% of slices at
64 x 64) at DRF 20."""

GENERATION = ("allpet_jax.generation", "--num_inputs", "512", "--steps", "50", "--out", "eval/generation")
GENERATION_LAST = (*GENERATION[:-1], "eval/generation_last", "--last")
"""The small-data control's second scoring: its last checkpoint, where memorisation would show."""


WARMUP = "--config.train.ema_warmup=True"
"""The EMA warmed up (session 13's fix); the preset keeps the plan's EMA so that the claims' arms compare."""


def _foundation(name: str, what: str, seed: int, rmas: bool, n_train: int = 500, scores: tuple = (GENERATION,),
                extra: tuple = ()) -> Item:
    last = ", at its best and at its last checkpoint" if GENERATION_LAST in scores else ""
    return Item(name, what + "; generation scored on 512 samples" + last, 65,
                ("--config.train.stages=foundation", f"--config.seed={seed}", f"--config.masks.rmas={rmas}",
                 f"--config.data.n_train={n_train}", *extra), links=(("autoencoder", "ae"),), scores=scores)


PLAN = (
    Item("ae", "sinogram autoencoder on the 500 low_dose pairs, shared by every arm", 12,
         ("--config.train.stages=autoencoder",)),
    _foundation("f_rmas_s0", "foundation, 500 sinograms, RMAS/DMM (completion), seed 0", 0, True),
    Item("ds500", "low_dose, 500 pairs: task fine-tuned from f_rmas_s0; latent and pixel regressors; scored at "
                  "DRF 20 (with the zero-pair arm), 4 and 100, and on lesion-rich slices (TMA off)", 165,
         ("--config.train.stages=task,regressor,pixel_regressor",),
         links=(("autoencoder", "ae"), ("foundation", "f_rmas_s0")),
         scores=(_low_dose_eval(20, zero_pair=True), _low_dose_eval(4), _low_dose_eval(100), LESIONS)),
    Item("tma_seg", "low_dose, 500 pairs, from f_rmas_s0 with parameter-free TMA; lesion-rich slices", 55,
         ("--config.train.stages=task", "--config.tma.enabled=True"),
         links=(("autoencoder", "ae"), ("foundation", "f_rmas_s0")), scores=(LESIONS,)),
    Item("tma_oracle", "the same with the oracle attention (the phantom's lesion labels); lesion-rich slices", 55,
         ("--config.train.stages=task", "--config.tma.enabled=True", "--config.tma.map=oracle"),
         links=(("autoencoder", "ae"), ("foundation", "f_rmas_s0")), scores=(LESIONS,)),
    Item("ds500_scratch", "low_dose, 500 pairs, task from scratch (no foundation), scored at DRF 20", 45,
         ("--config.train.stages=task",), links=(("autoencoder", "ae"),), scores=(_low_dose_eval(20),)),
    _foundation("f_plain_s0", "foundation, 500 sinograms, no masks (plain synthesis), seed 0", 0, False),
    _foundation("f_plain5000_s0", "foundation, 5000 sinograms, no masks, seed 0 (same U-Net passes)", 0, False, 5000),
    _foundation("f_rmas_s1", "foundation, 500, RMAS/DMM, seed 1", 1, True),
    _foundation("f_plain_s1", "foundation, 500, no masks, seed 1", 1, False),
    _foundation("f_rmas_s2", "foundation, 500, RMAS/DMM, seed 2", 2, True),
    _foundation("f_plain_s2", "foundation, 500, no masks, seed 2", 2, False),
    Item("ds5000_scratch", "low_dose, 5000 pairs, task from scratch", 50,
         ("--config.train.stages=task", "--config.data.n_train=5000"), links=(("autoencoder", "ae"),),
         scores=(_low_dose_eval(20),)),
    Item("ds500_ema", "low_dose, 500 pairs: the task fine-tuned from f_rmas_s0 as in ds500, with the EMA warmed up (the "
                      "plan's EMA kept 5% of the starting parameters after 3000 steps), scored at DRF 20", 35,
         ("--config.train.stages=task", "--config.train.ema_warmup=True"),
         links=(("autoencoder", "ae"), ("foundation", "f_rmas_s0")), scores=(_low_dose_eval(20),)),
    _foundation("f_plain50_s0", "small-data control: foundation, 50 sinograms, no masks, seed 0 (at 500 no arm copies, "
                "so this asks whether copying appears at all and whether RMAS/DMM prevents it)", 0, False, 50, (GENERATION, GENERATION_LAST)),
    _foundation("f_rmas50_s0", "small-data control: foundation, 50 sinograms, RMAS/DMM, seed 0",
                0, True, 50, (GENERATION, GENERATION_LAST)),
    _foundation("w_foundation", "the shipped weights' foundation: f_rmas_s0 with the EMA warmed up (not a claims arm: "
                "every arm compares under the plan's EMA)", 0, True, extra=(WARMUP,)),
    Item("w_low_dose", "the shipped weights' low_dose task: ds500_ema fine-tuned from w_foundation, scored at DRF 20",
         35, ("--config.train.stages=task", WARMUP), links=(("autoencoder", "ae"), ("foundation", "w_foundation")), scores=(_low_dose_eval(20),)),
    _foundation("e_plain_s0", "the generation arms with the EMA warmed up (is the verdict robust to the EMA's defect?): "
                "foundation, 500, no masks, seed 0; w_foundation is the RMAS arm", 0, False, extra=(WARMUP,)),
    _foundation("e_plain5000_s0", "the same, 5000 sinograms, no masks, seed 0", 0, False, 5000, extra=(WARMUP,)),
    Item("ds500_ramp", "low_dose, 500 pairs: the pixel regressor trained with the ramp-weighted sinogram loss (the "
                       "error as its image sees it), beside ds500's task and latent regressor; scored at DRF 20", 40,
         ("--config.train.stages=pixel_regressor", "--config.train.sinogram_loss=ramp"),
         links=(("autoencoder", "ae"), ("foundation", "f_rmas_s0"), ("task", "ds500"), ("regressor", "ds500")),
         scores=(_low_dose_eval(20),)),
)


def train_command(root: str, item: Item, preset: str = PRESET) -> list:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, f"configs/base.py:{preset}"),
            "--workdir", os.path.join(root, item.name), *item.train]


def score_command(root: str, item: Item, score) -> list:
    """A scoring module run on the item's workdir, its `--out` made a path under the item's directory."""
    module, *args = score
    i = args.index("--out") + 1
    args[i] = os.path.join(root, item.name, args[i])
    return [sys.executable, "-m", module, "--workdir", os.path.join(root, item.name), *args]


def commands(root: str, item: Item, preset: str = PRESET) -> list:
    out = [train_command(root, item, preset)] if item.train else []
    return out + [score_command(root, item, a) for a in item.scores]


def is_done(root: str, item: Item, preset: str = PRESET, archive: str | None = None) -> bool:
    """Whether `item` finished, under `root` or as `archive` records it, with the commands it has now (a
    changed item runs again, resuming)."""
    expected = _portable(commands(root, item, preset), root)
    return any((done := _read(os.path.join(where, item.name, DONE))) and done.get("commands") == expected
               for where in ((root, archive) if archive else (root,)))


def _portable(cmds: list, root: str) -> list:
    """Commands without this machine's interpreter, checkout and runs paths (so a moved checkout or root, or
    another machine, still counts an item as done)."""
    def portable(p):
        return "python" if p == sys.executable else p.replace(ROOT + os.sep, "").replace(root, RUNS)
    return [[portable(p) for p in c] for c in cmds]


def trained_stages(item: Item) -> list:
    """The stages `item`'s train command trains (its `--config.train.stages=`)."""
    flag = "--config.train.stages="
    return [s for a in item.train if a.startswith(flag) for s in a[len(flag):].split(",")]


def records(root: str, item: Item) -> list:
    """The small files of a finished item that the report reads, as paths relative to `root`: its done.json,
    each trained stage's metrics and each scoring's results (those that exist)."""
    paths = [os.path.join(item.name, DONE)] + [os.path.join(item.name, s, METRICS_FILE) for s in trained_stages(item)]
    for score in item.scores:
        out = score[score.index("--out") + 1]
        paths += [os.path.join(item.name, out, name) for name in RECORDS]
    return [p for p in paths if os.path.exists(os.path.join(root, p))]


def archive_item(root: str, item: Item, archive: str) -> list:
    """Copy `item`'s `records` from `root` to the same paths under `archive`, each file whole or not at all.
    Returns the paths copied."""
    copied = records(root, item)
    for path in copied:
        with atomic_path(os.path.join(archive, path), os.path.splitext(path)[1]) as tmp:
            shutil.copyfile(os.path.join(root, path), tmp)
    return copied


def by_name(name: str) -> Item:
    return next(i for i in PLAN if i.name == name)


TRAINED = "trained.json"  # an item's stages retrained under a root where the item's scores were not run


def ensure_linked_stages(root: str, item: Item, preset: str = PRESET) -> list:
    """Train each stage that `item` links to, unless the item that owns it finished under `root` (it was
    archived on another machine, or interrupted): that item's train command, its own links first. It resumes
    from a checkpoint there and repeats no scoring. Returns the items trained."""
    rebuilt = []
    for other in dict.fromkeys(o for _, o in item.links):
        owner = by_name(other)
        command = _portable([train_command(root, owner, preset)], root)
        if is_done(root, owner, preset) or _read(os.path.join(root, other, TRAINED)) == command:
            continue
        rebuilt += ensure_linked_stages(root, owner, preset)
        link_stages(root, owner)
        print(f"[{time.strftime('%H:%M:%S')}] {other}: training its {','.join(trained_stages(owner))} here for "
              f"{item.name} (not finished under this root)", flush=True)
        _call(train_command(root, owner, preset), os.path.join(root, other, "run.log"))
        write_text(os.path.join(root, other, TRAINED), json.dumps(command))
        rebuilt.append(other)
    return rebuilt


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def link_stages(root: str, item: Item) -> None:
    """`<item>/<stage>` -> `../<other>/<stage>` for each of `item.links`; an existing link must point there."""
    os.makedirs(os.path.join(root, item.name), exist_ok=True)
    for stage, other in item.links:
        path, target = os.path.join(root, item.name, stage), os.path.join("..", other, stage)
        if os.path.islink(path):
            if os.readlink(path) != target:
                raise ValueError(f"{path} links to {os.readlink(path)}, expected {target}")
        elif os.path.exists(path):
            raise ValueError(f"{path} exists and is not a link to {target}; move it away to run {item.name}")
        else:
            os.symlink(target, path)


def run_item(root: str, item: Item, preset: str = PRESET) -> float:
    link_stages(root, item)
    log = os.path.join(root, item.name, "run.log")
    t0 = time.time()
    for cmd in commands(root, item, preset):
        _call(cmd, log)
    wall = time.time() - t0
    write_text(os.path.join(root, item.name, DONE),
               json.dumps({"commands": _portable(commands(root, item, preset), root), "wall_s": wall, "machine": machine(),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return wall


def plan_table(root: str | None = None) -> str:
    """Markdown: the plan, each item's planned minutes and, under `root`, its measured wall time."""
    lines = ["| item | what | planned min | done: wall min |", "|---|---|---|---|"]
    for item in PLAN:
        wall = "-"
        path = os.path.join(root, item.name, DONE) if root else ""
        if path and os.path.exists(path):
            with open(path) as f:
                wall = f"{json.load(f)['wall_s'] / 60:.0f}"
        lines.append(f"| {item.name} | {item.what} | {item.minutes} | {wall} |")
    lines.append(f"| total | | {sum(i.minutes for i in PLAN)} ({sum(i.minutes for i in PLAN) / 60:.1f} h) | |")
    return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    into = {"flag_values": flag_values}
    flags.DEFINE_string("root", None, "directory of the runs: new, or one this command wrote (rerun to resume)", **into)
    flags.DEFINE_string("preset", PRESET, "configs/base.py preset of every run (smoke: a test of the plan)", **into)
    flags.DEFINE_bool("show", False, "print the plan and what is done, and run nothing", **into)
    flags.DEFINE_list("only", [], "run just these items, in this order (default: every item not done, in the "
                      "plan's order)", **into)
    flags.DEFINE_string("archive", None, "copy each finished item's records here, and count an item archived "
                        "there as done (docs/ws_runs in the repository)", **into)
    flags.mark_flag_as_required("root", flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    del argv
    root = os.path.abspath(os.path.expanduser(flag_values.root))
    unknown = [n for n in flag_values.only if n not in {i.name for i in PLAN}]
    if unknown:
        raise ValueError(f"--only must name items of the plan ({', '.join(i.name for i in PLAN)}); got {unknown}")
    archive = flag_values.archive and os.path.abspath(os.path.expanduser(flag_values.archive))
    if flag_values.show:
        print(plan_table(archive or root))
        return
    for path in (root, archive) if archive else (root,):  # each refused if it holds someone else's files, untouched
        claim_output_dir(path, TOOL, [i.name for i in PLAN])
    preset = flag_values.preset
    order = [by_name(n) for n in flag_values.only] if flag_values.only else PLAN
    todo = [i for i in order if not is_done(root, i, preset, archive)]
    if not todo:
        print(plan_table(archive or root))
        return
    item = todo[0]
    ensure_linked_stages(root, item, preset)
    print(f"[{time.strftime('%H:%M:%S')}] {item.name}: {item.what}", flush=True)
    wall = run_item(root, item, preset)
    print(f"[{time.strftime('%H:%M:%S')}] {item.name} done in {wall / 60:.1f} min", flush=True)
    if archive:
        print(f"archived {', '.join(archive_item(root, item, archive))} in {archive}", flush=True)
    if len(todo) > 1:  # the next item with the code as it is now
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", TOOL, *sys.argv[1:]])


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, errors=(ValueError,))
