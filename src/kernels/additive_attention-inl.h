// Per-target body of the fused additive / concat attention (see additive_attention.h).
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

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "attn/random.h"
#include "kernels/additive_attention.h"
#include "kernels/dropout_mask.h"
#include "kernels/simd_common-inl.h"

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
  float vsum2 = 0.0f;  // log2(e) sum_a v_a
};

inline Layout MakeLayout(const AdditiveAttentionArgs& a) {
  const DF df;
  Layout l;
  l.N = static_cast<int64_t>(hn::Lanes(df));
  l.Bc = kBlockVecs * l.N;
  l.blocks = (a.k_len + l.Bc - 1) / l.Bc;
  l.Dvp = (a.value_dim + kAdditiveRowPad - 1) / kAdditiveRowPad * kAdditiveRowPad;
  l.G = a.kv_heads > 0 ? a.q_heads / a.kv_heads : 1;
  double vsum = 0.0;
  for (int64_t e = 0; e < a.hidden; ++e) vsum += a.score_v[e];
  l.vsum2 = static_cast<float>(vsum * kLog2e);
  return l;
}

// What a kernel needs packed besides the score operands.
struct PackOptions {
  bool unfolded_q = false;         // 2^Qp' rows (the backward's gradient loop, lanes over a)
  bool values_transposed = false;  // V packed transposed per key block (the backward's dP)
};

// The operands of the score loop and the packed copies, O(N (A + Dv)) floats written once per
// call:
//   split  whether the split form applies (every |Qp'|, |Kp'| within SplitScaleFor's limit,
//          v finite)
//   units  hidden units the score loop visits: split, those with v_a != 0 (a unit with v_a = 0
//          adds exactly 0 to the score); plain, all A
//   unit   the hidden index a of each unit
//   coef   per unit: split 2^-sigma / v_a (FoldedPairAccumulate's c), plain v_a
//   sum_scale  2^-sigma (split) or 1: the score loop's sums times sum_scale are sum_a v_a r_a
//   qscore the score loop's query operand, [B*Hq*Tq][units]: split q'_u = 2^Qp'_a coef_u,
//          plain Qp'_a
//   kpt    the key operand per unit (split 2^Kp'_a, plain Kp'_a) packed transposed per key
//          block, [B*Hkv][blocks][units][Bc] (keys past Tk zero)
//   qsrc, ksrc  unfolded rows for the gradient loop (split 2^Qp', 2^Kp' in eq, ek; plain the
//          projections), stride proj_stride; qsrc only with PackOptions::unfolded_q
//   vp     values with rows padded to Dvp columns (zeros past Dv), [B*Hkv][Tk][Dvp]
//   vt     values transposed per key block, [B*Hkv][blocks][Dvp][Bc] (zeros past Tk and Dv);
//          only with PackOptions::values_transposed
struct Packed {
  bool split = false;
  int64_t units = 0;
  float sum_scale = 1.0f;
  std::vector<int64_t> unit;
  hwy::AlignedFreeUniquePtr<float[]> coef, qscore, kpt;
  const float* qsrc = nullptr;
  const float* ksrc = nullptr;
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

// dst = 2^src over `rows` rows of `stride` floats (a multiple of the vector length).
inline void Exp2Rows(const float* src, float* dst, int64_t rows, int64_t stride) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
#pragma omp parallel for schedule(static) if (rows * stride > 65536)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < stride; c += N)
      hn::Store(Exp2Clamped(df, hn::Load(df, src + r * stride + c)), df, dst + r * stride + c);
}

inline Packed PackKeysAndValues(const AdditiveAttentionArgs& a, const Layout& l,
                                PackOptions opt) {
  const int64_t heads = a.batch * a.kv_heads, A = a.hidden, S = a.proj_stride;
  const int64_t q_rows = a.batch * a.q_heads * a.q_len, k_rows = heads * a.k_len;
  Packed p;
  const SplitScale scale = SplitScaleFor(a.score_v, A);
  p.split = scale.limit >= 0.0f && WithinSplitLimit(a.q_proj, q_rows * S, scale.limit) &&
            WithinSplitLimit(a.k_proj, k_rows * S, scale.limit);
  // Sums of the folded terms come out 2^sigma too big: undone in the score's final FMA.
  p.sum_scale = p.split ? std::ldexp(1.0f, -scale.sigma) : 1.0f;
  for (int64_t e = 0; e < A; ++e)
    if (!p.split || a.score_v[e] != 0.0f) p.unit.push_back(e);
  p.units = static_cast<int64_t>(p.unit.size());
  const int64_t U = p.units;
  p.coef = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, U)));
  for (int64_t u = 0; u < U; ++u) {
    const float va = a.score_v[p.unit[static_cast<size_t>(u)]];
    // 2^-sigma / v_a: exact scaling of the rounded 1 / v_a (both normal, see SplitScaleFor).
    p.coef[static_cast<size_t>(u)] = p.split ? std::ldexp(1.0f / va, -scale.sigma) : va;
  }

  // Query operands: unfolded rows (gradient loop) and the score loop's rows.
  p.qsrc = a.q_proj, p.ksrc = a.k_proj;
  hwy::AlignedFreeUniquePtr<float[]> eq_tmp;
  if (p.split) {
    eq_tmp = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * S)));
    p.ek = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_rows * S)));
    Exp2Rows(a.q_proj, eq_tmp.get(), q_rows, S);
    Exp2Rows(a.k_proj, p.ek.get(), k_rows, S);
    p.ksrc = p.ek.get();
  }
  const float* qrows = p.split ? eq_tmp.get() : a.q_proj;
  p.qscore = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * U)));
#pragma omp parallel for schedule(static) if (q_rows * U > 65536)
  for (int64_t row = 0; row < q_rows; ++row) {
    const float* src = qrows + row * S;
    float* dst = p.qscore.get() + row * U;
    for (int64_t u = 0; u < U; ++u) {
      const float q = src[p.unit[static_cast<size_t>(u)]];
      dst[u] = p.split ? q * p.coef[static_cast<size_t>(u)] : q;
    }
  }
  if (p.split && opt.unfolded_q) {
    p.eq = std::move(eq_tmp);
    p.qsrc = p.eq.get();
  }

  p.kpt = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(
      1, heads * l.blocks * U * l.Bc)));
  p.vp = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(
      1, heads * a.k_len * l.Dvp)));
  if (opt.values_transposed)
    p.vt = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(
        1, heads * l.blocks * l.Dvp * l.Bc)));
