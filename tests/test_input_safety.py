"""Hostile and oversized inputs: arrays refused from their header before anything is allocated, shard
manifests that name files outside their directory, and which negative sinograms sampling accepts."""

import importlib.util
import io
import json
import math
import os
import types
import zipfile

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from allpet_jax.data import loaders, sources
from radon import Geometry

_spec = importlib.util.spec_from_file_location("base_config", os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

GEOM = Geometry(image_shape=(12, 10), n_angles=9, n_bins=14, pixel_size=2.0, bin_spacing=1.5)
HUGE = (1 << 20, 1 << 20, 900)  # 3.5 PiB of float32: only the header says so


def _npy_header(shape, descr="<f4") -> bytes:
    """The bytes of a `.npy` file whose header claims `shape`, followed by only 16 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\x00" * 16


def _mat5_with_dims(path, dims):
    """A MATLAB v5 file whose one variable `target` claims `dims` but holds the data of a 3 x 5 array."""
    scipy.io.savemat(path, {"target": np.ones((3, 5))})
    data = path.read_bytes()
    old = np.array([3, 5], "<i4").tobytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, np.array(dims, "<i4").tobytes()))


def _crafted(tmp_path, kind):
    """A file of `kind` whose header claims an array far above any limit, with (almost) no data."""
    if kind == "npy":
        path = tmp_path / "huge.npy"
        path.write_bytes(_npy_header(HUGE))
        return path, None, HUGE
    if kind == "npz":
        path = tmp_path / "huge.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("target.npy", _npy_header(HUGE))
        return path, "target", HUGE
    if kind == "mat":
        path = tmp_path / "huge.mat"
        _mat5_with_dims(path, (1 << 30, 1 << 30))
        return path, "target", (1 << 30, 1 << 30)
    if kind == "mat73":
        path = tmp_path / "huge73.mat"
        with h5py.File(path, "w") as f:  # contiguous storage is allocated only when written: the file stays small
            f.create_dataset("target", shape=HUGE[::-1], dtype="<f8").attrs["MATLAB_class"] = np.bytes_(b"double")
        return path, "target", HUGE
    path = tmp_path / "huge.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 1))
    header.set_data_dtype(np.float32)
    with open(path, "wb") as f:
        f.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 64)  # 348-byte header, extension flag, 64 bytes
    return path, None, (30000, 30000, 1)


@pytest.mark.parametrize("kind", ["npy", "npz", "mat", "mat73", "nifti"])
def test_huge_headers_are_refused_before_loading(tmp_path, kind):
    path, variable, shape = _crafted(tmp_path, kind)
    assert os.path.getsize(path) < 20_000  # only the header claims the size
    with pytest.raises(loaders.DataFileError) as info:
        loaders.load_sinogram(path, GEOM, variable)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert str(shape) in message and "2 GiB" in message


def test_size_limit_is_an_argument_and_exact(tmp_path):
    y = np.ones(GEOM.sino_shape, np.float32)  # 9 * 14 * 4 = 504 bytes
    np.save(tmp_path / "a.npy", y)
    np.savez(tmp_path / "a.npz", target=y)
    scipy.io.savemat(tmp_path / "a.mat", {"target": y})  # stored as single: 4 bytes per value
    for name, variable in (("a.npy", None), ("a.npz", "target"), ("a.mat", "target")):
        with pytest.raises(loaders.DataFileError, match=r"shape \(9, 14\) float32 \(504 bytes\).* 503 bytes"):
            loaders.read_array(tmp_path / name, variable, max_bytes=503)
        np.testing.assert_array_equal(loaders.read_array(tmp_path / name, variable, max_bytes=504), y)
    assert loaders.MAX_ARRAY_BYTES == 2 * 1024**3


def test_a_truncated_nifti_is_one_line(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((10, 12, 1), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "t.nii"))
    data = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[:-40])
    with pytest.raises(loaders.DataFileError, match="not a valid NIfTI image or truncated") as info:
        loaders.load_sinogram(tmp_path / "t.nii", GEOM)
    assert "\n" not in str(info.value)  # nibabel's own message spans lines


# --- shard manifests ------------------------------------------------------------------------------------


def test_shard_files_must_stay_inside_the_shard_directory(tmp_path):
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    (tmp_path / "outside.npz").write_bytes(b"")
    os.symlink(tmp_path / "outside.npz", shards / "link.npz")
    manifest = shards / sources.MANIFEST
    assert loaders.file_inside(shards, "train-00000-of-00001.npz", manifest) == str(shards / "train-00000-of-00001.npz")
    assert loaders.file_inside(shards, "sub/a.npz", manifest) == str(shards / "sub" / "a.npz")
    for name in ("../outside.npz", str(tmp_path / "outside.npz"), "link.npz", "sub/../../outside.npz", "", "."):
        with pytest.raises(loaders.DataFileError, match="which is not a file inside the directory") as info:
            loaders.file_inside(shards, name, manifest)
        assert str(info.value).startswith(f"{manifest}: ")
    with pytest.raises(loaders.DataFileError, match="expected a file name inside .*, got 3"):
        loaders.file_inside(shards, 3, manifest)


class _TinySource:
    """Two samples of one 2 x 2 field, with the header `write_shards` stores."""

    def __len__(self):
        return 2

    def read_batch(self, indices):
        return {"target": np.arange(len(indices) * 4, dtype=np.float32).reshape(-1, 2, 2)}

    def manifest_header(self):
        return {"format": sources.SHARD_FORMAT, "version": sources.SHARD_VERSION, "task": "low_dose",
                "split": "test", "seed": 0, "count": 2, "geometry": GEOM.to_dict(), "options": {}}


def test_shard_source_refuses_a_manifest_that_leaves_its_directory(tmp_path):
    shards = tmp_path / "shards"
    manifest = sources.write_shards(shards, _TinySource(), shard_size=2, progress=False)
    name = manifest["shards"][0]["file"]
    os.replace(shards / name, tmp_path / name)  # the same bytes, now outside the directory
    manifest["shards"][0]["file"] = f"../{name}"
    (shards / sources.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(loaders.DataFileError, match="not a file inside the directory"):
        sources.ShardSource(shards)


# --- which negative sinograms sampling accepts ----------------------------------------------------------


def _trained(**data):
    """What `sampling.file_inputs` reads of a trained stage: its config and meta (smoke geometry, 32 x 32)."""
    config = base.get_config("smoke")
    config.data.update(data)
    return types.SimpleNamespace(config=config, meta={"task": "low_dose", "channels": {"source": 1}})


def test_sampling_accepts_negative_bins_where_training_saw_them(tmp_path):
    from allpet_jax import sampling

    corrected = np.random.default_rng(0).normal(2.0, 2.0, (32, 32)).astype(np.float32)  # ~16% of bins < 0
    np.save(tmp_path / "corrected.npy", corrected)
    # The simulator's sinograms are corrected counts (negative in places), and so are files trained with
    # data.allow_negative: such models take corrected inputs.
    for trained in (_trained(source="simulated"), _trained(source="files", allow_negative=True)):
        inputs = sampling.file_inputs(trained, str(tmp_path / "corrected.npy"))
        np.testing.assert_array_equal(inputs["source"], corrected[None, None])
    # A model trained on raw, non-negative files refuses them, naming only what a sample.py user can change.
    with pytest.raises(loaders.DataFileError) as info:
        sampling.file_inputs(_trained(source="files", allow_negative=False), str(tmp_path / "corrected.npy"))
    message = str(info.value)
    n_negative = int((corrected < 0).sum())
    assert message.startswith(f"{tmp_path / 'corrected.npy'}: source sinogram has {n_negative} negative value(s)")
    assert "allow_negative" not in message and "\n" not in message
    assert "uncorrected" in message and "checkpoint" in message
    assert math.isclose(float(corrected.min()), float(message.split("minimum ")[1].split(")")[0]), rel_tol=1e-3)


def test_negative_raw_physics_fields_name_no_option(tmp_path):
    """Raw prompts and expected backgrounds are never negative, whatever the run's options: the refusal says
    so and does not send the user to `data.allow_negative`, which would not make them acceptable."""
    path = tmp_path / "physics.npz"
    randoms = np.ones((1,) + GEOM.sino_shape, np.float32)
    randoms[0, 0, :3] = -1.0
    np.savez(path, randoms=randoms)
    with pytest.raises(loaders.DataFileError) as e:
        sources.read_physics(path, GEOM, source_channels=1)
    message = str(e.value)
    assert "3 negative value(s)" in message and "never negative" in message and "allow_negative" not in message
