#!/usr/bin/env bash
# Builds attn and runs the test suite:
#   1. Release build, every test (ctest: the C++ suites and the Python package's pytest files);
#      then the Python package installed as the README says (pip into a virtual environment
#      that sees Debian's numpy and torch) and its examples run from outside the source tree;
#   2. the tests whose results go through BLAS (label blas) again under a second OpenBLAS kernel
#      (scripts/blas_kernels.sh), so that no bound depends on one kernel's summation order;
#   3. AddressSanitizer + UndefinedBehaviorSanitizer build, every test but the slow whole-model
#      training ones (ATTN_TEST_TRAINING=OFF; the Release run has them);
#   4. each libFuzzer target for FUZZ_SECONDS (default 20) on its seed corpus (scripts/fuzz.sh).
# ATTN_SKIP_SANITIZERS=1 skips 3, ATTN_SKIP_FUZZ=1 skips 4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/blas_kernels.sh
jobs=$(nproc)
start=$SECONDS
stage() { echo "[test] $1 (at $((SECONDS - start)) s)"; }

stage "Release build"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_TESTS=ON
cmake --build build -j "$jobs"
build/bin/attn --version
stage "Release tests"
ctest --test-dir build --output-on-failure -j "$jobs"

stage "Python package: pip install into a virtual environment, examples"
rm -rf build/venv
/usr/bin/python3 -m venv --system-site-packages build/venv
ATTN_CMAKE_BUILD_DIR="$PWD/build" build/venv/bin/pip install --quiet --no-build-isolation .
root="$PWD"
for example in python/examples/*.py; do
  (cd /tmp && OMP_WAIT_POLICY=passive PATH="$root/build/bin:$PATH" \
     "$root/build/venv/bin/python" "$root/$example" > /dev/null)
  echo "[test] ran $example"
done

second=$(second_blas_kernel)
stage "BLAS tests under OPENBLAS_CORETYPE=$second"
OPENBLAS_CORETYPE=$second ctest --test-dir build --output-on-failure -j "$jobs" -L blas

if [[ "${ATTN_SKIP_SANITIZERS:-0}" != 1 ]]; then
  stage "sanitizer build"
  # The install consumer is skipped here: it links an uninstrumented program against the
  # instrumented library, which the sanitizer runtimes do not support.
  cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTN_SANITIZE=ON \
    -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF -DATTN_BUILD_TOOLS=OFF \
    -DATTN_TEST_TRAINING=OFF
  cmake --build build-sanitize -j "$jobs"
  stage "sanitizer tests"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-sanitize --output-on-failure -j "$jobs" -E install_consumer
fi

if [[ "${ATTN_SKIP_FUZZ:-0}" != 1 ]]; then
  stage "fuzzing"
  FUZZ_SKIP_SETUP=1 bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi
stage "done"
