"""The paper's claims, judged from the workstation runs (`allpet_jax/workstation.py`): learning curves, and one
table per claim with its verdict, written as Markdown and PNG figures for docs/.

    python -m allpet_jax.claims --root docs/ws_runs --docs docs    # -> docs/WORKSTATION.md, docs/figures/ws_*.png

`--root` is the runs' root, or the archive of their records the repository keeps (`workstation --archive`).

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
from allpet_jax.experiments import machine, preset_config
from allpet_jax.training import runs
from allpet_jax.training.metrics import FILE as METRICS_FILE
from allpet_jax.training.metrics import read_metrics

TOOL = "allpet_jax.claims"
CLAIMS = (  # (the paper's claim that the workstation plan tests, in its words' sense; how it is tested here)
    ("trained on 500 sinograms with RMAS/DMM, the foundation generates sinograms comparable to models trained on "
     "much larger sets, without memorising its few samples",
     "Frechet distance within the 5000 arm's seed spread; memorisation ratio clearly above the 500 arm without masks"),
    ("fine-tuned with few pairs, the model improves low-dose PET over clinical reconstruction",
     "low_dose at DRF 20, image PSNR against the true activity: at least +3 dB over tuned clinical OSEM (lower end "
     "of the 95% CI)"),
    ("TMA steers the model to lesions and improves them",
     "lesion-ROI error lower than TMA off (95% CI below 0), beside an oracle map"),
)
COPYING = 0.9  # a memorisation ratio below this share of real sinograms' own counts as copying
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


WARMED_ARMS = {"500 + RMAS/DMM": "w_foundation", "500, no masks": "e_plain_s", "5000, no masks": "e_plain5000_s"}
"""The generation arms again with the EMA warmed up, one seed each (the RMAS arm is the shipped foundation):
whether the verdict survives the plan's EMA defect."""

SMALL_DATA_ARMS = {"50, no masks": "f_plain50_s", "50 + RMAS/DMM": "f_rmas50_s"}
"""The small-data control: at 500 sinograms no arm copies, so the control asks at 50 whether copying appears at
all within the budget and whether RMAS/DMM prevents it; each scored at its best and at its last checkpoint."""


def generation_results(root: str, arms: dict = GENERATION_ARMS, out: str = "generation") -> dict:
    """{arm: [results.json of each finished seed]} from each item's `eval/<out>`."""
    return {arm: [r for item in workstation.PLAN if item.name.startswith(prefix)
                  if (r := _json(os.path.join(root, item.name, "eval", out, "results.json")))]
            for arm, prefix in arms.items()}


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
    # two sets of fresh real sinograms are this far apart: no difference below it is resolved (one seed per arm)
    floor_distance = float(np.mean([r["fresh real sinograms"]["frechet"] for runs in results.values() for r in runs]))

    def resolution(a: str, b: str) -> float:
        """The smallest Frechet difference between arms `a` and `b` that this test resolves: the seed spread,
        two real sets' distance, or twice the root sum of squares of the two means' sampling noise
        (`generation.frechet_sd`; runs scored before it existed have none), whichever is largest."""
        noise = [np.array([r["model"].get("frechet_sd", 0.0) for r in results[x]], float) for x in (a, b)]
        return max(spread, floor_distance, 2.0 * float(np.sqrt(sum(np.sum(v**2) / len(v) ** 2 for v in noise))))

    tolerance = resolution("500 + RMAS/DMM", "5000, no masks")
    masks_res = resolution("500 + RMAS/DMM", "500, no masks")
    close = abs(rmas.mean() - big.mean()) <= tolerance
    data_gap = plain.mean() - big.mean()  # > 0: the 5000 arm generates better than the 500 arm without masks
    data_helps = data_gap > resolution("500, no masks", "5000, no masks")
    mem = {a: np.array([r["model"]["memorisation_median"] for r in results[a]], float) for a in ("500 + RMAS/DMM", "500, no masks")}
    less = mem["500 + RMAS/DMM"].mean() - mem["500, no masks"].mean()
    mem_spread = max([np.std(x, ddof=1) for x in mem.values() if len(x) > 1], default=0.0)
    real = float(np.mean([r["fresh real sinograms"]["memorisation_median"] for r in results["500, no masks"]]))
    copies = mem["500, no masks"].mean() < COPYING * real  # else no arm copies and RMAS has nothing to prevent
    clearly = less > max(mem_spread, 0.02)
    verdict = (f"Frechet distance (lower is better): 500 + RMAS {rmas.mean():.3g}, 5000 {big.mean():.3g}, 500 without "
               f"masks {plain.mean():.3g}; RMAS minus 5000 {rmas.mean() - big.mean():+.3g}, {'within' if close else 'outside'} "
               f"what the test resolves, {tolerance:.2g} (the largest of the seed spread {spread:.2g}"
               f"{' (one seed per arm)' if spread == 0 else ''}, two real sets' distance {floor_distance:.2g} and twice the "
               f"distances' sampling noise); RMAS minus 500 without masks {rmas.mean() - plain.mean():+.3g}, "
               f"{'resolved' if abs(rmas.mean() - plain.mean()) > masks_res else 'not resolved'} (the test resolves "
               f"{masks_res:.2g} between them). Memorisation ratio (median; fresh real sinograms {real:.3f}): 500 without "
               f"masks {mem['500, no masks'].mean():.3f}, RMAS minus no masks {less:+.3f} (above 0 is less memorised; "
               f"seed spread {mem_spread:.2g})")
    if not data_helps:
        verdict += (f". Ten times the data does not generate better here (500 without masks minus 5000 "
                    f"{data_gap:+.3g}), so there is no data gap for RMAS/DMM to close")
    if not copies:
        verdict += (f"; the 500 arm without masks does not copy its training set (ratio above {COPYING:.0%} of the "
                    "real one), so there is no memorisation for RMAS/DMM to prevent")
    verdict += f". Seeds: {', '.join(f'{a} {len(r)}' for a, r in results.items())}."
    if not (data_helps or copies):
        word = "cannot show"  # the budget creates neither problem the method addresses
    else:
        word = "does not hold" if not close else "holds in part" if not copies else "holds" if clearly else "does not hold"
    return "\n".join(lines), f"**{word}** at this budget. " + verdict


