"""Random-access data sources for the Grain pipeline: simulated on the fly, cached shards, users' files.

Every source has `len(source)`, `source[i]` (one sample) and `source.read_batch(indices)` (several samples
stacked along a new leading axis; the pipeline reads one batch per call). A sample is a dict of numpy
arrays:

- `source` `(C_src, n_angles, n_bins)` and `target` `(C_tgt, n_angles, n_bins)` float32 sinograms (counts);
- `index` int64: the sample's index in its split, so later stages (e.g. RMAS masks) can derive per-sample
  randomness from `(seed, index)` alone;
- from the simulator also `target_clean`, `image`, `mu`, `labels`, `prompt`, `dose` and `count_scale`
  (see `simulate.py`; its sinograms are corrected counts, which can dip below zero bin by bin);
- with `physics` (config `data.physics`), the raw data behind the corrected sinograms, `PHYSICS_FIELDS`
  (below): from the simulator always, from users' `.npz`/`.mat` files where they hold these variables.

Physics fields
--------------
The scanner model is `y ~ Poisson(eta * (a * t + s + r))` per bin (`simulate.py`); these fields hold its
terms in counts, never normalised by the pipeline:

- `prompts` `(C_src, n_angles, n_bins)`: the raw prompts `y` of the source acquisition (for `low_dose` the
  low-dose acquisition: its mean is `eta * (a * dose * t + s + r)`, `t` the full-dose trues);
- `normalisation` (`eta`) and `attenuation` (`a = exp(-R mu)`) `(n_angles, n_bins)`, shared by both
  acquisitions;
- `scatter`, `randoms` `(C_src, n_angles, n_bins)`: the expected `s` and `r` of the source acquisition;
- `target_prompts`, `target_scatter`, `target_randoms` `(C_tgt, n_angles, n_bins)`: the same for the
  target (full-dose) acquisition;
- `dose` `()` (not in `PHYSICS_FIELDS`: the simulator always returns it): the source's dose fraction.

Seeds and splits
----------------
Sample `i` of split `s` drawn with seed `S` uses the key

    fold_in(fold_in(jax.random.key(S), SPLITS.index(s)), i)          # SPLITS = ('train', 'val', 'test')

so it is a pure function of `(S, s, i)`: any sample can be regenerated alone, in any order and in any
batch. The three splits branch off the seed's key with different `fold_in` data, so they can never share a
key (unlike seed offsets such as `S + 1000`, which would collide with the run that uses seed `S + 1000`).

Shards
------
`write_shards` stores a source as `.npz` shards plus `manifest.json` (task, split, seed, geometry,
simulation options, per-field shapes and dtypes, and each shard's index range and sha256). Every file
is written to a temporary name and renamed into place, and the manifest is marked `"complete": true`
only after the last shard, so an interrupted run never leaves a shard or manifest that looks complete;
rerunning it with the same settings keeps the shards already written. The shard bytes are deterministic
(fixed zip timestamps), so several processes writing the same cache produce identical files.
`ShardSource` reads them back and verifies the manifest and every checksum when it opens.

What this module is not: file parsing lives in `loaders.py`, batching/shuffling in `pipeline.py`.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import threading
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np

from allpet_jax.atomic_write import atomic_path, write_text
from allpet_jax.data import loaders
from radon import Geometry

SPLITS = ("train", "val", "test")
PHYSICS_FIELDS = ("prompts", "normalisation", "attenuation", "scatter", "randoms", "target_prompts", "target_scatter",
                  "target_randoms")
"""Raw-data fields of a sample with `physics` on (see "Physics fields" above); also the variable names
read from users' `.npz`/`.mat` files."""
_FACTOR_FIELDS = ("normalisation", "attenuation")  # (n_angles, n_bins); the other fields (C, n_angles, n_bins)
_SIMULATOR_NAMES = {"prompts": "source_prompts", "normalisation": "normalisation", "attenuation": "attenuation",
                    "scatter": "source_scatter", "randoms": "source_randoms", "target_prompts": "target_prompts",
                    "target_scatter": "target_scatter", "target_randoms": "target_randoms"}

