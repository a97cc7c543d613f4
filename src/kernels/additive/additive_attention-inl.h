// Per-target part of the fused additive / concat attention (see additive_attention.h) shared by
// the forward (additive_attention_forward-inl.h) and the backward (_backward-inl.h): the tanh
// and reciprocal forms, the score operands and their packing, the score micro-kernel.
// Included once per Highway target by additive_attention.cpp through foreach_target.h.
//
// Two layouts of the same (i, j, a) cube, each chosen so that no loop needs a horizontal sum:
// - Scores (forward, and the recomputation in the backward): lanes over keys j. The key
//   projections of a block of Bc = 4 vectors of keys are packed transposed, KpT [A][Bc], and a
//   query row broadcasts Qp_ia against them: acc_j += v_a r(Qp_ia + KpT[a][j]). One row's scores
//   for a block come out as vectors, ready for the online softmax.
// - Projection gradients (backward): lanes over the hidden index a. For a fixed (i, j) the term
//   g_ija = dS_ij v_a (1 - t_ija^2) is added to dQp_i (a register accumulator over j) and to dKp_j
//   (a row owned by the work item) as whole vectors, and dS_ij t_ija to the per-thread dv.
// The backward therefore evaluates the tanh twice per (i, j, a) (scores, then gradients), the
// forward once. In the split form (see additive_attention.h) the scores cost 4 operations per
// (i, j, a) with v folded into the operands and two hidden units sharing one reciprocal
// estimate (FoldedPairAccumulate); the gradients one FMA and a Newton-refined reciprocal on the
// precomputed 2^Qp', 2^Kp' (PairR). Memory traffic is small next to that: a KpT block is A Bc
// floats (32 KiB at A = 128, AVX-512) and stays in L1 while every row of a work item streams
// over it; P V, dP and dV run as register tiles of several query rows so that each loaded V
// (or dV) vector serves all of them.

#if defined(ATTN_KERNELS_ADDITIVE_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_ADDITIVE_ATTENTION_INL_H_
#undef ATTN_KERNELS_ADDITIVE_ATTENTION_INL_H_
#else
#define ATTN_KERNELS_ADDITIVE_ATTENTION_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "attn/random.h"
#include "kernels/additive/additive_attention.h"
#include "kernels/common/dropout_mask.h"
#include "kernels/common/simd_common-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace additive {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;
using DU = hn::RebindToUnsigned<DF>;
using simd::Exp2Fraction;

constexpr int64_t kBlockVecs = 4;    // keys per block = 4 vectors (64 with AVX-512)
constexpr int64_t kQueryRows = 32;   // query rows per forward work item

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Clamps x to [lo, hi] and keeps NaN. x86 min/max return their SECOND operand when either is
// NaN, so constant-first keeps a NaN x; the portable targets' Min/Max drop NaN instead, hence
// the compare-and-select there (comparisons with NaN are false).
HWY_INLINE VF ClampKeepNaN(DF df, VF x, float lo, float hi) {
#if HWY_ARCH_X86 && HWY_TARGET != HWY_EMU128 && HWY_TARGET != HWY_SCALAR
  return hn::Min(hn::Set(df, hi), hn::Max(hn::Set(df, lo), x));
#else
  x = hn::IfThenElse(x > hn::Set(df, hi), hn::Set(df, hi), x);
  return hn::IfThenElse(x < hn::Set(df, lo), hn::Set(df, lo), x);
#endif
}