def shipped_foundation(root: str, results: dict) -> str | None:
    """One line on the shipped weights' foundation (`w_foundation`: f_rmas_s0 with the EMA warmed up) beside the
    500 + RMAS/DMM seeds `results`, which keep the plan's EMA; None until it is scored."""
    w = _json(os.path.join(root, "w_foundation", "eval", "generation", "results.json"))
    if not w:
        return None
    m, arm = w["model"], results.get("500 + RMAS/DMM", [])
    same = " and ".join(f"{h.split(' (')[0]} {_mean_sd([r['model'][k] for r in arm])}"
                        for k, h in GENERATION_KEYS[:2] if arm)
    return (f"The shipped foundation (`w_foundation`: f_rmas_s0's command with the EMA warmed up; one seed, not an arm "
            f"of the verdict, which compares every arm under the plan's EMA): Frechet distance {m['frechet']:.3g}"
            + (f" ± {m['frechet_sd']:.2g} (sampling noise)" if "frechet_sd" in m else "")
            + f", memorisation ratio (median) {m['memorisation_median']:.3f}, negative mass {m['negative_fraction']:.3g}"
            + (f"; the plan's EMA, {len(arm)} seeds: {same}." if arm else "."))


def median_difference_ci(a, b, key, level: float = 0.95, num_resamples: int = 2000) -> dict:
    """Median of `a` minus median of `b` (two independent samples) with its percentile bootstrap interval:
    each sample resampled on its own."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ka, kb = jax.random.split(key)
    ia = np.asarray(jax.random.randint(ka, (num_resamples, len(a)), 0, len(a)))
    ib = np.asarray(jax.random.randint(kb, (num_resamples, len(b)), 0, len(b)))
    d = np.median(a[ia], axis=1) - np.median(b[ib], axis=1)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(np.median(a) - np.median(b)), "lo": float(lo), "hi": float(hi)}


def small_data_control(best: dict, last: dict, big: list) -> tuple[str, str]:
    """Markdown table and finding of the small-data control (`SMALL_DATA_ARMS`, seed 0 of each, scored at the best
    (`best`) and the last (`last`) checkpoint), beside the 5000 arm's runs `big`."""
    plain, rmas = "50, no masks", "50 + RMAS/DMM"
    lines = ["| arm | checkpoint (step) | Frechet distance | memorisation ratio (median) | share with ratio < 0.8 |",
             "|---|---|---|---|---|"]
    for arm in SMALL_DATA_ARMS:
        for label, results in (("best", best), ("last", last)):
            for r in results.get(arm, [])[:1]:
                m = r["model"]
                lines.append(f"| {arm} | {label} ({r['step']}) | {m['frechet']:.3g} | {m['memorisation_median']:.3f} | "
                             f"{m['memorisation_below_0.8']:.1%} |")
    if big:
        lines.append(f"| 5000, no masks (the generation claim's reference) | best | "
                     f"{np.mean([r['model']['frechet'] for r in big]):.3g} | - | - |")
    if not all(last.get(a) for a in SMALL_DATA_ARMS):
        return "\n".join(lines), "**pending**: needs both arms of the small-data control"
    p, q = last[plain][0], last[rmas][0]
    real = p["fresh real sinograms"]["memorisation_median"]
    copies = p["model"]["memorisation_median"] < COPYING * real
    ci = median_difference_ci(q["model"]["memorisation_ratio"], p["model"]["memorisation_ratio"], jax.random.key(0))
    finding = (f"At 50 sinograms and its last checkpoint, the arm without masks has a median memorisation ratio of "
               f"{p['model']['memorisation_median']:.3f} (fresh real sinograms {real:.3f}; copying is below "
               f"{COPYING:.0%} of that), so it {'copies' if copies else 'does not copy'} its training set. RMAS/DMM "
               f"minus no masks: {ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}] (95% bootstrap interval; above 0 "
               "is less memorised). ")
    fb, fl = ([results[a][0]["model"]["frechet"] for a in (plain, rmas)] for results in (best, last))
    finding += (f"Frechet distance at the last checkpoints: no masks {fl[0]:.3g}, RMAS/DMM {fl[1]:.3g}"
                + (f" (5000 sinograms, the claim's reference: {np.mean([r['model']['frechet'] for r in big]):.3g})"
                   if big else "")
                + f"; at the best validation-loss checkpoints {fb[0]:.3g} and {fb[1]:.3g}. ")
    if not copies:
        word = "The budget creates no copying even at 50 sinograms, so it cannot show what RMAS/DMM prevents"
    elif ci["lo"] > 0:
        word = "RMAS/DMM reduces copying where copying arises"
    else:
        word = "RMAS/DMM does not reduce copying where copying arises"
    return "\n".join(lines), finding + f"**{word}**."


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


