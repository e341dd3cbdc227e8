"""Users' file loaders: round trips for every format, and clear errors for bad files."""

import os

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from allpet_jax.data import loaders, sources
from radon import Geometry, forward

GEOM = Geometry(image_shape=(12, 10), n_angles=9, n_bins=14, pixel_size=2.0, bin_spacing=1.5)


def sinogram(seed=0, channels=None):
    shape = GEOM.sino_shape if channels is None else (channels, *GEOM.sino_shape)
    return np.random.default_rng(seed).poisson(20.0, shape).astype(np.float32)


def save_mat73(path, arrays: dict):
    """A MATLAB v7.3 MAT-file as MATLAB writes it: HDF5 with a 512-byte userblock holding the MAT header,
    and every array stored with its dimensions reversed (column-major), tagged with MATLAB_class."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in arrays.items():
            ds = f.create_dataset(name, data=np.transpose(np.asarray(value, dtype=np.float64)))
            ds.attrs["MATLAB_class"] = np.bytes_(b"double")
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header)


def save_nifti(path, image, pixel=2.0, flip=False):
    """Store `image` (radon/phantom orientation) as a NIfTI slice in RAS+ voxel order; `flip=True` stores
    it in LPS voxel order instead, which the loader must undo."""
    data = image.T[::-1, ::-1]  # inverse of the loader's data[::-1, ::-1].T
    X, Y = data.shape
    affine = np.diag([pixel, pixel, pixel, 1.0])
    affine[:3, 3] = [-(X - 1) / 2 * pixel, -(Y - 1) / 2 * pixel, 0.0]
    if flip:
        data = data[::-1, ::-1]
        affine[:2, :2] *= -1
        affine[:2, 3] *= -1
    nib.save(nib.Nifti1Image(data[:, :, None].astype(np.float32), affine), str(path))


# --- round trips ----------------------------------------------------------------------------------------


def test_npy_and_npz_round_trip(tmp_path):
    y = sinogram(1)
    np.save(tmp_path / "a.npy", y)
    np.testing.assert_array_equal(loaders.load_sinogram(tmp_path / "a.npy", GEOM), y[None])
    two = sinogram(2, channels=2)
    np.savez(tmp_path / "b.npz", source=y, target=two)
    assert loaders.list_variables(tmp_path / "b.npz") == ["source", "target"]
    np.testing.assert_array_equal(loaders.load_sinogram(tmp_path / "b.npz", GEOM, "target"), two)
    np.testing.assert_array_equal(loaders.load_sinogram(tmp_path / "b.npz", GEOM, "source"), y[None])


def test_mat_v5_round_trip(tmp_path):
    y, x = sinogram(3), sinogram(4, channels=2)
    scipy.io.savemat(tmp_path / "d.mat", {"low": y, "full": x})
    assert loaders.list_variables(tmp_path / "d.mat") == ["full", "low"]
    np.testing.assert_array_equal(loaders.load_sinogram(tmp_path / "d.mat", GEOM, "low"), y[None])
    np.testing.assert_array_equal(loaders.load_sinogram(tmp_path / "d.mat", GEOM, "full"), x)


def test_mat_v73_round_trip_undoes_matlab_axis_order(tmp_path):
    y, x = sinogram(5), sinogram(6, channels=3)
    path = tmp_path / "d73.mat"
    save_mat73(path, {"low": y, "full": x})
    assert scipy.io.matlab.matfile_version(str(path))[0] == 2  # scipy recognises the header as v7.3
    with h5py.File(path, "r") as f:
        assert f["low"].shape == y.shape[::-1]  # stored transposed, as MATLAB does
    assert loaders.list_variables(path) == ["full", "low"]
    np.testing.assert_array_equal(loaders.load_sinogram(path, GEOM, "low"), y[None])
    np.testing.assert_array_equal(loaders.load_sinogram(path, GEOM, "full"), x)


@pytest.mark.parametrize("flip", [False, True])
def test_nifti_orientation_and_projection(tmp_path, flip):
    image = np.zeros(GEOM.image_shape, np.float32)
    image[1, 2] = 5.0  # a hot pixel near the top left
    image[4:9, 3:7] = 1.0
    save_nifti(tmp_path / "x.nii.gz", image, pixel=GEOM.pixel_size, flip=flip)
    np.testing.assert_array_equal(loaders.read_nifti(tmp_path / "x.nii.gz"), image)
    # The hot voxel's world (RAS) position from the affine is radon's position of pixel [1, 2], with radon's
    # +x towards the patient's left (-x_RAS) and +y anterior (+y_RAS), as in the phantoms.
    img = nib.load(tmp_path / "x.nii.gz")
    a, b = np.argwhere(img.get_fdata()[:, :, 0] == 5.0)[0]
    world = img.affine @ np.array([a, b, 0, 1.0])
    np.testing.assert_allclose(world[:2], [-GEOM.x_mm[2], GEOM.y_mm[1]], atol=1e-9)
    sino = loaders.load_sinogram(tmp_path / "x.nii.gz", GEOM)
    np.testing.assert_allclose(sino, np.asarray(forward(image[None], GEOM)), rtol=1e-6, atol=1e-6)


def test_file_source_pairs_files_in_sorted_order(tmp_path):
    for d in ("src", "tgt"):
        os.makedirs(tmp_path / d)
    for i in range(3):
        np.save(tmp_path / "src" / f"s{i}.npy", sinogram(10 + i))
        np.save(tmp_path / "tgt" / f"t{i}.npy", sinogram(20 + i))
    (tmp_path / "tgt" / "notes.txt").write_text("ignored")
    src = sources.FileSource(tmp_path / "tgt", GEOM, source_files=tmp_path / "src")
    assert len(src) == 3
    batch = src.read_batch([2, 0])
    np.testing.assert_array_equal(batch["target"][:, 0], [sinogram(22), sinogram(20)])
    np.testing.assert_array_equal(batch["source"][:, 0], [sinogram(12), sinogram(10)])
    np.testing.assert_array_equal(batch["index"], [2, 0])
    with pytest.raises(ValueError, match="separate source files"):
        sources.FileSource(tmp_path / "tgt", GEOM)


def test_file_source_reads_both_variables_of_mat_files(tmp_path):
    for i in range(2):
        scipy.io.savemat(tmp_path / f"p{i}.mat", {"ld": sinogram(i), "nd": sinogram(i + 5)})
    src = sources.FileSource(str(tmp_path / "*.mat"), GEOM, source_variable="ld", target_variable="nd", prompt=[1, 2, 3])
    sample = src[1]
    np.testing.assert_array_equal(sample["source"][0], sinogram(1))
    np.testing.assert_array_equal(sample["target"][0], sinogram(6))
    np.testing.assert_array_equal(sample["prompt"], [1, 2, 3])


def physics_variables(seed=0, channels=1):
    rng = np.random.default_rng(seed)
    per_channel = lambda: rng.uniform(0.5, 2.0, (channels, *GEOM.sino_shape)).astype(np.float32)
    return {"prompts": sinogram(seed, channels), "normalisation": rng.uniform(0.8, 1.2, GEOM.sino_shape),
            "attenuation": rng.uniform(0.1, 1.0, GEOM.sino_shape), "scatter": per_channel(), "randoms": per_channel(),
            "dose": 0.25}


def test_file_source_reads_optional_physics_variables(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"p{i}.npz", source=sinogram(i), target=sinogram(i + 5), **physics_variables(i))
    scipy.io.savemat(tmp_path / "p2.mat", {"source": sinogram(2), "target": sinogram(7), **physics_variables(2)})
    src = sources.FileSource(tmp_path, GEOM, physics=True)
    batch = src.read_batch([0, 2])
    A, B = GEOM.sino_shape
    shapes = {k: batch[k].shape for k in ("prompts", "normalisation", "attenuation", "scatter", "randoms", "dose")}
    assert shapes == {"prompts": (2, 1, A, B), "normalisation": (2, A, B), "attenuation": (2, A, B),
                      "scatter": (2, 1, A, B), "randoms": (2, 1, A, B), "dose": (2,)}
    np.testing.assert_allclose(batch["attenuation"][1], physics_variables(2)["attenuation"], rtol=1e-6)
    np.testing.assert_array_equal(batch["prompts"][0, 0], sinogram(0))
    np.testing.assert_allclose(batch["dose"], 0.25)
    assert not set(sources.PHYSICS_FIELDS) & set(sources.FileSource(tmp_path, GEOM).read_batch([0]))  # off: not read
    # Absent variables are left out; files that disagree on which they hold are refused, naming both.
    np.savez(tmp_path / "p3.npz", source=sinogram(3), target=sinogram(8))
    src = sources.FileSource(tmp_path, GEOM, physics=True)
    assert set(src.read_batch([3])) == {"source", "target", "index"}
    with pytest.raises(loaders.DataFileError, match="p3.npz: holds .* every file must hold the same ones"):
        src.read_batch([0, 3])


@pytest.mark.parametrize("name, value, message", [
    ("scatter", np.ones((2, 9, 14)), r"variable 'scatter' has 2 channel\(s\) but the source sinogram has 1"),
    ("normalisation", np.ones((14, 9)), r"variable 'normalisation' has shape \(14, 9\), expected \(n_angles, n_bins\)"),
    ("attenuation", np.full((9, 14), 3.0), r"above 1; store the factors themselves"),
    ("randoms", -np.ones((9, 14)), "negative value"),
    ("dose", 4.0, r"'dose' is \[4.0\]; it must be one number in \(0, 1\]"),
])
def test_bad_physics_variables_are_named(tmp_path, name, value, message):
    np.savez(tmp_path / "bad.npz", source=sinogram(), target=sinogram(), **dict(physics_variables(), **{name: value}))
    with pytest.raises(loaders.DataFileError, match=message) as info:
        sources.FileSource(tmp_path, GEOM, physics=True)[0]
    assert "\n" not in str(info.value) and "bad.npz" in str(info.value)


# --- bad files ------------------------------------------------------------------------------------------


def _error(path, variable=None):
    with pytest.raises(loaders.DataFileError) as info:
        loaders.load_sinogram(path, GEOM, variable)
    assert str(path) in str(info.value)
    return str(info.value)


def test_truncated_files_are_named(tmp_path):
    np.savez(tmp_path / "t.npz", target=sinogram())
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    assert "not a valid .npz" in _error(tmp_path / "t.npz", "target")
    np.save(tmp_path / "t.npy", sinogram())
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) - 40])
    assert "truncated" in _error(tmp_path / "t.npy")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    assert "MATLAB" in _error(tmp_path / "junk.mat", "x")
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 100)
    assert "NIfTI" in _error(tmp_path / "junk.nii")


def test_wrong_shape_names_expected_shape(tmp_path):
    np.save(tmp_path / "w.npy", np.ones((9, 13), np.float32))
    assert "(9, 14)" in _error(tmp_path / "w.npy")
    np.save(tmp_path / "t.npy", sinogram().T)
    assert "transposed" in _error(tmp_path / "t.npy")
    save_nifti(tmp_path / "big.nii", np.ones((13, 10), np.float32), pixel=GEOM.pixel_size)
    assert "(12, 10)" in _error(tmp_path / "big.nii")
    save_nifti(tmp_path / "px.nii", np.ones(GEOM.image_shape, np.float32), pixel=3.0)
    assert "pixel_size" in _error(tmp_path / "px.nii")
    nib.save(nib.Nifti1Image(np.ones((10, 12, 4), np.float32), np.eye(4)), str(tmp_path / "vol.nii"))
    assert "2-D" in _error(tmp_path / "vol.nii")


def test_missing_variable_lists_variables_present(tmp_path):
    np.savez(tmp_path / "m.npz", low=sinogram(), full=sinogram())
    message = _error(tmp_path / "m.npz", "target")
    assert "'target'" in message and "['full', 'low']" in message
    scipy.io.savemat(tmp_path / "m5.mat", {"low": sinogram()})
    assert "['low']" in _error(tmp_path / "m5.mat", "target")
    save_mat73(tmp_path / "m73.mat", {"low": sinogram(), "full": sinogram()})
    assert "['full', 'low']" in _error(tmp_path / "m73.mat", "target")
    assert "say which one" in _error(tmp_path / "m73.mat", None)


def test_bad_values(tmp_path):
    y = sinogram()
    y[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", y)
    assert "1 NaN" in _error(tmp_path / "nan.npy")
    y = sinogram()
    y[0, :2] = -1.0
    scipy.io.savemat(tmp_path / "neg.mat", {"target": y})
    assert "2 negative" in _error(tmp_path / "neg.mat", "target")
    save_mat73(tmp_path / "neg73.mat", {"target": y})
    assert "allow_negative" in _error(tmp_path / "neg73.mat", "target")
    # Corrected sinograms (like the simulator's) may dip below zero: accepted on request.
    np.testing.assert_array_equal(loaders.load_sinogram(tmp_path / "neg73.mat", GEOM, "target", allow_negative=True), y[None])
    image = np.ones(GEOM.image_shape, np.float32)
    image[0, 0] = np.inf
    save_nifti(tmp_path / "inf.nii", image, pixel=GEOM.pixel_size)
    assert "NaN or inf" in _error(tmp_path / "inf.nii")


class _CreatesFileWhenUnpickled:
    """Unpickling this runs `open(path, "w")`: the file exists afterwards only if something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_object_arrays_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = sinogram(), _CreatesFileWhenUnpickled(marker)
    np.save(tmp_path / "o.npy", obj)  # numpy pickles object arrays when saving; loading must refuse
    np.savez(tmp_path / "o.npz", target=obj)
    # The payload is live: numpy loading it with pickles allowed creates the file.
    np.load(tmp_path / "o.npy", allow_pickle=True)[1].close()
    assert marker.exists()
    marker.unlink()
    assert "pickled" in _error(tmp_path / "o.npy")
    assert "pickled" in _error(tmp_path / "o.npz", "target")
    with pytest.raises(loaders.DataFileError, match="pickled"):  # the physics variables' path
        loaders.read_optional(tmp_path / "o.npz", ["target"])
    assert not marker.exists()


def test_non_numeric_matlab_variables(tmp_path):
    scipy.io.savemat(tmp_path / "s.mat", {"target": {"a": 1.0}, "c": np.array([1 + 2j])})
    assert "struct" in _error(tmp_path / "s.mat", "target")
    assert "complex" in _error(tmp_path / "s.mat", "c")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "x.csv").write_text("1,2")
    assert "unsupported file type" in _error(tmp_path / "x.csv")