MANIFEST = "manifest.json"
SHARD_FORMAT = "allpet-jax-shards"
SHARD_VERSION = 1


def sample_key(seed: int, split: str, index):
    """The `jax.random` key of sample `index` (int or int array) of `split` under `seed` (see module doc)."""
    import jax

    key = jax.random.fold_in(jax.random.key(seed), _split_id(split))
    if np.ndim(index) == 0:
        return jax.random.fold_in(key, index)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(np.asarray(index, dtype=np.uint32))


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    return SPLITS.index(split)


class _Source:
    """Shared `__getitem__` / bounds checking on top of a subclass's `read_batch`."""

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        batch = self.read_batch([index])
        return {k: v[0] for k, v in batch.items()}

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._length):
            raise IndexError(f"{type(self).__name__} index out of range [0, {self._length}): {idx.tolist()}")
        return idx


# --- simulated on the fly -------------------------------------------------------------------------------


class SimulatedSource(_Source):
    """`n` samples of `task` simulated on demand by `simulate_pair`; sample `i` depends only on `(seed, split, i)`.

    Each sample is one call of a jitted `simulate_pair` that takes the split key and `i` (the key is
    folded inside the compiled function, so a call is one dispatch). One call per sample, rather than one
    `vmap`ped call per batch, because it is faster for the real simulator: at 128 x 128 / 128 angles on
    a 2-core CPU, 107 samples/s per call against 36 with `vmap` and 39 with `lax.map` over 8 keys, and
    it compiles in a third of the time (see `benchmarks/pipeline_bench.py`). The jitted function is
    shared by every source with the same (simulator, task, geometry, options), and a sample is
    bit-for-bit the same whichever batch asks for it. Samples are kept in an in-memory cache of at most
    `cache_bytes` (the 500-sample low-shot splits fit), so after the first epoch a sample costs a copy.
    Simulation runs on `device` (default the CPU, so it never takes accelerator memory from training).

    Args:
      task: a task name from `allpet_jax.tasks.TASKS`.
      geom: the sinogram/image geometry.
      n: number of samples in the split.
      seed: dataset seed.
      split: 'train', 'val' or 'test'.
      fields: keys to keep (default: all that `simulate_pair` returns); `index` is always added.
      cache_bytes: in-memory cache budget; 0 simulates every access afresh.
      device: a `jax.Device`, or a platform name ('cpu', 'gpu', ...); None keeps JAX's default device.
      simulate: the simulator, default `allpet_jax.data.simulate.simulate_pair` (an argument for tests).
      physics: also return `PHYSICS_FIELDS` (simulated with `diagnostics=True`, which the options and so
        the shard manifest record; the other diagnostics are left out). Off, nothing extra is computed.
      **options: passed to `simulate_pair`; must be JSON-serialisable so shards can record them.
    """

    def __init__(
        self,
        task: str,
        geom: Geometry,
        n: int,
        seed: int = 0,
        split: str = "train",
        *,
        fields: Sequence[str] | None = None,
        cache_bytes: int = 2 << 30,
        device="cpu",
        simulate: Callable | None = None,
        physics: bool = False,
        **options,
    ):
        import jax

        if simulate is None:
            from allpet_jax.data.simulate import simulate_pair as simulate
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative number of samples; got {n!r}")
        _split_id(split)
        self.task, self.geom, self.seed, self.split = task, geom, int(seed), split
        self.physics = bool(physics)
        self.options = dict(options, diagnostics=True) if self.physics else dict(options)
        self.fields = None if fields is None else tuple(fields)
        self._length = int(n)
        self._device = jax.devices(device)[0] if isinstance(device, str) else device
        self._simulate = _jitted_simulator(simulate, task, geom, self.options)
        with jax.default_device(self._device) if self._device is not None else _nullcontext():
            self._split_key = jax.random.fold_in(jax.random.key(self.seed), _split_id(split))
        self._cache = _LRUCache(cache_bytes)

    def read_batch(self, indices) -> dict:
        idx = self._check_indices(indices)
        samples = {}
        for i in dict.fromkeys(idx.tolist()):  # unique, in order
            sample = self._cache.get(i)
            if sample is None:
                sample = self._simulate_one(i)
                self._cache.put(i, sample)
            samples[i] = sample
        batch = {k: np.stack([samples[i][k] for i in idx.tolist()]) for k in (samples[int(idx[0])] if idx.size else ())}
        batch["index"] = idx
        return batch

    def _simulate_one(self, i: int) -> dict:
        import jax

        with jax.default_device(self._device) if self._device is not None else _nullcontext():
            out = jax.device_get(self._simulate(self._split_key, np.uint32(i)))
        if self.physics:
            from allpet_jax.data.simulate import DIAGNOSTICS

            out = {k: v for k, v in out.items() if k not in DIAGNOSTICS} | {
                name: out[key] for name, key in _SIMULATOR_NAMES.items()}
        keep = out.keys() if self.fields is None else self.fields
        return {k: np.asarray(out[k]) for k in keep}

    def manifest_header(self) -> dict:
        """What identifies this dataset in a shard manifest."""
        return _header(self.task, self.split, self.seed, self._length, self.geom, self.options)


