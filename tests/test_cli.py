"""One command-line convention (`allpet_jax/cli.py`): absl flags defined only when a CLI runs, so any of them
can be imported together; a bad flag or input is one line `PROG: error: ...` with exit status 2; --help
exits 0; `--n` renamed to what it counts, the old name a warned alias.

The subprocesses stop at their flags or at the first check, before any model or simulation."""

import importlib.util
import os
import subprocess
import sys

import pytest
from absl import flags

from allpet_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (program name in error lines, how it is started)
CLIS = [
    ("sample.py", ["sample.py"]),
    ("allpet_jax.evaluate", ["-m", "allpet_jax.evaluate"]),
    ("allpet_jax.data.make", ["-m", "allpet_jax.data.make"]),
    ("allpet_jax.data.preview", ["-m", "allpet_jax.data.preview"]),
    ("allpet_jax.figures.masks_tma", ["-m", "allpet_jax.figures.masks_tma"]),
    ("allpet_jax.experiments", ["-m", "allpet_jax.experiments"]),
    ("allpet_jax.workstation", ["-m", "allpet_jax.workstation"]),
    ("allpet_jax.generation", ["-m", "allpet_jax.generation"]),
    ("allpet_jax.claims", ["-m", "allpet_jax.claims"]),
    ("allpet_jax.export", ["-m", "allpet_jax.export"]),
    ("radon.demo", ["-m", "radon.demo"]),
]


