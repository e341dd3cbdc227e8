"""The one convention of the project's command lines (`sample.py`, `allpet_jax.evaluate`,
`allpet_jax.data.make`, `allpet_jax.data.preview`, `allpet_jax.figures.masks_tma`, `allpet_jax.experiments`;
`radon.demo` keeps its own few lines of it, as radon imports nothing from allpet_jax): absl flags, because
`train.py` needs them for its ml_collections `--config`.

- A bad flag, a bad value or a bad input is one line on stderr, `PROG: error: message`, and exit status 2;
  `--help` prints the usage (the module's docstring and its flags) and exits 0. PROG is the script
  (`sample.py`) or the module run with `python -m` (`allpet_jax.data.make`), the name the tool also writes
  in its output directories' owner file.
- A CLI module defines its flags in `define_flags(flag_values)`, called only from its `__main__` block, so
  importing any number of them into one process (a notebook, a test) defines nothing in absl's `FLAGS`.
  `parse` gives a FlagValues of its own to call a CLI's `main` in-process.
- A renamed flag keeps its old name as an alias for one release, with a warning when used.

Not here: what each tool does (its own module); the benchmarks' developer command lines (argparse).
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app, flags

INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
"""What a CLI turns into one `error:` line: a bad value, a missing input, an output it may not write
(`atomic_write.OutputDirectoryError` is a `FileExistsError` and a `ValueError`)."""


def fail(prog: str, message: str) -> NoReturn:
    """`PROG: error: message` on stderr (on one line) and exit status 2, like argparse."""
    print(f"{prog}: error: {' '.join(line.strip() for line in str(message).splitlines() if line.strip())}",
          file=sys.stderr)
    sys.exit(2)


def define_renamed(renamed: dict, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Each `{old: new}` flag name: `--old` kept as an alias of `--new` (defined already), listed beside it
    in `--help`."""
    for old, new in renamed.items():
        flags.DEFINE_alias(old, new, flag_values=flag_values, module_name=flag_values.find_module_defining_flag(new))


def _parse_argv(prog: str, argv: list, renamed: dict) -> list:
    """`FLAGS(argv)` (argv[0] is the program), a bad flag refused with `fail` and a renamed flag's old name
    warned about on stderr. Returns argv[0] and the arguments left after the flags."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:  # unknown flag, a value of the wrong type or out of bounds, a missing required one
        fail(prog, f"{e} (see --help)")
    except SystemExit as e:  # absl's --help/--helpfull print the usage, then exit 1: a request met, not an error
        sys.exit(0 if e.code == 1 else e.code)
    for old, new in (renamed or {}).items():
        if flags.FLAGS[old].present:
            print(f"{prog}: warning: --{old} is deprecated and will be removed in the next release; use --{new}",
                  file=sys.stderr)
    return rest


def parse(define_flags: Callable, argv: list, prog: str = "cli") -> flags.FlagValues:
    """The flags of one command line (`argv` without the program name) in a FlagValues of their own, not
    absl's global `FLAGS`: to call a CLI's `main([], values)` in a notebook or a test. A bad flag raises
    `flags.Error`."""
    values = flags.FlagValues()
    define_flags(values)
    values([prog, *argv])
    return values


def run(main: Callable, prog: str, define_flags: Callable, *, renamed: dict = None,
        errors: tuple = INPUT_ERRORS) -> None:
    """A CLI's `__main__`: define its flags in absl's `FLAGS`, parse them, run `main(argv)`, and turn a bad
    flag, a positional argument, `app.UsageError` or one of `errors` into `fail(prog, ...)`."""
    define_flags(flags.FLAGS)

    def main_or_fail(argv):
        if len(argv) > 1:
            fail(prog, f"unexpected argument(s) {' '.join(argv[1:])}: every input is a --flag (see --help)")
        try:
            main(argv)  # what it returns is for in-process callers: absl would make it the exit status
        except (app.UsageError, *errors) as e:
            fail(prog, str(e))

    app.run(main_or_fail, flags_parser=lambda argv: _parse_argv(prog, argv, renamed))
