"""Data sources and the Grain pipeline: determinism from the seed, disjoint splits, iterator checkpoints,
shards (make, manifest checksums, interruption), normalisation and the config."""

import hashlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allpet_jax import cli
from allpet_jax.data import make, pipeline, sources
from radon import Geometry, forward

_spec = importlib.util.spec_from_file_location("base_config", os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

GEOM = Geometry.square(16, n_angles=12, pixel_size=4.0, bin_spacing=4.0)


def tiny_simulate(key, task, geom, dose=0.25):
    """Stand-in for `simulate_pair` with the same output contract: a random disc, noisy low/full dose."""
    k1, k2, k3 = jax.random.split(key, 3)
    H, W = geom.image_shape
    y, x = jnp.meshgrid(jnp.linspace(-1, 1, H), jnp.linspace(-1, 1, W), indexing="ij")
    c = jax.random.uniform(k1, (3,), minval=jnp.array([-0.3, -0.3, 0.2]), maxval=jnp.array([0.3, 0.3, 0.6]))
    inside = ((x - c[0]) ** 2 + (y - c[1]) ** 2 < c[2] ** 2).astype(jnp.float32)
    clean = forward(5.0 * inside[None], geom)
    return {
        "source": jax.random.poisson(k2, dose * clean).astype(jnp.float32),
        "target": jax.random.poisson(k3, clean).astype(jnp.float32),
        "target_clean": clean,
        "image": 5.0 * inside[None],
        "mu": 0.0096 * inside,
        "labels": inside.astype(jnp.int32),
        "prompt": jnp.array([0, 0, 1], jnp.int32),
    }


def simulated(n=40, seed=0, split="train", **kw):
    # Every test passes the same options (dose=0.25), so they share one compiled simulator.
    return sources.SimulatedSource("low_dose", GEOM, n, seed, split, simulate=tiny_simulate, dose=0.25, **kw)


NORM = pipeline.Normalisation(source_scale=10.0, target_scale=40.0)


def batches(dataset, k):
    it = iter(dataset)
    return [next(it) for _ in range(k)]


# --- sources --------------------------------------------------------------------------------------------


def test_sample_is_pure_function_of_seed_split_index():
    a = simulated(cache_bytes=0).read_batch([3, 7, 11])
    b = simulated(cache_bytes=0).read_batch([11, 2])  # another source, another batch
    for k in a:
        if k != "index":
            np.testing.assert_array_equal(a[k][2], b[k][0])
    # Independent reference: the simulator called on `sample_key`, the documented key scheme.
    ref = jax.jit(lambda k: tiny_simulate(k, "low_dose", GEOM, dose=0.25))(sources.sample_key(0, "train", 7))
    np.testing.assert_array_equal(a["target"][1], ref["target"])
    np.testing.assert_allclose(a["target_clean"][1], ref["target_clean"], rtol=1e-6)
    np.testing.assert_array_equal(a["index"], [3, 7, 11])
    # Cached reads are the same arrays.
    src = simulated()
    first = src.read_batch([3, 7])
    np.testing.assert_array_equal(src.read_batch([7, 3])["target"], first["target"][::-1])


def test_splits_and_seeds_give_different_samples():
    idx = np.arange(8)
    train = simulated(cache_bytes=0).read_batch(idx)["target_clean"]
    val = simulated(split="val", cache_bytes=0).read_batch(idx)["target_clean"]
    other_seed = simulated(seed=1, cache_bytes=0).read_batch(idx)["target_clean"]
    for other in (val, other_seed):
        assert not any(np.allclose(train[i], other[j]) for i in idx for j in idx)
    keys = {tuple(np.asarray(jax.random.key_data(sources.sample_key(0, s, i)))) for s in sources.SPLITS for i in range(50)}
    assert len(keys) == 150


def test_source_bounds_and_bad_split():
    with pytest.raises(IndexError):
        simulated(n=4)[4]
    with pytest.raises(ValueError, match="split"):
        simulated(split="dev")


# --- pipeline -----------------------------------------------------------------------------------------


def build(src, seed=0, **kw):
    kw = {"batch_size": 8, "normalisation": NORM, "seed": seed, "num_threads": 2, "prefetch": 2, **kw}
    return pipeline.make_pipeline(src, **kw)


def test_pipeline_is_deterministic_and_each_epoch_is_a_permutation():
    src = simulated(n=32)
    a, b = batches(build(src), 8), batches(build(src), 8)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    epoch1 = np.concatenate([x["index"] for x in a[:4]])
    epoch2 = np.concatenate([x["index"] for x in a[4:]])
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(32))
    np.testing.assert_array_equal(np.sort(epoch2), np.arange(32))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled every epoch
    other = np.concatenate([x["index"] for x in batches(build(src, seed=1), 4)])
    assert not np.array_equal(epoch1, other)
    # Batch contents are the source's samples, normalised.
    x = a[0]
    raw = src.read_batch(x["index"])
    np.testing.assert_allclose(x["target"], raw["target"] / 40.0, rtol=1e-6)
    np.testing.assert_allclose(x["source"], raw["source"] / 10.0, rtol=1e-6)
    np.testing.assert_array_equal(x["labels"], raw["labels"])
    assert x["target"].dtype == np.float32 and x["target"].shape == (8, 1, 12, 16)


