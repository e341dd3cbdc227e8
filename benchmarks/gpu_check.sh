#!/usr/bin/env bash
# gpu_check.sh: one prepared call for a lent GPU machine (at most 10 minutes, one call).
#
# NOTE: this script has NOT yet run on a GPU. It was tested on CPU only, at the `smoke` preset:
#     SKIP_INSTALL=1 GPU_CHECK_PRESET=smoke GPU_CHECK_BUDGET_S=240 GPU_CHECK_OUT=/tmp/gpu_check_test \
#         bash benchmarks/gpu_check.sh
#
# What it does, from the repository root, in order:
#   1. installs the project (`pip install -e '.[test]'`; plus GPU JAX (`jax[cuda12]`) only where `nvidia-smi`
#      exists and the installed JAX sees no GPU), then checks that the modules training needs import;
#   2. prints the device: `nvidia-smi --query-gpu=name,memory.total --format=csv` where present, and
#      `jax.devices()`;
#   3. runs `benchmarks/train_bench.py --presets $PRESET --devices 1 --time_default --steps 5`: train-step
#      samples/s and XLA's compiled memory (MiB/device) per stage, then, in the same process, the device's
#      `memory_stats()` peak_bytes_in_use (GPU only; CPU devices report none). Its rows print as they finish,
#      and it stops at GPU_CHECK_BENCH_S seconds, so training keeps its share of the budget;
#   4. trains `autoencoder,foundation` with train.py for the time that remains (GPU_CHECK_BUDGET_S minus the
#      time spent so far, under `timeout`: being stopped there is the normal end), then prints the last lines
#      of the foundation's metrics.jsonl (samples_per_s, loss);
#   5. writes everything it prints to $GPU_CHECK_OUT/gpu_check.log too, and ends with a one-line summary.
# Exit status: 0 when every part ran (a part stopped at its time limit counts as ran), 1 otherwise.
#
# From the device tool (its $OUT comes back; files at most 2 folders down, at most 8 of them):
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
# GPU_CHECK_OUT defaults to $OUT there. The training workdir (checkpoints: many files, deep folders) then goes
# to /tmp/gpu_check_run, and its metrics.jsonl files are copied into $OUT. The device image has JAX (CUDA),
# flax, optax and orbax but no network: if grain, ml-collections, tensorboardX (or nibabel) are missing there,
# carry them as wheels in a folder (GPU_CHECK_WHEELS, default .whl; /work/.library/device/README.md says how).
#
# Environment (all optional):
#   GPU_CHECK_PRESET       configs/base.py preset (default `default`, the paper scale; `smoke` for a CPU test)
#   GPU_CHECK_BUDGET_S     wall-clock seconds for the whole script (default 540)
#   GPU_CHECK_OUT          output folder (default ${OUT:-/tmp/gpu_check}); the log is gpu_check.log there
#   GPU_CHECK_WORKDIR      train.py's workdir (default $GPU_CHECK_OUT/run, or /tmp/gpu_check_run when $OUT is
#                          set); emptied first, so each call trains from scratch
#   GPU_CHECK_BENCH_S      time limit of the benchmark (default 40% of the budget)
#   GPU_CHECK_BENCH_STAGES train_bench's --stages (default: all five stages)
#   GPU_CHECK_BUDGETS_GIB  train_bench's --budgets_gib (default 24, the paper's GPU)
#   GPU_CHECK_AE_STEPS     autoencoder steps before the foundation: at most this many (default 100, or the
#                          preset's own count where smaller)
#   GPU_CHECK_FOUNDATION_STEPS  foundation steps (default 1000000: it trains until the time runs out)
#   GPU_CHECK_LOG_EVERY    train.log_every (default 10)
#   GPU_CHECK_EVAL_EVERY   train.eval_every and train.checkpoint_every (default 1000)
#   GPU_CHECK_TRAIN_ARGS   more train.py flags, split at spaces (e.g. --config.data.num_threads=16)
#   GPU_CHECK_CACHE        JAX's persistent compilation cache (default: the project's, $ALLPET_XLA_CACHE or
#                          ~/.cache/allpet_jax/xla, as allpet_jax/experiments.py; train.py compiles each step twice
#                          and the cache makes the second one a read); `off` disables it. A warm cache (a rerun
#                          on the same machine) also shortens train_bench's `compile s` column
#   GPU_CHECK_WHEELS       folder of wheels pip may install from (default .whl, where it exists)
#   GPU_CHECK_JAX_SPEC     the GPU JAX to install where none is (default 'jax[cuda12]')
#   GPU_CHECK_PYTHON       the interpreter (default: the first of `python`, `python3` that has jax)
#   SKIP_INSTALL=1         skip step 1 when `python -c 'import allpet_jax'` already works (no network needed)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

