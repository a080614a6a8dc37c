#!/usr/bin/env bash
# End-to-end timings of the default main job, in a fresh clone of this checkout's HEAD with a running
# `semiprune server`: the full run, ratio-only changes (prune 70 %, 30 %, 90 %), and setting the
# ratio back, through the flow and as plain `dvc repro`.
#
#   bash benchmarks/bench_pipeline.sh [--out DIR] [--main-only] [--set KEY=VALUE ...]
#
# --out        where pipeline.log (every command's output), timings.tsv (step, exit code, seconds)
#              and metrics/ (the main job's) go; default reports/bench_pipeline
# --main-only  the full run alone
# --set        params for every flow run (they run in the workspace runs/bench; no plain-DVC steps
#              then), e.g. --set base.compile=reduce-overhead
# PYTHON       the interpreter with semiprune's dependencies (default .venv/bin/python, else python3)
# Each command has BENCH_STEP_TIMEOUT seconds (default 1800). Whole runs vary by about 15 % on a
# shared machine: compare figures measured in one run of this script.
set -u
ROOT=$(pwd)
OUT_DIR=reports/bench_pipeline MAIN_ONLY=0 SETS=()
while (( $# )); do
  case $1 in
    --out) OUT_DIR=$2; shift 2 ;;
    --main-only) MAIN_ONLY=1; shift ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    *) echo "error: unknown argument $1; see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/pipeline.log TSV=$OUT_DIR/timings.tsv
: >"$LOG"; printf 'step\texit\tseconds\n' >"$TSV"

WORK=$(mktemp -d)/project
git clone -q "$ROOT" "$WORK" || { echo "error: cannot clone $ROOT (run this from the project's git checkout)" >&2; exit 2; }
cd "$WORK" || exit 2
export PATH="$(dirname "$PYTHON"):$PATH" PREFECT_HOME=$WORK/.prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
RUN=("$PYTHON" -m flows.cli run "${SETS[@]}")
(( ${#SETS[@]} )) && RUN+=(--name bench)
WS=$WORK; (( ${#SETS[@]} )) && WS=$WORK/runs/bench  # where the main job's metrics land

timed() {  # timed STEP COMMAND...: run it, log its output, record its exit code and seconds
  local name=$1; shift
  echo "== $name: $*" >>"$LOG"
  local t0=$(date +%s%N)
  timeout "${BENCH_STEP_TIMEOUT:-1800}" "$@" >>"$LOG" 2>&1
  local rc=$? ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%d\t%d.%03d\n' "$name" "$rc" $(( ms / 1000 )) $(( ms % 1000 )) | tee -a "$TSV"
}
ratio() { sed -i "s/^  ratio: [0-9.]* /  ratio: $1 /" "$WORK/params.yaml"; }

# without the server every run would start a temporary one (5-10 s each): timings of another setup
"$PYTHON" -m flows.cli server start >>"$LOG" 2>&1 || { echo "error: semiprune server start failed; see $LOG" >&2; exit 1; }
trap '"$PYTHON" -m flows.cli server stop >>"$LOG" 2>&1' EXIT  # the server is a daemon: stop it however this ends
trap 'exit 143' TERM INT
timed main_job "${RUN[@]}"
cp -r "$WS/metrics" "$OUT_DIR/" 2>>"$LOG"
if (( ! MAIN_ONLY )); then
  ratio 0.7; timed ratio_0.7 "${RUN[@]}"
  ratio 0.5; timed revert_flow "${RUN[@]}"
  ratio 0.3; timed ratio_0.3 "${RUN[@]}"
  ratio 0.9; timed ratio_0.9 "${RUN[@]}"
  ratio 0.5; timed revert_flow_again "${RUN[@]}"
  if (( ! ${#SETS[@]} )); then  # plain DVC, where the flow would run: the 70 % run is in the run-cache
    ratio 0.7; timed cached_0.7_dvc_repro "$PYTHON" -m dvc repro -q
    ratio 0.5; timed revert_dvc_repro "$PYTHON" -m dvc repro -q
  fi
fi
echo "bench_pipeline: $TSV"
