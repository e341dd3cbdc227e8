"""allpet_jax.claims: the verdicts follow the numbers, on hand-made results with known answers."""

import json
import os

import numpy as np

from allpet_jax import claims


def test_plateau_reads_the_tail_of_a_curve():
    steps = np.arange(0, 3001, 250.0)
    rising = 30 - 10 * np.exp(-steps / 400)  # levelled off long before the end
    assert claims.plateau(steps, rising, "higher").startswith("plateau")
    linear = 20 + steps / 300
    assert claims.plateau(steps, linear, "higher").startswith("still improving")
    assert claims.plateau(steps, -linear, "lower").startswith("still improving")
    assert claims.plateau(steps[:3], linear[:3], "higher") == "too short"


def _generation(frechet, memorisation):
    keys = dict(memorisation_median=memorisation, frechet=frechet, hl_residual=0.1, range_residual=0.1,
                negative_fraction=0.01, **{"memorisation_below_0.8": 0.0})
    return {"model": keys, "fresh real sinograms": dict(keys, frechet=0.4, memorisation_median=1.0)}


def test_generation_verdict():
    close = {"500 + RMAS/DMM": [_generation(f, 0.97) for f in (5.0, 6.0, 7.0)],
             "500, no masks": [_generation(f, 0.80) for f in (9.0, 10.0, 11.0)],
             "5000, no masks": [_generation(6.5, 1.0)]}
    table, verdict = claims.generation_table(close)
    assert verdict.startswith("**holds**") and "| 500 + RMAS/DMM | 3 | 6 ± 1 |" in table
    far = dict(close, **{"5000, no masks": [_generation(2.0, 1.0)]})  # 4 away, seed spread 1
    assert claims.generation_table(far)[1].startswith("**does not hold**")
    copying = dict(close, **{"500 + RMAS/DMM": [_generation(f, 0.7) for f in (5.0, 6.0, 7.0)]})
    assert claims.generation_table(copying)[1].startswith("**does not hold**")
    assert claims.generation_table({k: [] for k in close})[1].startswith("**pending**")


def _lesion_result(errors):
    per = {"ALL-PET (ddim 20), mean of 8": {"osem_lesion_err": list(errors), "osem_cr_hot": [1.0] * len(errors),
                                             "osem_cr_cold": [None] * len(errors)}}
    return {"n": len(errors), "per_sample": per}


def test_tma_verdict(tmp_path):
    rng = np.random.default_rng(0)
    off = 0.5 + 0.1 * rng.normal(size=400)
    arms = {"ds500": off, "tma_seg": off + 0.001 * rng.normal(size=400), "tma_oracle": off - 0.1}
    for item, errors in arms.items():
        os.makedirs(tmp_path / item / "eval" / "lesions_drf20")
        (tmp_path / item / "eval" / "lesions_drf20" / "results.json").write_text(json.dumps(_lesion_result(errors)))
    table, verdict = claims.tma_table(str(tmp_path))
    assert verdict.startswith("**does not hold**") and "segmentation is the gap, -0.100" in verdict
    expected = f"| oracle attention | 400 | {np.mean(off) - 0.1:.3f} | -0.100 [-0.100, -0.100] | +0.00 / 0.00 (n 400) | - |"
    assert expected in table
