"""Output directories lose nothing: every CLI that writes a directory (`sample.py`, `allpet_jax.evaluate`,
`allpet_jax.data.make`, `allpet_jax.experiments`) writes only into a new, empty or its own directory,
refuses anything else in one line before its work, and `sample.py --overwrite` swaps the new directory in
so that the old or the new one exists at every moment, crash included. Sampling shows a progress bar over
samples and chunks.

`sample.py` and `evaluate` run in subprocesses, with their flags in absl's global FLAGS; `data.make` and
`experiments` run here, with flags of their own (`cli.parse`). Their one-line errors and exit status:
`test_cli.py`."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allpet_jax import atomic_write, cli, experiments, sampling
from allpet_jax.atomic_write import OWNER_FILE, OutputDirectoryError
from allpet_jax.data import make, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _users_dir(path, name="notes.txt", text="a week of work"):
    path.mkdir(parents=True)
    (path / name).write_text(text)
    return path


def _python(code: str, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


# --- the shared rule: atomic_write -------------------------------------------------------------------------


def test_a_directory_holding_a_users_file_is_refused_before_anything_is_written(tmp_path):
    out = _users_dir(tmp_path / "out")
    entered = []
    with pytest.raises(OutputDirectoryError) as e:
        with atomic_write.replacing_dir(out, "sample.py", replace=True):
            entered.append(True)
    message = str(e.value)
    assert "\n" not in message and str(out) in message and "notes.txt" in message
    assert not entered  # refused on entry, before the caller's work
    with pytest.raises(OutputDirectoryError, match="notes.txt"):
        atomic_write.claim_output_dir(out, "allpet_jax.evaluate", ["results.md"])
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "a week of work"
    assert os.listdir(tmp_path) == ["out"]  # no temporary left beside it

    many = _users_dir(tmp_path / "many", "0.txt")
    for i in range(1, 8):
        (many / f"{i}.txt").write_text("x")
    with pytest.raises(OutputDirectoryError, match=r"\(0.txt, 1.txt, 2.txt, 3.txt, 4.txt and 3 more\)"):
        atomic_write.check_output_dir(many, "sample.py")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirectoryError, match="is a file, not a directory"):
        atomic_write.check_output_dir(tmp_path / "file", "sample.py")


def test_only_a_directory_the_same_tool_wrote_and_nothing_else_is_replaced(tmp_path):
    out = tmp_path / "out"
    with atomic_write.replacing_dir(out, "sample.py") as new:
        (tmp_path / new / "old.npz").write_text("old")
    assert sorted(os.listdir(out)) == [OWNER_FILE, "old.npz"]
    assert json.loads((out / OWNER_FILE).read_text())["entries"] == ["old.npz"]
    with pytest.raises(OutputDirectoryError, match="--overwrite"):  # replacing is asked for, never assumed
        atomic_write.check_output_dir(out, "sample.py", replace=False)
    with pytest.raises(OutputDirectoryError, match="was written by sample.py, not allpet_jax.evaluate"):
        atomic_write.check_output_dir(out, "allpet_jax.evaluate")

    with atomic_write.replacing_dir(out, "sample.py", replace=True) as new:
        (tmp_path / new / "new.npz").write_text("new")
    assert sorted(os.listdir(out)) == [OWNER_FILE, "new.npz"] and (out / "new.npz").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]  # the old directory deleted, no temporary left

    (out / "mine.txt").write_text("the user's")  # a user's file, added later, makes it theirs again
    with pytest.raises(OutputDirectoryError, match="mine.txt"):
        with atomic_write.replacing_dir(out, "sample.py", replace=True):
            pass
    assert (out / "mine.txt").read_text() == "the user's" and (out / "new.npz").exists()


def test_a_file_arriving_during_the_work_stops_the_swap(tmp_path):
    out = tmp_path / "out"
    with atomic_write.replacing_dir(out, "sample.py"):
        pass
    with pytest.raises(OutputDirectoryError, match="late.txt"):
        with atomic_write.replacing_dir(out, "sample.py", replace=True) as new:
            (tmp_path / new / "new.npz").write_text("new")
            (out / "late.txt").write_text("written while sampling ran")
    assert sorted(os.listdir(out)) == [OWNER_FILE, "late.txt"] and os.listdir(tmp_path) == ["out"]


def test_claimed_directory_lists_its_entries_and_tolerates_its_interrupted_writes(tmp_path):
    out = tmp_path / "eval"
    assert atomic_write.claim_output_dir(out, "allpet_jax.evaluate", ["results.md"]) == str(out)
    (out / "results.md").write_text("old")
    atomic_write.claim_output_dir(out, "allpet_jax.evaluate", ["results.json"])  # a rerun: its own, resumed
    assert json.loads((out / OWNER_FILE).read_text())["entries"] == ["results.json", "results.md"]
    (out / "results.json.tmp-123-456").write_text("{")  # left by a SIGKILL inside atomic_path
    atomic_write.claim_output_dir(out, "allpet_jax.evaluate", ["results.json"])
    (out / "draft.md").write_text("mine")
    with pytest.raises(OutputDirectoryError, match=r"\(draft.md\)"):
        atomic_write.claim_output_dir(out, "allpet_jax.evaluate", ["results.md"])
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_write.claim_output_dir(empty, "allpet_jax.evaluate", ["results.md"])  # an empty directory is free
    (empty / OWNER_FILE).write_text("not json")  # an unreadable owner file proves nothing
    with pytest.raises(OutputDirectoryError, match=OWNER_FILE):
        atomic_write.claim_output_dir(empty, "allpet_jax.evaluate", ["results.md"])


CRASH = """
import os, shutil, sys
from allpet_jax import atomic_write

