#!/usr/bin/env bash
# Everything that needs a GPU: build fastnas._C against that machine's torch, run the
# CUDA tests and the Triton tests compiled for the GPU, then the GPU benchmarks.
# All parts take about 30 minutes; a 10-minute call holds build plus two or three
# parts (see PARTS below). With a warm machine a repeated build only relinks.
#
#   bash benchmarks/gpu_suite.sh [PART ...]   # results and logs under ${OUT:-benchmarks/results/gpu}
#
# Each step is time-boxed so the whole stays inside GPU_SUITE_BUDGET seconds
# (default 570, under the machine's 10-minute limit per command); a step that
# fails or times out is recorded in summary.txt and the next one still runs,
# since a partial result from a short-lived machine beats none.
# PYTHON picks the interpreter (default: python); SKIP_BUILD=1 reuses an install.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python}
BUDGET=${GPU_SUITE_BUDGET:-570}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
START=$SECONDS
FAILED=0

# step NAME CAP_SECONDS CMD...: run CMD for at most min(CAP, time left), log to $OUT/NAME.log.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        echo "== $name: not run, the suite's time budget is spent" | tee -a "$OUT/summary.txt"
        FAILED=1
        return
    fi
    echo "== $name (time box ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    local verdict="ok"
    ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
    ((rc == 5)) && verdict="NO TESTS COLLECTED"
    ((rc != 0 && rc != 5 && rc != 124 && rc != 137)) && verdict="FAILED"
    echo "== $name: $verdict (exit $rc, $((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
    ((rc == 0)) || FAILED=1
}

versions() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    nvidia-smi || true
    "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PYEOF
    git rev-parse HEAD 2>/dev/null || true
}

# timeout runs programs, not shell functions.
export -f versions
export PY
export PYTHONUNBUFFERED=1
# Parts to run, in order (default: all; a 10-minute call holds about two of the slow ones):
#   build   install fastnas._C against this machine's torch
#   kernels the CUDA C++ kernels' tests (tests/test_cuda_kernels.py), then the same under
#           compute-sanitizer: memcheck (out-of-bounds and misaligned accesses), racecheck
#           (shared-memory hazards) and synccheck (barriers); about 4 minutes
#   tests   the CUDA tests (pytest -n, Triton compiled for the GPU), while one step of each
#           fused configuration fills Triton's kernel cache for the benchmarks
#   step    search-step table, DARTS and PC-DARTS, eager/fused/checkpoint, each also as a CUDA graph
#   step256 the same table at batch 256
#   imagenet  a 224x224 search step with the ImageNet stem, no partial channels
#   largest the largest batch per configuration: estimated from the step table, each estimate run
#   ops     the GPU ops and multi_depthwise microbenchmarks
#   engine  the memory engine's ops, each pass on its own: CUDA C++ vs Triton vs eager, and
#           multi_depthwise vs cuDNN at the search sizes, with bandwidth as a fraction of copy
#   epoch   one whole epoch of a first-order DARTS search on CIFAR-shaped data (25,000 + 25,000
#           random images): the fused engine (save, recompute; CUDA graph by default) and the eager
#           reference under a CUDA graph
#   epoch_eager  the same epoch of the eager reference without a graph (the slowest: a call of its own)
PARTS=${*:-build kernels tests step imagenet largest ops engine step256 epoch epoch_eager}
want() { [[ " $PARTS " == *" $1 "* ]]; }
unset TRITON_INTERPRET

step versions 30 bash -c versions
if want build; then
    step build 200 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -e .
    step info 20 "$PY" -m fastnas.info
