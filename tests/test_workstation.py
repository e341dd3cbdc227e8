"""The workstation plan's pieces, without training: the plan's links and commands, the evaluation at one dose
and on lesion-rich slices (checked against scikit-image's connected components)."""

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
    # the claims' arms: three seeds of each 500-sinogram foundation, one of 5000, equal steps (U-Net passes)
    foundations = [item for item in workstation.PLAN if "--config.train.stages=foundation" in item.train]
    arms = [tuple(sorted(a for a in item.train if "rmas" in a or "n_train" in a)) for item in foundations]
    assert sorted(map(arms.count, set(arms))) == [1, 3, 3]
    assert not any("steps" in a for item in foundations for a in item.train)


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
