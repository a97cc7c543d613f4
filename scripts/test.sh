#!/usr/bin/env bash
# Builds attn and runs the whole test suite twice: a Release build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer (set ATTN_SKIP_SANITIZERS=1 to skip the second).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_TESTS=ON
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure -j "$jobs"

if [[ "${ATTN_SKIP_SANITIZERS:-0}" != 1 ]]; then
  # The install consumer is skipped here: it links an uninstrumented program against the
  # instrumented library, which the sanitizer runtimes do not support.
  cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTN_SANITIZE=ON \
    -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF
  cmake --build build-sanitize -j "$jobs"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-sanitize --output-on-failure -j "$jobs" -E install_consumer
fi
