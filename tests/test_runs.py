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


def test_the_foundation_draws_its_sinograms_with_the_pretraining_seed():
    import numpy as np

    from allpet_jax.data import pipeline
    from configs import base

    config = base.get_config("smoke")
    foundation, task = runs.stage_config(config, "foundation"), runs.stage_config(config, "task")
    assert foundation.data.seed == config.data.pretrain_seed != task.data.seed == config.data.seed
    assert runs.recipe(foundation, "foundation")["data_seed"] == config.data.pretrain_seed  # resuming checks it
    # so the synthesis targets are not the low_dose targets (with one seed they were the same phantoms)
    first = [np.asarray(pipeline.make_source(c.data, "train", progress=False).read_batch([0])["image"])
             for c in (foundation, task)]
    assert not np.allclose(first[0], first[1])
    old = config.copy_and_resolve_references()
    del old.data["pretrain_seed"]  # a config saved before the field: the data seed, as it was
    assert runs.stage_config(old, "foundation").data.seed == old.data.seed