_SIMULATORS: dict = {}
_SIMULATORS_LOCK = threading.Lock()


def _jitted_simulator(simulate, task, geom, options: dict):
    """`(split_key, i) -> simulate(fold_in(split_key, i), ...)`, jitted once per configuration and shared."""
    import jax

    key = (simulate, task, geom, json.dumps(options, sort_keys=True, default=repr))
    with _SIMULATORS_LOCK:
        if key not in _SIMULATORS:
            _SIMULATORS[key] = jax.jit(lambda split_key, i: simulate(jax.random.fold_in(split_key, i), task, geom, **options))
        return _SIMULATORS[key]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- shards -------------------------------------------------------------------------------------------


def _header(task, split, seed, count, geom, options) -> dict:
    try:
        options = json.loads(json.dumps(options, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"simulation options must be JSON-serialisable to be stored in shards: {e}") from e
    return {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "task": task,
        "split": split,
        "seed": int(seed),
        "count": int(count),
        "geometry": geom.to_dict(),
        "options": options,
    }


def _shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.npz"


def write_shards(directory, source, *, shard_size: int = 64, header: dict | None = None, progress: bool = True) -> dict:
    """Write every sample of `source` to `.npz` shards of `shard_size` samples in `directory`; returns the manifest.

    `header` (default `source.manifest_header()`) identifies the dataset. Shards of an interrupted earlier
    run with the same header and shard size are kept if their checksums match; a directory that already
    holds a different dataset is an error rather than being overwritten.
    """
    from tqdm.auto import tqdm

    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of samples; got {shard_size}")
    header = dict(source.manifest_header() if header is None else header)
    header["shard_size"] = int(shard_size)
    os.makedirs(directory, exist_ok=True)
    count = len(source)
    n_shards = -(-count // shard_size)
    done, done_fields = _resumable_shards(directory, header)
    manifest = dict(header, complete=False, fields={}, shards=[])
    with tqdm(total=count, desc=f"shards {header['task']}/{header['split']}", unit="sample", disable=not progress) as bar:
        for s in range(n_shards):
            start, stop = s * shard_size, min(count, (s + 1) * shard_size)
            name = _shard_name(header["split"], s, n_shards)
            path = os.path.join(directory, name)
            entry = done.get(name)
            if entry is None or entry["start"] != start or entry["count"] != stop - start or _sha256(path) != entry["sha256"]:
                batch = source.read_batch(np.arange(start, stop))
                _write_npz_atomic(path, batch)
                entry = {"file": name, "start": start, "count": stop - start, "sha256": _sha256(path)}
                manifest["fields"] = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in batch.items()}
            elif not manifest["fields"]:
                manifest["fields"] = done_fields
            manifest["shards"].append(entry)
            _write_json_atomic(os.path.join(directory, MANIFEST), manifest)
            bar.update(stop - start)
    manifest["complete"] = True
    _write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    return manifest


def _resumable_shards(directory, header) -> tuple[dict, dict]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return {}, {}
    old = read_manifest_file(path)
    old_header = {k: old.get(k) for k in header}
    if old_header != header:
        diff = [k for k in header if old_header[k] != header[k]]
        raise ValueError(
            f"{directory} already holds a different dataset ({', '.join(diff)} differ: {[old_header[k] for k in diff]} "
            f"there, {[header[k] for k in diff]} requested); choose another directory or delete it"
        )
    return {e["file"]: e for e in old.get("shards", [])}, old.get("fields", {})


def _write_npz_atomic(path, arrays: dict) -> None:
    """An uncompressed `.npz` (readable by `numpy.load`) with fixed timestamps, written then renamed."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(arrays[name]), allow_pickle=False)


def _write_json_atomic(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _sha256(path) -> str | None:
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest_file(path) -> dict:
    """The JSON of a shard manifest file, complete or not (`read_manifest` checks it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise loaders.DataFileError(path, f"cannot read the shard manifest ({e})") from e


def read_manifest(directory, *, verify: bool = True) -> dict:
    """The manifest of a complete shard directory; with `verify`, every shard's sha256 is checked too."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise loaders.DataFileError(
            directory, f"no {MANIFEST}: not a shard directory (write one with `python -m allpet_jax.data.make`)"
        )
    manifest = read_manifest_file(path)
    if manifest.get("format") != SHARD_FORMAT or manifest.get("version") != SHARD_VERSION:
        raise loaders.DataFileError(
            path, f"not a {SHARD_FORMAT} v{SHARD_VERSION} manifest (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r})"
        )
    if not manifest.get("complete"):
        raise loaders.DataFileError(
            path, "the shards are incomplete (the run that wrote them was interrupted); rerun the same "
            "`python -m allpet_jax.data.make` command to finish them"
        )
    shards = manifest["shards"]
    expected_start = 0
    for entry in shards:
        if entry["start"] != expected_start:
            raise loaders.DataFileError(path, f"shard {entry['file']} starts at {entry['start']}, expected {expected_start}")
        expected_start += entry["count"]
    if expected_start != manifest["count"]:
        raise loaders.DataFileError(path, f"shards hold {expected_start} samples but the manifest says {manifest['count']}")
    if verify:
        for entry in shards:
            shard = loaders.file_inside(directory, entry["file"], path)
            digest = _sha256(shard)
            if digest is None:
                raise loaders.DataFileError(shard, "shard listed in the manifest is missing")
            if digest != entry["sha256"]:
                raise loaders.DataFileError(
                    shard, f"sha256 {digest} does not match the manifest ({entry['sha256']}): the file is "
                    "corrupt or was replaced; delete the directory and make the shards again"
                )
    return manifest


class ShardSource(_Source):
    """Samples stored by `write_shards` (or `python -m allpet_jax.data.make`) in `directory`.

    Opening reads the manifest and (with `verify`) checks every shard's sha256. Shards are loaded whole
    on first use and kept in a least-recently-used cache of at most `cache_bytes`; with the default the
    paper-scale 500-sample splits stay in memory, so random access costs a dict lookup after one pass.

    Attributes: `manifest`, `task`, `split`, `seed`, `geom`, `options` (the simulation options).
    """

    def __init__(self, directory, *, fields: Sequence[str] | None = None, verify: bool = True, cache_bytes: int = 4 << 30):
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(self.directory, verify=verify)
        self.task, self.split, self.seed = self.manifest["task"], self.manifest["split"], self.manifest["seed"]
        self.geom = Geometry.from_dict(self.manifest["geometry"])
        self.options = self.manifest["options"]
        missing = [] if fields is None else [f for f in fields if f not in self.manifest["fields"]]
        if missing:
            raise ValueError(f"{self.directory}: shards have no field(s) {missing}; fields present: {sorted(self.manifest['fields'])}")
        self.fields = tuple(self.manifest["fields"]) if fields is None else tuple(fields)
        self._length = int(self.manifest["count"])
        self._starts = np.array([e["start"] for e in self.manifest["shards"]], dtype=np.int64)
        self._cache = _LRUCache(cache_bytes)

    def manifest_header(self) -> dict:
        return {k: self.manifest[k] for k in ("format", "version", "task", "split", "seed", "count", "geometry", "options")}

    def read_batch(self, indices) -> dict:
        idx = self._check_indices(indices)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        parts = {f: [None] * idx.size for f in self.fields}
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            arrays = self._shard(int(s))
            local = idx[where] - self._starts[s]
            for f in self.fields:
                for w, row in zip(where, arrays[f][local]):
                    parts[f][w] = row
        batch = {f: np.stack(rows) if rows else np.zeros((0, *self.manifest["fields"][f]["shape"])) for f, rows in parts.items()}
        batch["index"] = idx
        return batch

    def _shard(self, s: int) -> dict:
        return self._cache.get_or_load(s, lambda: self._load_shard(s))

    def _load_shard(self, s: int) -> dict:
        entry = self.manifest["shards"][s]
        path = loaders.file_inside(self.directory, entry["file"], os.path.join(self.directory, MANIFEST))
        with loaders.open_npz(path) as z:
            arrays = {}
            for f in self.fields:
                spec = self.manifest["fields"][f]
                try:
                    value = z[f]
                except Exception as e:
                    raise loaders.DataFileError(path, f"field {f!r} cannot be read ({type(e).__name__}: {e})") from e
                if value.shape != (entry["count"], *spec["shape"]) or str(value.dtype) != spec["dtype"]:
                    raise loaders.DataFileError(
                        path, f"field {f!r} has shape {value.shape} {value.dtype}, the manifest says "
                        f"{(entry['count'], *spec['shape'])} {spec['dtype']}"
                    )
                arrays[f] = value
        return arrays


class _LRUCache:
    """Thread-safe least-recently-used cache bounded by the bytes of its numpy values; loads each key once."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict = {}

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value: dict) -> None:
        size = sum(np.asarray(v).nbytes for v in value.values())
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= sum(np.asarray(v).nbytes for v in old.values())

    def get_or_load(self, key, load: Callable[[], dict]):
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                event = self._loading.get(key)
                if event is None:
                    event = self._loading[key] = threading.Event()
                    break
            event.wait()  # another thread is loading this key
        try:
            value = load()
            size = sum(np.asarray(v).nbytes for v in value.values())
            with self._lock:
                self._items[key] = value
                self._bytes += size
                self._evict()
            return value
        finally:
            with self._lock:
                del self._loading[key]
            event.set()


# --- users' files -------------------------------------------------------------------------------------


def list_files(path, file_format: str = "auto") -> list[str]:
    """Sorted data files named by `path`: a directory, a glob pattern, one file, or a list of these.

    `file_format` ('auto', 'npy', 'npz', 'mat' or 'nifti') keeps only files of that format in listings.
    """
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in list_files(p, file_format)]
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(os.path.join(path, n) for n in os.listdir(path))
    elif any(c in path for c in "*?["):
        names = sorted(glob.glob(path))
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such data file or directory")
        return [path]
    return [n for n in names if os.path.isfile(n) and _has_format(n, file_format)]