// 2^x on [-127, 64] after clamping (NaN stays NaN), on the shared polynomial (simd_common-inl.h).
// Unlike the softmax-only simd::Exp2 it also takes the positive arguments of the tanh and the
// split-form exponentials. -inf and anything below -127 give +0: the masked scores of the
// softmax. The upper clamp keeps 2^x finite for the tanh, where x >= 64 already rounds tanh to
// exactly 1 (1 - 2 / (2^64 + 1) == 1 in float).
// With AVX-512, vscalefps applies 2^n in one instruction; 2^-127 p is a denormal that the
// flush-to-zero mode set by every worker (FlushDenormals) makes exactly 0. Elsewhere the
// 1.5 * 2^23 shifter leaves n + 127 in the low mantissa bits, shifted into the exponent field
// (n = -127 gives the bit pattern of +0).
HWY_INLINE VF Exp2Clamped(DF df, VF x) {
  x = ClampKeepNaN(df, x, -127.0f, 64.0f);
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  const VF n = hn::Round(x);
  const VF p = Exp2Fraction(df, hn::Sub(x, n));
  return VF{_mm512_scalef_ps(p.raw, n.raw)};
#else
  const DI di;
  const VF shifter = hn::Set(df, 12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  const VF t = hn::Add(x, shifter);
  const VF p = Exp2Fraction(df, hn::Sub(x, hn::Sub(t, shifter)));
  const VF two_n = hn::BitCast(df, hn::ShiftLeft<23>(hn::BitCast(di, t)));
  return hn::Mul(p, two_n);
#endif
}

// r = 1 / (2^x + 1), so that tanh(y) = 1 - 2 r for x = 2 log2(e) y. The reciprocal estimate
// (14 bits with AVX-512, 12 with AVX2) plus one Newton step r (2 - d r) is within ~2 ulp; the
// denominator lies in [1, 2^64 + 1], far from the estimate's overflow and denormal ranges.
HWY_INLINE VF Reciprocal(DF df, VF d) {
  const VF r0 = hn::ApproximateReciprocal(d);
  return hn::Mul(r0, hn::NegMulAdd(d, r0, hn::Set(df, 2.0f)));
}
HWY_INLINE VF HalfOneMinusTanh(DF df, VF x) {
  return Reciprocal(df, hn::Add(Exp2Clamped(df, x), hn::Set(df, 1.0f)));
}

// r for one (i, j, a) from the two operands the kernels stream. Split form: the operands are
// 2^Qp' and 2^Kp' (2^(Qp' + Kp') = 2^Qp' 2^Kp'), so the exp2 of the cube becomes one FMA,
// d = eq ek + 1, and the exponentials cost O(N A) once: 5 vector operations per (i, j, a)
// instead of 16. Valid while every |Qp'|, |Kp'| is within SplitScaleFor's limit (the products
// stay normal floats; checked per call, see Packed). Plain form: the operands are Qp' and Kp'.
// The gradient loop uses this form; the score loop a folded one (FoldedPairAccumulate).
template <bool kSplit>
HWY_INLINE VF PairR(DF df, VF q, VF k) {
  if constexpr (kSplit) {
    return Reciprocal(df, hn::MulAdd(q, k, hn::Set(df, 1.0f)));
  } else {
    return HalfOneMinusTanh(df, hn::Add(q, k));
  }
}
// The score loop's form of the split PairR, with v_a folded into the operands. Since
// v_a r_a = v_a / (eq ek + 1) = 1 / (q'_a ek + c_a) with q'_a = eq / v_a and c_a = 1 / v_a, the
// term v_a r_a of the score is one FMA (d = q' ek + c) and a reciprocal; its Newton step
// r0 (2 - d r0) then fuses into the accumulation: acc += r0 (2 - d r0).
// Two units a, b share one reciprocal: 1/d_a + 1/d_b = (d_a + d_b) / (d_a d_b). With
// R0 ~ 1 / P, P = d_a d_b, e = 1 - P R0 and t = (d_a + d_b) R0, one Newton step gives
// acc += t + t e, formed as FMA(t, e, t) so that the residual e is not rounded against 2:
// 2 FMA, MUL, reciprocal, FNMA, ADD, MUL, FMA, ADD for two terms, the reciprocal estimate
// (3 micro-ops for zmm on Intel, as much as 1.5 FMAs) shared.
// Measured on the Xeon (Emerald Rapids) development machine, one core, scores of a 32-row,
// 64-key, A = 128 block (ns per 16-lane vector of (i, j, a)): unfolded FMA, RCP, FNMA, MUL, FMA
// 1.26; folded single terms 1.08-1.13; folded pairs 1.02-1.05 (0.92-1.0 with the residual
// rounded against 2, but 5.0 u instead of 4.1 u worst error); 4 bare FMAs 0.72. Tiling several
// query rows over each loaded KpT vector changed nothing: loads are not the limit.
// Error of v_a r_a + v_b r_b, worst over 3.2M random pairs, in u (|v_a| + |v_b|): unfolded
// 3.2, folded single 3.1, folded pair 4.1 (the roundings of q', c, P, d_a + d_b and t). The
// absolute error of a pair with d_a ~ -d_b (v of opposite signs) is that of 1/d_a + 1/d_b
// computed apart. The operands are pre-scaled by 2^-sigma so that P stays a normal float
// (SplitScaleFor).
HWY_INLINE VF FoldedTermAccumulate(DF df, VF q_folded, VF c, VF k, VF acc) {
  const VF d = hn::MulAdd(q_folded, k, c);
  const VF r0 = hn::ApproximateReciprocal(d);
  return hn::MulAdd(r0, hn::NegMulAdd(d, r0, hn::Set(df, 2.0f)), acc);
}
HWY_INLINE VF FoldedPairAccumulate(DF df, VF qa, VF ca, VF ka, VF qb, VF cb, VF kb, VF acc) {
  const VF da = hn::MulAdd(qa, ka, ca);
  const VF db = hn::MulAdd(qb, kb, cb);
  const VF prod = hn::Mul(da, db);
  const VF r0 = hn::ApproximateReciprocal(prod);
  const VF e = hn::NegMulAdd(prod, r0, hn::Set(df, 1.0f));
  const VF t = hn::Mul(hn::Add(da, db), r0);
  return hn::Add(acc, hn::MulAdd(t, e, t));
}

// |y| <= 63 / (2 log2 e) ~ 21.8 on both sides: tanh arguments beyond that in either projection
// (where tanh already rounds to +-1) or non-finite ones switch the call to the plain form. The
// folded, paired score operands tighten it by the range of v (SplitScaleFor).
constexpr float kSplitLimit = 63.0f;

// Sizes derived once per call; the packed copies of K projections and values.
struct Layout {
  int64_t N = 0;       // lanes
  int64_t Bc = 0;      // keys per block
  int64_t blocks = 0;  // key blocks per (b, kv head)
  int64_t Dvp = 0;     // value width padded to kAdditiveRowPad
  int64_t G = 1;       // query heads per kv head
};

inline Layout MakeLayout(const AdditiveAttentionArgs& a) {
  const DF df;
  Layout l;
  l.N = static_cast<int64_t>(hn::Lanes(df));
  l.Bc = kBlockVecs * l.N;
  l.blocks = (a.k_len + l.Bc - 1) / l.Bc;
  l.Dvp = (a.value_dim + kAdditiveRowPad - 1) / kAdditiveRowPad * kAdditiveRowPad;
  l.G = a.kv_heads > 0 ? a.q_heads / a.kv_heads : 1;
  return l;
}

// The operands of the score loop, and the copies the kernels pack once per call:
//   split  whether the split form applies (every |Qp'|, |Kp'| within SplitScaleFor's limit,
//          v finite)
//   units  hidden units the score loop visits: split, those with v_a != 0 (a unit with v_a = 0
//          adds exactly 0 to the score); plain, all A
//   unit   the hidden index a of each unit
//   coef   per unit: split 2^-sigma / v_a (FoldedPairAccumulate's c), plain v_a
//   sum_scale  2^-sigma (split) or 1: the score loop's sums times sum_scale are sum_a v_a r_a
//   sum_init   the score loop's starting value, -(sum_a v_a / 2) / sum_scale (see ScoreVectors)
//   kpt    the key operand per unit (split 2^Kp'_a, plain Kp'_a) packed transposed per key
//          block, [B*Hkv][blocks][units][Bc] (keys past Tk zero; PackKeyBlock)
// The score loop's query operand (FoldQueryRow), split q'_u = 2^Qp'_a coef_u, plain Qp'_a:
//   qscore [B*Hq*Tq][units], backward only (the forward folds each work item's rows into its
//          scratch, so no copy of all queries exists)
// Backward only:
//   qsrc, ksrc  unfolded rows for the gradient loop (split 2^Qp', 2^Kp' in eq, ek; plain the
//          projections), stride proj_stride
//   vt     values transposed per key block, [B*Hkv][blocks][Dvp][Bc] (zeros past Tk and Dv)
// Forward only:
//   vrows  values with rows of Dvp columns (zeros past Dv), [B*Hkv][Tk][Dvp]: the caller's V
//          in place when its rows are already whole aligned vectors, else the copy in vp
struct Packed {
  bool split = false;
  int64_t units = 0;
  float sum_scale = 1.0f;
  float sum_init = 0.0f;
  std::vector<int64_t> unit;
  hwy::AlignedFreeUniquePtr<float[]> coef, qscore, kpt;
  const float* qsrc = nullptr;
  const float* ksrc = nullptr;
  const float* vrows = nullptr;
  hwy::AlignedFreeUniquePtr<float[]> eq, ek, vp, vt;
};

inline bool WithinSplitLimit(const float* x, int64_t n, float limit) {
  bool ok = true;
  for (int64_t e = 0; e < n; ++e) ok &= std::abs(x[e]) <= limit;  // false for NaN
  return ok;
}

// The split form's bound L on |Qp'|, |Kp'| and the operand scale 2^-sigma of the folded
// pairs. With a = max log2 |v|, b = min log2 |v| over the units (v != 0), a folded term
// d = (eq ek + 1) / v lies in [2^-a, 2^(2L + 1 - b)] in magnitude, so a pair's product of the
// scaled terms d 2^-sigma lies in [2^(-2a - 2 sigma), 2^(4L + 2 - 2b - 2 sigma)]; both ends stay
// within 2^-124 .. 2^124 (normal, and so is its reciprocal) for
// 2L - 61 - b <= sigma <= 62 - a, which holds for L <= (122 - (a - b)) / 2 and sigma between
// them. Typical v (|v| spread over 2^10) give L ~ 56 .. 61: tanh arguments up to ~19.
struct SplitScale {
  float limit = -1.0f;  // L; negative: no split form (a non-finite v)
  int sigma = 0;        // the folded operands carry 2^-sigma: the sum of 1/d is 2^sigma too big
};
inline SplitScale SplitScaleFor(const float* v, int64_t A) {
  double hi = -1e300, lo = 1e300;
  for (int64_t e = 0; e < A; ++e) {
    if (!std::isfinite(v[e])) return SplitScale{};
    if (v[e] == 0.0f) continue;
    const double l2 = std::log2(std::abs(static_cast<double>(v[e])));
    hi = std::max(hi, l2), lo = std::min(lo, l2);
  }
  if (hi < lo) hi = lo = 0.0;  // every v is 0: no unit, any scale
  SplitScale sc;
  const double limit = std::min<double>(kSplitLimit, std::floor((122.0 - (hi - lo)) / 2.0));
  if (limit < 0.0) return SplitScale{};
  sc.limit = static_cast<float>(limit);
  sc.sigma = static_cast<int>(std::floor((1.0 + 2.0 * limit - hi - lo) / 2.0));
  return sc;
}

// Fills split, units, unit, coef and sum_scale of p; `split`: the call's projections are all
// within scale.limit (and v is finite).
inline void SetScoreUnits(const AdditiveAttentionArgs& a, const SplitScale& scale, bool split,
                          Packed& p) {
  p.split = split;
  // Sums of the folded terms come out 2^sigma too big: undone in the score's final product.
  p.sum_scale = split ? std::ldexp(1.0f, -scale.sigma) : 1.0f;
  double vsum = 0.0;
  for (int64_t e = 0; e < a.hidden; ++e) vsum += a.score_v[e];
  // Rounded once; 2^sigma scales it exactly (it stays finite: |v| 2^sigma <= 2^62).
  p.sum_init = split ? std::ldexp(static_cast<float>(-0.5 * vsum), scale.sigma)
                     : static_cast<float>(-0.5 * vsum);
  p.unit.clear();
  for (int64_t e = 0; e < a.hidden; ++e)
    if (!split || a.score_v[e] != 0.0f) p.unit.push_back(e);
  p.units = static_cast<int64_t>(p.unit.size());
  p.coef = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, p.units)));
  for (int64_t u = 0; u < p.units; ++u) {
    const float va = a.score_v[p.unit[static_cast<size_t>(u)]];
    // 2^-sigma / v_a: exact scaling of the rounded 1 / v_a (both normal, see SplitScaleFor).
    p.coef[static_cast<size_t>(u)] = split ? std::ldexp(1.0f / va, -scale.sigma) : va;
  }
}