CEILINGS = (  # evaluate.py's reference rows, shown under the 500-pair model at each DRF: the room the target needs
    ("ceiling: noisy target", "a perfect single sample (the full-dose target)"),
    ("ceiling: autoencoder", "the autoencoder's round trip of the clean target (a latent model's best)"),
    ("full-dose clinical OSEM", "full-dose clinical OSEM"),
    ("identity", "identity (the low-dose prompts' corrected sinogram)"),
)

DOWNSTREAM_ARMS = (("500 pairs, from the RMAS foundation", "ds500", (4, 20, 100)),
                   ("500 pairs, from the RMAS foundation, EMA warmed up", "ds500_ema", (20,)),
                   ("500 pairs, the shipped weights (foundation and task with the EMA warmed up)", "w_low_dose", (20,)),
                   ("500 pairs, from scratch", "ds500_scratch", (20,)), ("5000 pairs, from scratch", "ds5000_scratch", (20,)))
VARIANTS = (("ds500_ema", "with the EMA warmed up"),
            ("w_low_dose", "the shipped weights (foundation and task with the EMA warmed up)"))
"""ds500's variants (500 pairs fine-tuned from an RMAS foundation), each counted in the downstream verdict."""


def _posterior_cells(result: dict, row: str) -> str:
    """The relative CRPS and the 90 % coverage (with a calibrated ensemble's) of one row, as table cells."""
    s, k = result["summary"][row], result.get("num_samples", 1)
    if "crps" not in s:  # an image-only row (full-dose clinical OSEM)
        return "- | -"
    coverage = s.get("coverage90", {}).get("mean")
    calibrated = f" ({metrics.calibrated_coverage(k):.2f})" if coverage is not None and k > 1 else ""
    return f"{s['crps']['mean']:.3f} | " + (f"{coverage:.2f}{calibrated}" if coverage is not None else "-")


