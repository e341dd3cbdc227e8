"""Inference-only weights: a trained stage's EMA parameters, config and normalisation in one small `.npz`,
without optimiser state, so synthesis and `low_dose` run on a fresh clone without training.

    python -m allpet_jax.export --checkpoint RUN/foundation --name workstation_foundation   # -> weights/<name>.npz
    python sample.py --pretrained workstation_foundation --task synthesis
    python -m allpet_jax.evaluate --pretrained workstation_low_dose --task low_dose

The file holds `config` and `meta` (JSON strings), `step`, and one array per parameter leaf under `ema/` and
`frozen/` (the frozen autoencoder of a diffusion stage), named by its path in the parameter tree. Float32
leaves are stored as float16 (`--dtype float32` keeps them): half the size, and sampling with them moves a
sinogram by far less than the model's own sampling noise (tests/test_export.py). It is read with
`allow_pickle=False`; a leaf missing, extra, or of another shape is an error naming it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from allpet_jax import cli
from allpet_jax.training import runs
from allpet_jax.training import step as train_step

TOOL = "allpet_jax.export"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
FORMAT = "allpet-weights-1"


def _leaves(tree, prefix: str) -> dict:
    """`{prefix/path/to/leaf: array}` of a parameter tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out["/".join([prefix, *parts])] = np.asarray(leaf)
    return out


def export(trained: runs.TrainedStage, path: str, dtype: str = "float16") -> int:
    """Write `trained`'s EMA (and frozen) parameters, config and meta to `path` (atomically); returns its bytes."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32'; got {dtype!r}")
    arrays = {}
    for prefix, tree in (("ema", trained.state.ema), ("frozen", trained.state.frozen)):
        for name, leaf in _leaves(jax.device_get(tree), prefix).items():
            arrays[name] = leaf.astype(dtype) if leaf.dtype == np.float32 else leaf
    meta = dict(trained.meta, exported_from=trained.directory, format=FORMAT)
    arrays.update(config=np.array(trained.config.to_json()), meta=np.array(json.dumps(meta)),
                  step=np.array(trained.step, np.int64))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    return os.path.getsize(path)


def weights_path(name: str) -> str:
    """`name` as a path: an existing `.npz` file as given, else `weights/<name>.npz` of this repository."""
    if name.endswith(".npz") and os.path.exists(name):
        return os.path.abspath(name)
    path = os.path.join(WEIGHTS_DIR, f"{name}.npz")
    if not os.path.exists(path):
        known = sorted(f[:-4] for f in os.listdir(WEIGHTS_DIR) if f.endswith(".npz")) if os.path.isdir(WEIGHTS_DIR) else []
        raise FileNotFoundError(f"no pretrained weights {name!r}: expected {path} or a path to an exported .npz; "
                                f"available: {', '.join(known) or 'none'}")
    return path


def load(name: str) -> runs.TrainedStage:
    """The stage exported as `name` (`weights_path`), ready to generate with its EMA parameters."""
    path = weights_path(name)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    try:
        meta = json.loads(str(arrays.pop("meta")))
        cfg = ml_collections.ConfigDict(json.loads(str(arrays.pop("config"))))
        step = int(arrays.pop("step"))
    except KeyError as e:
        raise ValueError(f"{path} is not an exported weights file (no {e.args[0]!r} entry)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has weights format {meta.get('format')!r}; this version reads {FORMAT!r}")
    stage_obj = runs.build_trained_stage(cfg, meta)
    trees = {}
    for prefix, tree in (("ema", stage_obj.params), ("frozen", stage_obj.frozen)):
        expected = _leaves(tree, prefix)
        missing = [k for k in expected if k not in arrays]
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} parameter(s) of the {meta['stage']} stage, e.g. {missing[0]}")
        for k, leaf in expected.items():
            if arrays[k].shape != leaf.shape:
                raise ValueError(f"{path}: {k} has shape {arrays[k].shape}; the model needs {leaf.shape}")
        flat, treedef = jax.tree_util.tree_flatten(tree)
        trees[prefix] = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(arrays.pop(k), leaf.dtype) for k, leaf in zip(expected, flat)])
    extra = [k for k in arrays if k.startswith(("ema/", "frozen/"))]
    if extra:
        raise ValueError(f"{path} holds {len(extra)} parameter(s) the {meta['stage']} stage does not have, e.g. {extra[0]}")
    state = train_step.TrainState(step=jnp.int32(step), params=trees["ema"], opt_state=None, ema=trees["ema"],
                                  key=jnp.zeros((2,), jnp.uint32), frozen=trees["frozen"])
    return runs.TrainedStage(meta["stage"], cfg, meta, stage_obj, state, step, path)


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    into = {"flag_values": flag_values}
    flags.DEFINE_string("checkpoint", None, "a trained stage directory (WORKDIR/<stage>)", **into)
    flags.DEFINE_string("name", None, "the weights' name: written to weights/<name>.npz unless --out", **into)
    flags.DEFINE_string("out", "", "output .npz path (default weights/<name>.npz)", **into)
    flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "storage type of the float parameters", **into)
    flags.DEFINE_bool("overwrite", False, "replace an existing output file", **into)
    flags.mark_flags_as_required(["checkpoint", "name"], flag_values)


def main(argv, flag_values: flags.FlagValues = FLAGS) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    out = flag_values.out or os.path.join(WEIGHTS_DIR, f"{flag_values.name}.npz")
    if not out.endswith(".npz"):
        raise ValueError(f"--out must be a .npz path; got {out!r}")
    if os.path.exists(out) and not flag_values.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    trained = runs.load_trained(flag_values.checkpoint, best=True)
    size = export(trained, out, flag_values.dtype)
    print(f"wrote {out}: the {trained.name} stage ({trained.meta['task']}), step {trained.step}, {size / 2**20:.1f} MiB",
          flush=True)


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, errors=(ValueError, FileNotFoundError))