#pragma omp parallel for schedule(static) if (heads > 1)
  for (int64_t hk = 0; hk < heads; ++hk) {
    for (int64_t kb = 0; kb < l.blocks; ++kb) {
      float* dst = p.kpt.get() + (hk * l.blocks + kb) * U * l.Bc;
      for (int64_t jj = 0; jj < l.Bc; ++jj) {
        const int64_t j = kb * l.Bc + jj;
        const float* src = p.ksrc + (hk * a.k_len + j) * S;
        for (int64_t u = 0; u < U; ++u)
          dst[u * l.Bc + jj] = j < a.k_len ? src[p.unit[static_cast<size_t>(u)]] : 0.0f;
      }
      if (opt.values_transposed) {
        float* vt = p.vt.get() + (hk * l.blocks + kb) * l.Dvp * l.Bc;
        for (int64_t c = 0; c < l.Dvp; ++c)
          for (int64_t jj = 0; jj < l.Bc; ++jj) {
            const int64_t j = kb * l.Bc + jj;
            vt[c * l.Bc + jj] =
                j < a.k_len && c < a.value_dim ? a.v[(hk * a.k_len + j) * a.value_dim + c] : 0.0f;
          }
      }
    }
    for (int64_t j = 0; j < a.k_len; ++j) {
      const float* src = a.v + (hk * a.k_len + j) * a.value_dim;
      float* dst = p.vp.get() + (hk * a.k_len + j) * l.Dvp;
      std::memcpy(dst, src, static_cast<size_t>(a.value_dim) * sizeof(float));
      std::fill(dst + a.value_dim, dst + l.Dvp, 0.0f);
    }
  }
  return p;
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