def _has_format(name: str, file_format: str) -> bool:
    try:
        fmt = loaders.file_format(name)
    except loaders.DataFileError:
        return False
    return file_format == "auto" or fmt == file_format


class FileSource(_Source):
    """Paired (or target-only) sinograms from users' files; sample `i` comes from the `i`-th file.

    The target of sample `i` is variable `target_variable` of `target_files[i]`; the source is variable
    `source_variable` of `source_files[i]` (default: the same file as the target, for `.npz`/`.mat` files
    that hold both). `source_variable=None` gives target-only samples (for synthesis). `.npy` and NIfTI
    files hold one array each, so their variable names are ignored and paired data need `source_files`.
    NIfTI images are forward-projected with `geom` (see `loaders.load_sinogram`). Every array is checked
    against `geom` when it is read; a bad file raises `loaders.DataFileError` naming it.

    With `physics`, the variables of `PHYSICS_FIELDS` (and `dose`) that the file holding the source (the
    target file for target-only data) stores are read too (`read_physics`); absent ones are left out,
    but every file of the source must hold the same ones.

    Args:
      target_files: files, a directory or a glob (see `list_files`).
      geom: the configured geometry.
      source_files: optional separate files for the sources, in the same order.
      prompt: optional `[tracer_id, region_id, task_id]` attached to every sample as int32 `prompt`.
      allow_negative: accept negative values (corrected sinograms; see `loaders`).
      cache_bytes: read samples are kept in memory up to this budget.
      physics: also read the optional physics variables (config `data.physics`).
    """

    def __init__(
        self,
        target_files,
        geom: Geometry,
        *,
        source_files=None,
        target_variable: str | None = "target",
        source_variable: str | None = "source",
        file_format: str = "auto",
        prompt: Sequence[int] | None = None,
        allow_negative: bool = False,
        cache_bytes: int = 2 << 30,
        physics: bool = False,
    ):
        self.geom = geom
        self.allow_negative = bool(allow_negative)
        self.physics = bool(physics)
        self.target_files = list_files(target_files, file_format)
        if source_variable is None:
            self.source_files = None
        elif source_files is None:
            single = [f for f in self.target_files if loaders.file_format(f) in ("npy", "nifti")]
            if single:
                raise ValueError(
                    f"{single[0]}: .npy and NIfTI files hold one array, so paired data need separate source files "
                    "(data.source_path), or set source_variable=None for target-only data"
                )
            self.source_files = self.target_files
        else:
            self.source_files = list_files(source_files, file_format)
            if len(self.source_files) != len(self.target_files):
                raise ValueError(
                    f"{len(self.source_files)} source files but {len(self.target_files)} target files; they pair up in "
                    "sorted order, so both lists must have the same length"
                )
        if not self.target_files:
            raise ValueError(f"no data files found in {target_files!r} (format {file_format!r})")
        self.target_variable, self.source_variable = target_variable, source_variable
        self.prompt = None if prompt is None else np.asarray(prompt, dtype=np.int32)
        self._length = len(self.target_files)
        self._cache = _LRUCache(cache_bytes)

    def read_batch(self, indices) -> dict:
        idx = self._check_indices(indices)
        samples = [self._cache.get_or_load(int(i), lambda i=int(i): self._read(i)) for i in idx]
        for i, sample in zip(idx, samples):
            if sample.keys() != samples[0].keys():
                held = lambda s: sorted(set(PHYSICS_FIELDS) & s.keys())
                raise loaders.DataFileError(
                    self._physics_file(int(i)), f"holds the physics variables {held(sample)} but "
                    f"{self._physics_file(int(idx[0]))} holds {held(samples[0])}; every file must hold the same ones")
        batch = {k: np.stack([s[k] for s in samples]) for k in (samples[0] if samples else ())}
        batch["index"] = idx
        return batch

    def _read(self, i: int) -> dict:
        read = lambda path, variable: loaders.load_sinogram(path, self.geom, variable, allow_negative=self.allow_negative)
        sample = {"target": read(self.target_files[i], self.target_variable)}
        if self.source_files is not None:
            sample["source"] = read(self.source_files[i], self.source_variable)
        if self.prompt is not None:
            sample["prompt"] = self.prompt
        if self.physics:
            source_channels = sample["source"].shape[0] if "source" in sample else None
            sample.update(read_physics(self._physics_file(i), self.geom, source_channels, sample["target"].shape[0]))
        return sample

    def _physics_file(self, i: int) -> str:
        return (self.source_files or self.target_files)[i]


