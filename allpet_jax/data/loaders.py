"""Readers for users' own PET files: `.npy`/`.npz`, MATLAB `.mat` (v5 and v7.3) and NIfTI images.

Every reader returns plain numpy arrays and checks them against the configured `radon.Geometry`, so a
wrong file fails here, with its name and what is wrong, rather than deep inside a training step.

Layouts
-------
- Sinograms: `(n_angles, n_bins)` or `(C, n_angles, n_bins)`; returned as float32 `(C, n_angles, n_bins)`.
  Values must be finite and, unless `allow_negative`, >= 0. Raw prompts are never negative, but corrected
  sinograms (randoms/scatter subtracted, like the simulator's, see `simulate.py`) legitimately are in
  places: pass `allow_negative=True` (`config.data.allow_negative`) for those.
  (MATLAB's own `radon` returns `(n_bins, n_angles)`: transpose such arrays before saving them.)
- `.npy`: one array per file. `.npz`/`.mat`: several named variables; pick one with `variable`.
  Files are always opened with `numpy.load(..., allow_pickle=False)`: pickled object arrays are refused.
- Size: every reader reads the array's shape from the file's header (`.npy`/`.npz` header, `whosmat`,
  the HDF5 dataset, the NIfTI header) and refuses an array above `max_bytes` (default `MAX_ARRAY_BYTES`)
  before it allocates anything, so a damaged or hostile header fails with its shape, not a `MemoryError`.
- MATLAB v5 (and v4/v6/v7, all read by `scipy.io.loadmat`) arrays come back exactly as MATLAB shows them.
  MATLAB v7.3 files are HDF5; MATLAB writes its column-major arrays there with the dimensions reversed,
  so an `A x B` MATLAB matrix is an HDF5 dataset of shape `(B, A)`. `read_array` reverses all axes of a
  v7.3 variable (`numpy.transpose`), so both MAT versions give the array in MATLAB's index order.
- NIfTI (`.nii`, `.nii.gz`): one 2-D activity image per file (`(X, Y)`, or `(X, Y, 1)`), reoriented to the
  closest canonical RAS+ orientation and then laid out as the simulator's phantoms are (radiological
  convention, `phantoms.py`): row 0 is the most anterior row (`radon`'s y points up = anterior) and the
  columns run towards the patient's left (`radon`'s +x = -x_RAS), i.e. `image = data[::-1, ::-1].T`.
  The voxel size must equal the geometry's `pixel_size`. `load_sinogram` forward-projects the image with `radon.forward` (noise-free line
  integrals, activity x mm); it does not simulate counts.

What this module is not: it does not resample images, pick slices out of volumes, or simulate data (see
`simulate.py`); sources that index many files live in `sources.py`.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from radon import Geometry, forward

MAX_ARRAY_BYTES = 2 * 1024**3
"""The default largest array a reader loads (bytes as stored). A 2 GiB array holds 8192 float32 sinograms of
256 x 256, far more than one input file of this 2-D model needs, and still fits in a laptop's memory; a
header that claims more is a damaged file or the wrong one. Readers take `max_bytes` to change it."""

SINOGRAM_SUFFIXES = (".npy", ".npz", ".mat")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = SINOGRAM_SUFFIXES + NIFTI_SUFFIXES


class DataFileError(ValueError):
    """A user's data file cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(line.strip() for line in problem.splitlines() if line.strip())  # one line
        super().__init__(f"{self.path}: {self.problem}")


class NegativeValuesError(DataFileError):
    """Negative values where non-negative ones are required; `found` says how many, without a remedy, so a
    caller that knows the user's options (sampling, training) can name them."""

    def __init__(self, path, found: str, problem: str):
        self.found = found
        super().__init__(path, problem)


