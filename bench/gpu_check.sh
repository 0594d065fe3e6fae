#!/usr/bin/env bash
# GPU checks for a session lent a device machine (issue 16), a few minutes of device time:
#   build  llama-cpp-python 0.3.36 with CUDA (sm_90, as the H100 session built it) and the
#          llama-steer extension, for the device's python3 (3.12)
#   check  tests/test_cuda.py + tests/test_native.py; the real-shape Qwen3-VL-2B VLM (random
#          weights, Q4_K_M, made there by scripts/fixtures/make_real_shape.py) benchmarked with
#          -ngl 99, steered by headmaps/qwen3vl-2b.json (top 10, decode only) and on every head
#          of every layer (prefill + decode); the model-load segfault seen once on an H100:
#          bench/gpu_load_loop.py under gdb (or cuda-gdb), then two such processes at once
#
# 1. Here (network; nothing is installed here): stage the trimmed sdist and the wheels the
#    device lacks into .whl/ (ignored by git, ~25 MB):
#        bash bench/gpu_check.sh prepare [SDIST_DIR]   # default /work/sdist/llama_cpp_python-0.3.36
# 2. On the device, two calls back to back (a machine stays warm 30 s after a call; the build
#    stays in build/gpu-site, an ignored path, while it does):
#        run(command="bash bench/gpu_check.sh build", carry=[".whl"], timeout_s=480)
#        run(command="bash bench/gpu_check.sh check", carry=[".whl"], timeout_s=560)
#    `check tests|bench|segv` runs one part. Each step has its own timeout (they sum to less
#    than the call's); logs go to $OUT/<step>.log and stdout; exit status: failed steps.
#
# The device has python3 3.12 with torch, cmake, ninja, scikit-build-core, pytest, hypothesis,
# cuda-bindings and cuda-gdb (no gdb); it lacks cffi, pycparser and diskcache, and has
# transformers 5 / huggingface_hub 1.x where the fixture scripts use transformers 4.57.6 (with
# tokenizers 0.22, huggingface_hub < 1): those travel as wheels, installed with --target.
set -u
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
ROOT=$PWD
WHL=$ROOT/.whl
SITE=$ROOT/build/gpu-site       # llama-cpp-python (CUDA), cffi, pycparser, diskcache
FIXSITE=$ROOT/build/gpu-fixsite # transformers 4.57.6 & co., for the real-shape model only
CACHE=$ROOT/build/gpu-cache     # the real-shape GGUFs (~1.9 GB)
SDIST=/tmp/llama_cpp_python-0.3.36
MODEL=$CACHE/real-shape/qwen3vl-2b-shape-real-Q4_K_M.gguf
MMPROJ=$CACHE/real-shape/mmproj-qwen3vl-2b-shape-f16.gguf
OUT=${OUT:-$ROOT/build/gpu-out}
mkdir -p "$OUT"
FAILED=0

step() { # step NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, count failures
    local name=$1 t=$2
    shift 2
    echo "=== $name (timeout ${t}s) $(date +%T): $*" | tee -a "$OUT/gpu_check.log"
    local t0=$SECONDS
    timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/gpu_check.log"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    return "$rc"
}

