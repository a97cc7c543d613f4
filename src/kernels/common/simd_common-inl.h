// Helpers shared by the fused attention kernels (internal): the key interval a query row may
// attend, the flush-to-zero guard of every worker thread, and the exp2 of the online softmax.
//
// Two parts. The first is target-independent (an ordinary include guard): RowInterval and
// FlushDenormals. The second is per Highway target (the HWY_TARGET_TOGGLE guard), so a kernel's
// -inl.h includes this file inside its own foreach_target pass and gets Exp2 for that target.

#ifndef ATTN_KERNELS_SIMD_COMMON_SHARED_H_
#define ATTN_KERNELS_SIMD_COMMON_SHARED_H_

#include <algorithm>
#include <cstdint>
#include <limits>

#include "hwy/base.h"

#if HWY_ARCH_X86
#include <xmmintrin.h>
#endif

namespace attn::kernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2 = 0.6931471805599453;

// A row's log-sum-exp (natural log, as the forward stored it) in log2 units, as the unevaluated
// sum hi + lo of two floats: the backwards recompute P = 2^((s2 - hi) - lo). s2 - hi is exact
// for the scores that matter (within a factor 2 of hi, Sterbenz), so the only rounding left is
// the stored lse's own; a single float lse * log2(e) added a second one of the same size
// (~ |lse| u, 6e-5 relative in every P at |s| ~ 1e3; issue #10, test_large_logits).
// NaN stays NaN in both parts; +-inf gives hi = +-inf and lo = NaN (callers handle -inf rows).
struct Log2Shift {
  float hi = 0.0f, lo = 0.0f;
};
inline Log2Shift ToLog2Shift(float lse) {
  const double x = static_cast<double>(lse) * 1.4426950408889634;
  const float hi = static_cast<float>(x);
  return {hi, static_cast<float>(x - static_cast<double>(hi))};
}

// The key interval [lo, hi) query row i of batch b may attend (lo >= hi: fully masked), from the
// structured masks of attention.h: key and query lengths, causal, alignment and window. pos is
// the row's position among the keys (ALiBi distances are measured from it).
struct KeyInterval {
  int64_t lo = 0, hi = 0, pos = 0;
};

// Args: any kernel argument struct with the fields of fill_interval_masks (fused_args.h).
template <class Args>
inline KeyInterval RowInterval(const Args& a, int64_t b, int64_t i) {
  const int64_t key_len =
      a.key_lengths ? std::clamp<int64_t>(a.key_lengths[b], 0, a.k_len) : a.k_len;
  const int64_t query_len = a.query_lengths ? a.query_lengths[b] : a.q_len;
  const int64_t pos = i + (a.bottom_right ? key_len - query_len : 0);
  int64_t lo = 0, hi = i < query_len ? key_len : 0;
  if (a.causal) hi = std::min(hi, pos + 1);
  // Sizes beyond any sequence length are as good as unbounded (and would overflow pos +- size).
  constexpr int64_t kHuge = std::numeric_limits<int64_t>::max() / 4;
  if (a.window_left < kHuge) lo = std::max(lo, pos - a.window_left);
  if (a.window_right < kHuge) hi = std::min(hi, pos + a.window_right + 1);
  lo = std::clamp<int64_t>(lo, 0, key_len);
  hi = std::clamp<int64_t>(hi, 0, key_len);
  return {lo, hi, pos};
}

// Sets flush-to-zero and denormals-are-zero for the calling thread (MXCSR is per thread) and
// restores the previous mode on destruction: probabilities that underflow must become 0, not
// denormals that put P V on the slow path (10x), and the AVX-512 Exp2 relies on 2^-127
// flushing to 0. Every OpenMP worker of a kernel constructs one.
class FlushDenormals {
 public:
#if HWY_ARCH_X86
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_;
#endif
};

}  // namespace attn::kernels

#endif  // ATTN_KERNELS_SIMD_COMMON_SHARED_H_

// ---------------------------------------------------------------------------------------------
// Per-target part.

#if defined(ATTN_KERNELS_SIMD_COMMON_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_SIMD_COMMON_INL_H_
#undef ATTN_KERNELS_SIMD_COMMON_INL_H_
#else
#define ATTN_KERNELS_SIMD_COMMON_INL_H_
#endif

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace simd {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// 2^f for f in [-0.5, 0.5]: a degree-5 minimax polynomial (fitted by Remez exchange on the
// relative error, then the constant term set to exactly 1 so that 2^0 == 1): relative error
// < 1.8e-7, a few float ulps, as accurate as hn::Exp at a third of its cost. Every probability
// is later divided by the sum of the same approximations, and the backward rebuilds P from the
// forward's lse with this same polynomial.
HWY_INLINE VF Exp2Fraction(DF df, VF f) {
  VF p = hn::Set(df, 1.3276471979286704e-3f);
  p = hn::MulAdd(p, f, hn::Set(df, 9.675541334209831e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.550713273543075e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 0.2402211972384865f));
  p = hn::MulAdd(p, f, hn::Set(df, 0.693146967064733f));
  return hn::MulAdd(p, f, hn::Set(df, 1.0f));
}

// 2^x for the x <= 0 of the softmax: NaN-propagating, +0 for x = -inf (the masked scores) and
// for x < -126, exactly 1 for x = 0. x = n + f with n = round(x), f in [-0.5, 0.5].
HWY_INLINE VF Exp2(DF df, VF x) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  // vscalefps multiplies by 2^n in one instruction, and rounding is one more: 9 operations.
  // max(-127, x) returns x when x is NaN (the second operand wins), and turns -inf into a
  // finite 2^-127 that flush-to-zero makes exactly 0: this relies on FlushDenormals, which every
  // thread that runs this code sets.
  x = VF{_mm512_max_ps(_mm512_set1_ps(-127.0f), x.raw)};
  const VF n = hn::Round(x);
  const VF p = Exp2Fraction(df, hn::Sub(x, n));
  return VF{_mm512_scalef_ps(p.raw, n.raw)};
#else
  // Rounding by the 1.5 * 2^23 shifter leaves round(x) + 127 in the low mantissa bits of t
  // (|x| < 2^22), and shifting them into the exponent field builds 2^n without a conversion.
  const hn::RebindToSigned<DF> di;
  const VF shifter = hn::Set(df, 12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  const VF t = hn::Add(x, shifter);
  const VF p = Exp2Fraction(df, hn::Sub(x, hn::Sub(t, shifter)));
  // (n + 127) << 23: bits above the exponent field (the shifter's own) shift out.
  const VF two_n = hn::BitCast(df, hn::ShiftLeft<23>(hn::BitCast(di, t)));
  // The compare is false for NaN, so NaN survives; t's garbage for x < -126 is discarded here.
  return hn::IfThenZeroElse(x < hn::Set(df, -126.0f), hn::Mul(p, two_n));
#endif
}

}  // namespace simd
}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_SIMD_COMMON_INL_H_
