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
    # one seed per arm: two real sets' distance (0.4) is the smallest difference resolved
    single = {arm: runs[:1] for arm, runs in close.items()}  # RMAS 5.0 against 6.5
    assert claims.generation_table(single)[1].startswith("**does not hold**")
    single["5000, no masks"] = [_generation(5.3, 1.0)]
    assert "(one seed per arm)" in claims.generation_table(single)[1]
    assert claims.generation_table(single)[1].startswith("**holds**")
    noisy = {arm: [dict(r, model=dict(r["model"], frechet_sd=1.0)) for r in runs] for arm, runs in single.items()}
    noisy["5000, no masks"] = [dict(noisy["5000, no masks"][0], model=dict(noisy["5000, no masks"][0]["model"], frechet=7.5))]
    verdict = claims.generation_table(noisy)[1]  # 5.0 against 7.5, each +-1.0: within 2 sqrt(2) = 2.8
    assert verdict.startswith("**holds**") and "within what the test resolves, 2.8" in verdict
    assert "RMAS minus 500 without masks -4, resolved (the test resolves 2.8 between them)" in verdict  # 5 vs 9


def test_the_shipped_foundation_is_reported_beside_the_rmas_seeds(tmp_path):
    results = {"500 + RMAS/DMM": [_generation(f, m) for f, m in ((5.0, 0.96), (6.0, 0.97), (7.0, 0.98))]}
    assert claims.shipped_foundation(str(tmp_path), results) is None  # not scored yet
    out = tmp_path / "w_foundation" / "eval" / "generation"
    os.makedirs(out)
    out.joinpath("results.json").write_text(json.dumps(_generation(4.25, 0.99)))
    line = claims.shipped_foundation(str(tmp_path), results)
    assert "Frechet distance 4.25, memorisation ratio (median) 0.990" in line
    assert "3 seeds: Frechet distance 6 ± 1 and memorisation ratio 0.97 ± 0.01." in line


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


def test_generation_verdict_when_no_arm_copies():
    # Neither 500 arm copies its training set (ratios near the real sinograms' 1.0): the Frechet half can
    # hold, the memorisation half cannot show, and the verdict says so.
    none_copy = {"500 + RMAS/DMM": [_generation(f, 0.99) for f in (5.0, 6.0, 7.0)],
                 "500, no masks": [_generation(f, 0.98) for f in (9.0, 10.0, 11.0)],
                 "5000, no masks": [_generation(6.5, 1.0)]}
    verdict = claims.generation_table(none_copy)[1]
    assert verdict.startswith("**holds in part**") and "no memorisation for RMAS/DMM to prevent" in verdict
    # nor does ten times the data help (the 500 arm without masks as good as 5000): the budget poses neither
    # problem the method is for
    no_gap = dict(none_copy, **{"5000, no masks": [_generation(9.8, 1.0)]})
    verdict = claims.generation_table(no_gap)[1]
    assert verdict.startswith("**cannot show**") and "no data gap for RMAS/DMM to close" in verdict


def _low_dose_result(model_psnr, clinical_psnr, k=8):
    model, clinical = f"ALL-PET (ddim 20), mean of {k}", "source: FBP / clinical OSEM + Gaussian (val-tuned)"
    summary = {clinical: {"osem_psnr": {"mean": float(np.mean(clinical_psnr))}, "crps": {"mean": 0.3}},
               model: {"osem_psnr": {"mean": float(np.mean(model_psnr))}, "crps": {"mean": 0.125},
                       "coverage90": {"mean": 0.61}}}
    return {"n": len(model_psnr), "num_samples": k, "summary": summary,
            "per_sample": {clinical: {"osem_psnr": list(clinical_psnr)}, model: {"osem_psnr": list(model_psnr)}},
            "rank_histograms": {model: [0.3] + [0.4 / (k - 1)] * (k - 1) + [0.3]}}


