#include "kernels/common/simd_target.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <mutex>

#include "attn/error.h"
#include "hwy/highway.h"
#include "hwy/targets.h"

namespace attn::kernels {

namespace {

// The portable fallback this Highway build compiles: EMU128, or SCALAR where GCC < 12.3 makes
// Highway disable EMU128.
constexpr int64_t kFallbackTarget = HWY_TARGETS & (HWY_EMU128 | HWY_SCALAR);

int64_t target_bits_from_name(const std::string& raw) {
  std::string name = raw;
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (name == "scalar" || name == "emu128") return kFallbackTarget;
#if HWY_ARCH_X86
  if (name == "ssse3") return HWY_SSSE3;
  if (name == "sse4") return HWY_SSE4;
  if (name == "avx2") return HWY_AVX2;
  if (name == "avx3" || name == "avx512") return HWY_AVX3;
#endif
  throw Error("simd_target", "ATTN_SIMD_TARGET=\"" + raw +
                                 "\" is not one of scalar, emu128, ssse3, sse4, avx2, avx3, avx512");
}

}  // namespace

std::vector<SimdTarget> available_simd_targets() {
  apply_simd_target_from_env();  // the cap removes targets from Highway's supported set
  std::vector<SimdTarget> targets;
  // Lower bits are better targets; SupportedAndGeneratedTargets lists them in that order.
  for (int64_t bits : hwy::SupportedAndGeneratedTargets())
    targets.push_back({bits, hwy::TargetName(bits)});
  return targets;
}

void apply_simd_target_from_env() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* value = std::getenv("ATTN_SIMD_TARGET");
    if (value == nullptr || *value == '\0') return;
    const int64_t bits = target_bits_from_name(value);
    // Every better target has a lower bit: disable them all, keep this one and the worse ones.
    hwy::DisableTargets(bits - 1);
  });
}

std::string dispatched_simd_target() {
  apply_simd_target_from_env();
  // SupportedTargets() honours DisableTargets; the lowest bit is the best target.
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return targets == 0 ? "none" : hwy::TargetName(targets & ~(targets - 1));
}

ScopedSimdTarget::ScopedSimdTarget(int64_t target_bits) {
  hwy::SetSupportedTargetsForTest(target_bits);
}

ScopedSimdTarget::~ScopedSimdTarget() { hwy::SetSupportedTargetsForTest(0); }

}  // namespace attn::kernels
