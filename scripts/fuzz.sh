#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang-14 with ASan + UBSan) into build-fuzz and runs each
# for a bounded time on a temporary copy of its committed seed corpus (fuzz/corpus/<target>; the
# committed corpus is never written), with its dictionary fuzz/<target>.dict when there is one.
# Prints one summary line per target and exits non-zero when any target found a crash, a
# sanitizer report, a leak, a time-out or an out-of-memory.
#   bash scripts/fuzz.sh                    # every target, FUZZ_SECONDS (default 20) each
#   bash scripts/fuzz.sh 600                # 10 minutes each
#   bash scripts/fuzz.sh 60 fuzz_pairs      # one target
# Environment: FUZZ_SECONDS, FUZZ_BUILD_JOBS (default nproc), FUZZ_KEEP=1 keeps the temporary
# directory (grown corpus, crash inputs, logs) and prints its path, FUZZ_SKIP_SETUP=1 skips
# scripts/setup.sh. A failing input is also copied to build-fuzz/findings/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-${FUZZ_SECONDS:-20}}
[[ $# -gt 0 ]] && shift
targets=("$@")

if [[ "${FUZZ_SKIP_SETUP:-0}" != 1 ]]; then bash scripts/setup.sh; fi
CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DATTN_BUILD_FUZZERS=ON -DATTN_BUILD_TESTS=OFF -DATTN_BUILD_BENCHMARKS=OFF \
  -DATTN_BUILD_EXAMPLES=OFF -DATTN_BUILD_TOOLS=OFF >/dev/null
if ((${#targets[@]} == 0)); then
  for dir in fuzz/corpus/*/; do targets+=("fuzz_$(basename "$dir")"); done
fi
cmake --build build-fuzz -j "${FUZZ_BUILD_JOBS:-$(nproc)}" --target "${targets[@]}"

work=$(mktemp -d "${TMPDIR:-/tmp}/attn-fuzz.XXXXXX")
if [[ "${FUZZ_KEEP:-0}" == 1 ]]; then echo "[fuzz] work directory: $work"; else trap 'rm -rf "$work"' EXIT; fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# The readers are single-threaded; keep OpenMP and OpenBLAS from starting worker pools.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

failed=0
summary=()
for target in "${targets[@]}"; do
  seeds=fuzz/corpus/${target#fuzz_}
  mkdir -p "$work/$target/corpus" "$work/$target/artifacts"
  cp -r "$seeds/." "$work/$target/corpus/"
  log=$work/$target/log.txt
  echo "[fuzz] $target: ${seconds} s"
  extra=()  # the target's dictionary of keywords, when it has one
  if [[ -f fuzz/${target#fuzz_}.dict ]]; then extra+=("-dict=fuzz/${target#fuzz_}.dict"); fi
  rc=0
  "build-fuzz/fuzz/$target" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$work/$target/artifacts/" "${extra[@]}" \
    "$work/$target/corpus" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  crashes=$(find "$work/$target/artifacts" -type f | wc -l)
  if ((rc != 0 && crashes == 0)); then crashes=1; fi
  line=$(printf '%-18s %4s s  runs %-10s %7s exec/s  crashes %s  corpus %s files' "$target" \
    "$seconds" "${runs:-?}" "${rate:-?}" "$crashes" "$(ls "$work/$target/corpus" | wc -l)")
  summary+=("$line")
  if ((crashes != 0)); then
    failed=1
    echo "[fuzz] $target FAILED (exit $rc); the report:"
    grep -A40 -m1 -E '^==[0-9]+==ERROR|runtime error|deadly signal|ALARM|out-of-memory|uncaught exception' "$log" || tail -40 "$log"
    for f in "$work/$target/artifacts"/*; do
      [[ -f "$f" ]] && echo "[fuzz] input ($f): $(head -c 300 "$f" | od -An -c | head -8)"
    done
    # Keep the failing input where it can be read after the temporary directory is gone.
    mkdir -p build-fuzz/findings && cp "$work/$target/artifacts"/* build-fuzz/findings/ 2>/dev/null || true
  fi
done
echo "[fuzz] summary:"
printf '  %s\n' "${summary[@]}"
exit "$failed"
