"""TMA segmentation quality against the phantoms' lesion labels, at full dose and at 1/10 dose.

    python benchmarks/tma_quality.py [--n 64] [--size 128] [--seed 0]          # report (test split)
    python benchmarks/tma_quality.py --tune [--n 64]                          # tune (train split)

Data and maps go through the training path: a `low_dose` config (`configs/base.py` with `size` pixels,
angles and bins, `data.simulation` fixing the region and `dose=0.1`) gives the simulated source
(`pipeline.make_source`, sample `i` from `sources.sample_key`), a quarter of the slices from each region
(brain, chest, abdomen, trunk), and `training.transforms.TmaTransform` segments each slice in the
physical geometry the model's TMA uses (`pipeline.sample_geometry`: pixel `phantoms.FOV_MM[region] /
size`, 2 mm brain and 4.69 mm body at 128 px), so TMA's lengths in mm are true mm. Full dose = TMA of
the `target` sinogram, 1/10 dose = TMA of the `source` (a separate acquisition at 1/10 of the counts,
corrected and dose-normalised by the simulator): FBP of the measured sinogram, as the model's TMA sees
it. The report uses the `test` split; `--tune` searches the rule's constants (`TUNING`) on the `train`
split (disjoint keys), so the reported numbers are not tuned on the slices they describe.

Definitions (per lesion class: hot = label `lesion_hot` scored with the `hyper` map, cold =
`lesion_cold` with `hypo`):

* a *lesion* is one 8-connected component of the class's label in a slice;
* it is *detected* when the class's map flags at least half of its pixels (`--coverage`);
* *hit* (looser): at least one of its pixels is flagged;
* *FP area*: mm^2 per slice of the class's flagged pixels that are not within one pixel of any lesion
  of that class (physiological uptake, e.g. bladder or myocardium for hyper, counts as false positive),
  averaged over all slices, including slices without lesions.

Prints one Markdown table. The peer row is the same rule on the noise-free activity `image` (no noise,
no detector blur, no reconstruction): it separates what noise costs from what the rule itself misses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import radon  # noqa: E402
from allpet_jax import attention  # noqa: E402
from allpet_jax.data import phantoms, pipeline  # noqa: E402
from allpet_jax.training.transforms import TmaTransform, by_geometry  # noqa: E402
from configs import base  # noqa: E402

CLASSES = (("hot", "lesion_hot", "hyper"), ("cold", "lesion_cold", "hypo"))
DOSES = ("full", "1/10")
SINOGRAMS = {"full": "target", "1/10": "source"}  # the batch field TMA segments at each dose


@dataclasses.dataclass
class Group:
    """The slices of one anatomical region, in the physical geometry the training path gives them."""

    region: str
    transform: TmaTransform
    batch: dict  # the source's batch: `source`, `target`, `image`, `labels`, `prompt`, ...
    geom: radon.Geometry
    lesions: dict = None  # class -> Lesions

    @property
    def labels(self) -> np.ndarray:
        return self.batch["labels"]


def config_for(region: str, size: int, seed: int, n: int):
    """The training config of the benchmark's data: `low_dose` at 1/10 dose in `region`, `size` pixels,
    angles and bins, and `n` samples in every split; `config.tma` keeps the rule's defaults."""
    config = base.get_config()
    data = config.data
    data.task, data.seed, data.cache_dir = "low_dose", seed, ""
    data.image_size = data.n_angles = data.n_bins = size
    data.n_train = data.n_val = data.n_test = n
    data.simulation.region, data.simulation.dose = region, 0.1
    return config