// dst = 2^src for one row of `stride` floats (a multiple of the vector length, aligned).
HWY_INLINE void Exp2Row(DF df, const float* HWY_RESTRICT src, float* HWY_RESTRICT dst,
                        int64_t stride) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t c = 0; c < stride; c += N)
    hn::Store(Exp2Clamped(df, hn::Load(df, src + c)), df, dst + c);
}

// One query row's score operand dst[units] (Packed::qscore's row) from its projection row src
// (stride floats). exp2: src holds Qp', not yet 2^Qp' (row: stride floats of scratch).
inline void FoldQueryRow(const Packed& p, const float* src, bool exp2, int64_t stride,
                         float* HWY_RESTRICT row, float* HWY_RESTRICT dst) {
  if (exp2) {
    Exp2Row(DF(), src, row, stride);
    src = row;
  }
  const int64_t* HWY_RESTRICT unit = p.unit.data();
  const float* HWY_RESTRICT coef = p.coef.get();
  for (int64_t u = 0; u < p.units; ++u)
    dst[u] = p.split ? src[unit[u]] * coef[u] : src[unit[u]];
}

// Key block kb of (batch, kv head) hk packed transposed, dst [units][Bc] (Packed::kpt's block;
// keys past Tk zero), from the key rows src (stride proj_stride). exp2: src holds Kp', not yet
// 2^Kp' (row: proj_stride floats of scratch). The block is 32 KiB at A = 128 (AVX-512): the
// strided writes stay in L1.
inline void PackKeyBlock(const AdditiveAttentionArgs& a, const Layout& l, const Packed& p,
                         const float* src, bool exp2, int64_t hk, int64_t kb,
                         float* HWY_RESTRICT row, float* HWY_RESTRICT dst) {
  const int64_t S = a.proj_stride, U = p.units, Bc = l.Bc;
  const int64_t* HWY_RESTRICT unit = p.unit.data();
  for (int64_t jj = 0; jj < Bc; ++jj) {
    const int64_t j = kb * Bc + jj;
    if (j >= a.k_len) {
      for (int64_t u = 0; u < U; ++u) dst[u * Bc + jj] = 0.0f;
      continue;
    }
    const float* k = src + (hk * a.k_len + j) * S;
    if (exp2) {
      Exp2Row(DF(), k, row, S);
      k = row;
    }
    for (int64_t u = 0; u < U; ++u) dst[u * Bc + jj] = k[unit[u]];
  }
}