def read_physics(path, geom: Geometry, source_channels: int | None, target_channels: int | None = None,
                 n: int | None = None) -> dict:
    """The `PHYSICS_FIELDS` and `dose` that the `.npz`/`.mat` file `path` holds, checked against `geom`.

    Shapes as in "Physics fields" above; source-side sinograms must have `source_channels` channels and
    `target_*` ones `target_channels` (None: not checked). With `n`, the file holds a stack of `n` samples
    and every variable has a leading axis of `n` (`dose`: `(n,)` or one number for all). Absent variables
    are left out; a wrong one raises `loaders.DataFileError` naming the file, the variable and the fix.
    """
    out = {}
    for name, x in loaders.read_optional(path, PHYSICS_FIELDS + ("dose",)).items():
        if name == "dose":
            out[name] = _checked_dose(x, path, n)
            continue
        x = np.asarray(x)
        if n is not None and (x.ndim < 3 or x.shape[0] != n):
            raise loaders.DataFileError(
                path, f"variable {name!r} has shape {x.shape}; the file holds a stack of {n} source sinograms, so "
                f"each physics variable needs the same leading axis of {n}")
        rows = [_checked_physics(name, row, geom, path, source_channels, target_channels)
                for row in ([x] if n is None else x)]
        out[name] = rows[0] if n is None else np.stack(rows)
    return out