def _cli(command, *args):
    return subprocess.run([sys.executable, *command, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def _error_line(result, prog):
    """The one stderr line of a refused command line, after checking the exit status and the prefix."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def _import_sample():
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(ROOT, "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _modules():
    from allpet_jax import claims, evaluate, experiments, export, generation, workstation
    from allpet_jax.data import make, preview
    from allpet_jax.figures import masks_tma
    from radon import demo

    return {"sample.py": _import_sample(), "allpet_jax.evaluate": evaluate, "allpet_jax.data.make": make,
            "allpet_jax.data.preview": preview, "allpet_jax.figures.masks_tma": masks_tma,
            "allpet_jax.experiments": experiments, "allpet_jax.workstation": workstation,
            "allpet_jax.generation": generation, "allpet_jax.claims": claims, "allpet_jax.export": export,
            "radon.demo": demo}


def test_every_cli_imports_into_one_process_and_defines_no_flag():
    modules = _modules()  # sample.py and evaluate share flag names: a DuplicateFlagError if either defined them
    names = {}
    for prog, module in modules.items():
        own = flags.FlagValues()
        module.define_flags(own)
        names[prog] = set(own)
    assert {"workdir", "num_inputs", "num_samples", "n", "out"} <= names["sample.py"] & names["allpet_jax.evaluate"]
    assert {"task", "split_size", "n", "out"} <= names["allpet_jax.data.make"]
    assert {"runs", "tasks"} <= names["allpet_jax.experiments"] and {"counts"} <= names["radon.demo"]
    for prog, own in names.items():
        assert not own & set(flags.FLAGS), (prog, sorted(own & set(flags.FLAGS)))


@pytest.mark.parametrize("prog, new, required", [
    ("sample.py", "num_inputs", []),
    ("allpet_jax.evaluate", "num_inputs", []),
    ("allpet_jax.data.make", "split_size", ["--task", "low_dose", "--out", "shards"]),
])
def test_n_is_an_alias_of_its_new_name(prog, new, required):
    module = _modules()[prog]
    assert module.RENAMED == {"n": new}
    old = cli.parse(module.define_flags, ["--n", "3", *required])
    renamed = cli.parse(module.define_flags, [f"--{new}", "3", *required])
    assert old[new].value == renamed[new].value == 3 != old[new].default
    assert old["n"].present and not renamed["n"].present  # what the command line warns about


def test_the_old_name_still_works_with_a_warning():
    result = _cli(["sample.py"], "--n", 0, "--workdir", "/nowhere")  # refused by the first check, before loading
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "sample.py: warning: --n is deprecated and will be removed in the next release; use --num_inputs",
        "sample.py: error: --num_samples, --num_inputs and --steps must be >= 1; got 1, 0 and 50"]


@pytest.mark.parametrize("prog, command", CLIS, ids=[prog for prog, _ in CLIS])
def test_a_bad_flag_is_one_line_with_exit_status_2_and_help_exits_0(prog, command):
    line = _error_line(_cli(command, "--no_such_flag", 1), prog)
    assert "no_such_flag" in line and line.endswith("(see --help)")
    shown = _cli(command, "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    module_doc = _modules()[prog].__doc__
    assert shown.stdout.startswith(module_doc.splitlines()[0])  # the module's docstring is the usage
    assert "--out" in shown.stdout or "--runs" in shown.stdout or "--root" in shown.stdout


BAD_INPUTS = {  # name: (program, how it is started, arguments (x: a path under tmp_path), what the line says)
    "sample: no samples": ("sample.py", ["sample.py"], ["--num_samples", 0],
                           "--num_samples, --num_inputs and --steps must be >= 1; got 0"),
    "evaluate: no steps": ("allpet_jax.evaluate", ["-m", "allpet_jax.evaluate"], ["--steps", 0],
                           "--steps must be >= 1"),
    "make: options not an object": ("allpet_jax.data.make", ["-m", "allpet_jax.data.make"],
                                    ["--task", "low_dose", "--split_size", 1, "--out", "x", "--options", "[1]"],
                                    "--options must be a JSON object"),
    "make: no --out": ("allpet_jax.data.make", ["-m", "allpet_jax.data.make"], ["--task", "low_dose"],
                       "Flag --split_size must have a value"),
    "preview: unknown task": ("allpet_jax.data.preview", ["-m", "allpet_jax.data.preview"],
                              ["--task", "dose", "--out", "x"], "flag --task=dose: value should be one of <synthesis|"),
    "experiments: unpaired task": ("allpet_jax.experiments", ["-m", "allpet_jax.experiments"],
                                   ["--runs", "x", "--tasks", "synthesis"], "--tasks must be a non-empty subset of"),
    "workstation: unknown item": ("allpet_jax.workstation", ["-m", "allpet_jax.workstation"],
                                  ["--root", "x", "--only", "nope"], "--only must name items of the plan"),
    "generation: one input": ("allpet_jax.generation", ["-m", "allpet_jax.generation"],
                              ["--workdir", "x", "--num_inputs", 1], "--num_inputs must be >= 2"),
    "claims: no runs": ("allpet_jax.claims", ["-m", "allpet_jax.claims"], ["--root", "x"],
                        "--root must be the directory of the workstation runs"),
    "export: not npz": ("allpet_jax.export", ["-m", "allpet_jax.export"],
                        ["--checkpoint", "x", "--name", "n", "--out", "x/w.txt"], "--out must be a .npz path"),
    "experiments: positional": ("allpet_jax.experiments", ["-m", "allpet_jax.experiments"], ["low_dose", "--runs", "x"],
                                "unexpected argument(s) low_dose: every input is a --flag"),
    "demo: negative counts": ("radon.demo", ["-m", "radon.demo"], ["--counts", -1, "--out", "x"],
                              "flag --counts=-1: -1.0 is not a non-negative number"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_is_one_line_with_exit_status_2(case, tmp_path):
    prog, command, args, message = BAD_INPUTS[case]
    line = _error_line(_cli(command, *[tmp_path / "x" if a == "x" else a for a in args]), prog)
    assert message in line, line
    assert os.listdir(tmp_path) == []  # refused before anything is written


@pytest.mark.parametrize("prog, command, out_flag", [
    ("allpet_jax.data.make", ["-m", "allpet_jax.data.make", "--task", "low_dose", "--split_size", "1"], "--out"),
    ("allpet_jax.experiments", ["-m", "allpet_jax.experiments", "--tasks", "low_dose"], "--runs"),
])
def test_a_users_directory_is_refused_in_one_line_untouched(prog, command, out_flag, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("a week of work")
    line = _error_line(_cli(command, out_flag, users), prog)
    assert f"{users} holds files" in line and "notes.txt" in line, line
    assert os.listdir(users) == ["notes.txt"] and (users / "notes.txt").read_text() == "a week of work"


def test_a_finished_command_exits_0_and_prints_no_return_value(tmp_path):
    # An empty split simulates nothing; data.make's main returns the manifest, which absl would otherwise
    # print and turn into exit status 1.
    result = _cli(["-m", "allpet_jax.data.make"], "--task", "low_dose", "--split_size", 0, "--size", 8, "--out",
                  tmp_path / "shards", "--no_progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "" and result.stderr.strip() == f"wrote 0 samples in 0 shard(s) to {tmp_path / 'shards'}"
