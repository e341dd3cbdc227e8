"""train.py across two JAX processes on this machine, as on two hosts (docs/cluster.md).

Two processes with 2 host CPU devices each, joined through `jax.distributed` (coordinator on
127.0.0.1, gloo collectives), train 3 steps of the smoke preset's task stage. They must train exactly as
one process with 4 devices does, and only process 0 may write the run's files.

Which process wrote what is seen by a Python audit hook (`sitecustomize`, below). Orbax writes array
data from C++, where no hook sees it; its files carry the writing process in their names
(`ocdbt.process_<i>`), which the test checks instead.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
COMMON = ("--config", os.path.join(ROOT, "configs/base.py:smoke"), "--config.train.log_every=1",
          f"--config.train.steps.task={STEPS}", "--config.train.steps.autoencoder=1")

# Logs every write a process makes under AUDIT_UNDER (opened for writing, renamed, removed, made).
_SITECUSTOMIZE = r'''
import os, sys
_root, _log = os.environ["AUDIT_UNDER"], os.environ["AUDIT_LOG"]
_busy = []
def _hook(event, args):
    if _busy:
        return
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if isinstance(path, int) or not writes:
            return
        paths = [path]
    elif event == "os.rename":  # also os.replace
        paths = args[:2]
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree"):
        paths = args[:1]
    else:
        return
    paths = [os.path.abspath(os.fsdecode(p)) for p in paths if not isinstance(p, int)]
    if any(p == _root or p.startswith(_root + os.sep) for p in paths):
        _busy.append(1)
        try:
            with open(_log, "a") as f:
                f.write(event + " " + paths[-1] + "\n")
        finally:
            _busy.clear()
sys.addaudithook(_hook)
'''


_CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _env(n_devices: int, **extra) -> dict:
    """This environment without any cluster launcher's variables, on `n_devices` host CPU devices."""
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARIABLES and not k.startswith(("SLURM_", "OMPI_"))}
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n_devices}",
                **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(workdir) -> list[float]:
    lines = [json.loads(line) for line in open(os.path.join(workdir, "task", "metrics.jsonl"))]
    return [r["loss"] for r in lines if r["split"] == "train"]


def _params(workdir) -> dict:
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "task", "checkpoints", str(STEPS), "state"))
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])}


def test_only_launchers_of_several_processes_start_jax_distributed():
    """`train.maybe_initialize_distributed` against each launcher's variables, with JAX's call recorded."""
    cases = [
        ({}, []),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
         [{"num_processes": 2, "process_id": 1}]),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8482"}, [{"num_processes": None, "process_id": None}]),  # TPU VM
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
          "SLURM_STEP_NODELIST": "gpu[01-02]"}, [{}]),  # srun, 8 tasks: JAX reads SLURM's variables
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
          "SLURM_STEP_NODELIST": "gpu01"}, []),  # one task: one process with every local GPU
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, []),  # batch shell
        ({"OMPI_COMM_WORLD_SIZE": "4"}, [{}]),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, []),
    ]
    script = """
import json, os, sys
import jax
import train

calls = []
jax.distributed.initialize = lambda **kwargs: calls.append(kwargs)
base = dict(os.environ)
for variables in json.load(sys.stdin):
    os.environ.clear()
    os.environ.update(base, **variables)
    calls.clear()
    train.maybe_initialize_distributed()
    print(json.dumps(calls))
"""
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps([v for v, _ in cases]), cwd=ROOT,
                         env=_env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for (variables, expected), line in zip(cases, out.stdout.splitlines(), strict=True):
        assert json.loads(line) == expected, variables


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_process_0_writes(tmp_path):
    cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
    start = time.perf_counter()

    # One process, 4 devices: the autoencoder the task stage needs, then the reference task run (the U-Net
    # from scratch: a foundation stage would add minutes and no multi-process code path).
    reference = tmp_path / "one"
    out = subprocess.run([sys.executable, "train.py", *COMMON, "--workdir", str(reference), cache,
                          "--config.train.stages=autoencoder,task"],
                         cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    one_process_s = time.perf_counter() - start

    # Two processes, 2 devices each, the task stage from that autoencoder.
    workdir = tmp_path / "two"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for index in range(2):
        env = _env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # the default in JAX 0.10; older ones need it
                   PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
                   AUDIT_UNDER=str(workdir), AUDIT_LOG=str(tmp_path / f"writes_{index}.txt"))
        log = open(tmp_path / f"process_{index}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "train.py", *COMMON, "--workdir", str(workdir), cache, "--config.train.stages=task",
             f"--config.train.autoencoder_dir={reference / 'autoencoder'}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + 1800
    try:
        while any(p.poll() is None for p, _ in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):  # the other would wait for it until a timeout
                break
            time.sleep(1)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    two_process_s = time.perf_counter() - start - one_process_s
    print(f"wall time: one process {one_process_s:.0f} s (autoencoder and task), two processes {two_process_s:.0f} s")
    for index, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"process {index}:\n" + (tmp_path / f"process_{index}.log").read_text()[-5000:]

    # The same training: every logged loss (steps 1..3), then every parameter.
    losses, expected = _train_losses(workdir), _train_losses(reference)
    assert len(expected) == STEPS and len(losses) == STEPS  # each step logged once: process 1 logged nothing
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-6)
    params, expected = _params(workdir), _params(reference)
    assert params.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(params[name], expected[name], rtol=0, atol=1e-5, err_msg=name)

    # Only process 0 writes. Process 1 may make the directories it was given (`os.makedirs(exist_ok=True)`)
    # and writes its own data-iterator position, which Grain's checkpoint keeps one file per process of.
    written_by_0 = (tmp_path / "writes_0.txt").read_text()
    assert "task/metrics.jsonl" in written_by_0 and "checkpoints" in written_by_0  # the hook sees writes
    log_1 = tmp_path / "writes_1.txt"
    writes = [line.split(" ", 1) for line in (log_1.read_text() if log_1.exists() else "").splitlines()]
    allowed_dirs = {str(workdir), str(workdir / "task")}
    others = [(event, path) for event, path in writes
              if not (event == "os.mkdir" and path in allowed_dirs)
              and not (event == "open" and path.endswith("/data.orbax-checkpoint-tmp/process_1-of-2.json"))]
    assert not others, f"process 1 wrote {others}"
    names = [os.path.relpath(os.path.join(d, f), workdir) for d, dirs, files in os.walk(workdir) for f in dirs + files]
    assert [n for n in names if "process_1" in n] == [f"task/checkpoints/{STEPS}/data/process_1-of-2.json"]
