"""Choosing a stage's checkpoint by its validation metric (`runs.best_validated_step`)."""

import json

from allpet_jax.training import runs


def test_best_validated_step_uses_the_last_line_per_step_and_skips_a_cut_line(tmp_path):
    lines = [{"step": 100, "split": "val", "val_psnr": 25.0}, {"step": 200, "split": "val", "val_psnr": 26.0},
             {"step": 200, "split": "train", "val_psnr": 99.0},  # not validation
             {"step": 250, "split": "val", "val_psnr": 30.0},  # validated but not checkpointed
             {"step": 300, "split": "val", "val_psnr": 24.0},
             {"step": 100, "split": "val", "val_psnr": 27.0}]  # logged again after a resume: this one counts
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 300, "split": "va'  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    steps = {100, 200, 300}
    assert runs.best_validated_step(str(tmp_path), steps, "val_psnr", "max") == 100
    assert runs.best_validated_step(str(tmp_path), steps, "val_psnr", "min") == 300
    assert runs.best_validated_step(str(tmp_path), steps, "val_loss", "min") is None
    assert runs.best_validated_step(str(tmp_path / "nothing"), steps, "val_psnr", "max") is None