// acc[n] = sum_a v_a r(Qp_a + KpT[a][vector v0 + n]) / sum_scale for NV vectors of keys, over
// the units of Packed (coef: Packed::coef). Split form: the folded terms in pairs
// (FoldedPairAccumulate), the last unit alone when their count is odd; plain form: v_a times
// the full-range r.
// Not inlined: inside the large callers the compiler ran out of general registers and reloaded
// the loop's pointers from vector registers and the stack on every iteration (extra port-0
// micro-ops in a loop bound by ports 0 and 5); one call per row and block costs nothing.
template <size_t NV, bool kSplit>
HWY_NOINLINE void ScoreVectors(DF df, const RowBlock& rb, int64_t Bc,
                             const float* HWY_RESTRICT coef, int64_t units, size_t v0,
                             VF (&acc)[kBlockVecs]) {
  const size_t N = hn::Lanes(df);
  VF sum[NV];
  for (size_t n = 0; n < NV; ++n) sum[n] = hn::Zero(df);
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
    case 1: ScoreVectors<1, kSplit>(df, rb, l.Bc, coef, units, v0, acc); break;
    case 2: ScoreVectors<2, kSplit>(df, rb, l.Bc, coef, units, v0, acc); break;
    case 3: ScoreVectors<3, kSplit>(df, rb, l.Bc, coef, units, v0, acc); break;
    default: ScoreVectors<4, kSplit>(df, rb, l.Bc, coef, units, v0, acc); break;
  }
  // s = sum_a v_a (1 - 2 r_a) = sum v - 2 sum v r, scaled to log2 units in one FMA (the
  // power-of-two sum_scale changes no rounding).
  const VF minus_two_log2e = hn::Set(df, -2.0f * kLog2e * pk.sum_scale);
  const VF vsum2 = hn::Set(df, l.vsum2);
  const bool edge = (rb.jlo - rb.jb) % l.N != 0 || (rb.jhi - rb.jb) % l.N != 0;
  for (size_t n = 0; n < v1 - v0; ++n) {
    VF s = hn::MulAdd(acc[n], minus_two_log2e, vsum2);
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

// o_r[c] += sum_{j < count} p_r[j] V[j][c] for R rows r and NV vectors of columns (V rows have
// stride Dvp). Each V vector loaded serves R rows: the per-row form (R = 1) read the 32 KiB V
// block from L2 once per query row and took a quarter of the forward's time.
template <size_t R, size_t NV>
HWY_INLINE void TileAccumulatePV(DF df, float* const* HWY_RESTRICT o, const float* const* p,
                                 const float* HWY_RESTRICT vp, int64_t Dvp, int64_t count) {
  const size_t N = hn::Lanes(df);
  VF acc[R][NV];
  for (size_t r = 0; r < R; ++r)
    for (size_t n = 0; n < NV; ++n) acc[r][n] = hn::Load(df, o[r] + n * N);
  for (int64_t j = 0; j < count; ++j, vp += Dvp) {
    VF vj[NV];
    for (size_t n = 0; n < NV; ++n) vj[n] = hn::Load(df, vp + n * N);
    for (size_t r = 0; r < R; ++r) {
      const VF pj = hn::Set(df, p[r][j]);
      for (size_t n = 0; n < NV; ++n) acc[r][n] = hn::MulAdd(pj, vj[n], acc[r][n]);
    }
  }
  for (size_t r = 0; r < R; ++r)
    for (size_t n = 0; n < NV; ++n) hn::Store(acc[r][n], df, o[r] + n * N);
}

// The same over whole padded rows of Dvp columns.
template <size_t R>
HWY_INLINE void RowsAccumulatePV(DF df, float* const* o, const float* const* p,
                                 const float* vp, int64_t Dvp, int64_t count) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t chunk = static_cast<int64_t>(kTileVecs) * N;
  float* oc[R];
  int64_t c = 0;
  for (; c + chunk <= Dvp; c += chunk) {
    for (size_t r = 0; r < R; ++r) oc[r] = o[r] + c;
    TileAccumulatePV<R, kTileVecs>(df, oc, p, vp + c, Dvp, count);
  }
  for (; c < Dvp; c += N) {
    for (size_t r = 0; r < R; ++r) oc[r] = o[r] + c;
    TileAccumulatePV<R, 1>(df, oc, p, vp + c, Dvp, count);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct ForwardScratch {
  explicit ForwardScratch(const Layout& l)
      : o(hwy::AllocateAligned<float>(static_cast<size_t>(kQueryRows * l.Dvp))),
        p(hwy::AllocateAligned<float>(static_cast<size_t>(kQueryRows * l.Bc))),
        iv(static_cast<size_t>(kQueryRows)),
        max(static_cast<size_t>(kQueryRows)),
        sum(static_cast<size_t>(kQueryRows)) {
    active.reserve(static_cast<size_t>(kQueryRows));
  }
  hwy::AlignedFreeUniquePtr<float[]> o;  // unnormalised output rows [kQueryRows][Dvp]
  hwy::AlignedFreeUniquePtr<float[]> p;  // one key block's scores, then P, [kQueryRows][Bc]
  std::vector<KeyInterval> iv;
  std::vector<float> max, sum;  // running max (log2 units) and sum per row
  std::vector<int64_t> active;  // the rows that see the current key block
};

// Query rows [i0, i0 + rows) of head h of batch b: key blocks outermost so one packed block
// serves every row of the item from L1/L2. Per block: 1. every row's scores and online-softmax
// update (P into the scratch), 2. O += P V in register tiles of kTileRows rows.
inline void ForwardItem(const AdditiveAttentionArgs& a, const Layout& l, const Packed& pk,
                        ForwardScratch& sc, int64_t b, int64_t h, int64_t i0, int64_t rows,
                        float* out, float* lse, float* weights) {
  const DF df;
  const int64_t N = l.N, Dvp = l.Dvp, U = pk.units;
  const int64_t hk = b * a.kv_heads + h / l.G;
  const DropoutMask dropout(a.dropout.p, a.dropout.seed);
  int64_t lo = a.k_len, hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const KeyInterval iv = RowInterval(a, b, i0 + r);
    sc.iv[static_cast<size_t>(r)] = iv;
    if (iv.lo < iv.hi) lo = std::min(lo, iv.lo), hi = std::max(hi, iv.hi);
    sc.max[static_cast<size_t>(r)] = kNegInf;
    sc.sum[static_cast<size_t>(r)] = 0.0f;
  }
  std::fill_n(sc.o.get(), rows * Dvp, 0.0f);
  const float alibi2 = a.alibi_slopes ? a.alibi_slopes[h] * kLog2e : 0.0f;
  const float* vp = pk.vp.get() + hk * a.k_len * Dvp;
  const int64_t row_base = (b * a.q_heads + h) * a.q_len + i0;

  for (int64_t kb = lo / l.Bc; kb * l.Bc < hi; ++kb) {
    RowBlock rb;
    rb.kpt = pk.kpt.get() + (hk * l.blocks + kb) * U * l.Bc;
    rb.jb = kb * l.Bc;
    rb.alibi2 = alibi2;
    rb.bias_stride = a.bias.stride_k;
    rb.allowed_stride = a.allowed.stride_k;
    // 1. Scores and the online softmax (Milakov & Gimelshein 2018), per row, log2 units.
    sc.active.clear();
    int64_t tile_lo = rb.jb + l.Bc, tile_hi = rb.jb;  // union of the active rows' keys
    for (int64_t r = 0; r < rows; ++r) {
      const KeyInterval& iv = sc.iv[static_cast<size_t>(r)];
      rb.jlo = std::max(rb.jb, iv.lo);
      rb.jhi = std::min(rb.jb + l.Bc, iv.hi);
      if (rb.jlo >= rb.jhi) continue;  // causal / window / lengths: nothing visible here
      sc.active.push_back(r);
      tile_lo = std::min(tile_lo, rb.jlo), tile_hi = std::max(tile_hi, rb.jhi);
      rb.q_proj = pk.qscore.get() + (row_base + r) * U;
      rb.bias = BiasRow(a, b, h, i0 + r);
      rb.allowed = AllowedRow(a, b, h, i0 + r);
      rb.pos = static_cast<float>(iv.pos);
      size_t v0 = 0, v1 = 0;
      float* s2 = sc.p.get() + r * l.Bc;
      PackedRowBlockScores(df, pk, rb, l, s2, v0, v1);

      VF bmax = hn::Set(df, kNegInf);
      for (size_t n = v0; n < v1; ++n) bmax = hn::Max(bmax, hn::Load(df, s2 + n * N));
      const float block_max = hn::GetLane(hn::MaxOfLanes(df, bmax));
      float& row_max = sc.max[static_cast<size_t>(r)];
      float& row_sum = sc.sum[static_cast<size_t>(r)];
      if (block_max > row_max) {
        // alpha = 2^(old - new): 0 while the row had no score yet (its sum and o are 0 too).
        const float alpha = std::exp2(row_max - block_max);
        row_sum *= alpha;
        const VF av = hn::Set(df, alpha);
        float* o = sc.o.get() + r * Dvp;
        for (int64_t c = 0; c < Dvp; c += N) hn::Store(hn::Mul(hn::Load(df, o + c), av), df, o + c);
        row_max = block_max;
      }
      // A NaN score (NaN inputs) leaves row_max alone, and its p = NaN poisons the row's sum
      // and output, as the reference does; masked lanes are -inf and give p = 0, and so do
      // the vectors outside [v0, v1) (the tile below may span them for another row's keys).
      const VF shift = hn::Set(df, row_max == kNegInf ? 0.0f : row_max);
      VF psum = hn::Zero(df);
      for (size_t n = 0; n < v0; ++n) hn::Store(hn::Zero(df), df, s2 + n * N);
      for (size_t n = v0; n < v1; ++n) {
        const VF p = Exp2Clamped(df, hn::Sub(hn::Load(df, s2 + n * N), shift));
        psum = hn::Add(psum, p);
        hn::Store(p, df, s2 + n * N);
      }
      for (size_t n = v1; n < static_cast<size_t>(kBlockVecs); ++n)
        hn::Store(hn::Zero(df), df, s2 + n * N);
      row_sum += hn::GetLane(hn::SumOfLanes(df, psum));
      // The sum (and so lse) is before dropout; the output sums the dropped-out P.
      if (dropout.active())
        ApplyDropout(df, dropout, dropout.row(b, h, i0 + r), rb.jb, v0, v1, s2, nullptr);
    }

    // 2. O_r += P_r V over the union of the active rows' keys (P_r is 0 outside row r's).
    const size_t count = sc.active.size();
    const float* v_lo = vp + tile_lo * Dvp;
    float* o_rows[kTileRows];
    const float* p_rows[kTileRows];
    size_t t = 0;
    for (; t < count; t += kTileRows) {
      const size_t R = std::min(kTileRows, count - t);
      for (size_t x = 0; x < R; ++x) {
        const int64_t r = sc.active[t + x];
        o_rows[x] = sc.o.get() + r * Dvp;
        p_rows[x] = sc.p.get() + r * l.Bc + (tile_lo - rb.jb);
      }
      switch (R) {
        case 1: RowsAccumulatePV<1>(df, o_rows, p_rows, v_lo, Dvp, tile_hi - tile_lo); break;
        case 2: RowsAccumulatePV<2>(df, o_rows, p_rows, v_lo, Dvp, tile_hi - tile_lo); break;
        case 3: RowsAccumulatePV<3>(df, o_rows, p_rows, v_lo, Dvp, tile_hi - tile_lo); break;
        default: RowsAccumulatePV<kTileRows>(df, o_rows, p_rows, v_lo, Dvp, tile_hi - tile_lo);
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float l_sum = sc.sum[static_cast<size_t>(r)];
    // l_sum == 0 only when no key was visible (the max term contributes 2^0 = 1 otherwise).
    const bool masked = l_sum == 0.0f;
    const float inv = masked ? 0.0f : 1.0f / l_sum;
    const float* o = sc.o.get() + r * Dvp;
    float* dst = out + (row_base + r) * a.value_dim;
    for (int64_t c = 0; c < a.value_dim; ++c) dst[c] = masked ? 0.0f : o[c] * inv;
    lse[row_base + r] =
        masked ? kNegInf
               : static_cast<float>(sc.max[static_cast<size_t>(r)] * kLn2 +
                                    std::log(static_cast<double>(l_sum)));
  }

  // Weights on request: a second pass per row that recomputes the visible scores block by
  // block (the first pass's arithmetic) and writes P = exp2(s - max) / sum, the probabilities
  // the output was normalised with; 0 outside the row's key interval. It doubles the tanh work
  // of the forward (the kernel's whole cost) for the rows of this item.
  if (weights == nullptr) return;
  const int64_t Tk = a.k_len;
  for (int64_t r = 0; r < rows; ++r) {
    const KeyInterval& iv = sc.iv[static_cast<size_t>(r)];
    float* w = weights + (row_base + r) * Tk;
    const int64_t lo = std::min(iv.lo, iv.hi), hi = iv.hi;
    std::fill(w, w + lo, 0.0f);
    std::fill(w + hi, w + Tk, 0.0f);
    const float l_sum = sc.sum[static_cast<size_t>(r)];
    const float row_max = sc.max[static_cast<size_t>(r)];
    const VF shift = hn::Set(df, row_max == kNegInf ? 0.0f : row_max);
    const float inv = l_sum == 0.0f ? 0.0f : 1.0f / l_sum;
    RowBlock rb;
    rb.alibi2 = alibi2;
    rb.q_proj = pk.qscore.get() + (row_base + r) * U;
    rb.bias = BiasRow(a, b, h, i0 + r);
    rb.bias_stride = a.bias.stride_k;
    rb.allowed = AllowedRow(a, b, h, i0 + r);
    rb.allowed_stride = a.allowed.stride_k;
    rb.pos = static_cast<float>(iv.pos);
    for (int64_t kb = lo / l.Bc; kb * l.Bc < hi; ++kb) {
      rb.kpt = pk.kpt.get() + (hk * l.blocks + kb) * U * l.Bc;
      rb.jb = kb * l.Bc;
      rb.jlo = std::max(rb.jb, lo);
      rb.jhi = std::min(rb.jb + l.Bc, hi);
      size_t v0 = 0, v1 = 0;
      float* s2 = sc.p.get();
      PackedRowBlockScores(df, pk, rb, l, s2, v0, v1);
      for (size_t n = v0; n < v1; ++n) {
        const VF p = Exp2Clamped(df, hn::Sub(hn::Load(df, s2 + n * N), shift));
        hn::Store(hn::Mul(p, hn::Set(df, inv)), df, s2 + n * N);
      }
      std::copy(s2 + (rb.jlo - rb.jb), s2 + (rb.jhi - rb.jb), w + rb.jlo);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct BackwardScratch {
  BackwardScratch(const AdditiveAttentionArgs& a, const Layout& l)
      : p(hwy::AllocateAligned<float>(static_cast<size_t>(kTileRows * l.Bc))),
        ds(hwy::AllocateAligned<float>(static_cast<size_t>(kTileRows * l.Bc))),
        pz(hwy::AllocateAligned<float>(static_cast<size_t>(kTileRows * l.Bc))),
        z(hwy::AllocateAligned<float>(static_cast<size_t>(kTileRows * l.Bc))),
        dv_acc(hwy::AllocateAligned<float>(static_cast<size_t>(a.proj_stride))) {
    std::fill_n(dv_acc.get(), a.proj_stride, 0.0f);
  }
  // A tile of up to kTileRows query rows against one key block: P and dS, [kTileRows][Bc];
  // with dropout also P keep / (1 - p) and the factors keep / (1 - p).
  hwy::AlignedFreeUniquePtr<float[]> p, ds, pz, z;
  hwy::AlignedFreeUniquePtr<float[]> dv_acc;  // sum dS r per hidden unit (this thread)
  double ds_sum = 0.0;                        // sum dS (this thread)
};

// dS_j = P_j (dP_j - D_i) with dP_j = dO_i . V_j for the block's Bc keys and R query rows,
// lanes over keys (VT: the block's values transposed, [Dvp][Bc]): no horizontal sum per key
// (the per-key dot product with SumOfLanes took a third of the backward's time), each VT
// vector serves R rows, and the R x kBlockVecs accumulators hide the FMA latency.
// With dropout (z: the factors keep / (1 - p), nullptr without), dL/dP = z dP and
// dS = P (z dP - D), D = dO . O unchanged (O holds the dropout already).
template <size_t R>
HWY_INLINE void TileDS(DF df, const float* const* d_out, const float* HWY_RESTRICT vt,
                       int64_t Dvp, int64_t Bc, const float* HWY_RESTRICT p,
                       const float* HWY_RESTRICT z, const float* d_i, float* HWY_RESTRICT ds) {
  const size_t N = hn::Lanes(df);
  VF dp[R][kBlockVecs];
  for (size_t x = 0; x < R; ++x)
    for (size_t n = 0; n < kBlockVecs; ++n) dp[x][n] = hn::Zero(df);
  for (int64_t c = 0; c < Dvp; ++c, vt += Bc) {
    VF vv[kBlockVecs];
    for (size_t n = 0; n < kBlockVecs; ++n) vv[n] = hn::Load(df, vt + n * N);
    for (size_t x = 0; x < R; ++x) {
      const VF doc = hn::Set(df, d_out[x][c]);
      for (size_t n = 0; n < kBlockVecs; ++n) dp[x][n] = hn::MulAdd(doc, vv[n], dp[x][n]);
    }
  }
  for (size_t x = 0; x < R; ++x) {
    const VF dv = hn::Set(df, d_i[x]);
    for (size_t n = 0; n < kBlockVecs; ++n) {
      const size_t at = x * static_cast<size_t>(Bc) + n * N;
      const VF dpz = z == nullptr ? dp[x][n] : hn::Mul(dp[x][n], hn::Load(df, z + at));
      hn::Store(hn::Mul(hn::Load(df, p + at), hn::Sub(dpz, dv)), df, ds + at);
    }
  }
}

// Rows per TileDS and per TileProjectionGrads, vectors of hidden units per gradient tile: sized
// so that the accumulators, operands and temporaries fit 32 (AVX-512) or 16 vector registers.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr size_t kDSRows = 2;
constexpr size_t kGradRows = 2, kGradVecs = 1;
#else
constexpr size_t kDSRows = 4;
constexpr size_t kGradRows = 4, kGradVecs = 2;
#endif

// Projection gradients of R query rows against the keys [jlo, jhi) of a block, over NV vectors
// of hidden units (qp[x]: row x's unfolded operand at the first of those units; kp, dkp: key
// rows `stride` apart, indexed by key; ds[x]: row x's dS indexed by key, 0 where masked):
//   r = (1 - t) / 2,  1 - t^2 = 4 r (1 - r),  g = dS v (1 - t^2) = 4 v_a dS u,  u = r (1 - r)
//   dQp_i += g,  dKp_j += g,  dv_acc += dS r.
// 4 v_a is constant over the sums of dQp_i (over j) and dKp_j (over i): the loop accumulates
// dS u and the factor is applied once per stored vector here (dQp) and once per dKp row at the
// end of the work item (ScaleKeyGradRows). Keys outer, rows inner: each key's operand and dKp
// vectors are loaded and stored once for R rows (the per-row form re-read and re-wrote the dKp
// row for every query row), the rows' dQp stay in registers.
template <size_t R, size_t NV, bool kSplit>
HWY_INLINE void TileProjectionGrads(DF df, const float* const* qp, const float* HWY_RESTRICT kp,
                                    int64_t stride, const float* HWY_RESTRICT v4,
                                    const float* const* ds, int64_t jlo, int64_t jhi,
                                    float* HWY_RESTRICT dkp, float* const* dqp,
                                    float* HWY_RESTRICT dv_acc) {
  const size_t N = hn::Lanes(df);
  VF q[R][NV], dq[R][NV], dvr[NV];
  for (size_t n = 0; n < NV; ++n) {
    dvr[n] = hn::Load(df, dv_acc + n * N);
    for (size_t x = 0; x < R; ++x) q[x][n] = hn::Load(df, qp[x] + n * N), dq[x][n] = hn::Zero(df);
  }
  for (int64_t j = jlo; j < jhi; ++j) {
    const float* HWY_RESTRICT kj = kp + j * stride;
    float* HWY_RESTRICT dkj = dkp + j * stride;
    VF k[NV], dk[NV];
    for (size_t n = 0; n < NV; ++n) k[n] = hn::Load(df, kj + n * N), dk[n] = hn::Load(df, dkj + n * N);
    for (size_t x = 0; x < R; ++x) {
      const float dsx = ds[x][j];
      if (dsx == 0.0f) continue;  // masked, or a probability that underflowed: no gradient
      const VF dsj = hn::Set(df, dsx);
      for (size_t n = 0; n < NV; ++n) {
        const VF r = PairR<kSplit>(df, q[x][n], k[n]);
        const VF u = hn::NegMulAdd(r, r, r);  // r (1 - r)
        dq[x][n] = hn::MulAdd(dsj, u, dq[x][n]);
        dk[n] = hn::MulAdd(dsj, u, dk[n]);
        dvr[n] = hn::MulAdd(dsj, r, dvr[n]);
      }
    }
    for (size_t n = 0; n < NV; ++n) hn::Store(dk[n], df, dkj + n * N);
  }
  for (size_t n = 0; n < NV; ++n) {
    const VF v4n = hn::Load(df, v4 + n * N);
    for (size_t x = 0; x < R; ++x)
      hn::Store(hn::MulAdd(v4n, dq[x][n], hn::Load(df, dqp[x] + n * N)), df, dqp[x] + n * N);
    hn::Store(dvr[n], df, dv_acc + n * N);
  }
}

// dKp_j *= 4 v for `rows` rows of `stride` floats: the factor TileProjectionGrads leaves out.
HWY_INLINE void ScaleKeyGradRows(DF df, float* dkp, int64_t rows, int64_t stride,
                                 const float* v4) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t e = 0; e < stride; e += N)
      hn::Store(hn::Mul(hn::Load(df, dkp + j * stride + e), hn::Load(df, v4 + e)), df,
                dkp + j * stride + e);
}

// TileProjectionGrads over whole rows of `stride` (proj_stride) hidden units.
template <size_t R, bool kSplit>
HWY_INLINE void RowsProjectionGrads(DF df, const float* const* qp, const float* kp,
                                    int64_t stride, const float* v4, const float* const* ds,
                                    int64_t jlo, int64_t jhi, float* dkp, float* const* dqp,
                                    float* dv_acc) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t chunk = static_cast<int64_t>(kGradVecs) * N;
  const float* qe[R];
  float* dqe[R];
  int64_t e = 0;
  for (; e + chunk <= stride; e += chunk) {
    for (size_t x = 0; x < R; ++x) qe[x] = qp[x] + e, dqe[x] = dqp[x] + e;
    TileProjectionGrads<R, kGradVecs, kSplit>(df, qe, kp + e, stride, v4 + e, ds, jlo, jhi,
                                              dkp + e, dqe, dv_acc + e);
  }
  for (; e < stride; e += N) {
    for (size_t x = 0; x < R; ++x) qe[x] = qp[x] + e, dqe[x] = dqp[x] + e;
    TileProjectionGrads<R, 1, kSplit>(df, qe, kp + e, stride, v4 + e, ds, jlo, jhi, dkp + e,
                                      dqe, dv_acc + e);
  }
}

// dV_j[c] += sum_r P_r[j] dO_r[c] for R rows and NV vectors of columns (dV rows stride Dvp):
// the rows' dO vectors stay in registers and each dV vector is loaded and stored once per tile
// instead of once per row.
template <size_t R, size_t NV>
HWY_INLINE void TileAccumulateDV(DF df, float* HWY_RESTRICT dv, const float* const* p,
                                 const float* const* d_out, int64_t Dvp, int64_t count) {
  const size_t N = hn::Lanes(df);
  VF g[R][NV];
  for (size_t r = 0; r < R; ++r)
    for (size_t n = 0; n < NV; ++n) g[r][n] = hn::Load(df, d_out[r] + n * N);
  for (int64_t j = 0; j < count; ++j, dv += Dvp) {
    for (size_t n = 0; n < NV; ++n) {
      VF acc = hn::LoadU(df, dv + n * N);
      for (size_t r = 0; r < R; ++r) acc = hn::MulAdd(hn::Set(df, p[r][j]), g[r][n], acc);
      hn::StoreU(acc, df, dv + n * N);
    }
  }
}

template <size_t R>
HWY_INLINE void RowsAccumulateDV(DF df, float* dv, const float* const* p,
                                 const float* const* d_out, int64_t Dvp, int64_t count) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t chunk = static_cast<int64_t>(kTileVecs) * N;
  const float* dc[R];
  int64_t c = 0;
  for (; c + chunk <= Dvp; c += chunk) {
    for (size_t r = 0; r < R; ++r) dc[r] = d_out[r] + c;
    TileAccumulateDV<R, kTileVecs>(df, dv + c, p, dc, Dvp, count);
  }
  for (; c < Dvp; c += N) {
    for (size_t r = 0; r < R; ++r) dc[r] = d_out[r] + c;
    TileAccumulateDV<R, 1>(df, dv + c, p, dc, Dvp, count);
  }
}

struct BackwardInputs {
  const float* dop;  // dO padded [B*Hq*Tq][Dvp]
  const float* di;   // D_i = dO_i . O_i [B*Hq*Tq]
  const float* v4;   // 4 v, padded to proj_stride
};

// Key block kb of (batch b, kv head): every query row of the G heads that sees a key of it, in
// tiles of up to kTileRows rows. Writes the block's rows of dKp and dV; adds to this thread's
// dQp and dbias partials (dbias: nullptr without a bias gradient) and dv sums.
template <bool kSplit>
void BackwardItem(const AdditiveAttentionArgs& a, const AdditiveAttentionGradArgs& g,
                  const Layout& l, const Packed& pk, const BackwardInputs& in,
                  BackwardScratch& sc, float* dqp_partial, float* dbias_partial, int64_t b,
                  int64_t kvh, int64_t kb) {
  const DF df;
  const int64_t N = l.N, U = pk.units, Dvp = l.Dvp, S = a.proj_stride;
  const int64_t hk = b * a.kv_heads + kvh;
  const int64_t jb = kb * l.Bc, je = std::min(jb + l.Bc, a.k_len);
  const float* kp = pk.ksrc + hk * a.k_len * S;  // key operand rows j of this (b, kv head)
  float* dkp = g.d_k_proj + hk * a.k_len * S;
  const float* vt = pk.vt.get() + (hk * l.blocks + kb) * Dvp * l.Bc;
  // dV accumulates in the padded layout, then is copied out without the pad.
  std::vector<float> dvp(static_cast<size_t>((je - jb) * Dvp), 0.0f);
  std::fill_n(dkp + jb * S, (je - jb) * S, 0.0f);

  RowBlock rb;
  rb.kpt = pk.kpt.get() + (hk * l.blocks + kb) * U * l.Bc;
  rb.jb = jb;
  rb.bias_stride = a.bias.stride_k;
  rb.allowed_stride = a.allowed.stride_k;
  const DropoutMask dropout(a.dropout.p, a.dropout.seed);
  struct TileRow {
    int64_t h, i, row, jlo, jhi;
  };
  TileRow tile[kTileRows];
  size_t tile_rows = 0;

  // Steps 2 and 3 for the rows gathered in `tile` (their P rows are in the scratch).
  const auto flush_tile = [&]() {
    if (tile_rows == 0) return;
    int64_t lo = je, hi = jb;  // the union of the tile's keys
    const float* do_rows[kTileRows];
    float d_i[kTileRows];
    for (size_t x = 0; x < tile_rows; ++x) {
      lo = std::min(lo, tile[x].jlo), hi = std::max(hi, tile[x].jhi);
      do_rows[x] = in.dop + tile[x].row * Dvp;
      d_i[x] = in.di[tile[x].row];
    }
    // 2a. dP_ij = dO_i . V_j;  dS_ij = P_ij (dP_ij - D_i)  (0 where P is).
    for (size_t x0 = 0; x0 < tile_rows; x0 += kDSRows) {
      const size_t R = std::min(kDSRows, tile_rows - x0);
      const float* p = sc.p.get() + static_cast<int64_t>(x0) * l.Bc;
      const float* z = dropout.active() ? sc.z.get() + static_cast<int64_t>(x0) * l.Bc : nullptr;
      float* ds = sc.ds.get() + static_cast<int64_t>(x0) * l.Bc;
      switch (R) {
        case 1: TileDS<1>(df, do_rows + x0, vt, Dvp, l.Bc, p, z, d_i + x0, ds); break;
        case 2: TileDS<2>(df, do_rows + x0, vt, Dvp, l.Bc, p, z, d_i + x0, ds); break;
        case 3: TileDS<3>(df, do_rows + x0, vt, Dvp, l.Bc, p, z, d_i + x0, ds); break;
        default: TileDS<kDSRows>(df, do_rows + x0, vt, Dvp, l.Bc, p, z, d_i + x0, ds);
      }
    }
    // 2b. dV_j += P_ij dO_i over the union of the tile's keys (P is 0 outside a row's keys),
    // with dropout P keep / (1 - p).
    const float* p_rows[kTileRows];
    const float* p_used = dropout.active() ? sc.pz.get() : sc.p.get();
    for (size_t x = 0; x < tile_rows; ++x)
      p_rows[x] = p_used + static_cast<int64_t>(x) * l.Bc + (lo - jb);
    float* dv_lo = dvp.data() + (lo - jb) * Dvp;
    switch (tile_rows) {
      case 1: RowsAccumulateDV<1>(df, dv_lo, p_rows, do_rows, Dvp, hi - lo); break;
      case 2: RowsAccumulateDV<2>(df, dv_lo, p_rows, do_rows, Dvp, hi - lo); break;
      case 3: RowsAccumulateDV<3>(df, dv_lo, p_rows, do_rows, Dvp, hi - lo); break;
      default: RowsAccumulateDV<kTileRows>(df, dv_lo, p_rows, do_rows, Dvp, hi - lo);
    }
    const float* ds_rows[kTileRows];  // indexed by key
    const float* q_rows[kTileRows];
    float* dq_rows[kTileRows];
    for (size_t x = 0; x < tile_rows; ++x) {
      const TileRow& t = tile[x];
      const float* ds = sc.ds.get() + static_cast<int64_t>(x) * l.Bc - jb;
      ds_rows[x] = ds;
      q_rows[x] = pk.qsrc + t.row * S;
      dq_rows[x] = dqp_partial + t.row * S;
      double row_ds = 0.0;
      for (int64_t j = t.jlo; j < t.jhi; ++j) row_ds += ds[j];
      sc.ds_sum += row_ds;
      // (8) dbias_ij += dS_ij, into this thread's partial: broadcast dimensions map many (i, j)
      // to one element.
      if (dbias_partial != nullptr) {
        float* db = dbias_partial + (BiasRow(a, b, t.h, t.i) - a.bias.data);
        for (int64_t j = t.jlo; j < t.jhi; ++j) db[j * rb.bias_stride] += ds[j];
      }
    }
    // 3. dQp_i, dKp_j, dv from g_ija = dS_ij v_a (1 - t_ija^2), lanes over a (dS is 0 outside
    // a row's keys, so the union of the sub-tile's keys serves every row of it).
    for (size_t x0 = 0; x0 < tile_rows; x0 += kGradRows) {
      const size_t R = std::min(kGradRows, tile_rows - x0);
      int64_t glo = je, ghi = jb;
      for (size_t x = x0; x < x0 + R; ++x)
        glo = std::min(glo, tile[x].jlo), ghi = std::max(ghi, tile[x].jhi);
      const float* const* qx = q_rows + x0;
      const float* const* dsx = ds_rows + x0;
      float* const* dqx = dq_rows + x0;
      float* dva = sc.dv_acc.get();
      switch (R) {
        case 1: RowsProjectionGrads<1, kSplit>(df, qx, kp, S, in.v4, dsx, glo, ghi, dkp, dqx, dva); break;
        case 2: RowsProjectionGrads<2, kSplit>(df, qx, kp, S, in.v4, dsx, glo, ghi, dkp, dqx, dva); break;
        case 3: RowsProjectionGrads<3, kSplit>(df, qx, kp, S, in.v4, dsx, glo, ghi, dkp, dqx, dva); break;
        default: RowsProjectionGrads<kGradRows, kSplit>(df, qx, kp, S, in.v4, dsx, glo, ghi, dkp, dqx, dva);
      }
    }
    tile_rows = 0;
  };

  for (int64_t h = kvh * l.G; h < (kvh + 1) * l.G; ++h) {
    rb.alibi2 = a.alibi_slopes ? a.alibi_slopes[h] * kLog2e : 0.0f;
    for (int64_t i = 0; i < a.q_len; ++i) {
      const KeyInterval iv = RowInterval(a, b, i);
      rb.jlo = std::max(jb, iv.lo);
      rb.jhi = std::min(je, iv.hi);
      if (rb.jlo >= rb.jhi) continue;
      const int64_t row = (b * a.q_heads + h) * a.q_len + i;
      const float lse = g.lse[row];
      if (lse == kNegInf) continue;  // no visible score: no gradient
      rb.q_proj = pk.qscore.get() + row * U;
      rb.pos = static_cast<float>(iv.pos);
      rb.bias = BiasRow(a, b, h, i);
      rb.allowed = AllowedRow(a, b, h, i);

      // 1. Recompute s_ij and P_ij = exp(s_ij - lse_i) for the row's visible keys of the block
      // (0 elsewhere in the block).
      const int64_t x = static_cast<int64_t>(tile_rows);
      float* p = sc.p.get() + x * l.Bc;
      size_t v0 = 0, v1 = 0;
      RowBlockScores<kSplit>(df, rb, l, pk, p, v0, v1);
      const VF lse2 = hn::Set(df, lse * kLog2e);
      for (size_t n = 0; n < v0; ++n) hn::Store(hn::Zero(df), df, p + n * N);
      for (size_t n = v0; n < v1; ++n)
        hn::Store(Exp2Clamped(df, hn::Sub(hn::Load(df, p + n * N), lse2)), df, p + n * N);
      for (size_t n = v1; n < static_cast<size_t>(kBlockVecs); ++n)
        hn::Store(hn::Zero(df), df, p + n * N);
      if (dropout.active()) {
        float* pz = sc.pz.get() + x * l.Bc;
        std::copy(p, p + l.Bc, pz);
        ApplyDropout(df, dropout, dropout.row(b, h, i), jb, 0, kBlockVecs, pz,
                     sc.z.get() + x * l.Bc);
      }
      tile[tile_rows++] = TileRow{h, i, row, rb.jlo, rb.jhi};
      if (tile_rows == kTileRows) flush_tile();
    }
  }
  flush_tile();
  ScaleKeyGradRows(df, dkp + jb * S, je - jb, S, in.v4);
  for (int64_t j = jb; j < je; ++j)
    std::memcpy(g.dv + (hk * a.k_len + j) * a.value_dim, dvp.data() + (j - jb) * Dvp,
                static_cast<size_t>(a.value_dim) * sizeof(float));
}

}  // namespace additive

void AdditiveAttentionForwardImpl(const AdditiveAttentionArgs& a, float* out, float* lse,
                                  float* weights) {
  using namespace additive;
  if (a.batch == 0 || a.q_heads == 0 || a.q_len == 0) return;
  const Layout l = MakeLayout(a);
  const Packed pk = PackKeysAndValues(a, l, PackOptions{});
  const int64_t q_blocks = (a.q_len + kQueryRows - 1) / kQueryRows;
  const int64_t items = a.batch * a.q_heads * q_blocks;
#pragma omp parallel if (items > 1)
  {
    FlushDenormals ftz;
    ForwardScratch scratch(l);
    // Last query blocks first: under a causal mask they see the most keys.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = q_blocks - 1 - item / (a.batch * a.q_heads);
      const int64_t h = item % a.q_heads;
      const int64_t b = item / a.q_heads % a.batch;
      const int64_t i0 = qb * kQueryRows;
      ForwardItem(a, l, pk, scratch, b, h, i0, std::min(kQueryRows, a.q_len - i0), out, lse,
                  weights);
    }
  }
}

