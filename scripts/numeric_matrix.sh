#!/usr/bin/env bash
# Proves the numeric tests do not depend on one BLAS kernel or SIMD target: reruns them under
# every OpenBLAS kernel this CPU can execute (label blas: the tests whose results go through a
# BLAS product) and under every ATTN_SIMD_TARGET cap (label library, minus the EveryTarget
# suites, which pin each target themselves whatever the cap). Prints one line per run.
#   bash scripts/numeric_matrix.sh          # after scripts/test.sh has built ./build
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/blas_kernels.sh
jobs=$(nproc)
failed=0
run() {  # label, env assignment, ctest filters...
  local name=$1 assignment=$2; shift 2
  local log; log=$(mktemp)
  local t0=$SECONDS
  # ctest exits 0 when no test matches: count that as a failure too.
  if env "$assignment" ctest --test-dir build -j "$jobs" "$@" >"$log" 2>&1 &&
     grep -q '100% tests passed' "$log"; then
    echo "PASS $name: $(grep -E 'tests passed' "$log") ($((SECONDS - t0)) s)"
  else
    failed=1
    echo "FAIL $name: $(grep -E 'tests passed' "$log")"
    grep -E '^\s+[0-9]+ - ' "$log" | head -20
  fi
  rm -f "$log"
}
for kernel in $(runnable_blas_kernels); do
  run "OPENBLAS_CORETYPE=$kernel" "OPENBLAS_CORETYPE=$kernel" -L blas
done
for target in avx3 avx2 sse4 ssse3 scalar; do
  run "ATTN_SIMD_TARGET=$target" "ATTN_SIMD_TARGET=$target" -L library -E EveryTarget
done
exit $failed
