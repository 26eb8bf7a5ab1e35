#!/usr/bin/env bash
# Everything a lent GPU should measure, in one command, from a bare machine that has only this
# repository, the data archive and wheels of the packages it lacks:
#
#   benchmarks/gpu_suite.sh [--plan] [--data ARCHIVE] [--wheels DIR] [--out DIR]
#
# Stages, in order, each under its own time cap (`timeout`; a stage that runs out of time keeps
# what it finished, and the next stage still runs): setup (missing packages from --wheels, then
# nvidia-smi and torch versions), the tests that need CUDA, benchmarks/throughput.py --device
# cuda, session8 and fast on all of the data (side by side when the GPU has room), a probe of
# 1, 2, 4 and 8 runs at once (a minute each; the best throughput wins), then the ablation sweep
# with that many parallel runs. Everything goes into one folder (--out): logs, each run's
# metrics.json, the benchmark's JSON, versions. --plan prints the stages, estimates and caps and
# does nothing else (no GPU, no files). Target, stated and not measured here: stages 1-3 within
# 9 minutes on one H100 or H200.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DATA=${DATA:-$ROOT/../shared/data/cifar10-jpg.tar.gz}
WHEELS=${WHEELS:-}
OUT=${OUT:-$ROOT/gpu-suite-$(date +%Y%m%d-%H%M%S)}
PLAN=0
STAGE=""
while [ $# -gt 0 ]; do
  case $1 in
    --plan) PLAN=1 ;;
    --data) DATA=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --stage) STAGE=$2; shift ;;  # internal: run one stage's body (under the caller's timeout)
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=$(realpath -m "$OUT") DATA=$(realpath -m "$DATA")  # before the cd: relative to the caller
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 2

# Time caps in minutes, one per stage.
CAP_SETUP=3 CAP_TESTS=3 CAP_THROUGHPUT=3 CAP_TRAININGS=7 CAP_PROBE=6
CAP_ABLATION=${ABLATION_MINUTES:-150}
PROBE_SECONDS=60
GRID=(--preset session8 --grid num_splits=1,2,4,8 --grid dropout=0,0.1 --seeds 1,2,3)

# --- stage bodies (each runs as `gpu_suite.sh --stage NAME` under timeout) ------------------

cuda_tests() {  # the tests marked cuda (pyproject.toml); none is a note, not a failure
  local found
  found=$("$PY" -m pytest --collect-only -q -p no:cacheprovider -m cuda tests 2>/dev/null \
    | grep -c '::')
  if [ "$found" -eq 0 ]; then
    echo "no test is marked cuda (pytest -m cuda collects none): stage skipped"
    return 0
  fi
  "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
}

trainings() {  # session8 and fast on all of the data; side by side if 20 GiB are free
  local free
  free=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -n 1)
  echo "free GPU memory: ${free} MiB"
  train() { "$PY" -m eva_utils train --preset "$1" --data "$DATA" --quiet --out "$OUT/runs/$1-gpu"; }
  if [ "${free:-0}" -gt 20480 ]; then
    train session8 > "$OUT/train-session8.log" 2>&1 &
    train fast > "$OUT/train-fast.log" 2>&1
    wait
  else
    train session8 > "$OUT/train-session8.log" 2>&1
    train fast > "$OUT/train-fast.log" 2>&1
  fi
}

probe() {  # N session8 runs at once on synthetic images for a minute each; best N wins
  local n i
  for n in 1 2 4 8; do
    for i in $(seq "$n"); do
      timeout "$PROBE_SECONDS" "$PY" -m eva_utils train --preset session8 --data synthetic \
        --train-size 12800 --test-size 1000 --epochs 100 --seed "$i" --quiet \
        --out "$OUT/probe/$n/run$i" > "$OUT/probe-$n-$i.log" 2>&1 &
    done
    wait
  done
  "$PY" - "$OUT/probe" <<'EOF' | tee "$OUT/probe.txt"
import json, statistics, sys
from pathlib import Path

rates = {}
for n in (1, 2, 4, 8):  # training images per second, all runs together, after their 1st epoch
    total = 0.0
    for metrics in Path(sys.argv[1], str(n)).glob("*/metrics.json"):
        history = json.loads(metrics.read_text())["history"][1:]
        if history:
            total += 12800 / statistics.median(row["seconds"] for row in history)
    rates[n] = total
    print(f"{n} at once: {total:,.0f} images/s")
best = max(rates, key=rates.get)
print(f"best: {best}")
EOF
}