void AdditiveAttentionBackwardImpl(const AdditiveAttentionArgs& a,
                                   const AdditiveAttentionGradArgs& g) {
  using namespace additive;
  const int64_t S = a.proj_stride;
  const int64_t q_rows = a.batch * a.q_heads * a.q_len;
  const int64_t k_rows = a.batch * a.kv_heads * a.k_len;
  std::fill_n(g.d_q_proj, q_rows * S, 0.0f);
  std::fill_n(g.d_k_proj, k_rows * S, 0.0f);
  std::fill_n(g.d_score_v, a.hidden, 0.0f);
  std::fill_n(g.dv, k_rows * a.value_dim, 0.0f);
  if (q_rows == 0 || k_rows == 0) return;

  const Layout l = MakeLayout(a);
  const Packed pk =
      PackKeysAndValues(a, l, PackOptions{.unfolded_q = true, .values_transposed = true});
  // dO padded to whole vectors, D_i = dO_i . O_i (FlashAttention-2, eq. for dS), 4 v padded.
  auto dop = hwy::AllocateAligned<float>(static_cast<size_t>(q_rows * l.Dvp));
  auto di = hwy::AllocateAligned<float>(static_cast<size_t>(q_rows));
  auto v4 = hwy::AllocateAligned<float>(static_cast<size_t>(S));
  for (int64_t row = 0; row < q_rows; ++row) {
    const float* src = g.dout + row * a.value_dim;
    const float* o = g.out + row * a.value_dim;
    float* dst = dop.get() + row * l.Dvp;
    double d = 0.0;
    for (int64_t c = 0; c < a.value_dim; ++c) {
      dst[c] = src[c];
      d += static_cast<double>(src[c]) * o[c];
    }
    std::fill(dst + a.value_dim, dst + l.Dvp, 0.0f);
    di[static_cast<size_t>(row)] = static_cast<float>(d);
  }
  for (int64_t e = 0; e < S; ++e) v4[static_cast<size_t>(e)] = e < a.hidden ? 4.0f * a.score_v[e] : 0.0f;
  const BackwardInputs in{dop.get(), di.get(), v4.get()};

  const int64_t items = a.batch * a.kv_heads * l.blocks;
  const int threads = items > 1 ? omp_get_max_threads() : 1;
  // Thread t's partial dQp (thread 0 writes straight into the output) and dv sums.
  std::vector<hwy::AlignedFreeUniquePtr<float[]>> dqp_partials(static_cast<size_t>(threads));
  std::vector<std::vector<float>> dv_partials(static_cast<size_t>(threads));
  std::vector<double> ds_sums(static_cast<size_t>(threads), 0.0);
  // Thread t's partial dbias (thread 0 writes straight into the output), as for dQp.
  const bool want_dbias = g.dbias != nullptr && a.bias.data != nullptr;
  std::vector<std::vector<float>> dbias_partials(static_cast<size_t>(threads));
  if (want_dbias) std::fill_n(g.dbias, g.dbias_size, 0.0f);
  int used_threads = 1;
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals ftz;
    const int t = omp_get_thread_num();
#pragma omp single
    used_threads = omp_get_num_threads();
    float* dqp = g.d_q_proj;
    if (t > 0) {
      dqp_partials[static_cast<size_t>(t)] =
          hwy::AllocateAligned<float>(static_cast<size_t>(q_rows * S));
      dqp = dqp_partials[static_cast<size_t>(t)].get();
      std::fill_n(dqp, q_rows * S, 0.0f);
    }
    float* dbias = want_dbias ? g.dbias : nullptr;
    if (want_dbias && t > 0) {
      dbias_partials[static_cast<size_t>(t)].assign(static_cast<size_t>(g.dbias_size), 0.0f);
      dbias = dbias_partials[static_cast<size_t>(t)].data();
    }
    BackwardScratch scratch(a, l);
    // Static round-robin: the item -> thread map, and so every partial sum, is fixed for a
    // given thread count; round-robin spreads the heavy early key blocks of a causal mask.
#pragma omp for schedule(static, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t kb = item % l.blocks;
      const int64_t kvh = item / l.blocks % a.kv_heads;
      const int64_t b = item / l.blocks / a.kv_heads;
      if (pk.split)
        BackwardItem<true>(a, g, l, pk, in, scratch, dqp, dbias, b, kvh, kb);
      else
        BackwardItem<false>(a, g, l, pk, in, scratch, dqp, dbias, b, kvh, kb);
    }
    dv_partials[static_cast<size_t>(t)].assign(scratch.dv_acc.get(), scratch.dv_acc.get() + S);
    ds_sums[static_cast<size_t>(t)] = scratch.ds_sum;
  }
  // Fixed-order reductions: dQp over threads, dv = sum dS t = sum dS - 2 sum dS r.
  for (int t = 1; t < used_threads; ++t) {
    const float* src = dqp_partials[static_cast<size_t>(t)].get();
    for (int64_t x = 0; x < q_rows * S; ++x) g.d_q_proj[x] += src[x];
    if (want_dbias) {
      const float* db = dbias_partials[static_cast<size_t>(t)].data();
      for (int64_t x = 0; x < g.dbias_size; ++x) g.dbias[x] += db[x];
    }
  }
  for (int64_t e = 0; e < a.hidden; ++e) {
    double total = 0.0;
    for (int t = 0; t < used_threads; ++t)
      total += ds_sums[static_cast<size_t>(t)] -
               2.0 * static_cast<double>(dv_partials[static_cast<size_t>(t)][static_cast<size_t>(e)]);
    g.d_score_v[e] = static_cast<float>(total);
  }
}

const char* AdditiveTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_ADDITIVE_ATTENTION_INL_H_