def test_processes_read_their_rows_of_the_same_global_batches():
    # P processes together read exactly the batches one process reads, each its own contiguous rows.
    src = simulated(n=36)
    one = [x["index"] for x in batches(build(src, batch_size=6), 8)]  # 8 batches: past the first epoch
    rows = [[x["index"] for x in batches(build(src, batch_size=6, process_index=p, process_count=3), 8)]
            for p in range(3)]
    for step, expected in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([rows[p][step] for p in range(3)]), expected)
    assert pipeline.process_rows(6, 1, 3) == slice(2, 4)
    with pytest.raises(ValueError, match="divisible by the 4 processes"):
        pipeline.process_rows(6, 0, 4)
    # Evaluation splits are read whole by every process.
    val = [x["index"] for x in build(src, batch_size=6, shuffle=False, num_epochs=1, drop_remainder=False,
                                     process_index=2, process_count=3)]
    np.testing.assert_array_equal(np.concatenate(val), np.arange(36))


def test_iterator_state_round_trip():
    src = simulated(n=24)
    it = iter(build(src))
    for _ in range(5):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    it.set_state(state)
    again = [next(it) for _ in range(4)]
    fresh = iter(build(src))  # a resumed run: a new pipeline restored from the saved state
    fresh.set_state(json.loads(json.dumps(state)))
    resumed = [next(fresh) for _ in range(4)]
    for x, y, z in zip(after, again, resumed):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["index"], z["index"])
        np.testing.assert_array_equal(x["target"], z["target"])


def test_extra_transforms_run_after_normalisation_in_order():
    def first(batch):
        return dict(batch, tag=batch["index"] * 10, seen_max=batch["target"].max(axis=(1, 2, 3)))

    def second(batch):
        return dict(batch, tag=batch["tag"] + 1)

    (x,) = batches(build(simulated(n=16), extra_transforms=[first, second]), 1)
    np.testing.assert_array_equal(x["tag"], x["index"] * 10 + 1)
    np.testing.assert_allclose(x["seen_max"], x["target"].max(axis=(1, 2, 3)))


def test_evaluation_pipeline_keeps_partial_batch_in_order():
    ds = build(simulated(n=10), shuffle=False, num_epochs=1, drop_remainder=False, batch_size=4)
    sizes = [len(x["index"]) for x in ds]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="fewer than"):
        build(simulated(n=6), batch_size=8)