// One query row against one key block, restricted to the visible keys [jlo, jhi).
struct RowBlock {
  const float* q_proj;  // the row's score operand [units] (Packed::qscore)
  const float* kpt;     // the block's packed key operands [units][Bc] (Packed::kpt)
  int64_t jb;           // first key of the block
  int64_t jlo, jhi;     // visible keys inside the block
  float pos;            // pos(i), for ALiBi
  float alibi2;         // slope * log2(e), 0 without ALiBi
  const float* bias = nullptr;  // the row's bias, bias[j * bias_stride]; nullptr without bias
  int64_t bias_stride = 0;
  // The row's `allowed` mask, allowed[j * allowed_stride]; nullptr without one.
  const bool* allowed = nullptr;
  int64_t allowed_stride = 0;
};

// The bias row of query i of head h, batch b (nullptr without a bias), for RowBlock::bias.
inline const float* BiasRow(const AdditiveAttentionArgs& a, int64_t b, int64_t h, int64_t i) {
  const FlashBias& f = a.bias;
  return f.data == nullptr ? nullptr : f.data + b * f.stride_b + h * f.stride_h + i * f.stride_q;
}

// The `allowed` row of query i of head h, batch b (nullptr without a mask), for
// RowBlock::allowed.
inline const bool* AllowedRow(const AdditiveAttentionArgs& a, int64_t b, int64_t h, int64_t i) {
  const FlashAllowed& f = a.allowed;
  return f.data == nullptr ? nullptr : f.data + b * f.stride_b + h * f.stride_h + i * f.stride_q;
}