out, crash_at = sys.argv[1], sys.argv[2]
with atomic_write.replacing_dir(out, "sample.py") as new:
    open(os.path.join(new, "old.npz"), "w").write("old")
calls = []
rename, rmtree = os.rename, shutil.rmtree

def dying_rename(src, dst):
    calls.append(src)
    if crash_at == f"rename {len(calls)}":
        os._exit(3)  # a crash: no except, no finally runs
    rename(src, dst)

def dying_rmtree(path, *args, **kwargs):
    if crash_at == "rmtree":
        os._exit(3)
    rmtree(path, *args, **kwargs)

os.rename, shutil.rmtree = dying_rename, dying_rmtree
with atomic_write.replacing_dir(out, "sample.py", replace=True) as new:
    open(os.path.join(new, "new.npz"), "w").write("new")
"""


@pytest.mark.parametrize("crash_at", ["rename 1", "rename 2", "rmtree"])
def test_a_crash_during_the_swap_leaves_the_old_or_the_new_directory_whole(tmp_path, crash_at):
    out = tmp_path / "out"
    result = _python(CRASH, out, crash_at, timeout=60)
    assert result.returncode == 3, result.stderr
    whole = {}  # directory -> "old"/"new", for each directory beside `out` that holds one of them entirely
    for name in os.listdir(tmp_path):
        files = sorted(os.listdir(tmp_path / name))
        for which in ("old", "new"):
            if files == [OWNER_FILE, f"{which}.npz"] and (tmp_path / name / f"{which}.npz").read_text() == which:
                whole[name] = which
    assert "old" in whole.values() or whole.get("out") == "new", (crash_at, whole)
    if crash_at == "rmtree":  # both renames done: the new directory is in place
        assert whole["out"] == "new"


def test_an_error_during_the_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_write.replacing_dir(out, "sample.py") as new:
        (tmp_path / new / "old.npz").write_text("old")
    rename, calls = os.rename, []

    def failing_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # moving the new directory in
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        with atomic_write.replacing_dir(out, "sample.py", replace=True) as new:
            (tmp_path / new / "new.npz").write_text("new")
    assert (out / "old.npz").read_text() == "old" and os.listdir(tmp_path) == ["out"]


# --- sample.py ---------------------------------------------------------------------------------------------


def test_write_outputs_refuses_a_users_directory_and_replaces_its_own(tmp_path):
    users = _users_dir(tmp_path / "users")
    with pytest.raises(OutputDirectoryError, match="notes.txt"):
        sampling.write_outputs(users, {"output": np.ones(3, np.float32)}, overwrite=True)
    assert os.listdir(users) == ["notes.txt"] and os.listdir(tmp_path) == ["users"]

    out = sampling.write_outputs(tmp_path / "samples", {"output": np.zeros(3, np.float32)},
                                 figures=[("a.png", lambda p: open(p, "w").write("png"))])
    out = sampling.write_outputs(out, {"output": np.ones(3, np.float32)}, overwrite=True)
    assert sorted(os.listdir(out)) == [OWNER_FILE, "outputs.npz"]  # the old figure went with the old directory
    with np.load(os.path.join(out, "outputs.npz")) as f:
        np.testing.assert_array_equal(f["output"], np.ones(3, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["samples", "users"]


def test_sample_refuses_a_users_out_in_one_line_before_loading_anything(tmp_path):
    out = _users_dir(tmp_path / "out")
    # The checkpoint does not exist: the refusal must come first, before the model is even looked for.
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "nowhere" / "task"),
                             "--task", "low_dose", "--out", str(out), "--overwrite"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: ") and "notes.txt" in lines[0], lines
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "a week of work"


SAMPLE_PROGRESS = """
import sys
import numpy as np
from absl import flags
import sample
from allpet_jax import sampling