def _gain_row(lines: list, result: dict, shown: str, name: str, drf: int, red: str):
    """Append row `name` of one evaluation to the downstream table `lines`; returns its gain over clinical OSEM."""
    s = result["summary"]
    clinical = s[_row(s, _clinical)]["osem_psnr"]["mean"]
    g = gain(result, lambda n: n == name)
    cell = f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]" if g else "-"
    lines.append(f"| {shown} | {drf} | {result['n']} | {clinical:.2f} | {s[name]['osem_psnr']['mean']:.2f} | {cell} "
                 f"| {red} | {_posterior_cells(result, name)} |")
    return g


def between_arms(a: dict, b: dict, key: str = "osem_psnr") -> tuple[float, float, float] | None:
    """Model row (mean of K) of evaluation `a` minus that of evaluation `b`, paired by test sample with its 95%
    bootstrap interval; None unless both scored the same test samples (their clinical OSEM agrees per sample)."""
    pa, pb = a.get("per_sample", {}), b.get("per_sample", {})
    ca, cb = (_arr(p[_row(p, _clinical)][key]) if _row(p, _clinical) else None for p in (pa, pb))
    ma, mb = _row(pa, _is_mean), _row(pb, _is_mean)
    if ca is None or cb is None or ca.shape != cb.shape or not np.allclose(ca, cb, atol=1e-3, equal_nan=True) \
            or not (ma and mb):
        return None
    ci = metrics.paired_bootstrap_ci(_arr(pa[ma][key]), _arr(pb[mb][key]), jax.random.key(0))
    return ci["mean"], ci["lo"], ci["hi"]


def downstream_table(root: str) -> tuple[str, str]:
    lines = ["| arm | DRF | test samples | clinical OSEM + Gaussian, dB | model, dB | gain over clinical OSEM, dB [95% CI] "
             "| RED's gain | rel. CRPS | 90% coverage (calibrated) |", "|---|---|---|---|---|---|---|---|---|"]
    gains = {}  # item: its model's gain at DRF 20
    for label, item, drfs in DOWNSTREAM_ARMS:
        for drf in drfs:
            r = _json(os.path.join(root, item, "eval", f"low_dose_drf{drf}", "results.json"))
            if not r:
                lines.append(f"| {label} | {drf} | pending | | | | {RED[drf]:+.2f} | | |")
                continue
            s = r["summary"]
            rows = [(f"{label}: {_row(s, _is_mean)}", _row(s, _is_mean), f"{RED[drf]:+.2f}")]
            if item == "ds500" and drf == 20:
                rows += [(f"{name} (500 pairs)", name, "") for name in ("pixel U-Net regressor", "latent U-Net regressor")
                         if name in s]
                zero = _row(s, lambda n: n.startswith("zero-pair") and "mean of" in n)
                rows += [(zero, zero, "")] if zero else []
            if item == "ds500":
                rows += [(shown, name, "") for prefix, shown in CEILINGS
                         if (name := _row(s, lambda n, p=prefix: n.startswith(p)))]
            for shown, name, red in rows:
                g = _gain_row(lines, r, shown, name, drf, red)
                if drf == 20 and name == rows[0][1]:
                    gains[item] = g
    ramp = _json(os.path.join(root, "ds500_ramp", "eval", "low_dose_drf20", "results.json"))
    if ramp and "pixel U-Net regressor" in ramp["summary"]:
        _gain_row(lines, ramp, "pixel U-Net regressor, ramp-weighted loss (500 pairs)", "pixel U-Net regressor", 20, "")
    lines.append("")
    lines.append("The ceilings and the identity are scored like the arms (the mean over test samples, post-filtered): "
                 "the gain the target asks for is possible where a ceiling's gain exceeds +3 dB.")
    if (target := gains.get("ds500")) is None:
        return "\n".join(lines), "**pending**: the 500-pair model at DRF 20 is not scored yet"
    holds = max(g[1] for item, g in gains.items() if item == "ds500" or item in dict(VARIANTS)) >= 3.0
    trained_longer = "".join(f"; {what}, {g[0]:+.2f} dB [{g[1]:+.2f}, {g[2]:+.2f}]"
                             for item, what in VARIANTS if (g := gains.get(item)))
    drf20 = {item: _json(os.path.join(root, item, "eval", "low_dose_drf20", "results.json"))
             for item in ("ds500", "ds500_ema", "w_low_dose", "ds500_scratch", "ds5000_scratch")}
    against = []
    for a, b, what in (("ds500", "ds500_scratch", "the foundation's contribution (fine-tuned minus from scratch, both 500 pairs)"),
                       ("ds500", "ds5000_scratch", "500 pairs fine-tuned minus 5000 pairs from scratch"),
                       ("ds500_ema", "ds500", "the EMA's warm-up (warmed up minus as the plan trains)"),
                       ("w_low_dose", "ds500_ema", "the foundation's EMA warmed up too (the shipped weights minus "
                                                   "ds500_ema)")):
        if drf20[a] and drf20[b] and (d := between_arms(drf20[a], drf20[b])):
            against.append(f"{what}: {d[0]:+.2f} dB [{d[1]:+.2f}, {d[2]:+.2f}]")
    paired = (" Paired by test sample at DRF 20, " + "; ".join(against) + ".") if against else ""
    return "\n".join(lines), (f"**{'holds' if holds else 'does not hold'}** at this budget: at DRF 20 the 500-pair model "
                              f"is {target[0]:+.2f} dB [{target[1]:+.2f}, {target[2]:+.2f}] over tuned clinical OSEM"
                              f"{trained_longer} (target: at least +3 dB; RED +5.45 dB).{paired}")