// Dropout's keep decisions for N consecutive keys from `first` of the row with key row_key
// (DropoutMask::row): attn::dropout_bits (attn/random.h) lane by lane with lanes over keys, the
// transposed form of dropout_mask-inl.h's RowKeys (lanes over rows) for this kernel's layout.
// Keep iff bits >= threshold, as bits > threshold - 1 (the 24-bit values fit int32).
HWY_INLINE hn::Mask<DF> DropoutKeep(DF df, const DropoutMask& mask, uint64_t row_key,
                                    int64_t first) {
  const DU du;
  const DI di;
  const auto j = hn::Add(hn::Iota(du, 0), hn::Set(du, static_cast<uint32_t>(first)));
  auto x = hn::Xor(hn::Set(du, static_cast<uint32_t>(row_key)),
                   hn::Mul(j, hn::Set(du, kDropoutKeyStep)));
  x = hn::Xor(x, hn::ShiftRight<16>(x));
  x = hn::Mul(x, hn::Set(du, kDropoutMul1));
  x = hn::Xor(x, hn::Set(du, static_cast<uint32_t>(row_key >> 32)));
  x = hn::Xor(x, hn::ShiftRight<15>(x));
  x = hn::Mul(x, hn::Set(du, kDropoutMul2));
  x = hn::Xor(x, hn::ShiftRight<16>(x));
  x = hn::ShiftRight<8>(x);
  const auto threshold_minus1 = hn::Set(di, static_cast<int32_t>(mask.threshold()) - 1);
  return hn::RebindMask(df, hn::Gt(hn::BitCast(di, x), threshold_minus1));
}