def _checked_physics(name, x, geom, path, source_channels, target_channels):
    what = f"variable {name!r}"
    if name in _FACTOR_FIELDS:
        return loaders.check_factor(x, geom, path, what, upper=1.0 if name == "attenuation" else None)
    try:
        x = loaders.check_sinogram(x, geom, path, what)
    except loaders.NegativeValuesError as e:  # no option makes these acceptable: say what they must be
        raise loaders.DataFileError(path, f"{e.found}; {name} are raw prompts or expected backgrounds, which are "
                                          "never negative: store them before any correction") from None
    side, channels = ("target", target_channels) if name.startswith("target_") else ("source", source_channels)
    if channels is not None and x.shape[0] != channels:
        raise loaders.DataFileError(path, f"{what} has {x.shape[0]} channel(s) but the {side} sinogram has {channels}; "
                                          f"store {name} of the {side} acquisition, (n_angles, n_bins) per channel")
    return x


def _checked_dose(x, path, n):
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size not in ((1,) if n is None else (1, n)) or not np.all(np.isfinite(x) & (x > 0) & (x <= 1)):
        count = "one number" if n is None else f"one number or {n} (one per sinogram)"
        shown = f"{x.tolist()[:4]}{'...' if x.size > 4 else ''}"
        raise loaders.DataFileError(path, f"variable 'dose' is {shown}; it must be {count} in (0, 1], the fraction of "
                                          "the full dose")
    return np.float32(x[0]) if n is None else np.broadcast_to(x, (n,)).astype(np.float32)


def take(source, indices: Iterable[int]):
    """A view of `source` restricted to `indices` (e.g. a train/val/test block of one file list)."""
    return _Subset(source, np.asarray(list(indices), dtype=np.int64))


class _Subset(_Source):
    def __init__(self, parent, indices: np.ndarray):
        self.parent, self.indices = parent, indices
        self.geom = getattr(parent, "geom", None)
        self._length = len(indices)

    def read_batch(self, indices) -> dict:
        idx = self._check_indices(indices)
        batch = self.parent.read_batch(self.indices[idx])
        batch["index"] = idx
        return batch