PRESET=${GPU_CHECK_PRESET:-default}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-/tmp/gpu_check}}
if [[ -n "${GPU_CHECK_WORKDIR:-}" ]]; then
    WORKDIR=$GPU_CHECK_WORKDIR
elif [[ -n "${OUT:-}" && "$OUT_DIR" == "$OUT" ]]; then
    WORKDIR=/tmp/gpu_check_run
else
    WORKDIR=$OUT_DIR/run
fi
BENCH_S=${GPU_CHECK_BENCH_S:-$((BUDGET_S * 40 / 100))}
BENCH_STAGES=${GPU_CHECK_BENCH_STAGES:-autoencoder,foundation,task,regressor,pixel_regressor}
BUDGETS_GIB=${GPU_CHECK_BUDGETS_GIB:-24}
AE_STEPS_CAP=${GPU_CHECK_AE_STEPS:-100}
FOUNDATION_STEPS=${GPU_CHECK_FOUNDATION_STEPS:-1000000}
LOG_EVERY=${GPU_CHECK_LOG_EVERY:-10}
EVAL_EVERY=${GPU_CHECK_EVAL_EVERY:-1000}
CACHE=${GPU_CHECK_CACHE:-${ALLPET_XLA_CACHE:-${HOME:-/tmp}/.cache/allpet_jax/xla}}
TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:-}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
JAX_SPEC=${GPU_CHECK_JAX_SPEC:-jax[cuda12]}
PY=${GPU_CHECK_PYTHON:-}
if [[ -z "$PY" ]]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import importlib.util as u; exit(not u.find_spec("jax"))' 2>/dev/null; then
            PY=$(command -v "$candidate")
            break
        fi
    done
    PY=${PY:-$(command -v python3 || command -v python)}
fi
TAIL_S=15  # kept back from the budget for the metrics and the summary after training
LOG=$OUT_DIR/gpu_check.log

export PYTHONUNBUFFERED=1  # lines as they come
if [[ "$CACHE" != off ]]; then
    export JAX_COMPILATION_CACHE_DIR=$CACHE
fi

section() { printf '\n===== [%4ds] %s\n' "$SECONDS" "$*"; }

install() {
    if [[ "${SKIP_INSTALL:-0}" == 1 ]] && "$PY" -c 'import allpet_jax' 2>/dev/null; then
        echo "SKIP_INSTALL=1 and allpet_jax imports: not installing"
    else
        local opts=(--retries 0 --timeout 20 --no-build-isolation)  # no network on the device: fail fast
        [[ -d "$WHEELS" ]] && opts+=(--find-links "$WHEELS") && echo "wheels from $WHEELS"
        if ! timeout 300 "$PY" -m pip install -q "${opts[@]}" -e '.[test]'; then
            echo "pip could not install '.[test]' (no network?); installing the project without its dependencies"
            timeout 120 "$PY" -m pip install -q "${opts[@]}" --no-deps -e . || echo "pip failed; using the source tree"
        fi
        if command -v nvidia-smi >/dev/null \
            && ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
            echo "nvidia-smi exists but JAX sees no GPU: installing $JAX_SPEC"
            timeout 300 "$PY" -m pip install -q "${opts[@]}" -U "$JAX_SPEC" || echo "pip could not install $JAX_SPEC"
        fi
    fi
    # what train.py and train_bench.py import; a missing one fails here, in one line, not minutes later
    "$PY" - <<'EOF'
import importlib, sys
missing = []
for name in ("allpet_jax", "jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX",
             "absl", "scipy", "matplotlib", "tqdm", "h5py"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("missing modules: " + "; ".join(missing) + " -- carry them as wheels (GPU_CHECK_WHEELS)")
print("imports ok")
EOF
}

show_device() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total --format=csv || true
    else
        echo "no nvidia-smi"
    fi
    "$PY" -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())'
}

