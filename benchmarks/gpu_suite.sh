#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most ~10 minutes on the GPU machine:
# build fastnas._C against that machine's torch, run the CUDA tests and the Triton
# tests compiled for the GPU, then the GPU ops and search-step benchmarks.
#
#   bash benchmarks/gpu_suite.sh          # results and logs under ${OUT:-benchmarks/results/gpu}
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
step versions 30 bash -c versions
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    step build 150 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
step info 20 "$PY" -m fastnas.info
# Triton kernels must be compiled for the GPU here, not interpreted.
step test_gpu 170 env -u TRITON_INTERPRET "$PY" -m pytest -q -rs --maxfail=10 -p no:cacheprovider -m requires_cuda tests
# The search step: eager reference, fused engine (save, recompute), checkpointing.
step bench_search_step 170 env -u TRITON_INTERPRET "$PY" benchmarks/bench_search_step.py --device cuda --reps 3 \
    --no-count-ops --timeout 60 --out "$OUT"
step bench_cuda_graph 45 env -u TRITON_INTERPRET "$PY" benchmarks/bench_search_step.py --device cuda --reps 5 \
    --no-count-ops --timeout 40 --networks darts --configs auto:save --cuda-graph --tag cuda_graph --out "$OUT"
step bench_imagenet 70 env -u TRITON_INTERPRET "$PY" benchmarks/bench_search_step.py --device cuda --reps 2 \
    --no-count-ops --timeout 60 --networks darts --configs reference:save,auto:recompute --stem imagenet \
    --image-size 224 --batch-size 32 --tag imagenet224 --out "$OUT"
step largest_batch 60 env -u TRITON_INTERPRET "$PY" benchmarks/largest_batch.py --from "$OUT/cuda_search_step.csv" \
    --out "$OUT" --verify darts:auto:recompute
step bench_multi_depthwise 30 env -u TRITON_INTERPRET "$PY" benchmarks/bench_multi_depthwise.py --device cuda

echo "== total $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
# The device machine returns at most eight files: pack the logs and tables into one.
tar czf "$OUT/../gpu_results.tgz" -C "$OUT" . && mv "$OUT/../gpu_results.tgz" "$OUT/" || true
exit $FAILED
