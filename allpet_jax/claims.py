"""The paper's claims, judged from the workstation runs (`allpet_jax/workstation.py`): learning curves, and one
table per claim with its verdict, written as Markdown and PNG figures for docs/.

    python -m allpet_jax.claims --root ~/allpet_runs/ws --docs docs    # -> docs/WORKSTATION.md, docs/figures/ws_*.png

Runs not finished yet are left out of their table (and the verdict says what is missing), so the report can
be regenerated as the plan advances.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from absl import flags

from allpet_jax import cli, metrics, workstation
from allpet_jax.atomic_write import write_text
from allpet_jax.experiments import machine
from allpet_jax.training.metrics import FILE as METRICS_FILE
from allpet_jax.training.metrics import read_metrics

TOOL = "allpet_jax.claims"
RED = {4: 2.75, 20: 5.45, 100: 8.08}  # RED (Medical Image Analysis 2025): PSNR gain over OSEM, dB, by DRF
CURVES = {  # stage: (validation metric, better)
    "autoencoder": ("val_psnr", "higher"), "foundation": ("val_loss", "lower"), "task": ("val_crps", "lower"),
    "regressor": ("val_psnr", "higher"), "pixel_regressor": ("val_psnr", "higher"),
}


# --- reading the runs ----------------------------------------------------------------------------------


def _json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def curve(root: str, item: str, stage: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a validation metric of `root/item/stage` (empty when not logged yet). A linked stage
    is read where it was trained."""
    path = os.path.join(root, item, stage, METRICS_FILE)
    if os.path.islink(os.path.join(root, item, stage)) or not os.path.exists(path):
        return np.zeros(0), np.zeros(0)
    rows = [r for r in read_metrics(path) if r.get("split") == "val" and metric in r]
    return np.array([r["step"] for r in rows], float), np.array([r[metric] for r in rows], float)


def learning_curves(root: str, path: str) -> str:
    """One panel per stage: each item's validation curve of that stage."""
    from allpet_jax.plots import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (stage, (metric, better)) in zip(axes, CURVES.items()):
        for item in workstation.PLAN:
            steps, values = curve(root, item.name, stage, metric)
            if len(steps):
                ax.plot(steps, values, marker=".", label=item.name)
        ax.set_title(f"{stage}: {metric} ({better} is better)", fontsize=9)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def plateau(steps, values, better: str, tail: float = 0.25) -> str:
    """Whether a curve has levelled off: the change over its last `tail` of steps, against its total change."""
    if len(values) < 4:
        return "too short"
    start = steps[-1] - tail * (steps[-1] - steps[0])
    last = values[steps >= start]
    total = np.nanmax(values) - np.nanmin(values)
    gain = (last[-1] - last[0]) * (1 if better == "higher" else -1)
    share = gain / total if total > 0 else 0.0
    return (f"{'plateau' if share < 0.1 else 'still improving'} (over the last {tail:.0%} of steps it moved "
            f"{last[-1] - last[0]:+.3g}, {share:+.0%} of its whole range in the better direction)")


# --- the generation claim --------------------------------------------------------------------------------

GENERATION_ARMS = {  # arm: item name prefix
    "500 + RMAS/DMM": "f_rmas_s", "500, no masks": "f_plain_s", "5000, no masks": "f_plain5000_s",
}
GENERATION_KEYS = (("frechet", "Frechet distance"), ("memorisation_median", "memorisation ratio (median)"),
                   ("memorisation_below_0.8", "share with ratio < 0.8"), ("hl_residual", "HL residual"),
                   ("range_residual", "range residual"), ("negative_fraction", "negative mass"))


def generation_results(root: str) -> dict:
    """{arm: [results.json of each finished seed]}."""
    out = {}
    for arm, prefix in GENERATION_ARMS.items():
        out[arm] = [r for item in workstation.PLAN if item.name.startswith(prefix)
                    if (r := _json(os.path.join(root, item.name, "eval", "generation", "results.json")))]
    return out


def _mean_sd(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3g}" if len(v) == 1 else f"{v.mean():.3g} ± {v.std(ddof=1):.2g}"


