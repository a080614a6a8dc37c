#!/usr/bin/env bash
# The GPU checks in one pass, for a short lease of a CUDA machine: what the card is, the GPU-only
# tests, benchmarks/bench_pipeline.sh on the GPU (the default main job on Fashion-MNIST, ratio-only
# changes and reverts), the main job again with cold stage starts (SEMIPRUNE_WARM_STAGES=0: what
# the stage server saves), the engine's throughput per model with and without torch.compile, and the
# main job with every model compiled. Each step has its own time limit inside one overall deadline,
# in order of importance, so a short lease still returns the first ones.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default $OUT, else reports/gpu_check)
#
# Run from the project root of a git checkout, with semiprune's dependencies importable by
# $PYTHON (default python3) and Fashion-MNIST where the source stage finds it. Writes
# gpu_check.log (every step's output and seconds), engine_cuda.json, engine_cuda_compiled.json and
# pipeline.tgz (bench_pipeline's logs, timings and metrics).
# GPU_CHECK_SKIP="engine ..." skips steps by name; GPU_CHECK_COMPILE_MODE picks the torch.compile mode
# that engine_compiled and pipeline_compiled use (default reduce-overhead: CUDA graphs).
set -u
export PYTHON=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-reports/gpu_check}}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-560} ))
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
ROOT=$(pwd)
export PATH="$(dirname "$(command -v "$PYTHON")"):$PATH" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
export PREFECT_HOME=${PREFECT_HOME:-/tmp/semiprune-gpu-prefect} PREFECT_SERVER_ANALYTICS_ENABLED=false

# step NAME LIMIT_SECONDS COMMAND...: run it with the smaller of its limit and what the deadline leaves
step() {
  local name=$1 limit=$2; shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$LOG"; return 0; fi
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "== $name: skipped (deadline)" | tee -a "$LOG"; return 0; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s%N)
  # its own session, killed whole at the limit (timeout(1) and DVC start process groups of their
  # own inside it): nothing of a step outlives it to load the GPU under the next step's measurement
  setsid "$@" >>"$LOG" 2>&1 &
  local pid=$!
  ( sleep "$limit"; pkill -TERM -s "$pid"; sleep 10; pkill -KILL -s "$pid" ) 2>/dev/null &
  local watchdog=$!
  wait "$pid"
  local rc=$? ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  kill "$watchdog" 2>/dev/null
  printf '== %s: exit %d after %d.%03d s\n' "$name" "$rc" $(( ms / 1000 )) $(( ms % 1000 )) | tee -a "$LOG"
  return 0
}

step machine 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; \
  $PYTHON -c 'import torch; print(\"torch\", torch.__version__, torch.cuda.get_device_name(0), \"bf16\", torch.cuda.is_bf16_supported())'"
step gpu_tests 180 "$PYTHON" -m pytest tests/gpu -rs -q -p no:cacheprovider

SCRATCH=$(mktemp -d)
step pipeline 420 bash benchmarks/bench_pipeline.sh --out "$SCRATCH/pipeline"
step pipeline_cold 240 env SEMIPRUNE_WARM_STAGES=0 bash benchmarks/bench_pipeline.sh --out "$SCRATCH/pipeline_cold" --main-only
step engine 200 "$PYTHON" benchmarks/bench_engine.py --device cuda --workers 8 \
  --json "$OUT_DIR/engine_cuda.json"
step engine_compiled 150 "$PYTHON" benchmarks/bench_engine.py --device cuda --workers 8 \
  --skip-accuracy --models fastcnn_s fastcnn --compile "${GPU_CHECK_COMPILE_MODE:-reduce-overhead}" \
  --json "$OUT_DIR/engine_cuda_compiled.json"

step pipeline_compiled 300 bash benchmarks/bench_pipeline.sh --out "$SCRATCH/pipeline_compiled" --main-only \
  --set "base.compile=${GPU_CHECK_COMPILE_MODE:-reduce-overhead}"
tar -czf "$OUT_DIR/pipeline.tgz" -C "$SCRATCH" . 2>>"$LOG"
echo "== done" | tee -a "$LOG"