def calibration_figure(root: str, path: str) -> str | None:
    """Rank histograms (`metrics.rank_histogram`, from results.json) of every posterior row of the low_dose
    evaluations, one panel per arm and DRF, with the flat line of a calibrated sampler; None before any."""
    from allpet_jax.plots import _plt, save_figure

    panels = [(f"{label}, DRF {drf}", r["rank_histograms"]) for label, item, drfs in DOWNSTREAM_ARMS for drf in drfs
              if (r := _json(os.path.join(root, item, "eval", f"low_dose_drf{drf}", "results.json")))
              and r.get("rank_histograms")]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, histograms) in zip(axes[0], panels):
        width = 0.8 / len(histograms)
        for j, (name, h) in enumerate(histograms.items()):
            ranks = np.arange(len(h))
            ax.bar(ranks + (j - (len(histograms) - 1) / 2) * width, h, width, label=name.split(" (")[0])
        ax.axhline(1 / len(h), color="k", linestyle="--", linewidth=0.8, label="calibrated")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("rank of the clean truth among the samples")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("share of sinogram bins")
    fig.tight_layout()
    return save_figure(fig, path)


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


def tma_segmentation(config, n: int = 400, radius_px: float = 2.0, dose: float = 0.05, shown: int = 4) -> dict:
    """How far the parameter-free map is from the oracle, on the lesion-rich test slices the TMA arms are
    scored on (`evaluate.lesion_rich_indices`, the low-dose prompts at `dose`): the share of lesion pixels
    it flags (hot as hyper, cold as hypo, and either as either), the share of flagged pixels that are
    lesion, their Dice, the share of slices where it touches a lesion at all, and the mean attention on
    lesion and on other body pixels (the oracle's are 1 and 0). `shown` slices' images and maps come
    along for `tma_figure`."""
    from allpet_jax import evaluate, sampling
    from allpet_jax.data import phantoms
    from allpet_jax.training import transforms

    trained = evaluate.at_dose(runs.TrainedStage("task", config, {}, None, None, 0, ""), dose)
    x = sampling.simulated_inputs(trained, n, indices=evaluate.lesion_rich_indices(trained, n, radius_px))
    maps = {k: np.asarray(v) for k, v in transforms.TmaTransform(trained.config).image_maps(x).items()}
    labels = np.asarray(x["labels"]).reshape(maps["attention"].shape)
    hot, cold = (labels == phantoms.LABEL_IDS[k] for k in ("lesion_hot", "lesion_cold"))
    lesion, flagged = hot | cold, maps["hyper"] | maps["hypo"]
    hit = flagged & lesion
    return {"n": n, "dose": dose, "radius_px": radius_px, "recall": hit.sum() / lesion.sum(),
            "recall_hot": (maps["hyper"] & hot).sum() / max(hot.sum(), 1),
            "recall_cold": (maps["hypo"] & cold).sum() / max(cold.sum(), 1),
            "precision": hit.sum() / max(flagged.sum(), 1), "dice": 2 * hit.sum() / (lesion.sum() + flagged.sum()),
            "slices_touched": float(np.mean(hit.reshape(n, -1).any(axis=1))),
            "attention_lesion": float(maps["attention"][lesion].mean()),
            "attention_background": float(maps["attention"][maps["body"] & ~lesion].mean()),
            "shown": {"image": np.asarray(x["image"]).reshape(labels.shape)[:shown], "fbp": maps["image"][:shown],
                      "attention": maps["attention"][:shown], "hyper": maps["hyper"][:shown], "hypo": maps["hypo"][:shown],
                      "hot": hot[:shown], "cold": cold[:shown]}}