def generation_table(results: dict) -> tuple[str, str]:
    """Markdown table (mean ± seed standard deviation) and the verdict."""
    lines = ["| arm | seeds | " + " | ".join(h for _, h in GENERATION_KEYS) + " |", "|" + "---|" * (len(GENERATION_KEYS) + 2)]
    floor = None
    for arm, runs in results.items():
        if runs:
            lines.append(f"| {arm} | {len(runs)} | " + " | ".join(_mean_sd([r["model"][k] for r in runs])
                                                                 for k, _ in GENERATION_KEYS) + " |")
            floor = floor or runs[0]["fresh real sinograms"]
    if floor:
        lines.append("| fresh real sinograms (the floor) | - | " + " | ".join(f"{floor[k]:.3g}" for k, _ in GENERATION_KEYS) + " |")
    ceilings = [r["autoencoder ceiling"] for runs in results.values() for r in runs if "autoencoder ceiling" in r]
    if ceilings:
        lines.append("| autoencoder D(E(real)) (a latent model's ceiling) | - | " +
                     " | ".join(f"{ceilings[0][k]:.3g}" for k, _ in GENERATION_KEYS) + " |")
    rmas, plain, big = (np.array([r["model"][k] for r in results[a]], float)
                        for a, k in (("500 + RMAS/DMM", "frechet"), ("500, no masks", "frechet"), ("5000, no masks", "frechet")))
    if not (len(rmas) and len(big) and len(plain)):
        return "\n".join(lines), "**pending**: needs at least one seed of each arm"
    spread = max([np.std(x, ddof=1) for x in (rmas, plain, big) if len(x) > 1], default=0.0)
    close = abs(rmas.mean() - big.mean()) <= max(spread, 1e-12)
    mem = {a: np.array([r["model"]["memorisation_median"] for r in results[a]], float) for a in ("500 + RMAS/DMM", "500, no masks")}
    less = mem["500 + RMAS/DMM"].mean() - mem["500, no masks"].mean()
    verdict = (f"Frechet distance: 500 + RMAS {rmas.mean():.3g}, 5000 {big.mean():.3g} (difference "
               f"{rmas.mean() - big.mean():+.3g}; seed spread {spread:.2g}{' from one seed per arm: none' if spread == 0 else ''}): "
               f"{'within' if close else 'outside'} the spread. Memorisation ratio: RMAS minus no masks {less:+.3f} "
               f"(above 0 is less memorised). Seeds: {', '.join(f'{a} {len(r)}' for a, r in results.items())}.")
    holds = close and less > 0
    return "\n".join(lines), f"**{'holds' if holds else 'does not hold'}** at this budget. " + verdict


# --- the downstream claim ----------------------------------------------------------------------------------


def _arr(values) -> np.ndarray:
    """Per-sample scores from results.json (None where a sample had no value) as floats with NaN."""
    return np.asarray([np.nan if x is None else x for x in values], float)


def _row(summary: dict, pick) -> str | None:
    return next((name for name in summary if pick(name)), None)


def _is_mean(name: str) -> bool:
    return name.startswith("ALL-PET (") and "mean of" in name


def _clinical(name: str) -> bool:
    return name.startswith("source: FBP / clinical OSEM")


def gain(result: dict, pick, reference=_clinical, key: str = "osem_psnr") -> tuple[float, float, float] | None:
    """Mean paired difference of `key` (row `pick` minus row `reference`) with its 95% bootstrap interval."""
    per = result.get("per_sample", {})
    a, b = _row(per, pick), _row(per, reference)
    if not (a and b):
        return None
    ci = metrics.paired_bootstrap_ci(_arr(per[a][key]), _arr(per[b][key]), jax.random.key(0))
    return ci["mean"], ci["lo"], ci["hi"]