def test_normalisation_estimate_and_inverse():
    src = simulated(n=40)
    norm = pipeline.estimate_normalisation(src, n=20)
    raw = src.read_batch(np.arange(20))
    assert norm.source_scale == pytest.approx(np.percentile(raw["source"], 99.5))
    assert norm.target_scale == pytest.approx(np.percentile(raw["target"], 99.5))
    out = norm(raw)
    assert np.mean(out["target"] <= 1.0) >= 0.995
    np.testing.assert_allclose(norm.to_counts(out["target"]), raw["target"], rtol=1e-6)
    np.testing.assert_allclose(norm.to_counts(out["source"], "source"), raw["source"], rtol=1e-6)
    np.testing.assert_allclose(norm.to_counts(out["target_clean"], "target_clean"), raw["target_clean"], rtol=1e-6)
    np.testing.assert_array_equal(out["mu"], raw["mu"])  # physical units kept
    with pytest.raises(ValueError, match="positive"):
        pipeline.Normalisation(0.0, 1.0)
    # A zero source (the simulator's synthesis task) takes the target scale.
    class Synthesis:
        def __len__(self):
            return 8

        def read_batch(self, idx):
            return {"source": np.zeros((len(idx), 1, 12, 16)), "target": raw["target"][np.asarray(idx)]}

    synth = pipeline.estimate_normalisation(Synthesis(), n=8)
    assert synth.source_scale == synth.target_scale == pytest.approx(np.percentile(raw["target"][:8], 99.5))


# --- shards ---------------------------------------------------------------------------------------------


def test_shards_round_trip_with_checksums(tmp_path):
    src = simulated(n=21, seed=3, cache_bytes=0)
    manifest = sources.write_shards(tmp_path, src, shard_size=8, progress=False)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".npz"))
    assert files == ["train-00000-of-00003.npz", "train-00001-of-00003.npz", "train-00002-of-00003.npz"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    for entry in manifest["shards"]:
        digest = hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()
        assert entry["sha256"] == digest
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is True
    shards = sources.ShardSource(tmp_path)
    assert (len(shards), shards.task, shards.seed, shards.geom) == (21, "low_dose", 3, GEOM)
    idx = [20, 0, 9, 8, 7]  # across all three shards
    a, b = shards.read_batch(idx), src.read_batch(idx)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with np.load(tmp_path / files[0], allow_pickle=False) as z:  # plain .npz, readable by numpy
        np.testing.assert_array_equal(z["target"][7], b["target"][4])
    # The same pipeline over shards and over the simulator gives the same batches.
    x, y = batches(build(shards), 3), batches(build(src), 3)
    for p, q in zip(x, y):
        np.testing.assert_array_equal(p["target"], q["target"])
    # Writing is deterministic: a second directory has identical bytes.
    again = sources.write_shards(tmp_path / "again", src, shard_size=8, progress=False)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in manifest["shards"]]


def test_corrupt_shard_and_missing_manifest_are_refused(tmp_path):
    sources.write_shards(tmp_path, simulated(n=8, cache_bytes=0), shard_size=4, progress=False)
    shard = tmp_path / "train-00001-of-00002.npz"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256.*does not match") as info:
        sources.ShardSource(tmp_path)
    assert "train-00001-of-00002.npz" in str(info.value)
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="no manifest.json"):
        sources.ShardSource(tmp_path)


class _Interrupted(Exception):
    pass


def test_interrupted_make_is_refused_then_resumed(tmp_path):
    src = simulated(n=12, cache_bytes=0)
    reads = []

    class Flaky:
        def __len__(self):
            return len(src)

        def manifest_header(self):
            return src.manifest_header()

        def read_batch(self, idx):
            reads.append(list(idx))
            if len(reads) == 2:
                raise _Interrupted
            return src.read_batch(idx)

    with pytest.raises(_Interrupted):
        sources.write_shards(tmp_path, Flaky(), shard_size=5, progress=False)
    assert sorted(f for f in os.listdir(tmp_path)) == ["manifest.json", "train-00000-of-00003.npz"]
    with pytest.raises(ValueError, match="incomplete"):
        sources.ShardSource(tmp_path)
    sources.write_shards(tmp_path, Flaky(), shard_size=5, progress=False)
    assert reads[2:] == [[5, 6, 7, 8, 9], [10, 11]]  # the finished shard was kept
    np.testing.assert_array_equal(sources.ShardSource(tmp_path).read_batch([11])["target"], src.read_batch([11])["target"])
    with pytest.raises(ValueError, match="seed"):
        sources.write_shards(tmp_path, simulated(n=12, seed=9), shard_size=5, progress=False)


