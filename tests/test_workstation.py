"""The workstation plan's pieces, without training: the plan's links and commands, the evaluation at one dose
and on lesion-rich slices (checked against scikit-image's connected components)."""

import json
import os

import numpy as np
import pytest
import skimage.measure

from allpet_jax import evaluate, sampling, workstation
from allpet_jax.data import phantoms
from allpet_jax.training import runs
from configs import base


def test_the_plan_links_only_to_earlier_items_and_writes_under_each_item(tmp_path):
    names = [item.name for item in workstation.PLAN]
    assert len(set(names)) == len(names)
    for i, item in enumerate(workstation.PLAN):
        assert {other for _, other in item.links} <= set(names[:i]), item.name
        for cmd in workstation.commands(str(tmp_path), item):
            if "--out" in cmd:
                assert cmd[cmd.index("--out") + 1].startswith(os.path.join(str(tmp_path), item.name, ""))
            if "--workdir" in cmd:
                assert cmd[cmd.index("--workdir") + 1] == os.path.join(str(tmp_path), item.name)
    # the claims' arms: three seeds of each 500-sinogram foundation, one of 5000 and one of each 50-sinogram control
    # arm, equal steps (U-Net passes)
    foundations = [item for item in workstation.PLAN if "--config.train.stages=foundation" in item.train
                   and item.name.startswith("f_")]  # w_*: the shipped weights, not an arm
    arms = [tuple(sorted(a for a in item.train if "rmas" in a or "n_train" in a)) for item in foundations]
    seeds = {arm: arms.count(arm) for arm in arms}
    assert sorted(seeds.values()) == [1, 1, 1, 3, 3]
    assert {arm for arm, n in seeds.items() if n == 3} == {("--config.data.n_train=500", f"--config.masks.rmas={r}")
                                                        for r in (True, False)}
    assert not any("steps" in a for item in foundations for a in item.train)
    # one EMA for every arm, the preset's (the plan's first items trained without the warm-up), but ds500_ema's and
    # the shipped weights'
    assert base.get_config(workstation.PRESET).train.ema_warmup is False
    warmups = {item.name: [a for a in item.train if "ema_warmup" in a] for item in workstation.PLAN}
    for name in ("ds500_ema", "w_foundation", "w_low_dose", "e_plain_s0", "e_plain5000_s0"):
        assert warmups.pop(name) == ["--config.train.ema_warmup=True"], name
    assert not any(warmups.values())


def test_links_are_made_once_and_a_foreign_entry_is_refused(tmp_path):
    item = next(i for i in workstation.PLAN if i.name == "ds500")
    workstation.link_stages(str(tmp_path), item)
    workstation.link_stages(str(tmp_path), item)  # again: the same links are fine
    assert os.readlink(tmp_path / "ds500" / "foundation") == os.path.join("..", "f_rmas_s0", "foundation")
    other = workstation.Item("x", "", 1, links=(("foundation", "f_plain_s0"),))
    os.makedirs(tmp_path / "x" / "foundation")
    with pytest.raises(ValueError, match="not a link"):
        workstation.link_stages(str(tmp_path), other)
    assert not workstation.is_done(str(tmp_path), item)


def _trained():
    config = base.get_config("smoke")
    config.data.task = "low_dose"
    return runs.TrainedStage("task", config, {}, None, None, 0, "")


def test_at_dose_simulates_every_sample_at_that_dose():
    x = sampling.simulated_inputs(evaluate.at_dose(_trained(), 0.05), 6)
    np.testing.assert_allclose(x["dose"], 0.05)
    assert len(set(np.round(sampling.simulated_inputs(_trained(), 6)["dose"], 4))) > 1  # drawn otherwise


def test_lesion_rich_indices_are_the_first_samples_with_a_large_enough_lesion():
    trained, radius = _trained(), 1.5
    found = evaluate.lesion_rich_indices(trained, 4, radius, chunk=16)
    labels = sampling.simulated_inputs(trained, max(found) + 1)["labels"]
    lesion_ids = [phantoms.LABEL_IDS["lesion_hot"], phantoms.LABEL_IDS["lesion_cold"]]
    largest = [max([r.area for r in skimage.measure.regionprops(skimage.measure.label(np.isin(lab, lesion_ids),
                                                                                      connectivity=1))], default=0)
               for lab in labels]
    expected = [i for i, area in enumerate(largest) if area >= np.pi * radius**2][:4]
    assert found == expected and len(found) == 4
    assert len(expected) < len(largest)  # some samples are passed over


def _finished(root, item, files):
    """A finished item under `root`: its done.json with the plan's commands, and `files` (path: text)."""
    for path, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    command = workstation._portable(workstation.commands(root, item), root)
    os.makedirs(os.path.join(root, item.name), exist_ok=True)
    with open(os.path.join(root, item.name, workstation.DONE), "w") as f:
        f.write(json.dumps({"commands": command, "wall_s": 60.0}))


def test_an_archived_item_is_done_on_a_fresh_root_and_holds_only_its_records(tmp_path):
    root, archive, fresh = (str(tmp_path / d) for d in ("runs", "archive", "fresh"))
    item = workstation.by_name("ds500")
    records = {"ds500/task/metrics.jsonl": '{"step": 0}\n', "ds500/pixel_regressor/metrics.jsonl": "{}\n",
               "ds500/eval/low_dose_drf20/results.json": "{}", "ds500/eval/low_dose_drf20/results.md": "r",
               "ds500/eval/lesions_drf20/results.json": "{}"}
    _finished(root, item, {**records, "ds500/task/checkpoints/1/x": "weights", "ds500/eval/low_dose_drf4/other.npz": ""})
    copied = workstation.archive_item(root, item, archive)
    assert sorted(copied) == sorted([*records, "ds500/done.json"])
    archived = {os.path.relpath(os.path.join(d, n), archive) for d, _, names in os.walk(archive) for n in names}
    assert archived == set(copied)  # no checkpoints, no temporaries
    for path in copied:
        assert open(os.path.join(archive, path)).read() == open(os.path.join(root, path)).read()
    assert workstation.is_done(fresh, item, archive=archive) and not workstation.is_done(fresh, item)
    assert not workstation.is_done(fresh, item, preset="smoke", archive=archive)  # other commands: not done


def test_linked_stages_not_finished_here_are_trained_first_then_not_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(workstation, "_call", lambda cmd, log: calls.append(cmd[cmd.index("--workdir") + 1]))
    root = str(tmp_path)
    item = workstation.by_name("tma_seg")  # links ae's autoencoder and f_rmas_s0's foundation (which links ae's)
    assert workstation.ensure_linked_stages(root, item) == ["ae", "f_rmas_s0"]
    assert calls == [os.path.join(root, "ae"), os.path.join(root, "f_rmas_s0")]
    assert os.readlink(tmp_path / "f_rmas_s0" / "autoencoder") == os.path.join("..", "ae", "autoencoder")
    assert workstation.ensure_linked_stages(root, workstation.by_name("tma_oracle")) == [] and len(calls) == 2

    fresh = tmp_path / "fresh"
    _finished(str(fresh), workstation.by_name("ae"), {})  # finished here: used as it is
    calls.clear()
    assert workstation.ensure_linked_stages(str(fresh), item) == ["f_rmas_s0"] and len(calls) == 1
