#!/usr/bin/env bash
# Builds and runs the benchmark binaries with the settings BENCHMARKS.md was measured with.
#   bash scripts/bench.sh                       # every benchmark binary
#   bash scripts/bench.sh bench_attention ...   # one binary, extra args passed through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_BENCHMARKS=ON >/dev/null
if [[ $# -gt 0 ]]; then
  target=$1; shift
  cmake --build build -j "$(nproc)" --target "$target"
  "./build/bench/$target" "$@"
else
  cmake --build build -j "$(nproc)"
  for b in build/bench/bench_*; do "$b" --benchmark_min_time=0.2; done
fi