fi
if want kernels; then
    # Failures show here first, in a minute; the sanitizers then run the same tests (slowly).
    step kernel_tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider -m requires_cuda tests/test_cuda_kernels.py
    SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    sanitize() {  # sanitize TOOL CAP PYTEST_K_EXPRESSION
        if [[ ! -x $SANITIZER ]]; then
            echo "== sanitizer_$1: not run, compute-sanitizer not found" | tee -a "$OUT/summary.txt"
            FAILED=1
            return
        fi
        step "sanitizer_$1" "$2" "$SANITIZER" --tool "$1" --error-exitcode 1 --target-processes all \
            "$PY" -m pytest -q -x -p no:cacheprovider -m requires_cuda tests/test_cuda_kernels.py -k "$3"
    }
    # CUDA graphs, opcheck and autograd add nothing the sanitizers check, and take long under them.
    sanitize memcheck 150 "not graph and not opcheck and not autograd"
    sanitize racecheck 120 "(test_multi_depthwise and 7x9) or large_plane or bit_identical"
    sanitize synccheck 60 "test_multi_depthwise and 7x9"
fi
if want tests; then
    warm() {  # one untimed step per fused configuration: compiles the Triton kernels the benchmarks use
        for cfg in "darts save" "darts recompute" "pc-darts save" "pc-darts recompute"; do
            set -- $cfg
            "$PY" -m fastnas.bench --device cuda --network "$1" --memory "$2" --reps 1 --no-count-ops >/dev/null 2>&1
        done
        "$PY" -m fastnas.bench --device cuda --stem imagenet --image-size 224 --batch-size 8 --memory recompute \
            --reps 1 --no-count-ops >/dev/null 2>&1
    }
    export -f warm
    timeout -k 10 300 bash -c warm &
    WARM=$!
    step tests 300 "$PY" -m pytest -q -rs -n 12 --maxfail=30 -p no:cacheprovider -m requires_cuda tests
    wait $WARM
fi
if want step; then
    step search_step 330 "$PY" benchmarks/bench_search_step.py --device cuda --reps 5 --timeout 120 --cuda-graph \
        --out "$OUT"
fi
if want imagenet; then
    step imagenet 300 "$PY" benchmarks/bench_search_step.py --device cuda --reps 2 --timeout 140 --no-count-ops \
        --networks darts --configs reference:save,auto:save,auto:recompute --stem imagenet --image-size 224 \
        --batch-size 32 --tag imagenet224 --out "$OUT"
fi
if want largest; then
    src="$OUT/cuda_search_step.csv"
    [[ -f $src ]] || src=benchmarks/results/cuda_search_step.csv
    step largest 400 "$PY" benchmarks/largest_batch.py --from "$src" --out "$OUT" --verify darts:reference:save,darts:auto:save,darts:auto:recompute,pc-darts:auto:recompute
fi
if want step256; then
    step search_step_256 330 "$PY" benchmarks/bench_search_step.py --device cuda --batch-size 256 --reps 3 \
        --timeout 120 --cuda-graph --no-count-ops --tag b256 --out "$OUT"
fi
if want epoch; then
    step epoch 560 "$PY" benchmarks/bench_epoch.py --device cuda --configs auto,auto-recompute,reference-graph \
        --timeout 250 --out "$OUT"
fi
if want epoch_eager; then
    step epoch_eager 560 "$PY" benchmarks/bench_epoch.py --device cuda --configs reference --timeout 540 \
        --out "$OUT/eager"
fi
if want ops; then
    step bench_ops 120 "$PY" benchmarks/bench_ops.py --device cuda --out "$OUT"
    step bench_multi_depthwise 60 "$PY" benchmarks/bench_multi_depthwise.py --device cuda
fi
if want engine; then
    step bench_engine_ops 240 "$PY" benchmarks/bench_engine_ops.py --device cuda --out "$OUT"
    step bench_engine_ops_bf16 120 "$PY" benchmarks/bench_engine_ops.py --device cuda --quick --dtype bf16 \
        --tag bf16 --out "$OUT"
fi

echo "== total $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
# The device machine returns at most eight files: pack the logs and tables into one.
tar czf "$OUT/../gpu_results.tgz" -C "$OUT" . && mv "$OUT/../gpu_results.tgz" "$OUT/" || true
exit $FAILED