def simulate(size: int, n: int, seed: int, split: str) -> list[Group]:
    """`n` low_dose pairs at 1/10 dose, a quarter per region, read from the training config's source;
    each region's geometry is the one `TmaTransform` segments its slices in."""
    groups = []
    for r, region in enumerate(phantoms.REGIONS):
        config = config_for(region, size, seed, len(phantoms.REGIONS) * n)
        index = np.arange(r * n, r * n + n // len(phantoms.REGIONS))  # disjoint sample indices per region
        batch = pipeline.make_source(config.data, split, progress=False).read_batch(index)
        transform = TmaTransform(config)
        (geom,) = set(transform.geometries(batch))
        group = Group(region, transform, batch, geom)
        group.lesions = {name: Lesions(group.labels, phantoms.LABEL_IDS[label]) for name, label, _ in CLASSES}
        groups.append(group)
    return groups


class Lesions:
    """The lesions of one class in a stack of label maps, indexed once so scoring a map is a bincount."""

    def __init__(self, labels: np.ndarray, label_id: int):
        self.ids = np.zeros(labels.shape, np.int64)  # 0: no lesion; lesions numbered across slices
        self.near = np.zeros(labels.shape, bool)  # within one pixel of a lesion
        count = 0
        for n, lab in enumerate(labels):
            lesion = lab == label_id
            comp, k = ndimage.label(lesion, np.ones((3, 3)))  # 8-connected components
            self.ids[n] = np.where(comp > 0, comp + count, 0)
            self.near[n] = ndimage.binary_dilation(lesion, np.ones((3, 3)))
            count += k
        self.count = count
        self.sizes = np.bincount(self.ids.ravel(), minlength=count + 1)[1:]

    def counts(self, flags: np.ndarray, pixel_mm: float, coverage: float) -> np.ndarray:
        """`[lesions, detected, hit, slices, FP mm^2]` of boolean maps `flags` `(n, H, W)` (module docstring)."""
        covered = np.bincount(self.ids[flags], minlength=self.count + 1)[1:] / np.maximum(self.sizes, 1)
        fp_mm2 = np.count_nonzero(flags & ~self.near) * pixel_mm**2
        return np.array([self.count, np.sum(covered >= coverage), np.sum(covered > 0), len(flags), fp_mm2], float)


def rates(counts: np.ndarray) -> dict:
    lesions, detected, hit, slices, fp = counts
    return dict(lesions=int(lesions), detection=detected / max(lesions, 1), hit=hit / max(lesions, 1), fp_mm2=fp / slices)


@functools.partial(jax.jit, static_argnames=("geom", "config"))
def _features(sino, geom, config):
    return attention.segmentation_features(radon.fbp(sino, geom, config.fbp_filter, config.fbp_cutoff), geom, config)


def features_of(sinos, geom, config, chunk=16):
    """`attention.segmentation_features` of the FBP of every sinogram `(n, n_angles, n_bins)` (computed once,
    reused for every threshold of `--tune`)."""
    parts = [jax.device_get(_features(jnp.asarray(sinos[i : i + chunk]), geom, config)) for i in range(0, len(sinos), chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def score(groups, maps, coverage) -> dict:
    """Rates per class over all groups; `maps[g]` holds group g's `hyper` and `hypo` `(n, H, W)`."""
    totals = {name: np.zeros(5) for name, _, _ in CLASSES}
    for group, group_maps in zip(groups, maps):
        for name, _, kind in CLASSES:
            totals[name] += group.lesions[name].counts(np.asarray(group_maps[kind]), group.geom.pixel_size, coverage)
    return {name: rates(c) for name, c in totals.items()}


def evaluate(groups, features, config, coverage) -> dict:
    """`score` of the maps that `config`'s ratios give on precomputed `features[g]` (the tuning loop)."""
    maps = [attention.classify({k: jnp.asarray(v) for k, v in f.items()}, g.geom, config) for g, f in zip(groups, features)]
    return score(groups, maps, coverage)


# The search behind TmaConfig's defaults. Hyper and hypo use separate constants (except the reference
# length), so each class is tuned on its own: smoothing lengths x ratios, objective = detection rate
# minus FP area / 5000 mm^2 (5000 mm^2 of false alarm per slice, about 7 % of a chest slice's body, costs
# as much as missing every lesion), averaged over both doses. An earlier round on the same train slices
# screened lesion_sigma_mm 2.0 and reference_sigma_mm 20.0 (both worse) before the z-scores existed.
TUNING = {
    "hot": (dict(lesion_sigma_mm=(3.5, 5.0), reference_sigma_mm=(10.0,)),
            dict(hyper_ratio=(1.3, 1.5, 1.7), hyper_floor=(1.2, 1.6, 2.0), hot_z=(0.0, 0.5, 1.0, 1.5, 2.0))),
    "cold": (dict(cold_sigma_mm=(3.5, 5.0), reference_sigma_mm=(10.0,), tissue_fraction=(0.3, 0.5)),
             dict(hypo_ratio=(0.6, 0.7, 0.8), cold_z=(0.0, 0.3, 0.6, 1.0, 1.5))),
}


def tune(args):
    """Grid search (`TUNING`) on the train split; prints the best settings of each class."""
    groups = simulate(args.size, args.n, args.seed, "train")
    rule = groups[0].transform.tma_config  # config.tma's constants, as training reads them
    for cls, (smooth_grid, ratio_grid) in TUNING.items():
        rows = []
        for svals in itertools.product(*smooth_grid.values()):
            smooth = dataclasses.replace(rule, **dict(zip(smooth_grid, svals)))
            feats = {dose: [features_of(g.batch[SINOGRAMS[dose]][:, 0], g.geom, smooth) for g in groups] for dose in DOSES}
            for values in itertools.product(*ratio_grid.values()):
                config = dataclasses.replace(smooth, **dict(zip(ratio_grid, values)))
                results = [evaluate(groups, feats[dose], config, args.coverage)[cls] for dose in DOSES]
                objective = np.mean([r["detection"] - r["fp_mm2"] / 5000.0 for r in results])
                rows.append((objective, {**dict(zip(smooth_grid, svals)), **dict(zip(ratio_grid, values))}, results))
        rows.sort(key=lambda r: -r[0])
        for objective, params, results in rows[:5]:
            summary = "; ".join(f"{d}: {r['detection']:.0%} detected, {r['fp_mm2']:.0f} mm^2 FP" for d, r in zip(DOSES, results))
            print(f"{cls} {objective:.3f} {params}  {summary}", flush=True)


def report(args):
    """The table: TMA as training computes it (`TmaTransform.image_maps`) at both doses, and the peer."""
    groups = simulate(args.size, args.n, args.seed, "test")
    rows = [(f"{dose} dose: FBP of the measured sinogram",
             score(groups, [g.transform.image_maps(g.batch, SINOGRAMS[dose]) for g in groups], args.coverage))
            for dose in DOSES]
    truth = [noise_free_maps(g) for g in groups]
    rows.append(("peer: the noise-free activity image", score(groups, truth, args.coverage)))
    n_hot, n_cold = rows[0][1]["hot"]["lesions"], rows[0][1]["cold"]["lesions"]
    pixels = ", ".join(f"{g.region} {g.geom.pixel_size:.2f} mm" for g in groups)
    print(
        f"TMA against the phantoms' lesion labels: {sum(len(g.labels) for g in groups)} low_dose test slices "
        f"({n_hot} hot, {n_cold} cold lesions), {args.size}x{args.size} px ({pixels}), {args.size} angles. "
        f"Detected: >= {args.coverage:.0%} of the lesion's pixels flagged (hot by hyper, cold by hypo); hit: any "
        "pixel flagged; FP: flagged mm^2 per slice farther than 1 px from every lesion of that class.\n"
    )
    print("| input | hot detected | hot hit | hot FP mm^2/slice | cold detected | cold hit | cold FP mm^2/slice |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        h, c = r["hot"], r["cold"]
        print(f"| {name} | {h['detection']:.0%} | {h['hit']:.0%} | {h['fp_mm2']:.0f} | {c['detection']:.0%} | {c['hit']:.0%} | {c['fp_mm2']:.0f} |")


def noise_free_maps(group: Group) -> dict:
    """The rule on the noise-free activity `image` (no FBP), in the geometry `TmaTransform` uses."""
    config = group.transform.tma_config
    segment = lambda geom, images: attention.attention_maps_from_image(images, geom, config)
    return by_geometry(segment, group.transform.geometries(group.batch), group.batch["image"][:, 0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="slices (a quarter per region)")
    p.add_argument("--size", type=int, default=128, help="image size, angles and bins")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--coverage", type=float, default=0.5, help="fraction of a lesion's pixels that must be flagged")
    p.add_argument("--tune", action="store_true", help="grid-search the rule on the train split instead of reporting")
    args = p.parse_args(argv)
    start = time.perf_counter()
    (tune if args.tune else report)(args)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
