#!/usr/bin/env bash
# Everything that only a GPU can show, in steps that each fit one 10-minute device call.
#
#   bash benchmarks/gpu_session.sh build tests        # first call: build _C with CUDA, run the gpu tests
#   bash benchmarks/gpu_session.sh la similarity psl  # later calls: the CUDA benchmark runners
#   bash benchmarks/gpu_session.sh task-vectors mudsc
#
# ~470 gpu tests; if `tests` does not fit one call (Triton compiles every kernel variant on first use),
# run its halves in two calls: `tests-la` (the CUDA assignment solver) and `tests-rest` (everything else).
#
# Logs go to $OUT (the device tool's return folder) or ./gpu-logs; copy the benchmark logs into
# benchmarks/results/<device>-<name>-<date>.txt and commit them (each starts with its command and machine).
# Uses the machine's own python3/torch/triton (no registry there): the build is --no-build-isolation.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
day="$(date +%F)"
status=0

run() {  # run NAME COMMAND...: tee the output to $out/NAME.txt, remember a failure, go on
    local name="$1"; shift
    echo "== $name: $*" | tee "$out/$name.txt"
    "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}

for step in "$@"; do
    case "$step" in
        build) run build python3 -m pip install --no-build-isolation --no-deps -e . ;;
        tests) run gpu-tests python3 -m pytest -m gpu -q -rs --durations=15 -o addopts="" tests ;;
        tests-la) run gpu-tests-la python3 -m pytest -m gpu -q -rs --durations=15 -o addopts="" \
            tests/test_linear_assignment.py ;;
        tests-rest) run gpu-tests-rest python3 -m pytest -m gpu -q -rs --durations=15 -o addopts="" tests \
            --ignore=tests/test_linear_assignment.py ;;
        la) run "linear-assignment-$day" python3 benchmarks/run_linear_assignment.py --device cuda ;;
        similarity) run "similarity-$day" python3 benchmarks/run_similarity.py --device cuda ;;
        psl) run "per-sample-linear-$day" python3 benchmarks/run_per_sample_linear.py --device cuda ;;
        task-vectors) run "task-vectors-$day" python3 benchmarks/run.py --device cuda ;;
        mudsc) run "mudsc-$day" python3 benchmarks/run_mudsc.py --device cuda ;;
        *) echo "unknown step $step (build, tests, tests-la, tests-rest, la, similarity, psl, task-vectors, mudsc)"; exit 2 ;;
    esac
done
exit $status