def test_real_simulator_through_make_shards_and_pipeline(tmp_path):
    """The real `simulate_pair` end to end: the `make` command line, `ShardSource`, the pipeline. One XLA
    compile (16 x 16), shared by `make` and the direct `SimulatedSource`."""
    from allpet_jax.data.simulate import TASKS

    out = tmp_path / "low_dose"
    argv = ["--task", "low_dose", "--split_size", "6", "--out", str(out), "--seed", "4", "--size", "16",
            "--n_angles", "12", "--pixel_size", "4", "--shard_size", "4", "--split", "val", "--no_progress"]
    manifest = make.main([], cli.parse(make.define_flags, argv))
    assert (manifest["count"], len(manifest["shards"]), manifest["split"], manifest["seed"]) == (6, 2, "val", 4)
    shards = sources.ShardSource(out)
    assert shards.geom == GEOM
    idx = [5, 0, 3]
    got = shards.read_batch(idx)
    ref = sources.SimulatedSource("low_dose", GEOM, 6, seed=4, split="val").read_batch(idx)
    assert got.keys() == ref.keys() >= {"source", "target", "target_clean", "image", "mu", "labels", "prompt", "index"}
    for k in got:  # the same compiled function and keys: bit-for-bit equal
        assert got[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(got[k], ref[k])
    shapes = {k: got[k].shape[1:] for k in ("source", "target", "target_clean", "image", "mu", "labels", "prompt")}
    assert shapes == {"source": (1, 12, 16), "target": (1, 12, 16), "target_clean": (1, 12, 16), "image": (1, 16, 16),
                      "mu": (16, 16), "labels": (16, 16), "prompt": (3,)}
    assert got["labels"].dtype == got["prompt"].dtype == np.int32
    np.testing.assert_array_equal(got["prompt"][:, 2], TASKS.index("low_dose"))
    norm = pipeline.estimate_normalisation(shards)
    (batch,) = batches(pipeline.make_pipeline(shards, batch_size=4, normalisation=norm, seed=0, num_threads=1), 1)
    assert batch["target"].shape == (4, 1, 12, 16) and batch["target"].dtype == np.float32
    np.testing.assert_allclose(norm.to_counts(batch["target"]), shards.read_batch(batch["index"])["target"], rtol=1e-6)


def test_physics_fields_take_stable_names_and_cost_nothing_when_off():
    """`physics=True` simulates with `diagnostics=True` and returns the source acquisition's raw data under
    `PHYSICS_FIELDS` (the other diagnostics left out); off, the simulator is never asked for them. (The
    values themselves are checked against the Poisson means in test_simulate.py.)"""
    from allpet_jax.data.simulate import DIAGNOSTICS

    calls = []

    def with_diagnostics(key, task, geom, dose=0.25, diagnostics=False):
        calls.append(diagnostics)
        out = {"source": jnp.zeros((1,) + geom.sino_shape), "target": jnp.ones((1,) + geom.sino_shape),
               "dose": jnp.float32(dose)}  # no Poisson draws: they cost seconds of compile
        if diagnostics:  # each diagnostic a constant sinogram of its index in DIAGNOSTICS
            out.update({k: jnp.full((1,) + geom.sino_shape, float(i)) for i, k in enumerate(DIAGNOSTICS)})
            out.update(normalisation=out["normalisation"][0], attenuation=out["attenuation"][0])
        return out

    on = sources.SimulatedSource("low_dose", GEOM, 4, simulate=with_diagnostics, physics=True, dose=0.25)
    got = on.read_batch([0, 1])
    assert calls == [True] and on.manifest_header()["options"] == {"dose": 0.25, "diagnostics": True}
    expected = {"prompts": "source_prompts", "normalisation": "normalisation", "attenuation": "attenuation",
                "scatter": "source_scatter", "randoms": "source_randoms", "target_prompts": "target_prompts",
                "target_scatter": "target_scatter", "target_randoms": "target_randoms"}
    assert set(expected) == set(sources.PHYSICS_FIELDS)
    for name, key in expected.items():
        np.testing.assert_array_equal(got[name], DIAGNOSTICS.index(key), err_msg=name)
    assert got["prompts"].shape == (2, 1) + GEOM.sino_shape and got["normalisation"].shape == (2,) + GEOM.sino_shape
    assert not set(got) & (set(DIAGNOSTICS) - set(expected))  # only the stable names
    calls.clear()
    off = sources.SimulatedSource("low_dose", GEOM, 4, simulate=with_diagnostics, dose=0.25).read_batch([0])
    assert calls == [False] and not set(off) & set(sources.PHYSICS_FIELDS)


# --- config ---------------------------------------------------------------------------------------------


def smoke_data(**overrides):
    data = base.get_config("smoke").data
    data.image_size, data.n_angles, data.n_bins, data.pixel_size, data.bin_spacing = 16, 12, 16, 4.0, 4.0
    data.update(overrides)
    return data


def test_config_presets():
    for preset, size in (("", 256), ("default", 256), ("workstation", 64), ("cpu", 64), ("smoke", 32)):
        data = base.get_config(preset).data
        geom = pipeline.geometry_from_config(data)
        assert geom.image_shape == (size, size) and geom.n_angles == size
        assert geom.fov_radius_mm == 256.0  # the same 512 mm field of view at every size
    assert base.get_config().data.n_train == 500
    with pytest.raises(ValueError, match="preset"):
        base.get_config("gpu-huge")


def test_config_cache_dir_makes_then_reads_shards(tmp_path):
    data = smoke_data(cache_dir=str(tmp_path), n_train=8, batch_size=4)
    data.simulation.dose = 0.25  # None options are drawn by the simulator and not passed
    train, norm = pipeline.pipeline_from_config(data, "train", simulate=tiny_simulate)
    assert isinstance(norm, pipeline.Normalisation)
    manifest = sources.read_manifest(tmp_path / "train")
    assert (manifest["count"], manifest["options"]) == (8, {"dose": 0.25})
    first = batches(train, 2)
    mtime = os.path.getmtime(tmp_path / "train" / "manifest.json")
    again, _ = pipeline.pipeline_from_config(data, "train", normalisation=norm, simulate=tiny_simulate)
    assert os.path.getmtime(tmp_path / "train" / "manifest.json") == mtime  # read, not remade
    for x, y in zip(first, batches(again, 2)):
        np.testing.assert_array_equal(x["target"], y["target"])
    val, _ = pipeline.pipeline_from_config(data, "val", normalisation=norm, simulate=tiny_simulate)
    assert [len(b["index"]) for b in val] == [4, 4]
    with pytest.raises(ValueError, match="seed"):
        pipeline.make_source(smoke_data(cache_dir=str(tmp_path), n_train=8, seed=5), "train", simulate=tiny_simulate)


def test_config_files_split_into_consecutive_blocks(tmp_path):
    for i in range(7):
        np.savez(tmp_path / f"case{i}.npz", source=np.full(GEOM.sino_shape, i, np.float32), target=np.full(GEOM.sino_shape, 10.0 + i, np.float32))
    data = smoke_data(source="files", path=str(tmp_path), n_train=4, n_val=2, n_test=5)
    got = {s: pipeline.make_source(data, s) for s in sources.SPLITS}
    assert [len(got[s]) for s in sources.SPLITS] == [4, 2, 1]
    np.testing.assert_array_equal(got["val"].read_batch([0, 1])["source"][:, 0, 0, 0], [4, 5])
    np.testing.assert_array_equal(got["test"][0]["target"][0, 0, 0], 16.0)
    norm = pipeline.normalisation_from_config(data)
    assert norm.source_scale == pytest.approx(np.percentile(np.repeat([0.0, 1, 2, 3], 12 * 16), 99.5))