prepare() {
    local sdist=${1:-/work/sdist/llama_cpp_python-0.3.36} base plat
    base=$(basename "$sdist")
    mkdir -p "$WHL"
    # without git history, vocab models, docs, media, benches and tests (none is built:
    # llama.cpp's tests/examples/tools are off when it is a subproject; mtmd is in tools/)
    tar -C "$(dirname "$sdist")" \
        --exclude="$base/.git" --exclude="$base/vendor/llama.cpp/.git" \
        --exclude="$base/vendor/llama.cpp/models" --exclude="$base/vendor/llama.cpp/docs" \
        --exclude="$base/vendor/llama.cpp/media" --exclude="$base/vendor/llama.cpp/benches" \
        --exclude="$base/vendor/llama.cpp/tests" \
        -czf "$WHL/llama_cpp_python-0.3.36-trimmed.tgz" "$base" || return 1
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --python-version 3.12 --implementation cp)
    python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$WHL/site" \
        cffi==2.0.0 pycparser==3.0 diskcache==5.6.3 || return 1
    python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$WHL/fix" \
        transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 || return 1
    du -sh "$WHL" "$WHL"/*
}

unpack_sdist() {
    [ -d "$SDIST/vendor/llama.cpp/ggml" ] || tar -C /tmp -xzf "$WHL"/llama_cpp_python-*.tgz
}

build() {
    nvidia-smi -L
    python3 -V
    command -v nvcc >/dev/null && nvcc --version | tail -1
    if [ -e "$SITE/llama_cpp/lib/libggml-cuda.so" ]; then
        echo "build/gpu-site already holds llama-cpp-python built with CUDA"
    else
        unpack_sdist || return 1
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
            "$WHL"/site/*.whl || return 1
        step pip-build-llama-cpp 400 env CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" \
            CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-index --no-deps \
            --no-build-isolation --no-compile --target "$SITE" "$SDIST" || return 1
    fi
    step build-ext 60 env PYTHONPATH="$SITE" python3 setup.py build_ext --inplace || return 1
    PYTHONPATH=$SITE:$ROOT/plugin python3 -c "import llama_cpp, llama_steer
print('llama-cpp-python', llama_cpp.__version__, 'GPU offload', llama_cpp.llama_supports_gpu_offload())"
}

real_shape() { # the real-shape VLM into $CACHE; its torch stage runs under transformers 4.57.6
    if [ ! -d "$FIXSITE/transformers" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$FIXSITE" \
            "$WHL"/fix/*.whl || return 1
    fi
    unpack_sdist || return 1
    PYTHONPATH=$FIXSITE:$SITE:$ROOT/plugin python3 scripts/fixtures/make_real_shape.py \
        --llama-cpp "$SDIST/vendor/llama.cpp" --torch-python python3 --cache "$CACHE"
}

check_tests() {
    step tests 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_native.py
}

check_bench() {
    [ -e "$MODEL" ] || step real-shape 200 bash "$SELF" real-shape || return 1
    local b=(python3 bench/overhead.py -m "$MODEL" --mmproj "$MMPROJ" -ngl 99 -t 4 -n 64
        --runs 3 --reps 7)
    step bench-gpu-headmap 110 "${b[@]}" --headmap headmaps/qwen3vl-2b.json
    step bench-gpu-all 110 "${b[@]}"
}

check_segv() {
    local dbg loop=(python3 bench/gpu_load_loop.py --iters 12)
    [ -e "$MODEL" ] && loop+=(-m "$MODEL" --mmproj "$MMPROJ")
    dbg=$(command -v gdb || command -v cuda-gdb)
    # one process under the debugger: a native backtrace where it dies ("No stack." if not)
    if [ -n "$dbg" ]; then
        step segv-debugger 100 "$dbg" -batch -ex run -ex bt -ex "info threads" --args "${loop[@]}"
        if grep -q "received signal" "$OUT/segv-debugger.log"; then
            echo "REPRODUCED under $dbg: see $OUT/segv-debugger.log"
            FAILED=$((FAILED + 1))
        fi
    else
        step segv-plain 100 "${loop[@]}"
    fi
    # two at once, as when two processes died: faulthandler prints each one's Python stack
    ulimit -c unlimited 2>/dev/null
    step segv-two-processes 100 bash -c '
        "$@" >"$OUT/segv-p1.log" 2>&1 & a=$!
        "$@" >"$OUT/segv-p2.log" 2>&1 & b=$!
        trap "kill $a $b" TERM
        wait $a; ra=$?; wait $b; rb=$?
        echo "process 1 rc=$ra, process 2 rc=$rb (139 or -11: SIGSEGV)"
        tail -n 4 "$OUT"/segv-p1.log "$OUT"/segv-p2.log
        [ $ra -eq 0 ] && [ $rb -eq 0 ]' _ "${loop[@]}"
    local core
    for core in core core.*; do
        [ -e "$core" ] && [ -n "$dbg" ] && "$dbg" -batch -ex bt python3 "$core" 2>&1 |
            tee -a "$OUT/segv-core.log"
    done
}

check() {
    export PYTHONPATH=$SITE:$ROOT/plugin OMP_WAIT_POLICY=passive PYTHONUNBUFFERED=1 OUT
    if ! python3 -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"; then
        echo "no CUDA llama-cpp-python in build/gpu-site: run 'bash bench/gpu_check.sh build' first"
        return 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
    local parts=("$@")
    [ ${#parts[@]} -gt 0 ] || parts=(tests bench segv)
    for p in "${parts[@]}"; do "check_$p"; done
}

case "${1:-}" in
prepare) prepare "${2:-}" || FAILED=1 ;;
build) build || FAILED=$((FAILED + 1)) ;;
real-shape) real_shape || FAILED=1 ;;
check)
    shift
    check "$@" || FAILED=$((FAILED + 1))
    ;;
*)
    sed -n '2,25p' "$SELF"
    exit 2
    ;;
esac
echo "failed steps: $FAILED" | tee -a "$OUT/gpu_check.log"
exit "$FAILED"
