#!/usr/bin/env bash
# The GPU checks of issues #12, #13 and #35, for a session lent a device machine. Here, once:
#   make device-kit                      (builds .whl/, ~50 MiB, git-ignored)
# then device calls from the repository root, carry [".whl"]:
#   bash deploy/device/check.sh [STEP ...]
# STEPs (the default: tests learner, 7 minutes at most, the limits below adding up to 420 s, plus
# the install; `scaling loop`, 270 s, is a second call):
#   tests    the CUDA tests (tests/test_cuda.py, the compiled update's tests/test_compiled.py) and
#            the TD3 update tests, un-skipped
#   learner  make bench-learner's CUDA rows: ours plain / compiled (reduce-overhead: CUDA graphs) /
#            SB3 at batch 256 and 1024, TFLOP/s vs a matmul, variants, GPU memory
#   scaling  make bench-scaling's K-env actor with its policy on the GPU, beside the CPU float32 one
#   loop     make bench-loop: a distributed run's updates/s against the bench's, on the GPU
# Each step has its own time limit; one that fails or runs out is reported and the next still
# runs. Seven files land in $OUT (the device tool brings back at most eight): summary.txt, a log per
# step, and results/bench.json and bench.md with the device's sections beside this checkout's.
set -u
OUT=${OUT:-/tmp/device-check}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/av-td3-site}
KIT=${KIT:-.whl}  # KIT=none: use $PY's own packages (a dry run of this script on a CPU machine)
STEPS=${*:-tests learner}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{ nvidia-smi -L || true; "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'; echo "$(nproc) cores"; } >"$OUT/summary.txt" 2>&1

if [ "$KIT" != none ]; then
  [ -d "$KIT" ] || { echo "no $KIT/: run 'make device-kit' here and carry it" | tee -a "$OUT/summary.txt"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/*.whl &&
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$KIT/ray-slim.tar.xz" "$SITE" ||
    { echo "installing the kit from $KIT/ failed" | tee -a "$OUT/summary.txt"; exit 1; }
fi
# Ray's workers and the learner's subprocesses import the project from here too.
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout --signal=INT --kill-after=30 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

for s in $STEPS; do
  case $s in
    tests) step tests 120 "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py tests/test_compiled.py tests/test_td3.py ;;
    learner) step learner 300 "$PY" -m tests.bench.learner --devices cuda ;;
    scaling) step scaling 130 "$PY" -m tests.bench.scaling --runs policy,cuda_policy --envs 1,8,16 ;;
    loop) step loop 140 "$PY" -m tests.bench.loop --seconds 75 ;;
    *) echo "unknown step '$s' (steps: tests learner scaling loop)" | tee -a "$OUT/summary.txt" ;;
  esac
done
cp results/bench.json results/bench.md "$OUT"/ 2>/dev/null
cat "$OUT/summary.txt"