def file_format(path) -> str:
    """'npy', 'npz', 'mat' or 'nifti' from the file name; DataFileError for anything else."""
    name = os.fspath(path).lower()
    for suffix, fmt in ((".npy", "npy"), (".npz", "npz"), (".mat", "mat"), (".nii", "nifti"), (".nii.gz", "nifti")):
        if name.endswith(suffix):
            return fmt
    raise DataFileError(path, f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def file_inside(directory, name, listed_in) -> str:
    """`directory/name` for a file `name` that a listing (`listed_in`, e.g. a shard manifest) names; a
    `DataFileError` on `listed_in` unless the path, symlinks resolved, stays inside `directory`.

    A listing is data, and data must not reach other files: absolute names, `..` and links that lead out
    of `directory` are refused rather than read.
    """
    if not isinstance(name, str):
        raise DataFileError(listed_in, f"expected a file name inside {os.fspath(directory)}, got {name!r}")
    path = os.path.join(os.fspath(directory), name)
    root = os.path.realpath(directory)
    resolved = os.path.realpath(path)
    if resolved == root or os.path.commonpath([root, resolved]) != root:
        raise DataFileError(listed_in, f"names {name!r}, which is not a file inside the directory {os.fspath(directory)} "
                                       f"(it resolves to {resolved}); a listing may only name files in its own directory")
    return path


def list_variables(path) -> list[str]:
    """Names of the arrays stored in a `.npz` or `.mat` file (MATLAB's internal `#refs#` etc. excluded)."""
    fmt = file_format(path)
    if fmt == "npz":
        with open_npz(path) as z:
            return sorted(z.files)
    if fmt == "mat":
        if _is_hdf5(path):
            with _open_h5(path) as f:
                return sorted(k for k in f.keys() if not k.startswith("#"))
        return sorted(_whosmat(path))
    return []


def read_array(path, variable: str | None = None, *, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """The numeric array stored in `path` (variable `variable` for `.npz`/`.mat`), as numpy.

    `variable=None` picks the only variable of a `.npz`/`.mat` file and is an error if there are several.
    NIfTI files give the image in `radon`'s orientation, `(H, W)` float32 (see the module docstring).
    An array of more than `max_bytes` (as stored) is refused from its header, before it is read.
    """
    fmt = file_format(path)
    if fmt == "npy":
        return _read_npy(path, max_bytes)
    if fmt == "npz":
        return _read_npz(path, variable, max_bytes)
    if fmt == "mat":
        return _read_mat_h5(path, variable, max_bytes) if _is_hdf5(path) else _read_mat_v5(path, variable, max_bytes)
    return read_nifti(path, max_bytes=max_bytes)


def check_sinogram(x, geom: Geometry, path, what: str = "sinogram", allow_negative: bool = False) -> np.ndarray:
    """`x` as float32 `(C, n_angles, n_bins)`: finite, of the geometry's shape, and >= 0 unless `allow_negative`."""
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise DataFileError(path, f"{what} must be a real numeric array; got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[None]
    expected = geom.sino_shape
    if x.ndim != 3 or x.shape[1:] != expected:
        hint = ""
        if x.ndim in (2, 3) and x.shape[-2:] == expected[::-1]:
            hint = " (it looks transposed: MATLAB's radon writes (n_bins, n_angles); save the transpose)"
        raise DataFileError(
            path,
            f"{what} has shape {x.shape}, expected (n_angles, n_bins) = {expected} or (C, {expected[0]}, "
            f"{expected[1]}) for the configured geometry{hint}; fix the file or set data.n_angles/data.n_bins",
        )
    return _check_values(x.astype(np.float32), path, what, "counts", allow_negative)


def check_image(x, geom: Geometry, path, what: str = "image", allow_negative: bool = False) -> np.ndarray:
    """`x` as float32 `(H, W)`: finite activity of the geometry's image shape, >= 0 unless `allow_negative`."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape != geom.image_shape:
        raise DataFileError(
            path,
            f"{what} has shape {x.shape}, expected (H, W) = {geom.image_shape} for the configured geometry; "
            "resample the image or set data.image_size",
        )
    return _check_values(x, path, what, "activity", allow_negative)


def check_factor(x, geom: Geometry, path, what: str, upper: float | None = None) -> np.ndarray:
    """`x` as float32 `(n_angles, n_bins)`: a per-bin factor (normalisation, attenuation), finite, >= 0 and,
    with `upper`, at most `upper`."""
    x = np.asarray(x)
    if x.shape != geom.sino_shape:
        raise DataFileError(
            path, f"{what} has shape {x.shape}, expected (n_angles, n_bins) = {geom.sino_shape} (one factor per "
            "bin, shared by the sinogram's channels)")
    x = _check_values(x.astype(np.float32), path, what, "factors")
    if upper is not None and x.max() > upper * (1 + 1e-6):
        raise DataFileError(path, f"{what} has values up to {float(x.max()):.4g}, above {upper:g}; store the factors "
                                  "themselves (attenuation: a = exp(-R mu) in (0, 1], not R mu or 1 / a)")
    return x


def read_optional(path, names) -> dict:
    """The variables among `names` that a `.npz`/`.mat` file holds, as numpy arrays (absent ones left out;
    `.npy` and NIfTI files hold one array and give `{}`)."""
    if file_format(path) not in ("npz", "mat"):
        return {}
    present = set(list_variables(path))
    return {name: read_array(path, name) for name in names if name in present}


def read_nifti(path, *, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """A 2-D NIfTI image as float32 `(H, W)` in `radon`'s orientation (see the module docstring)."""
    image, _ = _read_nifti_with_spacing(path, max_bytes)
    return image


def load_sinogram(path, geom: Geometry, variable: str | None = None, *, allow_negative: bool = False,
                  max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """The checked sinogram `(C, n_angles, n_bins)` float32 stored in (or projected from) `path`.

    Sinogram files are read and checked against `geom`. A NIfTI image is checked (shape, voxel size,
    values) and forward-projected with `radon.forward` into a `(1, n_angles, n_bins)` sinogram. Arrays
    above `max_bytes` are refused before they are read (`read_array`).
    """
    if file_format(path) != "nifti":
        return check_sinogram(read_array(path, variable, max_bytes=max_bytes), geom, path, _what(variable), allow_negative)
    image, spacing = _read_nifti_with_spacing(path, max_bytes)
    if not np.allclose(spacing, geom.pixel_size, rtol=1e-3):
        raise DataFileError(
            path,
            f"voxel size {tuple(float(s) for s in spacing)} mm differs from the configured pixel_size "
            f"{geom.pixel_size} mm; set data.pixel_size={float(spacing[0])} or resample the image",
        )
    image = check_image(image, geom, path, allow_negative=allow_negative)
    return np.asarray(forward(image[None], geom), dtype=np.float32)


# --- format readers -------------------------------------------------------------------------------------

# Everything numpy, zipfile and zlib raise for a damaged or truncated file.
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError)


def _check_size(path, what: str, shape, dtype, max_bytes: int) -> None:
    """Refuse an array of `shape` and `dtype`, as a file's header gives them, above `max_bytes` as stored."""
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow
    if size > max_bytes:
        raise DataFileError(
            path, f"{what} has shape {shape} {dtype} ({_format_bytes(size)}), above the limit of "
            f"{_format_bytes(max_bytes)} for one array; the header is damaged or this is not the file meant "
            "(store large data as several files)")


def _format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.3g} {unit}"


def _npy_header(fh) -> tuple[tuple, np.dtype]:
    """Shape and dtype from the header of the `.npy` stream `fh`; the data are not read."""
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unknown .npy format version {version}")
    # Version 3.0 is 2.0 with UTF-8 field names, which change neither the shape nor the item size.
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return shape, dtype


def _read_npy(path, max_bytes: int) -> np.ndarray:
    try:
        with open(os.fspath(path), "rb") as f:
            shape, dtype = _npy_header(f)
    except FileNotFoundError:
        raise
    except _READ_ERRORS as e:
        raise DataFileError(path, f"not a valid .npy file or truncated ({type(e).__name__}: {e})") from e
    _check_size(path, "array", shape, dtype, max_bytes)
    try:
        return np.load(os.fspath(path), allow_pickle=False)
    except FileNotFoundError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataFileError(path, _PICKLE_PROBLEM) from e
        raise DataFileError(path, f"not a valid .npy file or truncated ({e})") from e
    except _READ_ERRORS as e:
        raise DataFileError(path, f"not a valid .npy file or truncated ({type(e).__name__}: {e})") from e


_PICKLE_PROBLEM = (
    "holds a pickled Python object array, which is never loaded (allow_pickle=False for safety); "
    "re-save it as a plain numeric array, e.g. np.save(path, np.asarray(x, dtype=np.float32))"
)


def open_npz(path):
    """`numpy.load` of an `.npz` file (no pickles); a corrupt or truncated file raises `DataFileError`."""
    try:
        return np.load(os.fspath(path), allow_pickle=False)
    except FileNotFoundError:
        raise
    except _READ_ERRORS as e:
        raise DataFileError(path, f"not a valid .npz file or truncated ({type(e).__name__}: {e})") from e


def _read_npz(path, variable, max_bytes: int):
    with open_npz(path) as z:
        name = _pick_variable(path, variable, sorted(z.files))
        member = name if name in z.zip.namelist() else f"{name}.npy"  # numpy's own lookup order
        try:
            with z.zip.open(member) as fh:
                shape, dtype = _npy_header(fh)
        except _READ_ERRORS as e:
            raise DataFileError(
                path, f"variable {name!r} cannot be read: truncated or damaged ({type(e).__name__}: {e})"
            ) from e
        _check_size(path, f"variable {name!r}", shape, dtype, max_bytes)
        try:
            return z[name]
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise DataFileError(path, f"variable {name!r} {_PICKLE_PROBLEM}") from e
            raise DataFileError(path, f"variable {name!r} cannot be read: truncated or damaged ({e})") from e
        except _READ_ERRORS as e:
            raise DataFileError(
                path, f"variable {name!r} cannot be read: truncated or damaged ({type(e).__name__}: {e})"
            ) from e


def _pick_variable(path, variable, present: list[str]) -> str:
    if variable is None:
        if len(present) == 1:
            return present[0]
        raise DataFileError(
            path, f"holds {len(present)} variables {present}; say which one to read (data.*_variable)"
        )
    if variable not in present:
        raise DataFileError(path, f"has no variable {variable!r}; variables present: {present}")
    return variable


# Bytes per element of MATLAB's classes; cell arrays, structs and the rest take a pointer per element.
_MATLAB_DTYPES = {"double": np.float64, "single": np.float32, "logical": np.bool_, "char": np.uint16,
                  **{f"{sign}int{bits}": np.dtype(f"{sign}int{bits}") for sign in ("", "u") for bits in (8, 16, 32, 64)}}


def _whosmat(path) -> dict:
    """`{name: (shape, MATLAB class)}` of a MATLAB v4-v7 file, from the variables' headers alone."""
    import scipy.io

    try:
        return {name: (shape, matlab_class) for name, shape, matlab_class in scipy.io.whosmat(os.fspath(path))}
    except Exception as e:  # scipy raises several unrelated types for a damaged file
        raise DataFileError(path, f"not a valid MATLAB .mat file ({type(e).__name__}: {e})") from e


def _read_mat_v5(path, variable, max_bytes: int):
    import scipy.io

    variables = _whosmat(path)
    name = _pick_variable(path, variable, sorted(variables))
    shape, matlab_class = variables[name]
    _check_size(path, f"variable {name!r}", shape, _MATLAB_DTYPES.get(matlab_class, object), max_bytes)
    try:
        value = scipy.io.loadmat(os.fspath(path), variable_names=[name])[name]
    except Exception as e:  # scipy raises several unrelated types for a damaged file
        raise DataFileError(path, f"variable {name!r} cannot be read from the .mat file ({type(e).__name__}: {e})") from e
    if value.dtype.kind not in "biuf":
        raise DataFileError(
            path, f"variable {name!r} is a MATLAB {_matlab_kind(value)}, not a numeric array; save a numeric array"
        )
    return value


def _matlab_kind(value) -> str:
    if value.dtype.kind == "c":
        return "complex array"
    if value.dtype.kind == "O":
        return "cell array"
    if value.dtype.names:
        return "struct"
    return f"array of dtype {value.dtype}"


def _is_hdf5(path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(os.fspath(path)))
    except OSError:
        return False


def _open_h5(path):
    import h5py

    try:
        return h5py.File(os.fspath(path), "r")
    except OSError as e:
        raise DataFileError(path, f"not a valid MATLAB v7.3 (HDF5) .mat file or truncated ({e})") from e


def _read_mat_h5(path, variable, max_bytes: int):
    import h5py

    with _open_h5(path) as f:
        name = _pick_variable(path, variable, sorted(k for k in f.keys() if not k.startswith("#")))
        node = f[name]
        matlab_class = node.attrs.get("MATLAB_class", b"")
        matlab_class = matlab_class.decode() if isinstance(matlab_class, bytes) else str(matlab_class)
        if isinstance(node, h5py.Group) or matlab_class in ("struct", "cell") or node.dtype.kind not in "biuf":
            kind = matlab_class or ("group" if isinstance(node, h5py.Group) else f"dtype {node.dtype}")
            raise DataFileError(path, f"variable {name!r} is a MATLAB {kind}, not a real numeric array")
        if "MATLAB_empty" in node.attrs and node.attrs["MATLAB_empty"]:
            raise DataFileError(path, f"variable {name!r} is an empty MATLAB array")
        _check_size(path, f"variable {name!r}", node.shape[::-1], node.dtype, max_bytes)  # in MATLAB's order
        try:
            value = node[()]
        except _READ_ERRORS as e:
            raise DataFileError(path, f"variable {name!r} cannot be read: truncated or damaged ({e})") from e
    # MATLAB stores column-major arrays in HDF5 with the dimensions reversed; undo it.
    return np.transpose(np.asarray(value))


def _read_nifti_with_spacing(path, max_bytes: int):
    import nibabel as nib

    try:
        img = nib.load(os.fspath(path))  # the header only; the voxels stay on disk
    except FileNotFoundError:
        raise
    except (nib.filebasedimages.ImageFileError, *_READ_ERRORS) as e:
        raise DataFileError(path, f"not a valid NIfTI image or truncated ({type(e).__name__}: {e})") from e
    _check_size(path, "NIfTI image", img.shape, img.get_data_dtype(), max_bytes)
    try:
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = img.header.get_zooms()
    except (nib.filebasedimages.ImageFileError, *_READ_ERRORS) as e:
        raise DataFileError(path, f"not a valid NIfTI image or truncated ({type(e).__name__}: {e})") from e
    extra = data.shape[2:]
    if data.ndim < 2 or any(n != 1 for n in extra):
        raise DataFileError(
            path,
            f"NIfTI image has shape {data.shape}; expected one 2-D slice (X, Y) or (X, Y, 1). "
            "Extract 2-D axial slices first, e.g. nib.load(path).get_fdata()[:, :, k]",
        )
    data = data.reshape(data.shape[:2])
    # RAS+ voxels -> radiological image: row 0 most anterior (largest y), columns towards the patient's left.
    image = np.ascontiguousarray(data[::-1, ::-1].T)
    return image, np.asarray(zooms[:2], dtype=np.float64)


def _check_values(x, path, what, quantity, allow_negative=False):
    finite = np.isfinite(x)
    if not finite.all():
        raise DataFileError(path, f"{what} has {int(x.size - finite.sum())} NaN or inf value(s); {quantity} must be finite")
    if not allow_negative and (x < 0).any():
        found = f"{what} has {int((x < 0).sum())} negative value(s) (minimum {float(x.min()):.4g})"
        raise NegativeValuesError(
            path, found, f"{found}; PET {quantity} must be >= 0. If these are corrected (randoms/scatter-subtracted) "
            "data, set data.allow_negative=True (allow_negative=True)")
    return x


def _what(variable):
    return "sinogram" if variable is None else f"variable {variable!r}"
