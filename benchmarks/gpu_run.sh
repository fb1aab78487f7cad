#!/usr/bin/env bash
# The GPU benchmark in one command, for a bare GPU machine with no network (one H100 or H200, under 9 minutes):
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]          # OUT_DIR: default $OUT, else benchmarks/results
#   bash benchmarks/gpu_run.sh --cpu-smoke DIR    # the same steps at tiny shapes on a CPU (tests/bench)
#   bash benchmarks/gpu_run.sh --engine [OUT_DIR] # instead of 3: the engine against a raw decode loop (4 minutes)
#
# 1. Versions: python, nvidia-smi (when there is one).
# 2. The project, offline from this tree: nothing when `loong_jax` already imports; else
#    `pip install --no-index --no-deps --no-build-isolation -e .` (the machine's own jax, flax and setuptools);
#    else, when pip cannot build, a folder of links laid out as the installed package (`--link-farm` forces it).
# 3. benchmarks/gpu_h200.py in two processes, each under a hard `timeout` (a compile that hangs loses only its
#    phase): env + ceilings + float32 greedy exactness against the CPU + attention per layer, then the whole
#    7B-shaped model and its cost-model file.
#    Results accumulate in OUT_DIR/gpu_h200.json (rewritten after every case) and the log in OUT_DIR/gpu_run.log.
#    With --engine, step 3 is benchmarks/engine_decode.py instead: the whole engine (asynchronous steps) against
#    a raw jitted decode loop of a Llama-2-7B-shaped model with random bf16 weights, 4K-token prompts, batch 32
#    on a GPU of 120 GB or more, else 16 (KV for 32 x 4K is 66 GB); printed to OUT_DIR/engine_decode.txt.
# Exit status: 0 when both phases finished, else the first failing phase's.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

SMOKE=0 LINK_FARM=0 ENGINE=0 OUT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=1 ;;
        --link-farm) LINK_FARM=1 ;;
        --engine) ENGINE=1 ;;
        -*) echo "gpu_run.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT_DIR=$arg ;;
    esac
done
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# XLA's pool takes 92% of the GPU (its default, 75%, leaves an H100 short of a 7B model plus 8 x 4K of KV).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if [ "$SMOKE" = 1 ]; then
    export JAX_PLATFORMS=cpu
    BENCH_FLAGS=(--tiny) ATTENTION_LIMIT=240 MODEL_LIMIT=240
else
    # 200 + 280 s of hard limits, plus the install: under 9 minutes.
    BENCH_FLAGS=() ATTENTION_LIMIT=200 MODEL_LIMIT=280
fi
LOG="$OUT_DIR/gpu_run.log"
: > "$LOG"

say() { echo "gpu_run: $*" | tee -a "$LOG"; }

# 1. Versions.
say "python: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
fi

# 2. The project, offline.
# Checked from / : run from the tree, `python -c` would find its top-level loong_jax/ (without models/ inside) first.
imports() { (cd / && "$PYTHON" -c "import loong_jax.executor.programs, loong_jax.models.kernels.dispatch") 2>> "$LOG"; }

link_farm() {  # loong_jax laid out as setuptools' package-dir maps it (models/, sharding/, server/ inside)
    local site
    site=$(mktemp -d)/site
    mkdir -p "$site/loong_jax"
    for entry in "$REPO"/loong_jax/*; do ln -s "$entry" "$site/loong_jax/"; done
    for folder in models sharding server; do ln -s "$REPO/$folder" "$site/loong_jax/$folder"; done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

if [ "$LINK_FARM" = 1 ]; then
    link_farm && say "project: linked from $REPO (forced)"
elif imports; then
    say "project: already importable"
elif "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 && imports; then
    say "project: installed in editable mode from $REPO"
else
    link_farm && say "project: pip could not install it; linked from $REPO"
fi
if ! imports; then
    say "project: loong_jax does not import (see $LOG)"
    exit 3
fi
say "project: loong_jax from $(cd / && "$PYTHON" -c 'import loong_jax; print(loong_jax.__file__)')"

# 3. The benchmark, one hard limit per process.
if [ "$ENGINE" = 1 ]; then
    if [ "$SMOKE" = 1 ]; then
        ENGINE_FLAGS=(--shape tiny --batch 2 --prompt-len 16 --steps 8 --repeats 1) ENGINE_LIMIT=120
    else
        MEMORY_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
        BATCH=$([ "${MEMORY_MIB:-0}" -ge 120000 ] && echo 32 || echo 16)
        ENGINE_FLAGS=(--shape llama2-7b --batch "$BATCH" --prompt-len 4096 --steps 32 --repeats 3 --timeline)
        ENGINE_LIMIT=240
    fi
    say "engine decode: ${ENGINE_FLAGS[*]} (at most $ENGINE_LIMIT s)"
    timeout --kill-after=10 "$ENGINE_LIMIT" "$PYTHON" benchmarks/engine_decode.py "${ENGINE_FLAGS[@]}" 2>&1 \
        | tee -a "$LOG" "$OUT_DIR/engine_decode.txt"
    exit "${PIPESTATUS[0]}"
fi
REPORT="$OUT_DIR/gpu_h200.json"
rm -f "$REPORT"
run_phase() {  # limit, phases, budget
    say "phases $2 (at most $1 s)"
    timeout --kill-after=10 "$1" "$PYTHON" benchmarks/gpu_h200.py "${BENCH_FLAGS[@]}" --phases "$2" \
        --budget-s "$3" --out "$REPORT" --cost-model-out "$OUT_DIR/gpu_cost_model.json" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    [ "$status" = 124 ] && say "phases $2: stopped at the $1 s limit (the report keeps every finished case)"
    return "$status"
}
run_phase "$ATTENTION_LIMIT" env,ceilings,exactness,attention $((ATTENTION_LIMIT - 25)); first=$?
run_phase "$MODEL_LIMIT" model $((MODEL_LIMIT - 40)); second=$?
say "report: $REPORT"
[ "$first" = 0 ] && exit "$second"
exit "$first"
