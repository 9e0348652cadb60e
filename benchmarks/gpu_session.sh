#!/usr/bin/env bash
# Everything that only a GPU can show, in steps that each fit one 10-minute device call.
#
#   bash benchmarks/gpu_session.sh build tests-la la   # first call: build _C with CUDA, assignment tests + runner
#   bash benchmarks/gpu_session.sh similarity mudsc    # later calls: the other runners ...
#   bash benchmarks/gpu_session.sh tests-rest psl task-vectors
#
# A device machine is handed back after ~30 s idle and a later call starts a bare one, so _C does not survive
# between calls. Every step other than `build` therefore makes sure a CUDA-enabled _C is there first:
#   - if .device_build/_C*.so was carried (run tool: carry=[".device_build"]) and was built from the same
#     csrc/, python/, CMakeLists.txt and setup.py (sources.sha1 beside it), it is copied into the package;
#   - otherwise _C is built (a minute or two for sm_90 only), at most once per call.
# `build` leaves the built library in $OUT/device_build/: copy that folder to .device_build/ here (it is
# git-ignored) and pass carry=[".device_build"] on the later calls to skip their builds.
#
# ~470 gpu tests; `tests` may not fit one call (Triton compiles every kernel variant on first use): its
# halves are `tests-la` (the CUDA assignment solver) and `tests-rest` (everything else). Each test has a
# 300 s timeout where pytest-timeout is installed, so one hung kernel cannot eat the whole call.
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

has_cuda_c() {  # the importable _C has its CUDA part
    python3 -c "import sys, merging_kernels as m; sys.exit(0 if m.build_info().get('cuda') else 1)" 2>/dev/null
}

native_sources_hash() {  # what _C is built from: a carried build of other sources is stale
    find csrc python CMakeLists.txt setup.py -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -d' ' -f1
}

build_failed=0
cuda_ready=0  # checked once per call: each check imports torch

build() {
    if [ "$build_failed" = 1 ]; then return 1; fi  # once per call is enough
    [ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
    export MERGING_KERNELS_CUDA_ARCHS="${MERGING_KERNELS_CUDA_ARCHS:-90}"  # H100 and H200 are sm_90
    # REQUIRE_NATIVE: a CUDA part that does not compile fails here with nvcc's log, instead of
    # setup.py falling back to a CPU-only _C
    MERGING_KERNELS_REQUIRE_NATIVE=1 run build python3 -m pip install --no-build-isolation --no-deps -e .
    if ! has_cuda_c; then  # a CPU-only build would only show later, as skipped or failing gpu tests
        echo "== build: _C has no CUDA part: $(python3 -c 'import merging_kernels as m; print(m.build_info())' 2>&1)" \
            | tee -a "$out/build.txt"
        status=1
        build_failed=1
        return 1
    fi
    mkdir -p "$out/device_build"
    cp merging_kernels/_C*.so "$out/device_build/"
    native_sources_hash > "$out/device_build/sources.sha1"
    cuda_ready=1
    echo "== build: CUDA _C saved to \$OUT/device_build (carry it as .device_build on later calls)"
}

ensure_built() {
    [ "$cuda_ready" = 1 ] && return 0
    if has_cuda_c; then cuda_ready=1; return 0; fi
    if compgen -G ".device_build/_C*.so" >/dev/null; then
        if [ "$(cat .device_build/sources.sha1 2>/dev/null)" != "$(native_sources_hash)" ]; then
            echo "== the carried .device_build/_C was built from other csrc/ sources; building"
        else
            cp .device_build/_C*.so merging_kernels/
            if has_cuda_c; then echo "== using the carried .device_build/_C"; cuda_ready=1; return 0; fi
            echo "== the carried .device_build/_C does not load with CUDA here; building:"
            python3 -c "import merging_kernels as m; print(m.build_info())" 2>&1 | tail -3
        fi
    fi
    build
}

pytest_gpu() {  # pytest_gpu NAME ARGS...: the gpu tests, each with a timeout where the plugin exists
    local name="$1"; shift
    local timeout=()
    python3 -c "import pytest_timeout" 2>/dev/null && timeout=(--timeout=300)
    run "$name" python3 -m pytest -m gpu -q -rs --durations=15 -o addopts="" ${timeout[@]+"${timeout[@]}"} "$@"
}

steps="build tests tests-la tests-rest la similarity psl task-vectors mudsc"
for step in "$@"; do  # a typo fails before any build
    case " $steps " in *" $step "*) ;; *) echo "unknown step $step ($steps)"; exit 2 ;; esac
done

for step in "$@"; do
    [ "$step" = build ] || ensure_built || { echo "== no CUDA _C: skipping $step" | tee -a "$out/skipped.txt"; continue; }
    case "$step" in
        build) build ;;
        tests) pytest_gpu gpu-tests tests ;;
        tests-la) pytest_gpu gpu-tests-la tests/test_linear_assignment.py ;;
        tests-rest) pytest_gpu gpu-tests-rest tests --ignore=tests/test_linear_assignment.py ;;
        la) run "linear-assignment-$day" python3 benchmarks/run_linear_assignment.py --device cuda ;;
        similarity) run "similarity-$day" python3 benchmarks/run_similarity.py --device cuda ;;
        psl) run "per-sample-linear-$day" python3 benchmarks/run_per_sample_linear.py --device cuda ;;
        task-vectors) run "task-vectors-$day" python3 benchmarks/run.py --device cuda ;;
        mudsc) run "mudsc-$day" python3 benchmarks/run_mudsc.py --device cuda ;;
    esac
done
exit $status
