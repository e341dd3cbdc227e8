"""Writing a file so that a reader sees the old file or the whole new one, never a part of it: write a
temporary file beside it, flush it to disk, rename it over the target (`os.replace` is atomic within a
file system). A crash or an error mid-write leaves the old file (or none) and no temporary behind.

Used for evaluation results, experiment tables, figures and the data pipeline's shard cache. Not here:
a directory of outputs written as one (`sampling.write_outputs` renames a temporary directory).
"""

from __future__ import annotations

import contextlib
import os
import threading


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """A temporary path beside `path` to write to: when the block ends without error it is synced and
    renamed to `path`, otherwise removed. `suffix` keeps an extension the writer reads (e.g. `.png`
    for matplotlib). The name is unique per process and thread, so concurrent writers do not collide."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