def tma_figure(segmentation: dict, path: str) -> str:
    """Columns: lesion-rich test slices. Rows: the true activity, the low-dose FBP that TMA segments with its
    hyper (red) and hypo (blue) outlines, the parameter-free attention and the oracle's; every panel
    outlines the true lesions (dashed yellow)."""
    from allpet_jax.plots import _plt, save_figure

    plt = _plt()
    shown = segmentation["shown"]
    n = len(shown["image"])
    fig, axes = plt.subplots(4, n, figsize=(2.6 * n, 10.4), squeeze=False)
    for c in range(n):
        lesions = (shown["hot"][c] | shown["cold"][c]).astype(float)
        panels = [("true activity", shown["image"][c], "gray", None), ("low-dose FBP (TMA input)", shown["fbp"][c], "gray", None),
                  ("parameter-free attention", shown["attention"][c], "inferno", 1.0),
                  ("oracle attention", lesions, "inferno", 1.0)]
        for r, (title, img, cmap, vmax) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, vmin=0 if vmax else None, vmax=vmax)
            ax.contour(lesions, levels=[0.5], colors="yellow", linewidths=0.8, linestyles="--")
            if r == 1:
                for mask, colour in ((shown["hyper"][c], "red"), (shown["hypo"][c], "deepskyblue")):
                    if mask.any():
                        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle("TMA on lesion-rich test slices (true lesions dashed yellow; TMA's hyper red, hypo blue)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, path)


def segmentation_text(segmentation: dict) -> str:
    s = segmentation
    return (f"The parameter-free map against the oracle on the same {s['n']} lesion-rich slices (DRF "
            f"{1 / s['dose']:.0f} prompts): it flags {s['recall']:.0%} of lesion pixels (hot as hyper "
            f"{s['recall_hot']:.0%}, cold as hypo {s['recall_cold']:.0%}); {s['precision']:.0%} of what it flags is "
            f"lesion (Dice {s['dice']:.2f}); it touches a lesion in {s['slices_touched']:.0%} of slices; its mean "
            f"attention is {s['attention_lesion']:.2f} on lesion pixels and {s['attention_background']:.2f} on the "
            f"rest of the body (the oracle's: 1 and 0).")


def _copy_grid(root: str, item: str, scoring: str, figures: str, name: str) -> str | None:
    """Copy `item`'s `eval/<scoring>/grid.png` to `figures/<name>`; returns `name`, or None if it has none."""
    grid = os.path.join(root, item, "eval", scoring, "grid.png")
    if not os.path.exists(grid):
        return None
    shutil.copyfile(grid, os.path.join(figures, name))
    return name


# --- the report --------------------------------------------------------------------------------------------


def report(root: str, docs: str) -> str:
    figures = os.path.join(docs, "figures")
    os.makedirs(figures, exist_ok=True)
    learning_curves(root, os.path.join(figures, "ws_curves.png"))
    parts = ["# The paper's claims at the workstation budget", "",
             "Generated by `python -m allpet_jax.claims --root docs/ws_runs --docs docs` from the records of the "
             "runs of `python -m allpet_jax.workstation --archive docs/ws_runs` (docs/RESULTS.md has the plan, the "
             "preset and the power calculation). Each run's machine is in its commands below; this report was "
             "written on: " + machine() + ".",
             "", "## Runs", "", workstation.plan_table(root), "", "## Learning curves", "",
             "![validation curves](figures/ws_curves.png)", ""]
    for item in workstation.PLAN:
        for stage, (metric, better) in CURVES.items():
            steps, values = curve(root, item.name, stage, metric)
            if len(steps):
                parts.append(f"- {item.name}/{stage}: {metric} {values[0]:.4g} at step 0 -> {values[-1]:.4g} at step "
                             f"{int(steps[-1])}, best {np.nanmax(values) if better == 'higher' else np.nanmin(values):.4g}; "
                             f"{plateau(steps, values, better)}")
    table, generation = generation_table(generation_results(root))
    parts += ["", "## Generation: 500 sinograms with RMAS/DMM against 500 and 5000 without", "", table, "", generation, ""]
    if shipped := shipped_foundation(root, generation_results(root)):
        parts += [shipped, ""]
        if name := _copy_grid(root, "w_foundation", "generation", figures, "ws_generation_w_foundation.png"):
            parts += ["The shipped foundation (generated above, real below):", "", f"![shipped](figures/{name})", ""]
    table, warmed = generation_table(generation_results(root, WARMED_ARMS))
    parts += ["### The generation arms with the EMA warmed up (one seed each; the verdict above keeps the plan's EMA)",
              "", table, "", warmed, ""]
    if not warmed.startswith("**pending**"):
        generation += f" The same test with the EMA warmed up, one seed per arm: **{warmed.split('**')[1]}**."
    for arm, prefix in GENERATION_ARMS.items():
        if name := _copy_grid(root, f"{prefix}0", "generation", figures, f"ws_generation_{prefix}0.png"):
            parts += [f"{arm}, seed 0 (generated above, real below):", "", f"![{arm}](figures/{name})", ""]
    table, control = small_data_control(generation_results(root, SMALL_DATA_ARMS),
                                        generation_results(root, SMALL_DATA_ARMS, "generation_last"),
                                        generation_results(root)["5000, no masks"])
    parts += ["### The small-data control: 50 sinograms, with and without RMAS/DMM", "", table, "", control, ""]
    if name := _copy_grid(root, "f_plain50_s0", "generation_last", figures, "ws_generation_f_plain50_last.png"):
        parts += ["50, no masks, last checkpoint (generated above, real below):", "", f"![50, no masks](figures/{name})", ""]
    if not control.startswith("**pending**"):
        generation += " Small-data control: " + control
    table, downstream = downstream_table(root)
    parts += ["## Downstream: low_dose at 500 pairs against tuned clinical OSEM", "", table, "",
              "Model: the mean of K samples, post-filtered like every row (evaluate.py). Gain: paired by test sample, "
              "with its 95% bootstrap interval. rel. CRPS: per bin against the clean target, over the mean clean count.",
              "", downstream, ""]
    if calibration_figure(root, os.path.join(figures, "ws_calibration.png")):
        parts += ["Calibration: the rank of the clean truth among the K samples, per sinogram bin (flat when calibrated; "
                  "a U when the samples are too narrow, a dome when too wide, a slope when biased):", "", "![rank histograms](figures/ws_calibration.png)", ""]
    if name := _copy_grid(root, "ds500", "low_dose_drf20", figures, "ws_downstream_drf20.png"):
        parts += ["What the numbers look like: the first test slices at DRF 20, each row reconstructed and "
                  "post-filtered as it was scored:", "", f"![DRF 20 images](figures/{name})", ""]
    table, tma = tma_table(root)
    parts += ["## TMA against an oracle (400 lesion-rich slices, DRF 20)", "", table, "",
              "CR bias / RMSE: mean of CR - 1 and root mean square of CR - 1 over the slices with a lesion of that kind.",
              "", tma, ""]
    if any(_json(os.path.join(root, item, "eval", "lesions_drf20", "results.json")) for _, item in TMA_ARMS):
        segmentation = tma_segmentation(preset_config(workstation.PRESET))  # the TMA arms' slices; no model needed
        tma_figure(segmentation, os.path.join(figures, "ws_tma_maps.png"))
        parts += [segmentation_text(segmentation), "", "![TMA maps](figures/ws_tma_maps.png)", ""]
    for label, item in TMA_ARMS:
        if name := _copy_grid(root, item, "lesions_drf20", figures, f"ws_lesions_{item}.png"):
            parts += [f"{label}: the first lesion-rich test slices, as scored:", "", f"![{label}](figures/{name})", ""]
    parts += ["## Commands", "", "Each finished item's commands, as its `done.json` records them (`<runs>` is the runs' root), "
              "and its wall time:", ""]
    for item in workstation.PLAN:
        done = _json(os.path.join(root, item.name, workstation.DONE))
        if done:
            lines = "\n".join(" ".join(c).replace(root, "<runs>") for c in done["commands"])
            parts += [f"`{item.name}` ({done['wall_s'] / 60:.0f} min, {done.get('machine', '')}, finished "
                      f"{done.get('finished', '')}):", "", "```bash", lines, "```", ""]
    parts += ["## What holds", "", "| claim, as the paper states it | tested here as | verdict |", "|---|---|---|"]
    for (claim, test), verdict in zip(CLAIMS, (generation, downstream, tma)):
        parts.append(f"| {claim} | {test} | {verdict} |")
    parts.append("")
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
