"""Simulate one split of a task and store it as checksummed `.npz` shards (see `sources.write_shards`).

    python -m allpet_jax.data.make --task low_dose --split_size 500 --out data/low_dose/train
    python -m allpet_jax.data.make --task delayed_frame --split_size 100 --split test --seed 3 --size 128 \\
        --n_angles 128 --n_bins 128 --shard_size 32 --out data/delayed/test

Read the result with `ShardSource(out)`, or point `config.data.cache_dir` at the parent of `<split>`
directories. Rerunning an interrupted command finishes it; the shards already written are kept. `--out`
must be new, empty or a directory this command wrote (`allpet_jax.atomic_write.claim_output_dir`): one
holding other files is refused before anything is simulated. A bad flag or input is one line,
`allpet_jax.data.make: error: ...`, and exit status 2 (`allpet_jax.cli`). `--split_size` was `--n` (an
alias until the next release).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from allpet_jax import cli, tasks
from allpet_jax.atomic_write import claim_output_dir
from allpet_jax.data import sources
from radon import Geometry

FLAGS = flags.FLAGS
TOOL = "allpet_jax.data.make"  # the program in error lines and the owner named in --out's owner file
RENAMED = {"n": "split_size"}  # old flag: new name; the old one is an alias until the next release


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """This CLI's flags, in `flag_values`: called from `__main__` only, so importing the module defines none."""
    into = {"flag_values": flag_values}
    flags.DEFINE_enum("task", None, tasks.TASKS, "the task whose pairs to simulate", **into)
    flags.DEFINE_integer("split_size", None, "number of samples in the split", lower_bound=0, **into)
    flags.DEFINE_string("out", None, "output directory: new, empty, or one this command wrote", **into)
    flags.DEFINE_enum("split", "train", sources.SPLITS, "split, which selects disjoint keys", **into)
    flags.DEFINE_integer("seed", 0, "dataset seed", **into)
    flags.DEFINE_integer("size", 256, "image size N (N x N pixels)", lower_bound=1, **into)
    flags.DEFINE_integer("n_angles", None, "projection angles over [0, pi) (default: --size)", lower_bound=1, **into)
    flags.DEFINE_integer("n_bins", None, "detector bins (default: --size)", lower_bound=1, **into)
    flags.DEFINE_float("pixel_size", None, "pixel size in mm (default: 512 mm / size)", **into)
    flags.DEFINE_float("bin_spacing", None, "bin spacing in mm (default: pixel size)", **into)
    flags.DEFINE_integer("shard_size", 64, "samples per shard", lower_bound=1, **into)
    flags.DEFINE_string("options", "{}", "JSON object of extra simulate_pair options", **into)
    flags.DEFINE_bool("no_progress", False, "no progress bar", **into)
    for name in ("task", "split_size", "out"):
        flags.mark_flag_as_required(name, flag_values)
    cli.define_renamed(RENAMED, flag_values)


def main(argv, flag_values: flags.FlagValues = FLAGS) -> dict:
    """Simulate and write the shards the flags in `flag_values` (parsed) describe; returns the manifest."""
    del argv
    try:
        options = json.loads(flag_values.options)
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--options must be a JSON object, e.g. '{{\"region\": \"brain\"}}'; got "
                             f"{flag_values.options!r} ({e})") from None
    if not isinstance(options, dict):
        raise app.UsageError(f"--options must be a JSON object, e.g. '{{\"region\": \"brain\"}}'; got "
                             f"{flag_values.options!r}")
    pixel = flag_values.pixel_size or 512.0 / flag_values.size
    geom = Geometry(
        image_shape=(flag_values.size, flag_values.size),
        n_angles=flag_values.n_angles or flag_values.size,
        n_bins=flag_values.n_bins or flag_values.size,
        pixel_size=pixel,
        bin_spacing=flag_values.bin_spacing or pixel,
    )
    # Each sample is written once, so an in-memory cache would only cost memory.
    source = sources.SimulatedSource(flag_values.task, geom, flag_values.split_size, flag_values.seed,
                                     flag_values.split, cache_bytes=0, **options)
    n_shards = -(-flag_values.split_size // flag_values.shard_size)
    written = [sources.MANIFEST] + [sources._shard_name(flag_values.split, i, n_shards) for i in range(n_shards)]
    claim_output_dir(flag_values.out, TOOL, written)  # an OutputDirectoryError, before anything is simulated
    manifest = sources.write_shards(flag_values.out, source, shard_size=flag_values.shard_size,
                                    progress=not flag_values.no_progress)
    print(f"wrote {manifest['count']} samples in {len(manifest['shards'])} shard(s) to {flag_values.out}",
          file=sys.stderr)
    return manifest


if __name__ == "__main__":
    cli.run(main, TOOL, define_flags, renamed=RENAMED)