def downstream_table(root: str) -> tuple[str, str]:
    lines = ["| arm | DRF | test samples | clinical OSEM + Gaussian, dB | model (mean of K), dB | gain over clinical OSEM, dB [95% CI] | RED's gain |",
             "|---|---|---|---|---|---|---|"]
    target = None
    arms = (("500 pairs, from the RMAS foundation", "ds500", (4, 20, 100)), ("500 pairs, from scratch", "ds500_scratch", (20,)),
            ("5000 pairs, from scratch", "ds5000_scratch", (20,)))
    for label, item, drfs in arms:
        for drf in drfs:
            r = _json(os.path.join(root, item, "eval", f"low_dose_drf{drf}", "results.json"))
            if not r:
                lines.append(f"| {label} | {drf} | pending | | | | {RED[drf]:+.2f} |")
                continue
            s = r["summary"]
            clinical, model = s[_row(s, _clinical)]["osem_psnr"]["mean"], s[_row(s, _is_mean)]["osem_psnr"]["mean"]
            g = gain(r, _is_mean)
            cell = f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]" if g else "-"
            lines.append(f"| {label} | {drf} | {r['n']} | {clinical:.2f} | {model:.2f} | {cell} | {RED[drf]:+.2f} |")
            if item == "ds500" and drf == 20:
                target = g
                for name in ("pixel U-Net regressor", "latent U-Net regressor"):
                    if name in s:
                        gg = gain(r, lambda n, name=name: n == name)
                        lines.append(f"| {name} (500 pairs) | 20 | {r['n']} | {clinical:.2f} | {s[name]['osem_psnr']['mean']:.2f} | "
                                     f"{gg[0]:+.2f} [{gg[1]:+.2f}, {gg[2]:+.2f}] | |")
                zero = _row(s, lambda n: n.startswith("zero-pair") and "mean of" in n)
                if zero:
                    gz = gain(r, lambda n: n == zero)
                    lines.append(f"| {zero} | 20 | {r['n']} | {clinical:.2f} | {s[zero]['osem_psnr']['mean']:.2f} | "
                                 f"{gz[0]:+.2f} [{gz[1]:+.2f}, {gz[2]:+.2f}] | |")
    if target is None:
        return "\n".join(lines), "**pending**: the 500-pair model at DRF 20 is not scored yet"
    holds = target[1] >= 3.0
    return "\n".join(lines), (f"**{'holds' if holds else 'does not hold'}** at this budget: at DRF 20 the 500-pair model "
                              f"is {target[0]:+.2f} dB [{target[1]:+.2f}, {target[2]:+.2f}] over tuned clinical OSEM "
                              f"(target +3 dB; RED +5.45 dB).")


# --- TMA ---------------------------------------------------------------------------------------------------

TMA_ARMS = (("TMA off", "ds500"), ("parameter-free TMA", "tma_seg"), ("oracle attention", "tma_oracle"))


def _cr_stats(values) -> str:
    v = _arr(values)
    v = v[np.isfinite(v)]
    if not len(v):
        return "-"
    return f"{np.mean(v - 1):+.2f} / {np.sqrt(np.mean((v - 1) ** 2)):.2f} (n {len(v)})"


def tma_table(root: str) -> tuple[str, str]:
    lines = ["| arm | slices | lesion-ROI error (mean) | Δ vs TMA off [95% CI] | hot CR bias / RMSE | cold CR bias / RMSE |",
             "|---|---|---|---|---|---|"]
    results = {label: _json(os.path.join(root, item, "eval", "lesions_drf20", "results.json")) for label, item in TMA_ARMS}
    off = results["TMA off"]
    deltas = {}
    for label, r in results.items():
        if not r:
            lines.append(f"| {label} | pending | | | | |")
            continue
        per = r["per_sample"][_row(r["per_sample"], _is_mean)]
        err = np.nanmean(_arr(per["osem_lesion_err"]))
        delta = "-"
        if off and label != "TMA off":  # paired by slice: every arm scores the same lesion-rich slices
            reference = off["per_sample"][_row(off["per_sample"], _is_mean)]["osem_lesion_err"]
            ci = metrics.paired_bootstrap_ci(_arr(per["osem_lesion_err"]), _arr(reference), jax.random.key(0))
            deltas[label] = ci
            delta = f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
        lines.append(f"| {label} | {r['n']} | {err:.3f} | {delta} | {_cr_stats(per['osem_cr_hot'])} | {_cr_stats(per['osem_cr_cold'])} |")
    if len(deltas) < 2:
        return "\n".join(lines), "**pending**: needs all three arms"
    helps = {k: v["hi"] < 0 for k, v in deltas.items()}
    seg, oracle = deltas["parameter-free TMA"], deltas["oracle attention"]
    verdict = (f"parameter-free TMA {'lowers' if helps['parameter-free TMA'] else 'does not lower'} the lesion error "
               f"({seg['mean']:+.3f}); the oracle {'does' if helps['oracle attention'] else 'does not'} ({oracle['mean']:+.3f})")
    if helps["oracle attention"] and not helps["parameter-free TMA"]:
        verdict += f": the segmentation is the gap, {oracle['mean'] - seg['mean']:+.3f} of lesion error"
    return "\n".join(lines), f"**{'holds' if helps['parameter-free TMA'] else 'does not hold'}** at this budget: " + verdict + "."


