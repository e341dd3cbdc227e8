"""Simulate one split of a task and store it as checksummed `.npz` shards (see `sources.write_shards`).

    python -m allpet_jax.data.make --task low_dose --n 500 --out data/low_dose/train
    python -m allpet_jax.data.make --task delayed_frame --n 100 --split test --seed 3 --size 128 \\
        --n_angles 128 --n_bins 128 --shard_size 32 --out data/delayed/test

Read the result with `ShardSource(out)`, or point `config.data.cache_dir` at the parent of `<split>`
directories. Rerunning an interrupted command finishes it; the shards already written are kept. `--out`
must be new, empty or a directory this command wrote (`allpet_jax.atomic_write.claim_output_dir`): one
holding other files is refused before anything is simulated.
"""

from __future__ import annotations

import argparse
import json
import sys

from allpet_jax.atomic_write import OutputDirectoryError, claim_output_dir
from allpet_jax.data import sources
from radon import Geometry

TOOL = "allpet_jax.data.make"  # the owner named in --out's owner file (atomic_write.OWNER_FILE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m allpet_jax.data.make", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="task name, e.g. low_dose (see allpet_jax.tasks.TASKS)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output directory: new, empty, or one this command wrote")
    p.add_argument("--split", default="train", choices=sources.SPLITS, help="split, which selects disjoint keys")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--size", type=int, default=256, help="image size N (N x N pixels)")
    p.add_argument("--n_angles", type=int, default=None, help="projection angles over [0, pi) (default: size)")
    p.add_argument("--n_bins", type=int, default=None, help="detector bins (default: size)")
    p.add_argument("--pixel_size", type=float, default=None, help="pixel size in mm (default: 512 mm / size)")
    p.add_argument("--bin_spacing", type=float, default=None, help="bin spacing in mm (default: pixel size)")
    p.add_argument("--shard_size", type=int, default=64, help="samples per shard")
    p.add_argument("--options", default="{}", help="JSON object of extra simulate_pair options")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard_size must be a positive number of samples; got {args.shard_size}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    pixel = args.pixel_size or 512.0 / args.size
    geom = Geometry(
        image_shape=(args.size, args.size),
        n_angles=args.n_angles or args.size,
        n_bins=args.n_bins or args.size,
        pixel_size=pixel,
        bin_spacing=args.bin_spacing or pixel,
    )
    options = json.loads(args.options)
    if not isinstance(options, dict):
        raise SystemExit(f"--options must be a JSON object; got {args.options!r}")
    # Each sample is written once, so an in-memory cache would only cost memory.
    source = sources.SimulatedSource(args.task, geom, args.n, args.seed, args.split, cache_bytes=0, **options)
    n_shards = -(-args.n // args.shard_size)
    written = [sources.MANIFEST] + [sources._shard_name(args.split, i, n_shards) for i in range(n_shards)]
    try:
        claim_output_dir(args.out, TOOL, written)
    except OutputDirectoryError as e:
        raise SystemExit(f"{TOOL}: error: {e}") from None
    manifest = sources.write_shards(args.out, source, shard_size=args.shard_size, progress=not args.no_progress)
    print(f"wrote {manifest['count']} samples in {len(manifest['shards'])} shard(s) to {args.out}", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
