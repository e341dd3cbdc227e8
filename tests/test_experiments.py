"""The experiment tables: seed statistics with deltas paired by seed, the per-task table, and reuse of
an evaluation only when it is newer than the checkpoints it scored, and arms' flags checked against the config."""

import os
import sys
import time

import numpy as np
import pytest

from allpet_jax import experiments as E


def _run(**metrics):
    return E.Run("", [], 0.0, {"ALL-PET (ddim 20)": {k: {"mean": v, "std": 0.0, "n": 16} for k, v in metrics.items()}})


def test_seed_table_pairs_the_deltas_by_seed():
    full = [_run(sino_psnr=v) for v in (22.0, 23.0, 24.0)]
    arm = [_run(sino_psnr=v) for v in (22.5, 23.1, 24.9)]  # per-seed differences 0.5, 0.1, 0.9
    table = E.seed_table({"full": full, "arm": arm}, ["sino_psnr"])
    d = np.array([0.5, 0.1, 0.9])
    row = table.splitlines()[3]  # header, rule, the first arm, this arm
    assert "standard deviation of that value over the arm's seeds" in table  # says which spread is which
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3"
    assert cells[2] == f"{np.mean([22.5, 23.1, 24.9]):.3f} ± {np.std([22.5, 23.1, 24.9]):.3f}"
    assert cells[3] == f"{d.mean():+.3f} ± {d.std():.3f}"  # paired: 0.267 spread, not the unpaired 0.8
    unpaired = E.seed_table({"full": full, "arm": arm[:2]}, ["sino_psnr"])
    assert f"| {np.mean([22.5, 23.1]) - 23.0:+.3f} |" in unpaired


def test_task_table_picks_one_sample_and_the_mean_rows():
    summary = {"ceiling: autoencoder D(E(clean target))": {"sino_psnr": {"mean": 40.0}},
               "identity": {"sino_psnr": {"mean": 21.0}},
               "pixel U-Net regressor": {"sino_psnr": {"mean": 27.0}, "osem_psnr": {"mean": 30.0}},
               "latent U-Net regressor": {"sino_psnr": {"mean": 26.0}, "osem_psnr": {"mean": 29.5}},
               "ALL-PET (ddim 20), one sample": {"sino_psnr": {"mean": 24.0}, "osem_psnr": {"mean": 29.0}},
               "ALL-PET (ddim 20), mean of 16": {"sino_psnr": {"mean": 25.5}, "osem_psnr": {"mean": 30.5},
                                                 "crps": {"mean": 0.0412}, "coverage90": {"mean": 0.85}},
               "ALL-PET + Poisson guidance 0.2 (ddim 20), mean of 16": {"sino_psnr": {"mean": 99.0}},
               "source: FBP / clinical OSEM + Gaussian (val-tuned)": {"osem_psnr": {"mean": 31.0}},
               "full-dose clinical OSEM (reference)": {"osem_psnr": {"mean": 38.0}}}
    row = E.task_table({"low_dose": E.Run("", [], 0.0, summary)}).splitlines()[-1]
    assert row == ("| low_dose | 40.00 | 21.00 | 27.00 | 26.00 | 24.00 | 25.50 | 31.00 | 30.00 | 30.50 | 38.00 "
                   "| 0.0412 | 0.85 |")


def test_an_evaluation_is_reused_only_when_newer_than_the_checkpoints(tmp_path):
    ckpt = tmp_path / "task" / "checkpoints" / "10"
    ckpt.mkdir(parents=True)
    (ckpt / "state").write_text("x")
    result = tmp_path / "eval" / "results.json"
    result.parent.mkdir()
    cmd = [sys.executable, "-m", "allpet_jax.evaluate", "--workdir", str(tmp_path)]
    log = tmp_path / "run.log"
    log.write_text("$ " + " ".join(cmd) + "\n")
    time.sleep(0.05)
    result.write_text("{}")
    assert E._up_to_date(str(result), str(tmp_path), cmd, str(log))
    assert not E._up_to_date(str(result), str(tmp_path), cmd + ["--steps", "50"], str(log))  # other arguments
    later = time.time() + 5
    os.utime(ckpt / "state", (later, later))  # a newer checkpoint: score again
    assert not E._up_to_date(str(result), str(tmp_path), cmd, str(log))


def test_check_overrides_refuses_unknown_fields_and_unparsable_values():
    E.check_overrides("smoke", ["--config.masks.rmas=false", "--config.diffusion.consistency_weight=10",
                                          "--config.masks.count=fixed", "--config.masks.n_cells=1"])
    with pytest.raises(ValueError, match="no field 'masks.rmass'"):
        E.check_overrides("smoke", ["--config.masks.rmass=false"])
    with pytest.raises(ValueError, match="expects a int, got '1.5'"):
        E.check_overrides("smoke", ["--config.masks.n_cells=1.5"])
    with pytest.raises(ValueError, match="expects a bool"):
        E.check_overrides("smoke", ["--config.masks.rmas=yes please"])
    with pytest.raises(ValueError, match="expected an override"):
        E.check_overrides("smoke", ["--masks.rmas=false"])