// p keep / (1 - p) over the vectors [v0, v1) of a block's row starting at key jb, in place: a
// select, so a dropped NaN or inf becomes 0 as on the composed path. With factor != nullptr
// the factors keep / (1 - p) are stored there too (the backward's dP scaling).
HWY_INLINE void ApplyDropout(DF df, const DropoutMask& mask, uint64_t row_key, int64_t jb,
                             size_t v0, size_t v1, float* HWY_RESTRICT p,
                             float* HWY_RESTRICT factor) {
  const size_t N = hn::Lanes(df);
  const VF scale = hn::Set(df, mask.scale());
  for (size_t n = v0; n < v1; ++n) {
    const auto keep = DropoutKeep(df, mask, row_key, jb + static_cast<int64_t>(n * N));
    hn::Store(hn::IfThenElseZero(keep, hn::Mul(hn::Load(df, p + n * N), scale)), df, p + n * N);
    if (factor != nullptr) hn::Store(hn::IfThenElseZero(keep, scale), df, factor + n * N);
  }
}

// acc[n] = sum_a v_a (r(Qp_a + KpT[a][vector v0 + n]) - 1/2) / sum_scale = -s / (2 sum_scale)
// for NV vectors of keys, over the units of Packed (coef: Packed::coef), starting from
// init = Packed::sum_init = -(sum_a v_a / 2) / sum_scale. Split form: the folded terms in pairs
// (FoldedPairAccumulate), the last unit alone when their count is odd; plain form: v_a times
// the full-range r.
// Why the -1/2 start: the terms v_a r_a, r in (0, 1), all have the sign of v_a, so a sum from 0
// grows to ~ sum_a v_a / 2 and every key-dependent term is rounded against that magnitude;
// s = sum v - 2 sum v r then cancels it. At large logits (|v| ~ 1e3, issue #10) that made the
// scores, and so out and every gradient, 3-7x less accurate than a plain float32 sum of
// v_a tanh_a. Started from -sum v / 2, the running sum is -(1/2) sum v tanh, the plain sum's
// own magnitudes, and no cancellation is left for the end.
// Not inlined: inside the large callers the compiler ran out of general registers and reloaded
// the loop's pointers from vector registers and the stack on every iteration (extra port-0
// micro-ops in a loop bound by ports 0 and 5); one call per row and block costs nothing.
template <size_t NV, bool kSplit>
HWY_NOINLINE void ScoreVectors(DF df, const RowBlock& rb, int64_t Bc,
                             const float* HWY_RESTRICT coef, int64_t units, float init,
                             size_t v0, VF (&acc)[kBlockVecs]) {
  const size_t N = hn::Lanes(df);
  VF sum[NV];
  for (size_t n = 0; n < NV; ++n) sum[n] = hn::Set(df, init);
  const float* HWY_RESTRICT kpt = rb.kpt + v0 * N;
  const float* HWY_RESTRICT qp = rb.q_proj;
  int64_t u = 0;
  if constexpr (kSplit) {
    for (; u + 2 <= units; u += 2, kpt += 2 * Bc) {
      const VF qa = hn::Set(df, qp[u]), ca = hn::Set(df, coef[u]);
      const VF qb = hn::Set(df, qp[u + 1]), cb = hn::Set(df, coef[u + 1]);
      for (size_t n = 0; n < NV; ++n)
        sum[n] = FoldedPairAccumulate(df, qa, ca, hn::Load(df, kpt + n * N), qb, cb,
                                      hn::Load(df, kpt + Bc + n * N), sum[n]);
    }
  }
  for (; u < units; ++u, kpt += Bc) {
    const VF qu = hn::Set(df, qp[u]);
    const VF cu = hn::Set(df, coef[u]);
    for (size_t n = 0; n < NV; ++n) {
      if constexpr (kSplit) {
        sum[n] = FoldedTermAccumulate(df, qu, cu, hn::Load(df, kpt + n * N), sum[n]);
      } else {
        sum[n] = hn::MulAdd(cu, PairR<false>(df, qu, hn::Load(df, kpt + n * N)), sum[n]);
      }
    }
  }
  for (size_t n = 0; n < NV; ++n) acc[n] = sum[n];
}

