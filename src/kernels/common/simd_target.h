// Choosing the Highway SIMD target of attn's kernels (internal).
//
// The kernels are compiled once per Highway target (foreach_target.h) and HWY_DYNAMIC_DISPATCH
// picks the best one the CPU supports. Two ways to restrict that choice:
//
// - ATTN_SIMD_TARGET=<name> in the environment caps the target for the whole process: it is read
//   once, at the first kernel call, and disables (hwy::DisableTargets) every target better than
//   <name>, so a CPU without <name> falls back to the best target below it. Names
//   (case-insensitive): scalar (alias emu128: the portable fallback, whichever of the two this
//   Highway build compiles), ssse3, sse4, avx2, avx3 (alias avx512). Anything else throws
//   attn::Error.
// - Tests loop over available_simd_targets() and pin one with ScopedSimdTarget, which mocks the
//   CPU's target set (hwy::SetSupportedTargetsForTest) and restores it on destruction. Both act
//   on process-global state: do not switch targets while kernels run on other threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace attn::kernels {

struct SimdTarget {
  int64_t bits = 0;  // one HWY_* target bit
  std::string name;  // Highway's name: "AVX3", "AVX2", "SSE4", "SSSE3", "SCALAR", "EMU128"
};

// Targets compiled into attn that this CPU supports and ATTN_SIMD_TARGET allows, best first (so
// tests that loop over them never pin a target the cap disabled).
std::vector<SimdTarget> available_simd_targets();

// Applies ATTN_SIMD_TARGET once per process; every dispatching kernel entry point calls it.
void apply_simd_target_from_env();

// Name of the target HWY_DYNAMIC_DISPATCH calls now (after ATTN_SIMD_TARGET), e.g. "AVX3".
std::string dispatched_simd_target();

// Pins dispatch to one target for the lifetime of the object.
class ScopedSimdTarget {
 public:
  explicit ScopedSimdTarget(int64_t target_bits);
  ~ScopedSimdTarget();
  ScopedSimdTarget(const ScopedSimdTarget&) = delete;
  ScopedSimdTarget& operator=(const ScopedSimdTarget&) = delete;
};

}  // namespace attn::kernels