def test_downstream_verdict_posterior_cells_and_calibration_figure(tmp_path):
    rng = np.random.default_rng(1)
    clinical = 20 + rng.normal(size=256)
    out = tmp_path / "ds500" / "eval" / "low_dose_drf20"
    os.makedirs(out)
    (out / "results.json").write_text(json.dumps(_low_dose_result(clinical + 4.0 + 0.1 * rng.normal(size=256), clinical)))
    table, verdict = claims.downstream_table(str(tmp_path))
    assert verdict.startswith("**holds**") and "+4.0" in verdict
    # 90 % coverage of 8 samples next to a calibrated 8-member ensemble's, 7/9 = 0.78 (metrics.calibrated_coverage)
    assert "| +5.45 | 0.125 | 0.61 (0.78) |" in table
    assert "| 500 pairs, from scratch | 20 | pending |" in table
    # the ceilings are scored like the arms, paired against clinical OSEM; an image-only row has no CRPS
    with_ceilings = _low_dose_result(clinical + 4.0, clinical)
    for name, offset, crps in (("ceiling: autoencoder D(E(clean target))", 9.0, {"mean": 0.04}),
                               ("full-dose clinical OSEM (reference)", 6.0, None)):
        with_ceilings["summary"][name] = {"osem_psnr": {"mean": float(np.mean(clinical + offset))}}
        with_ceilings["summary"][name].update({"crps": crps} if crps else {})
        with_ceilings["per_sample"][name] = {"osem_psnr": list(clinical + offset)}
    (out / "results.json").write_text(json.dumps(with_ceilings))
    table = claims.downstream_table(str(tmp_path))[0]
    assert "| the autoencoder's round trip of the clean target (a latent model's best) | 20 | 256 |" in table
    assert "| +9.00 [+9.00, +9.00] |  | 0.040 | - |" in table
    assert "| full-dose clinical OSEM | 20 | 256 |" in table and "| +6.00 [+6.00, +6.00] |  | - | - |" in table
    (out / "results.json").write_text(json.dumps(_low_dose_result(clinical + 2.0 + 0.1 * rng.normal(size=256), clinical)))
    assert claims.downstream_table(str(tmp_path))[1].startswith("**does not hold**")
    ema = tmp_path / "ds500_ema" / "eval" / "low_dose_drf20"  # the EMA warmed up: its gain, and paired against ds500
    os.makedirs(ema)
    ema.joinpath("results.json").write_text(json.dumps(_low_dose_result(clinical + 2.75, clinical)))
    ds500 = json.loads((out / "results.json").read_text())
    expected = np.mean(clinical + 2.75 - np.asarray(ds500["per_sample"]["ALL-PET (ddim 20), mean of 8"]["osem_psnr"]))
    verdict = claims.downstream_table(str(tmp_path))[1]
    assert verdict.startswith("**does not hold**") and "with the EMA warmed up, +2.75 dB [+2.75, +2.75]" in verdict
    assert f"the EMA's warm-up (warmed up minus as the plan trains): {expected:+.2f} dB" in verdict and expected > 0
    shipped = tmp_path / "w_low_dose" / "eval" / "low_dose_drf20"  # the shipped weights: a variant that counts
    os.makedirs(shipped)
    shipped.joinpath("results.json").write_text(json.dumps(_low_dose_result(clinical + 3.25, clinical)))
    table, verdict = claims.downstream_table(str(tmp_path))
    assert verdict.startswith("**holds**") and "the shipped weights (foundation and task with the EMA warmed up), +3.25" in verdict
    assert "the foundation's EMA warmed up too (the shipped weights minus ds500_ema): +0.50 dB" in verdict
    assert "| 500 pairs, the shipped weights (foundation and task with the EMA warmed up): ALL-PET" in table
    shipped.joinpath("results.json").unlink()
    ema.joinpath("results.json").unlink()
    # the foundation's contribution: paired by test sample with the scratch arm when both scored the same samples
    scratch = tmp_path / "ds500_scratch" / "eval" / "low_dose_drf20"
    os.makedirs(scratch)
    scratch.joinpath("results.json").write_text(json.dumps(_low_dose_result(clinical + 2.5, clinical)))
    ds500 = json.loads((out / "results.json").read_text())
    expected = np.mean(np.asarray(ds500["per_sample"]["ALL-PET (ddim 20), mean of 8"]["osem_psnr"]) - clinical - 2.5)
    verdict = claims.downstream_table(str(tmp_path))[1]
    assert f"fine-tuned minus from scratch, both 500 pairs): {expected:+.2f} dB" in verdict
    scratch.joinpath("results.json").write_text(json.dumps(_low_dose_result(clinical + 2.5, clinical + 0.1)))
    assert "fine-tuned minus from scratch" not in claims.downstream_table(str(tmp_path))[1]  # other test samples
    scratch.joinpath("results.json").unlink()
    ramp = _low_dose_result(clinical + 0.5, clinical)  # the ramp-loss pixel regressor's row, from its own item
    ramp["summary"]["pixel U-Net regressor"] = ramp["summary"].pop("ALL-PET (ddim 20), mean of 8")
    ramp["per_sample"]["pixel U-Net regressor"] = ramp["per_sample"].pop("ALL-PET (ddim 20), mean of 8")
    os.makedirs(tmp_path / "ds500_ramp" / "eval" / "low_dose_drf20")
    (tmp_path / "ds500_ramp" / "eval" / "low_dose_drf20" / "results.json").write_text(json.dumps(ramp))
    assert "| pixel U-Net regressor, ramp-weighted loss (500 pairs) | 20 | 256 |" in claims.downstream_table(str(tmp_path))[0]
    assert "+0.50 [+0.50, +0.50]" in claims.downstream_table(str(tmp_path))[0]
    assert claims.calibration_figure(str(tmp_path / "none"), str(tmp_path / "c.png")) is None
    assert os.path.getsize(claims.calibration_figure(str(tmp_path), str(tmp_path / "c.png"))) > 5000


