"""sampling.py pieces that need no trained model: prompts, and outputs written whole or not at all."""

import os

import numpy as np
import pytest

from allpet_jax import sampling
from allpet_jax.data.kinetics import TRACERS
from allpet_jax.data.phantoms import REGIONS
from allpet_jax.data.simulate import TASKS


def test_parse_prompt_names_and_null_ids():
    assert sampling.parse_prompt("tracer=FDG,region=brain").tolist() == [0, 0, 0]
    assert sampling.parse_prompt("tracer=11c-acetate, region=Trunk", "low_dose").tolist() == [
        TRACERS.index("11C-acetate"), REGIONS.index("trunk"), TASKS.index("low_dose")]
    assert sampling.parse_prompt("").tolist() == [len(TRACERS), len(REGIONS), len(TASKS)]  # unconditional
    assert sampling.parse_prompt("region=chest").tolist() == [len(TRACERS), REGIONS.index("chest"), 0]
    with pytest.raises(ValueError, match="unknown tracer 'XYZ'"):
        sampling.parse_prompt("tracer=XYZ")
    with pytest.raises(ValueError, match="key=value"):
        sampling.parse_prompt("FDG")


def test_write_outputs_is_all_or_nothing(tmp_path):
    arrays = {"output": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    out = sampling.write_outputs(tmp_path / "run", arrays, mat=True)
    with np.load(os.path.join(out, "outputs.npz"), allow_pickle=False) as f:
        np.testing.assert_array_equal(f["output"], arrays["output"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        sampling.write_outputs(tmp_path / "run", arrays)

    def broken_figure(path):
        raise RuntimeError("figure failed")

    with pytest.raises(RuntimeError, match="figure failed"):
        sampling.write_outputs(tmp_path / "other", arrays, figures=[("a.png", broken_figure)])
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing half-written, no temporary directory left