ablation() {
  local parallel
  parallel=$(sed -n 's/^best: //p' "$OUT/probe.txt" 2>/dev/null)
  echo "parallel runs: ${parallel:=1} (from the probe)"
  "$PY" -m eva_utils sweep "${GRID[@]}" --data "$DATA" --parallel "$parallel" --quiet \
    --out "$OUT/ablation"
  local rc=$?
  [ "$rc" -eq 0 ] || "$PY" -m eva_utils sweep --summarize "$OUT/ablation"  # what finished
  return "$rc"
}

if [ -n "$STAGE" ]; then
  "$STAGE"
  exit $?
fi

# --- the plan ------------------------------------------------------------------------------

# Seconds per epoch of the recorded H100 runs (results/*/metrics.json).
read -r S8 FAST < <("$PY" - <<'EOF'
from eva_utils.results import read_recorded_run

print(*(f"{read_recorded_run(f'results/{name}').summary()['seconds_per_epoch']:.1f}"
        for name in ("session8-h100", "fast-h100")))
EOF
)
plan() {
  local minutes
  minutes() { "$PY" -c "print(f'{$1 / 60:.1f}')"; }
  echo "GPU suite: stages, estimates and time caps. Estimates from the recorded H100 runs"
  echo "(results/session8-h100: $S8 s/epoch, results/fast-h100: $FAST s/epoch, 30 epochs each);"
  echo "the setup, test and benchmark estimates are guesses, not measurements."
  printf '  %-42s %-28s %s\n' "stage" "estimate" "cap"
  printf '  %-42s %-28s %s\n' "0 setup: wheels, nvidia-smi, versions" "under 1 min" "$CAP_SETUP min"
  printf '  %-42s %-28s %s\n' "1 tests marked cuda (pytest -m cuda)" "under 1 min" "$CAP_TESTS min"
  printf '  %-42s %-28s %s\n' "2 throughput.py --device cuda" "about 1 min" "$CAP_THROUGHPUT min"
  printf '  %-42s %-28s %s\n' "3 session8 + fast, all data, side by side" \
    "$(minutes "30 * $S8") min (session8)" "$CAP_TRAININGS min"
  printf '  %-42s %-28s %s\n' "4 probe: 1, 2, 4, 8 runs at once" \
    "$((4 * PROBE_SECONDS / 60)) min" "$CAP_PROBE min"
  printf '  %-42s %-28s %s\n' "5 ablation: 24 runs of 30 epochs" \
    "$(minutes "24 * 30 * $S8") min / speed-up" "$CAP_ABLATION min (ABLATION_MINUTES)"
  echo "Target (stated, not measured here): stages 1-3 within 9 minutes on one H100 or H200."
  echo "The ablation estimate is one run at a time at session8's speed, divided by the speed-up"
  echo "the probe measures; a stopped ablation continues with the same command (it resumes)."
  echo "Output folder: $OUT"
}
plan
[ "$PLAN" -eq 1 ] && exit 0

# --- the run -------------------------------------------------------------------------------

mkdir -p "$OUT" || exit 2
plan > "$OUT/plan.txt"
echo "stage	status	seconds" > "$OUT/stages.tsv"
stage() {  # stage NAME CAP_MINUTES COMMAND...: a stage's output in NAME.log, its fate in stages.tsv
  local name=$1 cap=$2 started=$SECONDS rc status
  shift 2
  echo "== $name (cap $cap min): $*"
  timeout --kill-after=60 "$((cap * 60))" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=done ;;
    124|137) status="out of time (kept what finished)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "   $name: $status after $((SECONDS - started)) s; log: $OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" >> "$OUT/stages.tsv"
}

setup() {
  local module
  for module in torch torchvision torchsummary matplotlib tqdm PIL pytest; do
    "$PY" -c "import $module" 2>/dev/null && continue
    [ -n "$WHEELS" ] || { echo "missing $module and no --wheels DIR"; continue; }
    case $module in PIL) module=pillow ;; esac
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$module"
  done
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  "$PY" -c "import platform, torch, torchvision
print('python', platform.python_version(), 'torch', torch.__version__, 'torchvision',
      torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$OUT/versions.txt"
  git -C "$ROOT" rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
}
export -f setup
export OUT PY WHEELS ROOT

stage setup "$CAP_SETUP" bash -c setup
stage cuda-tests "$CAP_TESTS" "$0" --stage cuda_tests --data "$DATA" --out "$OUT"
stage throughput "$CAP_THROUGHPUT" "$PY" benchmarks/throughput.py --device cuda \
  --json "$OUT/throughput.json"
stage trainings "$CAP_TRAININGS" "$0" --stage trainings --data "$DATA" --out "$OUT"
stage probe "$CAP_PROBE" "$0" --stage probe --data "$DATA" --out "$OUT"
stage ablation "$CAP_ABLATION" "$0" --stage ablation --data "$DATA" --out "$OUT"
cat "$OUT/stages.tsv"
echo "everything is in $OUT"