def test_tma_segmentation_counts_against_the_labels(monkeypatch, tmp_path):
    from allpet_jax.data import phantoms
    from allpet_jax.training import transforms
    from configs import base

    config = base.get_config("smoke")
    config.data.task = "low_dose"
    hot_id, cold_id = phantoms.LABEL_IDS["lesion_hot"], phantoms.LABEL_IDS["lesion_cold"]

    def oracle(self, batch):  # a segmentation that is exactly the labels scores 1 everywhere and 0 off lesions
        labels = np.asarray(batch["labels"]).reshape(len(batch["labels"]), 32, 32)
        lesion = np.isin(labels, [hot_id, cold_id])
        return {"hyper": labels == hot_id, "hypo": labels == cold_id, "attention": lesion.astype(np.float32),
                "body": labels > 0, "image": np.asarray(batch["image"]).reshape(labels.shape)}

    monkeypatch.setattr(transforms.TmaTransform, "image_maps", oracle)
    s = claims.tma_segmentation(config, n=3, radius_px=1.5, shown=2)
    for key in ("recall", "recall_hot", "precision", "dice", "slices_touched", "attention_lesion"):
        assert s[key] == 1.0, key
    assert s["attention_background"] == 0.0 and s["shown"]["attention"].shape == (2, 32, 32)
    assert os.path.getsize(claims.tma_figure(s, str(tmp_path / "t.png"))) > 5000
    assert "flags 100% of lesion pixels" in claims.segmentation_text(s)

    def swapped(self, batch):  # hot flagged as hypo and cold as hyper: every lesion pixel is flagged, by the wrong kind
        maps = oracle(self, batch)
        return dict(maps, hyper=maps["hypo"], hypo=maps["hyper"])

    monkeypatch.setattr(transforms.TmaTransform, "image_maps", swapped)
    s = claims.tma_segmentation(config, n=3, radius_px=1.5)
    assert s["recall"] == 1.0 and s["recall_hot"] == 0.0 and s["recall_cold"] == 0.0


def test_report_of_a_plan_barely_started(tmp_path):
    root, docs = tmp_path / "runs", tmp_path / "docs"
    os.makedirs(root / "ae")
    command = ["python", "train.py", "--workdir", str(root / "ae"), "--config.train.stages=autoencoder"]
    (root / "ae" / "done.json").write_text(json.dumps({"commands": [command], "wall_s": 600.0, "machine": "m",
                                                      "finished": "today"}))
    os.makedirs(root / "ds500" / "eval" / "low_dose_drf20")  # a scoring's picture reaches the report before its numbers
    (root / "ds500" / "eval" / "low_dose_drf20" / "grid.png").write_bytes(b"png")
    text = claims.report(str(root), str(docs))
    assert "![DRF 20 images](figures/ws_downstream_drf20.png)" in text
    assert (docs / "figures" / "ws_downstream_drf20.png").read_bytes() == b"png"
    assert "python train.py --workdir <runs>/ae --config.train.stages=autoencoder" in text  # portable commands
    assert "`ae` (10 min, m, finished today)" in text
    what_holds = text[text.index("## What holds"):]
    assert what_holds.count("**pending**") == 3 and os.path.exists(docs / "WORKSTATION.md")


def test_median_difference_ci_matches_scipy_bootstrap():
    from scipy import stats

    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 1.0, 400), rng.normal(0.0, 1.0, 300)
    ours = claims.median_difference_ci(a, b, claims.jax.random.key(0), num_resamples=2000)
    ref = stats.bootstrap((a, b), lambda x, y, axis=-1: np.median(x, axis=axis) - np.median(y, axis=axis),
                          method="percentile", n_resamples=2000, random_state=rng).confidence_interval
    assert abs(ours["mean"] - (np.median(a) - np.median(b))) < 1e-12
    assert abs(ours["lo"] - ref.low) < 0.02 and abs(ours["hi"] - ref.high) < 0.02


def _control(ratios, step=3000):
    r = _generation(6.0, float(np.median(ratios)))
    r["model"]["memorisation_ratio"] = list(ratios)
    return dict(r, step=step)


def test_small_data_control_verdict():
    rng = np.random.default_rng(2)
    copying, fresh = 0.5 + 0.05 * rng.normal(size=256), 1.0 + 0.05 * rng.normal(size=256)
    best = {"50, no masks": [_control(fresh, 1000)], "50 + RMAS/DMM": [_control(fresh, 1000)]}
    last = {"50, no masks": [_control(copying)], "50 + RMAS/DMM": [_control(fresh)]}
    table, finding = claims.small_data_control(best, last, [_generation(6.5, 1.0)])
    assert finding.endswith("**RMAS/DMM reduces copying where copying arises**.")
    assert ("last checkpoints: no masks 6, RMAS/DMM 6 (5000 sinograms, the claim's reference: 6.5); at the best "
            "validation-loss checkpoints 6 and 6." in finding)
    assert f"| 50, no masks | last (3000) | 6 | {np.median(copying):.3f} |" in table and "| 5000, no masks" in table
    last["50 + RMAS/DMM"] = [_control(copying + 0.01)]
    assert claims.small_data_control(best, last, [])[1].endswith("does not reduce copying where copying arises**.")
    last["50, no masks"] = [_control(fresh)]
    assert "cannot show" in claims.small_data_control(best, last, [])[1]
    assert claims.small_data_control(best, {}, [])[1].startswith("**pending**")