sampling.load_for_task = lambda *a, **k: type("Trained", (), {"directory": sys.argv[1]})
sampling.geometry_of = lambda *a, **k: None
sampling.simulated_inputs = lambda *a, **k: {}
sampling.model_batch = lambda *a, **k: {"prompt": np.zeros((2, 3), np.int32)}

def generate(*args, **kwargs):
    print("progress:", repr(kwargs.get("progress", "<not passed>")))
    raise SystemExit(0)

sampling.generate = generate
sample.define_flags()
flags.FLAGS(["sample.py", "--checkpoint", sys.argv[1], "--out", sys.argv[2]])
sample.main([])
"""


def test_sample_asks_for_a_progress_bar(tmp_path):
    result = _python(SAMPLE_PROGRESS, tmp_path / "task", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "progress: 'low_dose (default sampler, 50 steps)'", result.stdout


# --- evaluate ----------------------------------------------------------------------------------------------


EVALUATE = """
import sys
from absl import flags
from allpet_jax import evaluate, sampling

sampling.load_for_task = lambda *a, **k: type("Trained", (), {"directory": "/nowhere/task"})

def sampling_started(*args, **kwargs):
    raise RuntimeError("sampling started")

evaluate.evaluate_paired = evaluate.evaluate_synthesis = sampling_started
evaluate.define_flags()
flags.FLAGS(["evaluate", "--checkpoint", "/nowhere/task", "--num_inputs", "4"])
for out in sys.argv[1:]:
    flags.FLAGS.out = out
    try:
        evaluate.main([])
    except (ValueError, RuntimeError) as e:
        print(type(e).__name__ + ":", e)
