"""Writing outputs so that a crash or an error never leaves a half-written file, and a tool never
deletes or overwrites what it did not write.

- Files: `atomic_path` / `write_text` write a temporary file beside the target, flush it to disk and
  rename it over the target (`os.replace` is atomic within a file system). A reader sees the old file or
  the whole new one; a failed write leaves the old file (or none) and no temporary behind.
- Output directories: each CLI that writes a directory (`sample.py`, `allpet_jax.evaluate`,
  `allpet_jax.data.make`, `allpet_jax.experiments`) leaves in it an owner file, `OWNER_FILE`, naming the
  tool and the entries it writes there. A tool writes into (or replaces) only a directory that is absent,
  empty, or marked by the same tool and holding nothing its owner file does not list; anything else is
  refused with one line naming the directory and the foreign entries (`OutputDirectoryError`), before any
  work and with nothing touched. `claim_output_dir` is for tools that add to a directory in place
  (evaluation results, shards, experiment runs); `replacing_dir` for a directory written as one
  (`sampling.write_outputs`): it is written beside the target and swapped in, so that the old or the new
  directory exists at every moment.

Not here: what goes into the files (each tool's own module).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading

OWNER_FILE = ".allpet_outputs.json"
"""The owner file of an output directory: `{"tool": ..., "entries": [...]}`, the tool that wrote the
directory and the names (files or folders, top level) it writes there."""

_TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp-\d+-\d+(\.\w+)?$")  # `atomic_path`'s temporaries


class OutputDirectoryError(FileExistsError, ValueError):
    """An output directory a tool may not write into: it holds files the tool did not write, or it exists
    and replacing it was not asked for. Raised before anything is written."""


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


# --- output directories ---------------------------------------------------------------------------------


def _owner(path: str) -> dict | None:
    """The owner file of directory `path` as `{"tool", "entries"}`, or None when it has none (or an
    unreadable one, which then counts as a foreign file)."""
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(owner, dict) and isinstance(owner.get("tool"), str) and isinstance(owner.get("entries"), list)):
        return None
    return owner


def _write_owner(path: str, tool: str, entries) -> None:
    write_text(os.path.join(path, OWNER_FILE), json.dumps(
        {"tool": tool, "entries": sorted(set(entries) - {OWNER_FILE}),
         "about": f"{tool} wrote this directory; it replaces or adds to it only while it holds nothing else"},
        indent=1) + "\n")


def foreign_entries(path: str, tool: str) -> list[str]:
    """The entries of directory `path` that `tool` did not write: all of them when its owner file is
    missing, unreadable or another tool's; otherwise those the owner file does not list (the temporaries an
    interrupted `atomic_path` left of listed entries count as listed). [] for an absent or empty directory."""
    if not os.path.isdir(path):
        return []
    names = sorted(os.listdir(path))
    owner = _owner(path)
    if owner is None or owner["tool"] != tool:
        return names
    listed = set(owner["entries"]) | {OWNER_FILE}
    leftover = lambda name: (m := _TEMPORARY.match(name)) is not None and m["name"] in listed
    return [name for name in names if name not in listed and not leftover(name)]


def check_output_dir(path: str, tool: str, *, replace: bool = True) -> str:
    """`path` made absolute, once it is known that `tool` may write there: it is absent, an empty
    directory, or a directory `tool` wrote that holds nothing else (`foreign_entries`). Otherwise one
    `OutputDirectoryError` line names the directory and what is in the way. With `replace=False` (a tool
    that replaces its directory only when asked, like `sample.py` without `--overwrite`) a non-empty
    directory is refused too. Reads only; call it before the work, so a refusal costs nothing."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputDirectoryError(f"{path} is a file, not a directory; choose another output directory")
    foreign = foreign_entries(path, tool)
    if foreign:
        owner = _owner(path)
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        whose = f"was written by {owner['tool']}, not {tool}" if owner and owner["tool"] != tool else \
            f"holds files {tool} did not write"
        raise OutputDirectoryError(f"{path} {whose} ({shown}); {tool} writes only into a new or empty directory or one "
                                   "it wrote itself: choose another output directory, or move those files away")
    if not replace and os.path.isdir(path) and os.listdir(path):
        raise OutputDirectoryError(f"{path} exists; choose another --out or pass --overwrite")
    return path


def claim_output_dir(path: str, tool: str, entries) -> str:
    """Make `path` the output directory of `tool`, which will write `entries` (top-level names) in it in
    place: refused as `check_output_dir` says, else created if needed and its owner file updated to list
    `entries` too. Call it before the work: an unwritable directory also fails now. Returns `path`
    made absolute."""
    path = check_output_dir(path, tool)
    os.makedirs(path, exist_ok=True)
    owner = _owner(path)
    _write_owner(path, tool, set(entries) | set(owner["entries"] if owner else ()))
    return path


@contextlib.contextmanager
def replacing_dir(path: str, tool: str, *, replace: bool = False):
    """A new temporary directory beside `path` to write into. When the block ends without error, an owner
    file listing what it holds is added and it takes the place of `path`: the old directory is renamed
    aside, the new one renamed in, then the old one deleted. At every moment the old or the new directory
    exists whole (a crash between the renames leaves them as `<path>.old-*` and `<path>.tmp-*`), and an
    error puts the old one back. `path` is checked (`check_output_dir`) on entry and again before the
    swap, as files may have arrived meanwhile; an error in the block removes the temporary directory."""
    path = check_output_dir(path, tool, replace=replace)
    if os.path.islink(path):
        raise OutputDirectoryError(f"{path} is a symbolic link; give the directory it points to")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    try:
        yield new
        _write_owner(new, tool, os.listdir(new))
        check_output_dir(path, tool, replace=replace)
        if not os.path.isdir(path):
            os.rename(new, path)
            return
        old = tempfile.mkdtemp(prefix=name + ".old-", dir=parent)
        os.rmdir(old)  # only a unique name was needed: the old directory moves there
        os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