// Scores of one row over one key block in log2 units,
// s2_j = log2(e) (v . tanh(..) - ALiBi + bias_j),
// -inf outside [jlo, jhi), stored to s2[j - jb] for the vectors [v0, v1) that cover the visible
// keys. Returns v0 and v1 through the arguments.
template <bool kSplit>
HWY_INLINE void RowBlockScores(DF df, const RowBlock& rb, const Layout& l, const Packed& pk,
                               float* HWY_RESTRICT s2, size_t& v0, size_t& v1) {
  const float* HWY_RESTRICT coef = pk.coef.get();
  const int64_t units = pk.units;
  const DI di;
  const size_t N = hn::Lanes(df);
  v0 = static_cast<size_t>((rb.jlo - rb.jb) / l.N);
  v1 = static_cast<size_t>((rb.jhi - rb.jb + l.N - 1) / l.N);
  VF acc[kBlockVecs];
  switch (v1 - v0) {
    case 1: ScoreVectors<1, kSplit>(df, rb, l.Bc, coef, units, pk.sum_init, v0, acc); break;
    case 2: ScoreVectors<2, kSplit>(df, rb, l.Bc, coef, units, pk.sum_init, v0, acc); break;
    case 3: ScoreVectors<3, kSplit>(df, rb, l.Bc, coef, units, pk.sum_init, v0, acc); break;
    default: ScoreVectors<4, kSplit>(df, rb, l.Bc, coef, units, pk.sum_init, v0, acc); break;
  }
  // s = sum_a v_a (1 - 2 r_a) = -2 sum_a v_a (r_a - 1/2), scaled to log2 units in one
  // multiplication (the power-of-two sum_scale changes no rounding).
  const VF minus_two_log2e = hn::Set(df, -2.0f * kLog2e * pk.sum_scale);
  const bool edge = (rb.jlo - rb.jb) % l.N != 0 || (rb.jhi - rb.jb) % l.N != 0;
  for (size_t n = 0; n < v1 - v0; ++n) {
    VF s = hn::Mul(acc[n], minus_two_log2e);
    const int64_t first = rb.jb + static_cast<int64_t>((v0 + n) * N);
    // Iota(0) is a constant; Iota(first) compiled to 16 scalar stores and a vector reload
    // (a failed store forward, 4.5% of the forward's time).
    const VI keys = hn::Add(hn::Iota(di, 0), hn::Set(di, static_cast<int32_t>(first)));
    if (rb.alibi2 != 0.0f) {
      const VF dist = hn::Abs(hn::Sub(hn::Set(df, rb.pos), hn::ConvertTo(df, keys)));
      s = hn::NegMulAdd(hn::Set(df, rb.alibi2), dist, s);
    }
    if (rb.bias != nullptr) {
      // Gathered through the broadcast stride (scalar: one load per key against the A FMAs of
      // its score), only the visible keys: the vector may run past Tk.
      HWY_ALIGN float bias2[HWY_MAX_BYTES / sizeof(float)];
      for (size_t lane = 0; lane < N; ++lane) {
        const int64_t j = first + static_cast<int64_t>(lane);
        bias2[lane] = j >= rb.jlo && j < rb.jhi ? rb.bias[j * rb.bias_stride] * kLog2e : 0.0f;
      }
      s = hn::Add(s, hn::Load(df, bias2));
    }
    if (rb.allowed != nullptr) {
      // Read in place through the broadcast stride, only the keys inside [jlo, jhi) (the
      // vector may run past Tk); -inf for the others, as for the interval masks.
      HWY_ALIGN int32_t ok[HWY_MAX_BYTES / sizeof(float)];
      for (size_t lane = 0; lane < N; ++lane) {
        const int64_t j = first + static_cast<int64_t>(lane);
        ok[lane] = j >= rb.jlo && j < rb.jhi && rb.allowed[j * rb.allowed_stride] ? 1 : 0;
      }
      const auto visible = hn::Ne(hn::Load(di, ok), hn::Zero(di));
      s = hn::IfThenElse(hn::RebindMask(df, visible), s, hn::Set(df, kNegInf));
    } else if (edge) {
      const auto visible = hn::And(keys > hn::Set(di, static_cast<int32_t>(rb.jlo - 1)),
                                   keys < hn::Set(di, static_cast<int32_t>(rb.jhi)));
      s = hn::IfThenElse(hn::RebindMask(df, visible), s, hn::Set(df, kNegInf));
    }
    hn::Store(s, df, s2 + (v0 + n) * N);
  }
}

// RowBlockScores in the form the packed operands were prepared for.
HWY_INLINE void PackedRowBlockScores(DF df, const Packed& pk, const RowBlock& rb,
                                     const Layout& l, float* HWY_RESTRICT s2, size_t& v0,
                                     size_t& v1) {
  if (pk.split)
    RowBlockScores<true>(df, rb, l, pk, s2, v0, v1);
  else
    RowBlockScores<false>(df, rb, l, pk, s2, v0, v1);
}

// Register tile of P V: vectors of V per key on targets with 32 vector registers (R x NV
// accumulators, NV loaded V vectors and a broadcast must fit), half that with 16.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr size_t kTileVecs = 2;
#else
constexpr size_t kTileVecs = 4;
#endif
constexpr size_t kTileRows = 4;

}  // namespace additive

const char* AdditiveTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_ADDITIVE_ATTENTION_INL_H_