"""


def test_evaluate_refuses_a_users_out_before_sampling_and_reuses_its_own(tmp_path):
    users = _users_dir(tmp_path / "users", "results.md", "my own results")
    own = tmp_path / "own"
    atomic_write.claim_output_dir(own, "allpet_jax.evaluate", ["results.md", "results.json"])
    (own / "results.json").write_text("{}")
    result = _python(EVALUATE, users, own, tmp_path / "new")
    assert result.returncode == 0, result.stderr[-2000:]
    refused, reused, new = result.stdout.strip().splitlines()
    assert refused.startswith("OutputDirectoryError: ") and f"{users} holds files" in refused, refused
    assert "(results.md)" in refused
    assert reused == new == "RuntimeError: sampling started"  # its own or a new directory: the work starts
    assert (users / "results.md").read_text() == "my own results" and os.listdir(users) == ["results.md"]
    assert sorted(os.listdir(tmp_path / "new")) == [OWNER_FILE]


# --- data.make ---------------------------------------------------------------------------------------------


class _TinySource:
    """A stand-in for `SimulatedSource`: `n` samples of a 2 x 3 sinogram, sample `i` filled with `i`."""

    def __init__(self, task, geom, n, seed=0, split="train", **options):
        self.task, self.n, self.seed, self.split = task, n, seed, split

    def __len__(self):
        return self.n

    def read_batch(self, idx):
        idx = np.asarray(idx)
        return {"target": np.broadcast_to(idx[:, None, None], (len(idx), 2, 3)).astype(np.float32)}

    def manifest_header(self):
        return {"format": sources.SHARD_FORMAT, "version": sources.SHARD_VERSION, "task": self.task,
                "split": self.split, "seed": self.seed, "count": self.n, "geometry": {}, "options": {}}


def test_data_make_refuses_a_users_out_before_simulating_and_resumes_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SimulatedSource", _TinySource)
    args = ["--task", "low_dose", "--split_size", "5", "--shard_size", "2", "--size", "8", "--no_progress"]

    def make_main(argv):
        return make.main([], cli.parse(make.define_flags, argv))

    out = tmp_path / "shards"
    manifest = make_main(args + ["--out", str(out)])
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert make_main(args + ["--out", str(out)])["shards"] == manifest["shards"]  # its own: finished again, kept

    def simulation_started(*a, **k):
        raise AssertionError("simulation started")

    monkeypatch.setattr(sources, "write_shards", simulation_started)
    users = _users_dir(tmp_path / "users")
    with pytest.raises(OutputDirectoryError) as e:  # one line on the command line: test_cli.py
        make_main(args + ["--out", str(users)])
    assert "notes.txt" in str(e.value) and "\n" not in str(e.value) and os.listdir(users) == ["notes.txt"]


# --- experiments -------------------------------------------------------------------------------------------


def test_experiments_refuses_a_users_runs_dir_before_training_and_resumes_its_own(tmp_path, monkeypatch):
    def training_started(*a, **k):
        raise RuntimeError("training started")

    def experiments_main(argv):
        return experiments.main([], cli.parse(experiments.define_flags, argv))

    monkeypatch.setattr(experiments, "run_tasks", training_started)
    users = _users_dir(tmp_path / "users")
    with pytest.raises(OutputDirectoryError) as e:  # one line on the command line: test_cli.py
        experiments_main(["--runs", str(users), "--tasks", "low_dose"])
    assert "notes.txt" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(users) == ["notes.txt"]

    runs = tmp_path / "runs"
    for _ in range(2):  # a new directory, then the same one again (a rerun resumes it)
        with pytest.raises(RuntimeError, match="training started"):
            experiments_main(["--runs", str(runs), "--tasks", "low_dose"])
        (runs / "low_dose").mkdir(exist_ok=True)
    assert json.loads((runs / OWNER_FILE).read_text())["entries"] == ["low_dose", "results.md", "synthesis"]


# --- progress ----------------------------------------------------------------------------------------------


def _trained(batch_size: int):
    """A stand-in for `runs.TrainedStage` whose model adds 1 to the (normalised) source."""

    def stage_generate(params, frozen, batch, key, sampler, num_steps, eta, guidance, cfg_scale):
        return batch["source"] + params["shift"]

    return types.SimpleNamespace(config=types.SimpleNamespace(data=types.SimpleNamespace(batch_size=batch_size)),
                                 stage=types.SimpleNamespace(generate=stage_generate),
                                 state=types.SimpleNamespace(ema={"shift": jnp.float32(1.0)}, frozen={}),
                                 normalisation=types.SimpleNamespace(target_scale=2.0))


def test_generate_shows_a_bar_over_samples_and_chunks_unless_switched_off(capsys):
    source = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 1, 2, 3)
    batch = {"prompt": np.zeros((5, 3), np.int32), "source": source}
    trained = _trained(batch_size=2)  # 5 inputs in chunks of 2: 3 chunks, the last one padded
    out = sampling.generate(trained, batch, jax.random.key(0), num_samples=2, progress="low_dose")
    np.testing.assert_array_equal(out, np.stack([(source + 1) * 2] * 2))
    err = capsys.readouterr().err
    assert "low_dose" in err and "10/10" in err and "sample 2/2, chunk 3/3" in err, err

    sampling.generate(trained, batch, jax.random.key(0))  # on by default, as training's bar is
    assert "sampling" in capsys.readouterr().err
    for off in (False, ""):
        sampling.generate(trained, batch, jax.random.key(0), progress=off)
        assert capsys.readouterr().err == ""
