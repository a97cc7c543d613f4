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
// forward once. Each evaluation is PairR: in the split form (see additive_attention.h) one FMA
// and a Newton-refined reciprocal on the precomputed 2^Qp', 2^Kp'. Memory traffic is small next to that: a KpT block is A Bc floats (32 KiB at
// A = 128, AVX-512) and stays in L1/L2 while every row of a work item streams over it.

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
#include "kernels/additive_attention.h"
#include "kernels/simd_common-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace additive {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;
using simd::Exp2Fraction;

constexpr int64_t kBlockVecs = 4;    // keys per block = 4 vectors (64 with AVX-512)
constexpr int64_t kQueryRows = 32;   // query rows per forward work item
constexpr size_t kChunkVecs = 8;     // vectors of a row held in registers (P V, gradients)

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
// instead of 16. Valid while every |Qp'|, |Kp'| <= kSplitLimit (the product stays a normal float;
// checked per call, see Packed). Plain form: the operands are Qp' and Kp'.
template <bool kSplit>
HWY_INLINE VF PairR(DF df, VF q, VF k) {
  if constexpr (kSplit) {
    return Reciprocal(df, hn::MulAdd(q, k, hn::Set(df, 1.0f)));
  } else {
    return HalfOneMinusTanh(df, hn::Add(q, k));
  }
}
// |y| <= 63 / (2 log2 e) ~ 21.8 on both sides: tanh arguments beyond that in either projection
// (where tanh already rounds to +-1) or non-finite ones switch the call to the plain form.
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

// The operands of PairR and the packed copies, O(N (A + Dv)) floats written once per call:
//   split  whether the split form applies (every |Qp'|, |Kp'| <= kSplitLimit, no NaN)
//   qsrc, ksrc  rows of the query / key operands (2^Qp', 2^Kp' in eq, ek when split; else the
//          projections themselves), stride proj_stride
//   kpt    ksrc packed transposed per key block, [B*Hkv][blocks][A][Bc] (keys past Tk zero)
//   vp     values with rows padded to Dvp columns (zeros past Dv), [B*Hkv][Tk][Dvp]
struct Packed {
  bool split = false;
  const float* qsrc = nullptr;
  const float* ksrc = nullptr;
  hwy::AlignedFreeUniquePtr<float[]> eq, ek, kpt, vp;
};

inline bool WithinSplitLimit(const float* x, int64_t n) {
  bool ok = true;
  for (int64_t e = 0; e < n; ++e) ok &= std::abs(x[e]) <= kSplitLimit;  // false for NaN
  return ok;
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

inline Packed PackKeysAndValues(const AdditiveAttentionArgs& a, const Layout& l) {
  const int64_t heads = a.batch * a.kv_heads, A = a.hidden, S = a.proj_stride;
  const int64_t q_rows = a.batch * a.q_heads * a.q_len, k_rows = heads * a.k_len;
  Packed p;
  p.split = WithinSplitLimit(a.q_proj, q_rows * S) && WithinSplitLimit(a.k_proj, k_rows * S);
  p.qsrc = a.q_proj, p.ksrc = a.k_proj;
  if (p.split) {
    p.eq = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * S)));
    p.ek = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_rows * S)));
    Exp2Rows(a.q_proj, p.eq.get(), q_rows, S);
    Exp2Rows(a.k_proj, p.ek.get(), k_rows, S);
    p.qsrc = p.eq.get(), p.ksrc = p.ek.get();
  }
  p.kpt = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(
      1, heads * l.blocks * A * l.Bc)));
  p.vp = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(
      1, heads * a.k_len * l.Dvp)));