# --- the report --------------------------------------------------------------------------------------------


def report(root: str, docs: str) -> str:
    figures = os.path.join(docs, "figures")
    os.makedirs(figures, exist_ok=True)
    learning_curves(root, os.path.join(figures, "ws_curves.png"))
    parts = ["# The paper's claims at the workstation budget", "",
             f"Generated by `python -m allpet_jax.claims --root <runs> --docs docs` from the runs of "
             "`python -m allpet_jax.workstation` (docs/RESULTS.md has the plan, the preset and the power "
             "calculation). Machine: " + machine() + ".",
             "", "## Runs", "", workstation.plan_table(root), "", "## Learning curves", "",
             "![validation curves](figures/ws_curves.png)", ""]
    for item in workstation.PLAN:
        for stage, (metric, better) in CURVES.items():
            steps, values = curve(root, item.name, stage, metric)
            if len(steps):
                parts.append(f"- {item.name}/{stage}: {metric} {values[0]:.4g} at step 0 -> {values[-1]:.4g} at step "
                             f"{int(steps[-1])}, best {np.nanmax(values) if better == 'higher' else np.nanmin(values):.4g}; "
                             f"{plateau(steps, values, better)}")
    table, verdict = generation_table(generation_results(root))
    parts += ["", "## Generation: 500 sinograms with RMAS/DMM against 500 and 5000 without", "", table, "", verdict, ""]
    for arm, prefix in GENERATION_ARMS.items():
        grid = os.path.join(root, f"{prefix}0", "eval", "generation", "grid.png")
        if os.path.exists(grid):
            name = f"ws_generation_{prefix}0.png"
            shutil.copyfile(grid, os.path.join(figures, name))
            parts += [f"{arm}, seed 0 (generated above, real below):", "", f"![{arm}](figures/{name})", ""]
    table, verdict = downstream_table(root)
    parts += ["## Downstream: low_dose at 500 pairs against tuned clinical OSEM", "", table, "", verdict, ""]
    table, verdict = tma_table(root)
    parts += ["## TMA against an oracle (400 lesion-rich slices, DRF 20)", "", table, "",
              "CR bias / RMSE: mean of CR - 1 and root mean square of CR - 1 over the slices with a lesion of that kind.",
              "", verdict, ""]
    text = "\n".join(parts)
    write_text(os.path.join(docs, "WORKSTATION.md"), text)
    return text


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    into = {"flag_values": flag_values}
    flags.DEFINE_string("root", None, "the workstation runs (python -m allpet_jax.workstation --root)", **into)
    flags.DEFINE_string("docs", "docs", "where WORKSTATION.md and figures/ws_*.png go", **into)
    flags.mark_flag_as_required("root", flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    del argv
    if not os.path.isdir(flag_values.root):
        raise ValueError(f"--root must be the directory of the workstation runs; {flag_values.root} is not a directory")
    print(report(os.path.abspath(flag_values.root), flag_values.docs))


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, errors=(ValueError,))
