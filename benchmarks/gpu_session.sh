#!/usr/bin/env bash
# Everything that only a GPU can show, in one device call (steps in the order given, most important first):
#
#   bash benchmarks/gpu_session.sh build tests-la la similarity tests-rest psl task-vectors mudsc psl-conv
#
# (run tool: timeout_s=600). A lease is 15 minutes of device time, machine start and idle time included,
# and one call at most 10, so the script keeps its own clock: GPU_SESSION_SECONDS (default 540) from its
# start. Each step runs under `timeout` for what is left of that budget (SIGINT first, so pytest still
# prints its summary and a runner its last rows), and a step that would start with under 30 s left is
# skipped and listed in skipped.txt. The call therefore returns inside the tool's limit with every
# finished log under $OUT; a second call made at once (the machine stays warm ~30 s, _C included) picks
# up the skipped steps.
#
# A later call on a fresh machine has no _C. Every step other than `build` therefore makes sure a
# CUDA-enabled _C is there first:
#   - if .device_build/_C*.so was carried (run tool: carry=[".device_build"]) and was built from the same
#     csrc/, python/, CMakeLists.txt and setup.py (sources.sha1 beside it), it is copied into the package;
#   - otherwise _C is built (a minute or two for sm_90 only), at most once per call.
# `build` leaves the built library in $OUT/device_build/: copy that folder to .device_build/ here (it is
# git-ignored) and pass carry=[".device_build"] on later calls to skip their builds.
#
# ~470 gpu tests: `tests-la` (the CUDA assignment solver) and `tests-rest` (everything else), or `tests`
# for both. They run on 8 pytest-xdist workers where the plugin is installed (Triton compiles every
# kernel variant on first use, on the CPU), and each test has a 120 s timeout where pytest-timeout is
# installed (thread method: a kernel that never returns is still stopped), so one hung kernel cannot
# eat the call.
#
# Each step's log is gpu-logs/<step>.txt; only 8 files come back from $OUT (the device tool's return
# folder), so after every step all logs so far are packed into $OUT/logs.tar (a call stopped mid-step
# still returns the finished ones), beside $OUT/device_build/. Unpack it here, copy the benchmark logs
# into benchmarks/results/<device>-<name>-<date>.txt and commit them (each starts with its command and
# machine).
# Uses the machine's own python3/torch/triton (no registry there): the build is --no-build-isolation.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=gpu-logs
out="${OUT:-$logs}"  # what comes back: logs.tar and device_build/
mkdir -p "$logs" "$out"
export PYTHONUNBUFFERED=1
day="$(date +%F)"
status=0

budget="${GPU_SESSION_SECONDS:-540}"
started=$SECONDS

run() {  # run NAME COMMAND...: within what is left of the budget, tee the output to $logs/NAME.txt, go on
    local name="$1"; shift
    local left=$(( budget - (SECONDS - started) ))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left} s of the call's ${budget} s left: $*" | tee -a "$logs/skipped.txt"
        status=1
        pack_logs
        return 1
    fi
    echo "== $name: $* (at most ${left} s)" | tee "$logs/$name.txt"
    timeout -s INT -k 20 "$left" "$@" 2>&1 | tee -a "$logs/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== $name: stopped at the end of the call's budget" | tee -a "$logs/$name.txt"
    echo "== $name: exit $rc after $(( SECONDS - started )) s of the call" | tee -a "$logs/$name.txt"
    [ "$rc" -eq 0 ] || status=1
    pack_logs
    return "$rc"
}

pack_logs() {  # every log so far in one file of $OUT (only 8 files come back)
    [ "$out" = "$logs" ] || tar -cf "$out/logs.tar" -C "$logs" --exclude=device_build .
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
            | tee -a "$logs/build.txt"
        status=1
        build_failed=1
        pack_logs
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

pytest_gpu() {  # pytest_gpu NAME ARGS...: the gpu tests, on xdist workers and with timeouts where installed
    local name="$1"; shift
    local extra=()
    python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120 --timeout-method=thread)
    python3 -c "import xdist" 2>/dev/null && extra+=(-n 8)
    run "$name" python3 -m pytest -m gpu -q -rs --durations=15 -o addopts="" ${extra[@]+"${extra[@]}"} "$@"
}

steps="build tests tests-la tests-rest la similarity psl task-vectors mudsc psl-conv"
for step in "$@"; do  # a typo fails before any build
    case " $steps " in *" $step "*) ;; *) echo "unknown step $step ($steps)"; exit 2 ;; esac
done

for step in "$@"; do
    [ "$step" = build ] || ensure_built || { echo "== no CUDA _C: skipping $step" | tee -a "$logs/skipped.txt"; pack_logs; continue; }
    case "$step" in
        build) build ;;
        tests) pytest_gpu gpu-tests tests ;;
        tests-la) pytest_gpu gpu-tests-la tests/test_linear_assignment.py ;;
        tests-rest) pytest_gpu gpu-tests-rest tests --ignore=tests/test_linear_assignment.py ;;
        la) run "linear-assignment-$day" python3 benchmarks/run_linear_assignment.py --device cuda ;;
        similarity) run "similarity-$day" python3 benchmarks/run_similarity.py --device cuda ;;
        psl) run "per-sample-linear-$day" python3 benchmarks/run_per_sample_linear.py --device cuda ;;
        # banks vs stacked per-sample conv on a GPU: choose_conv_strategy keeps banks on CUDA until this is read
        psl-conv) run "per-sample-conv2d-$day" python3 benchmarks/run_per_sample_linear.py --conv --device cuda --quick ;;
        task-vectors) run "task-vectors-$day" python3 benchmarks/run.py --device cuda ;;
        mudsc) run "mudsc-$day" python3 benchmarks/run_mudsc.py --device cuda ;;
    esac
done
exit $status