# train_bench's own command line, run in this process so that the device's peak memory can be read after it. The
# timeout's SIGTERM ends it through `finally` (once the compile in progress returns), so the peak prints then too.
BENCH_PY=$(cat <<'EOF'
import os, runpy, signal, sys
stopped = []
def stop(*_):
    stopped.append(1)
    sys.exit(124)
signal.signal(signal.SIGTERM, stop)
sys.argv = ["benchmarks/train_bench.py", *sys.argv[1:]]
print("$ python " + " ".join(sys.argv), flush=True)
try:
    runpy.run_path("benchmarks/train_bench.py", run_name="__main__")
finally:
    import jax
    stats = jax.devices()[0].memory_stats()  # None on CPU
    if stats and "peak_bytes_in_use" in stats:
        print(f"device peak_bytes_in_use over the benchmark: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB "
              f"(limit {stats.get('bytes_limit', 0) / 2**30:.1f} GiB)", flush=True)
    else:
        print(f"device memory_stats: none on {jax.devices()[0].platform}", flush=True)
    if stopped:  # leave at once: shutting down with a compile in flight can hang until the SIGKILL
        sys.stdout.flush()
        os._exit(124)
EOF
)

bench() {
    timeout -k 20 "$BENCH_S" "$PY" -c "$BENCH_PY" --presets "$PRESET" --stages "$BENCH_STAGES" --devices 1 \
        --time_default --steps 5 --budgets_gib "$BUDGETS_GIB"
}

# train.py's progress bar redraws itself (carriage returns) at every logged step: keep one state per 15 s, on
# its own line, and pass everything else (errors too) through as it comes.
THIN_PY=$(cat <<'EOF'
import os, re, sys, time
bar = re.compile(rb"\d+/\d+ \[[^\]]*(it/s|s/it|step/s|s/step)")
last, pending, buf = 0.0, b"", b""
def out(line):
    sys.stdout.buffer.write(line.rstrip() + b"\n")
    sys.stdout.flush()
while chunk := os.read(0, 65536):
    buf += chunk
    *parts, buf = re.split(rb"[\r\n]", buf)
    for part in parts:
        if not part.strip():
            continue
        if bar.search(part):
            pending = part
            if time.monotonic() - last >= 15:
                out(pending)
                last, pending = time.monotonic(), b""
        else:  # the bar's latest state first, so a stage's last bar stays before its summary line
            if pending:
                out(pending)
                pending = b""
            out(part)
for part in (pending, buf):
    if part.strip():
        out(part)
EOF
)

ae_steps() {
    "$PY" -c "from configs import base; print(min($AE_STEPS_CAP, int(base.get_config('$PRESET').train.steps['autoencoder'])))"
}

train() {
    local remaining=$((BUDGET_S - SECONDS - TAIL_S))
    rm -rf "$WORKDIR"  # from scratch, and no earlier call's metrics reported as this one's
    if ((remaining < 30)); then
        echo "only ${remaining}s left of the ${BUDGET_S}s budget: not training"
        return 1
    fi
    local cmd=("$PY" train.py --config "configs/base.py:$PRESET" --workdir "$WORKDIR"
        --config.train.stages=autoencoder,foundation
        "--config.train.steps.autoencoder=$(ae_steps)" "--config.train.steps.foundation=$FOUNDATION_STEPS"
        "--config.train.log_every=$LOG_EVERY" "--config.train.eval_every=$EVAL_EVERY"
        "--config.train.checkpoint_every=$EVAL_EVERY")
    # shellcheck disable=SC2206  # split at spaces on purpose
    if [[ -n "$TRAIN_ARGS" ]]; then cmd+=($TRAIN_ARGS); fi
    echo "\$ timeout $remaining ${cmd[*]}"
    timeout -k 15 "$remaining" "${cmd[@]}" 2>&1 | "$PY" -u -c "$THIN_PY"
}

