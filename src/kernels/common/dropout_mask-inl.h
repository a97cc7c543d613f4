// Per-target SIMD round of dropout's keep decision (see dropout_mask.h and attn/random.h): the
// lane operations of attn::dropout_bits on 32-bit lanes, included by a kernel's -inl.h inside its
// own foreach_target pass. Lanes are query rows (the fused kernels' transposed layout): each
// lane carries its row's key, and one key j is broadcast to all lanes.
//
// Cost per element: 11 lane operations (2 multiplies) plus the compare and select, against the
// scalar 64-bit SplitMix64 round per element this replaces (5 multiply-xorshift steps of 64-bit
// values, not vectorised).

#if defined(ATTN_KERNELS_DROPOUT_MASK_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_DROPOUT_MASK_INL_H_
#undef ATTN_KERNELS_DROPOUT_MASK_INL_H_
#else
#define ATTN_KERNELS_DROPOUT_MASK_INL_H_
#endif

#include <cstdint>

#include "attn/random.h"
#include "hwy/highway.h"
#include "kernels/common/dropout_mask.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace dropout {

namespace hn = hwy::HWY_NAMESPACE;

// The row keys of one vector of rows and the per-call constants, held in registers across keys.
template <class DF>
struct RowKeys {
  using DU = hn::RebindToUnsigned<DF>;
  using DI = hn::RebindToSigned<DF>;
  hn::Vec<DU> lo, hi;
  hn::Vec<DI> threshold_minus1;
  hn::Vec<DF> scale;

  RowKeys(DF df, const DropoutMask& mask, const uint32_t* HWY_RESTRICT key_lo,
          const uint32_t* HWY_RESTRICT key_hi)
      : lo(hn::LoadU(DU(), key_lo)),
        hi(hn::LoadU(DU(), key_hi)),
        threshold_minus1(hn::Set(DI(), static_cast<int32_t>(mask.threshold()) - 1)),
        scale(hn::Set(df, mask.scale())) {}

  // attn::dropout_bits(key, j) in every lane (random.h's operations, lane by lane).
  HWY_INLINE hn::Vec<DU> Bits(uint32_t j) const {
    const DU du;
    auto x = hn::Xor(lo, hn::Set(du, j * kDropoutKeyStep));
    x = hn::Xor(x, hn::ShiftRight<16>(x));
    x = hn::Mul(x, hn::Set(du, kDropoutMul1));
    x = hn::Xor(x, hi);
    x = hn::Xor(x, hn::ShiftRight<15>(x));
    x = hn::Mul(x, hn::Set(du, kDropoutMul2));
    x = hn::Xor(x, hn::ShiftRight<16>(x));
    return hn::ShiftRight<8>(x);
  }
  // Lanes whose element (row, j) is kept: bits >= threshold, as bits > threshold - 1 (Highway
  // 1.0 has no integer >= on x86). The 24-bit values and the threshold (<= 2^24) fit int32, so
  // the signed compare is the unsigned one.
  HWY_INLINE hn::Mask<DF> Keep(uint32_t j) const {
    const DI di;
    return hn::RebindMask(DF(), hn::Gt(hn::BitCast(di, Bits(j)), threshold_minus1));
  }
  // p * keep / (1 - p): a select, not a multiply by 0, so a dropped NaN or inf becomes 0 as on
  // the composed path.
  HWY_INLINE hn::Vec<DF> Apply(uint32_t j, hn::Vec<DF> p) const {
    return hn::IfThenElseZero(Keep(j), hn::Mul(p, scale));
  }
  // The factor keep / (1 - p).
  HWY_INLINE hn::Vec<DF> Factor(uint32_t j) const {
    return hn::IfThenElseZero(Keep(j), scale);
  }
};

}  // namespace dropout
}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_DROPOUT_MASK_INL_H_