#pragma omp parallel for schedule(static) if (heads > 1)
  for (int64_t hk = 0; hk < heads; ++hk) {
    for (int64_t kb = 0; kb < l.blocks; ++kb) {
      float* dst = p.kpt.get() + (hk * l.blocks + kb) * A * l.Bc;
      for (int64_t jj = 0; jj < l.Bc; ++jj) {
        const int64_t j = kb * l.Bc + jj;
        const float* src = p.ksrc + (hk * a.k_len + j) * a.proj_stride;
        for (int64_t e = 0; e < A; ++e) dst[e * l.Bc + jj] = j < a.k_len ? src[e] : 0.0f;
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
  const float* q_proj;  // the row's query operand [A] (Packed::qsrc)
  const float* kpt;     // the block's packed key operands [A][Bc]
  int64_t jb;           // first key of the block
  int64_t jlo, jhi;     // visible keys inside the block
  float pos;            // pos(i), for ALiBi
  float alibi2;         // slope * log2(e), 0 without ALiBi
  const float* bias = nullptr;  // the row's bias, bias[j * bias_stride]; nullptr without bias
  int64_t bias_stride = 0;
};

// The bias row of query i of head h, batch b (nullptr without a bias), for RowBlock::bias.
inline const float* BiasRow(const AdditiveAttentionArgs& a, int64_t b, int64_t h, int64_t i) {
  const FlashBias& f = a.bias;
  return f.data == nullptr ? nullptr : f.data + b * f.stride_b + h * f.stride_h + i * f.stride_q;
}

// acc[n] = sum_a v_a r(Qp_a + KpT[a][vector v0 + n]) for NV vectors of keys.
template <size_t NV, bool kSplit>
HWY_INLINE void ScoreVectors(DF df, const RowBlock& rb, int64_t Bc, const float* HWY_RESTRICT sv,
                             int64_t A, size_t v0, VF (&acc)[kBlockVecs]) {
  const size_t N = hn::Lanes(df);
  VF sum[NV];
  for (size_t n = 0; n < NV; ++n) sum[n] = hn::Zero(df);
  const float* HWY_RESTRICT kpt = rb.kpt + v0 * N;
  const float* HWY_RESTRICT qp = rb.q_proj;
  for (int64_t e = 0; e < A; ++e, kpt += Bc) {
    const VF qa = hn::Set(df, qp[e]);
    const VF va = hn::Set(df, sv[e]);
    for (size_t n = 0; n < NV; ++n) {
      const VF r = PairR<kSplit>(df, qa, hn::Load(df, kpt + n * N));
      sum[n] = hn::MulAdd(va, r, sum[n]);
    }
  }
  for (size_t n = 0; n < NV; ++n) acc[n] = sum[n];
}

// Scores of one row over one key block in log2 units,
// s2_j = log2(e) (v . tanh(..) - ALiBi + bias_j),
// -inf outside [jlo, jhi), stored to s2[j - jb] for the vectors [v0, v1) that cover the visible
// keys. Returns v0 and v1 through the arguments.
template <bool kSplit>
HWY_INLINE void RowBlockScores(DF df, const RowBlock& rb, const Layout& l,
                               const float* HWY_RESTRICT sv, int64_t A,
                               float* HWY_RESTRICT s2, size_t& v0, size_t& v1) {
  const DI di;
  const size_t N = hn::Lanes(df);
  v0 = static_cast<size_t>((rb.jlo - rb.jb) / l.N);
  v1 = static_cast<size_t>((rb.jhi - rb.jb + l.N - 1) / l.N);
  VF acc[kBlockVecs];
  switch (v1 - v0) {
    case 1: ScoreVectors<1, kSplit>(df, rb, l.Bc, sv, A, v0, acc); break;
    case 2: ScoreVectors<2, kSplit>(df, rb, l.Bc, sv, A, v0, acc); break;
    case 3: ScoreVectors<3, kSplit>(df, rb, l.Bc, sv, A, v0, acc); break;
    default: ScoreVectors<4, kSplit>(df, rb, l.Bc, sv, A, v0, acc); break;
  }
  // s = sum_a v_a (1 - 2 r_a) = sum v - 2 sum v r, scaled to log2 units in one FMA.
  const VF minus_two_log2e = hn::Set(df, -2.0f * kLog2e);
  const VF vsum2 = hn::Set(df, l.vsum2);
  const bool edge = (rb.jlo - rb.jb) % l.N != 0 || (rb.jhi - rb.jb) % l.N != 0;
  for (size_t n = 0; n < v1 - v0; ++n) {
    VF s = hn::MulAdd(acc[n], minus_two_log2e, vsum2);
    const int64_t first = rb.jb + static_cast<int64_t>((v0 + n) * N);
    const VI keys = hn::Iota(di, static_cast<int32_t>(first));
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
    if (edge) {
      const auto visible = hn::And(keys > hn::Set(di, static_cast<int32_t>(rb.jlo - 1)),
                                   keys < hn::Set(di, static_cast<int32_t>(rb.jhi)));
      s = hn::IfThenElse(hn::RebindMask(df, visible), s, hn::Set(df, kNegInf));
    }
    hn::Store(s, df, s2 + (v0 + n) * N);
  }
}

// RowBlockScores in the form the packed operands were prepared for.
HWY_INLINE void PackedRowBlockScores(DF df, const Packed& pk, const RowBlock& rb,
                                     const Layout& l, const float* HWY_RESTRICT sv, int64_t A,
                                     float* HWY_RESTRICT s2, size_t& v0, size_t& v1) {
  if (pk.split)
    RowBlockScores<true>(df, rb, l, sv, A, s2, v0, v1);
  else
    RowBlockScores<false>(df, rb, l, sv, A, s2, v0, v1);
}

// o[c] += sum_{j < count} p[j] V[j][c] for NV vectors of columns; V rows have stride Dvp.
template <size_t NV>
HWY_INLINE void AccumulatePV(DF df, float* HWY_RESTRICT o, const float* HWY_RESTRICT vp,
                             int64_t Dvp, const float* HWY_RESTRICT p, int64_t count) {
  const size_t N = hn::Lanes(df);
  VF acc[NV];
  for (size_t n = 0; n < NV; ++n) acc[n] = hn::Load(df, o + n * N);
  for (int64_t j = 0; j < count; ++j, vp += Dvp) {
    const VF pj = hn::Set(df, p[j]);
    for (size_t n = 0; n < NV; ++n) acc[n] = hn::MulAdd(pj, hn::Load(df, vp + n * N), acc[n]);
  }
  for (size_t n = 0; n < NV; ++n) hn::Store(acc[n], df, o + n * N);
}

// The same over a whole padded row of Dvp columns, kChunkVecs vectors at a time.
HWY_INLINE void RowAccumulatePV(DF df, float* o, const float* vp, int64_t Dvp, const float* p,
                                int64_t count) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t chunk = static_cast<int64_t>(kChunkVecs) * N;
  int64_t c = 0;
  for (; c + chunk <= Dvp; c += chunk)
    AccumulatePV<kChunkVecs>(df, o + c, vp + c, Dvp, p, count);
  for (; c + 4 * N <= Dvp; c += 4 * N) AccumulatePV<4>(df, o + c, vp + c, Dvp, p, count);
  for (; c < Dvp; c += N) AccumulatePV<1>(df, o + c, vp + c, Dvp, p, count);
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct ForwardScratch {
  explicit ForwardScratch(const Layout& l)
      : o(hwy::AllocateAligned<float>(static_cast<size_t>(kQueryRows * l.Dvp))),
        s2(hwy::AllocateAligned<float>(static_cast<size_t>(l.Bc))),
        iv(static_cast<size_t>(kQueryRows)),
        max(static_cast<size_t>(kQueryRows)),
        sum(static_cast<size_t>(kQueryRows)) {}
  hwy::AlignedFreeUniquePtr<float[]> o, s2;
  std::vector<KeyInterval> iv;
  std::vector<float> max, sum;  // running max (log2 units) and sum per row
};

// Query rows [i0, i0 + rows) of head h of batch b: key blocks outermost so one packed block
// serves every row of the item from L1/L2.
inline void ForwardItem(const AdditiveAttentionArgs& a, const Layout& l, const Packed& pk,
                        ForwardScratch& sc, int64_t b, int64_t h, int64_t i0, int64_t rows,
                        float* out, float* lse, float* weights) {
  const DF df;
  const int64_t N = l.N, A = a.hidden, Dvp = l.Dvp;
  const int64_t hk = b * a.kv_heads + h / l.G;
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
    rb.kpt = pk.kpt.get() + (hk * l.blocks + kb) * A * l.Bc;
    rb.jb = kb * l.Bc;
    rb.alibi2 = alibi2;
    rb.bias_stride = a.bias.stride_k;
    for (int64_t r = 0; r < rows; ++r) {
      const KeyInterval& iv = sc.iv[static_cast<size_t>(r)];
      rb.jlo = std::max(rb.jb, iv.lo);
      rb.jhi = std::min(rb.jb + l.Bc, iv.hi);
      if (rb.jlo >= rb.jhi) continue;  // causal / window / lengths: nothing visible here
      rb.q_proj = pk.qsrc + (row_base + r) * a.proj_stride;
      rb.bias = BiasRow(a, b, h, i0 + r);
      rb.pos = static_cast<float>(iv.pos);
      size_t v0 = 0, v1 = 0;
      float* s2 = sc.s2.get();
      PackedRowBlockScores(df, pk, rb, l, a.score_v, A, s2, v0, v1);

      // Online softmax (Milakov & Gimelshein 2018), per row, log2 units.
      VF bmax = hn::Set(df, kNegInf);
      for (size_t n = v0; n < v1; ++n) bmax = hn::Max(bmax, hn::Load(df, s2 + n * N));
      const float block_max = hn::GetLane(hn::MaxOfLanes(df, bmax));
      float& row_max = sc.max[static_cast<size_t>(r)];
      float& row_sum = sc.sum[static_cast<size_t>(r)];
      float* o = sc.o.get() + r * Dvp;
      if (block_max > row_max) {
        // alpha = 2^(old - new): 0 while the row had no score yet (its sum and o are 0 too).
        const float alpha = std::exp2(row_max - block_max);
        row_sum *= alpha;
        const VF av = hn::Set(df, alpha);
        for (int64_t c = 0; c < Dvp; c += N) hn::Store(hn::Mul(hn::Load(df, o + c), av), df, o + c);
        row_max = block_max;
      }
      // A NaN score (NaN inputs) leaves row_max alone, and its p = NaN poisons the row's sum
      // and output, as the reference does; masked lanes are -inf and give p = 0.
      const VF shift = hn::Set(df, row_max == kNegInf ? 0.0f : row_max);
      VF psum = hn::Zero(df);
      for (size_t n = v0; n < v1; ++n) {
        const VF p = Exp2Clamped(df, hn::Sub(hn::Load(df, s2 + n * N), shift));
        psum = hn::Add(psum, p);
        hn::Store(p, df, s2 + n * N);
      }
      row_sum += hn::GetLane(hn::SumOfLanes(df, psum));
      RowAccumulatePV(df, o, vp + rb.jlo * Dvp, Dvp, s2 + (rb.jlo - rb.jb), rb.jhi - rb.jlo);
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
    rb.q_proj = pk.qsrc + (row_base + r) * a.proj_stride;
    rb.bias = BiasRow(a, b, h, i0 + r);
    rb.bias_stride = a.bias.stride_k;
    rb.pos = static_cast<float>(iv.pos);
    for (int64_t kb = lo / l.Bc; kb * l.Bc < hi; ++kb) {
      rb.kpt = pk.kpt.get() + (hk * l.blocks + kb) * A * l.Bc;
      rb.jb = kb * l.Bc;
      rb.jlo = std::max(rb.jb, lo);
      rb.jhi = std::min(rb.jb + l.Bc, hi);
      size_t v0 = 0, v1 = 0;
      float* s2 = sc.s2.get();
      PackedRowBlockScores(df, pk, rb, l, a.score_v, A, s2, v0, v1);
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
      : s2(hwy::AllocateAligned<float>(static_cast<size_t>(l.Bc))),
        ds(hwy::AllocateAligned<float>(static_cast<size_t>(l.Bc))),
        dv_acc(hwy::AllocateAligned<float>(static_cast<size_t>(a.proj_stride))) {
    std::fill_n(dv_acc.get(), a.proj_stride, 0.0f);
  }
  hwy::AlignedFreeUniquePtr<float[]> s2, ds;
  hwy::AlignedFreeUniquePtr<float[]> dv_acc;  // sum dS r per hidden unit (this thread)
  double ds_sum = 0.0;                        // sum dS (this thread)
};

// Per (i, j) with dS_ij != 0, over NV vectors of hidden units (qp, kp: the query row's and the
// key rows' PairR operands at the first of those units, key rows `stride` apart):
//   r = (1 - t) / 2,  1 - t^2 = 4 r (1 - r),  g = dS v (1 - t^2)
//   dQp_i += g (registers),  dKp_j += g (the item's own rows),  dv_acc += dS r.
template <size_t NV, bool kSplit>
HWY_INLINE void ProjectionGrads(DF df, const float* HWY_RESTRICT qp, const float* HWY_RESTRICT kp,
                                int64_t stride, const float* HWY_RESTRICT v4,
                                const float* HWY_RESTRICT ds, int64_t jlo, int64_t jhi,
                                float* HWY_RESTRICT dkp, float* HWY_RESTRICT dqp,
                                float* HWY_RESTRICT dv_acc) {
  const size_t N = hn::Lanes(df);
  VF dq[NV], dvr[NV];
  for (size_t n = 0; n < NV; ++n) dq[n] = hn::Zero(df), dvr[n] = hn::Load(df, dv_acc + n * N);
  for (int64_t j = jlo; j < jhi; ++j) {
    if (ds[j] == 0.0f) continue;  // masked, or a probability that underflowed: no gradient
    const VF dsj = hn::Set(df, ds[j]);
    const float* HWY_RESTRICT kj = kp + j * stride;
    float* HWY_RESTRICT dkj = dkp + j * stride;
    for (size_t n = 0; n < NV; ++n) {
      const VF r = PairR<kSplit>(df, hn::Load(df, qp + n * N), hn::Load(df, kj + n * N));
      const VF vw = hn::Mul(hn::Load(df, v4 + n * N), hn::NegMulAdd(r, r, r));  // 4 v r (1 - r)
      dq[n] = hn::MulAdd(dsj, vw, dq[n]);
      hn::Store(hn::MulAdd(dsj, vw, hn::Load(df, dkj + n * N)), df, dkj + n * N);
      dvr[n] = hn::MulAdd(dsj, r, dvr[n]);
    }
  }
  for (size_t n = 0; n < NV; ++n) {
    hn::Store(hn::Add(hn::Load(df, dqp + n * N), dq[n]), df, dqp + n * N);
    hn::Store(dvr[n], df, dv_acc + n * N);
  }
}

struct BackwardInputs {
  const float* dop;  // dO padded [B*Hq*Tq][Dvp]
  const float* di;   // D_i = dO_i . O_i [B*Hq*Tq]
  const float* v4;   // 4 v, padded to proj_stride
};

// Key block kb of (batch b, kv head): every query row of the G heads that sees a key of it.
// Writes the block's rows of dKp and dV; adds to this thread's dQp and dbias partials (dbias:
// nullptr without a bias gradient) and dv sums.
template <bool kSplit>
void BackwardItem(const AdditiveAttentionArgs& a, const AdditiveAttentionGradArgs& g,
                         const Layout& l, const Packed& pk, const BackwardInputs& in,
                         BackwardScratch& sc, float* dqp_partial, float* dbias_partial,
                         int64_t b, int64_t kvh, int64_t kb) {
  const DF df;
  const int64_t N = l.N, A = a.hidden, Dvp = l.Dvp, S = a.proj_stride;
  const int64_t hk = b * a.kv_heads + kvh;
  const int64_t jb = kb * l.Bc, je = std::min(jb + l.Bc, a.k_len);
  const float* kp = pk.ksrc + hk * a.k_len * S;  // key operand rows j of this (b, kv head)
  float* dkp = g.d_k_proj + hk * a.k_len * S;
  const float* vp = pk.vp.get() + hk * a.k_len * Dvp;
  // dV accumulates in the padded layout, then is copied out without the pad.
  std::vector<float> dvp(static_cast<size_t>((je - jb) * Dvp), 0.0f);
  std::fill_n(dkp + jb * S, (je - jb) * S, 0.0f);
  float* ds = sc.ds.get() - jb;  // indexed by key
  const int64_t chunk = static_cast<int64_t>(kChunkVecs) * N;

  RowBlock rb;
  rb.kpt = pk.kpt.get() + (hk * l.blocks + kb) * A * l.Bc;
  rb.jb = jb;
  rb.bias_stride = a.bias.stride_k;
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
      rb.q_proj = pk.qsrc + row * S;
      rb.pos = static_cast<float>(iv.pos);
      rb.bias = BiasRow(a, b, h, i);

      // 1. Recompute s_ij and P_ij = exp(s_ij - lse_i) for the row's visible keys of the block.
      size_t v0 = 0, v1 = 0;
      float* s2 = sc.s2.get();
      RowBlockScores<kSplit>(df, rb, l, a.score_v, A, s2, v0, v1);
      const VF lse2 = hn::Set(df, lse * kLog2e);
      for (size_t n = v0; n < v1; ++n)
        hn::Store(Exp2Clamped(df, hn::Sub(hn::Load(df, s2 + n * N), lse2)), df, s2 + n * N);

      // 2. dV_j += P_ij dO_i;  dP_ij = dO_i . V_j;  dS_ij = P_ij (dP_ij - D_i).
      const float* dO = in.dop + row * Dvp;
      const float d_i = in.di[row];
      double row_ds = 0.0;
      for (int64_t j = rb.jlo; j < rb.jhi; ++j) {
        const float p = s2[j - jb];
        if (p == 0.0f) {
          ds[j] = 0.0f;
          continue;
        }
        const VF pv = hn::Set(df, p);
        const float* vj = vp + j * Dvp;
        float* dvj = dvp.data() + (j - jb) * Dvp;
        VF dot = hn::Zero(df);
        for (int64_t c = 0; c < Dvp; c += N) {
          const VF dOc = hn::Load(df, dO + c);
          dot = hn::MulAdd(dOc, hn::Load(df, vj + c), dot);
          hn::StoreU(hn::MulAdd(pv, dOc, hn::LoadU(df, dvj + c)), df, dvj + c);
        }
        ds[j] = p * (hn::GetLane(hn::SumOfLanes(df, dot)) - d_i);
        row_ds += ds[j];
      }
      sc.ds_sum += row_ds;
      // (8) dbias_ij += dS_ij, into this thread's partial: broadcast dimensions map many (i, j)
      // to one element.
      if (dbias_partial != nullptr) {
        float* db = dbias_partial + (BiasRow(a, b, h, i) - a.bias.data);
        for (int64_t j = rb.jlo; j < rb.jhi; ++j) db[j * rb.bias_stride] += ds[j];
      }

      // 3. dQp_i, dKp_j, dv from g_ija = dS_ij v_a (1 - t_ija^2), lanes over a.
      float* dqp = dqp_partial + row * S;
      int64_t e = 0;
      for (; e + chunk <= S; e += chunk)
        ProjectionGrads<kChunkVecs, kSplit>(df, rb.q_proj + e, kp + e, S, in.v4 + e, ds, rb.jlo, rb.jhi,
                                    dkp + e, dqp + e, sc.dv_acc.get() + e);
      for (; e + 4 * N <= S; e += 4 * N)
        ProjectionGrads<4, kSplit>(df, rb.q_proj + e, kp + e, S, in.v4 + e, ds, rb.jlo, rb.jhi, dkp + e,
                           dqp + e, sc.dv_acc.get() + e);
      for (; e < S; e += N)
        ProjectionGrads<1, kSplit>(df, rb.q_proj + e, kp + e, S, in.v4 + e, ds, rb.jlo, rb.jhi, dkp + e,
                           dqp + e, sc.dv_acc.get() + e);
    }
  }
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
  const Packed pk = PackKeysAndValues(a, l);
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
  const Packed pk = PackKeysAndValues(a, l);
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