BRIEF_PY='
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:  # a line cut short by the timeout
        print(line.rstrip())
        continue
    keep = ("step", "split", "loss", "samples_per_s", "memory_gib")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                      if k in keep or k.startswith("val_")}))
'

report_training() {
    local stage
    for stage in autoencoder foundation; do
        local metrics=$WORKDIR/$stage/metrics.jsonl
        if [[ -f "$metrics" ]]; then
            echo "--- $metrics (last lines; step, split, loss, samples_per_s, memory_gib and val_* of each)"
            tail -n "$([[ $stage == foundation ]] && echo 5 || echo 2)" "$metrics" | "$PY" -c "$BRIEF_PY"
            [[ "$WORKDIR" == "$OUT_DIR"/* ]] || cp "$metrics" "$OUT_DIR/${stage}_metrics.jsonl"
        else
            echo "--- no $metrics"
        fi
    done
}

foundation_summary() {
    "$PY" - "$WORKDIR/foundation/metrics.jsonl" <<'EOF'
import json, os, sys
path = sys.argv[1]
rows = []
for line in open(path) if os.path.exists(path) else ():
    try:
        rows.append(json.loads(line))
    except ValueError:  # a line cut short by the timeout
        pass
train = [r for r in rows if r.get("split") == "train"]
if not train:
    print("foundation: no training lines")
else:
    last = train[-1]
    rates = [r["samples_per_s"] for r in train[1:]] or [last["samples_per_s"]]  # the first interval holds warm-up
    rates.sort()
    print(f"foundation: step {last['step']}, loss {last['loss']:.4f}, samples/s {rates[len(rates) // 2]:.1f} "
          f"(median of {len(rates)} intervals), XLA {last.get('memory_gib', float('nan')):.2f} GiB")
EOF
}

main() {
    local failed=() rc
    echo "gpu_check: preset $PRESET, budget ${BUDGET_S}s (benchmark up to ${BENCH_S}s), out $OUT_DIR, workdir $WORKDIR"
    local commit='?'
    if command -v git >/dev/null && git -C "$ROOT" rev-parse --short HEAD >/dev/null 2>&1; then
        commit=$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo '+changes')
    fi
    echo "$(date -u +%FT%TZ), commit $commit, host $(uname -n), python $PY"

    section "install"
    install || { echo "install: failed"; failed+=(install); }

    section "device"
    show_device || failed+=(device)
    if [[ " ${failed[*]} " == *" install "* ]]; then
        echo "gpu_check: FAILED (install) in ${SECONDS}s"
        return 1
    fi

    section "train_bench ($PRESET, 1 device, up to ${BENCH_S}s)"
    rc=0; bench || rc=$?
    if ((rc == 124 || rc == 137)); then echo "train_bench: stopped at its ${BENCH_S}s limit (the rows above finished)"
    elif ((rc != 0)); then echo "train_bench: exit $rc"; failed+=(train_bench); fi

    section "train.py autoencoder,foundation ($PRESET) for the time that remains"
    rc=0; train || rc=$?
    if ((rc == 124 || rc == 137)); then echo "train.py: stopped at the time limit (the normal end)"
    elif ((rc != 0)); then echo "train.py: exit $rc"; failed+=(train); fi

    section "training metrics"
    report_training
    local found
    found=$(foundation_summary) || found="foundation: metrics unreadable"
    echo "$found"
    [[ "$found" == *"no training lines"* ]] && failed+=(no_foundation_steps)

    local rows
    rows=$(grep -c "^| $PRESET |" "$LOG" || true)
    section "summary"
    echo "gpu_check: $([[ ${#failed[@]} -eq 0 ]] && echo OK || echo "FAILED (${failed[*]})"); preset $PRESET;" \
        "$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo cpu);" \
        "train_bench rows $rows; $found; ${SECONDS}s of ${BUDGET_S}s; log $LOG"
    [[ ${#failed[@]} -eq 0 ]]
}

mkdir -p "$OUT_DIR"
: >"$LOG"
main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
