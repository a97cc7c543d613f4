// Per-target body of the fused dot-product attention backward (see flash_backward.h).
// Included once per Highway target by flash_backward.cpp through foreach_target.h.
//
// Layout: the forward's "transposed query" scheme (flash_attention-inl.h). A tile is
// kTileVecs * Lanes query rows of one head (48 with AVX-512), one row per vector lane, and every
// Tq x Tk quantity lives only as a [keys][rows] block of one tile in L1:
//   Pt  [keys][TR]  P^T  = exp2(K Qt - lse log2 e)       (2) recomputed, never stored globally
//   dSt [keys][TR]  dS^T = P^T (V dOt - D)               (4), (5)
// With rows in lanes, the three products that reduce over the feature dimension or over keys
// broadcast one element of a row-major array against vectors of a transposed one:
//   P^T  += K[j][d]  * Qt[d][:]      dP^T += V[j][c] * dOt[c][:]     dQt[d][:] += K[j][d] * dSt[j][:]
// and the two that reduce over query rows (dV, dK) broadcast one element of Pt / dSt against
// vectors of a row-major, zero-padded copy of dO / Q:
//   dV[j][:] += Pt[j][i] * dO[i][:]  dK[j][:] += dSt[j][i] * Q[i][:]
// Every micro-kernel keeps 24 accumulators in registers (8 x 3 or 6 x 4 vectors), so the FMA
// ports, not the loads, set the pace; no product ever needs a horizontal reduction.
//
// Memory traffic: a work item is (batch, kv head, block of kKeyBlock keys). Its K and V block and
// its dK, dV accumulators (128 KiB each at d = 128) and one tile's Pt and dSt (48 KiB each) stay
// in the 2 MiB L2 while the item streams Qt, dOt, Q and dO of its G query heads and reads and
// writes its thread's dQt partial, once per tile: about 5 Tq D floats per head and item, the
// only traffic that grows with Tk / kKeyBlock. That stream, not the FMAs, limited small blocks
// (one thread, N = 2048, d = 128, CPU time per call: 64 keys 0.43 s, 128 keys 0.35 s,
// 256 keys 0.31 s, 512 keys 0.30 s; d = 64 gained 10%); 256 keeps 16 items at N = 512, H = 8
// for two threads.

#if defined(ATTN_KERNELS_FLASH_BACKWARD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_FLASH_BACKWARD_INL_H_
#undef ATTN_KERNELS_FLASH_BACKWARD_INL_H_
#else
#define ATTN_KERNELS_FLASH_BACKWARD_INL_H_
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
#include "kernels/common/dropout_mask-inl.h"
#include "kernels/common/dropout_mask.h"
#include "kernels/flash/flash_backward.h"
#include "kernels/common/simd_common-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace flash_bwd {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;
using simd::Exp2;

constexpr size_t kTileVecs = 3;     // query rows per tile = 3 vectors (as in the forward)
constexpr int64_t kKeyBlock = 256;  // keys per work item (see the memory-traffic note above)
constexpr size_t kScoreKeys = 8;    // keys per register block of P^T and dP^T (8 x 3 vectors)
constexpr size_t kGradCols = 8;     // dQt columns per register block (8 x 3 vectors)
constexpr size_t kRowKeys = 6;      // keys per register block of dV and dK (6 x 4 vectors)
constexpr size_t kRowVecs = 4;

// Keys visible to a tile (of one batch; intervals do not depend on the head).
struct TileKeys {
  bool any_visible = false;
  int64_t union_lo = 0, union_hi = 0;  // keys visible to at least one row
  int64_t inter_lo = 0, inter_hi = 0;  // keys visible to every row that sees any key
};

// Per-call arrays shared read-only by all threads: the queries and output gradients in the two
// layouts the micro-kernels need, and per-row softmax statistics and key intervals.
struct Prepared {
  int64_t TR = 0, tiles = 0, Tqp = 0, Dp = 0, Dvp = 0;
  hwy::AlignedFreeUniquePtr<float[]> qt;     // [B Hq][tiles][D][TR]   q * scale * log2(e)
  hwy::AlignedFreeUniquePtr<float[]> dot;    // [B Hq][tiles][Dv][TR]  dout
  // Row-major q and dout with rows padded to Dp / Dvp floats (whole vectors): the caller's
  // arrays themselves when D / Dv are multiples of the vector length, else padded copies
  // (only the real rows of a tile are ever read).
  const float* qrows = nullptr;   // row (bh, i) at qrows + (bh * Tq + i) * Dp
  const float* dorows = nullptr;  // row (bh, i) at dorows + (bh * Tq + i) * Dvp
  hwy::AlignedFreeUniquePtr<float[]> qpad, dopad;  // the copies, when needed
  // [B Hq][Tqp] lse log2(e) as hi + lo (ToLog2Shift); hi = +inf, lo = 0: row gets P = 0
  hwy::AlignedFreeUniquePtr<float[]> shift, shift_lo;
  hwy::AlignedFreeUniquePtr<float[]> delta;  // [B Hq][Tqp] D_i = dO_i . O_i
  hwy::AlignedFreeUniquePtr<float[]> pos;    // [B][Tqp] pos(i), for ALiBi
  hwy::AlignedFreeUniquePtr<int32_t[]> lo_minus1, hi;  // [B][Tqp]
  std::vector<TileKeys> tile_keys;           // [B][tiles]
};

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Sizes, allocations and the per-batch key intervals (serial: O(B Tq)).
void PrepareLayout(const FlashBackwardArgs& a, Prepared& p) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t TR = static_cast<int64_t>(kTileVecs) * N;
  const int64_t D = a.head_dim, Dv = a.value_dim, BH = a.batch * a.q_heads;
  p.TR = TR;
  p.tiles = (a.q_len + TR - 1) / TR;
  p.Tqp = p.tiles * TR;
  p.Dp = RoundUp(std::max<int64_t>(D, 1), N);
  p.Dvp = RoundUp(std::max<int64_t>(Dv, 1), N);
  const size_t rows = static_cast<size_t>(BH * p.Tqp);
  p.qt = hwy::AllocateAligned<float>(rows * static_cast<size_t>(D) + 1);
  p.dot = hwy::AllocateAligned<float>(rows * static_cast<size_t>(Dv) + 1);
  const size_t real_rows = static_cast<size_t>(BH * a.q_len);
  const bool copy_q = p.Dp != D, copy_dout = p.Dvp != Dv;
  if (copy_q) p.qpad = hwy::AllocateAligned<float>(real_rows * static_cast<size_t>(p.Dp));
  if (copy_dout) p.dopad = hwy::AllocateAligned<float>(real_rows * static_cast<size_t>(p.Dvp));
  p.qrows = copy_q ? p.qpad.get() : a.q;
  p.dorows = copy_dout ? p.dopad.get() : a.dout;
  p.shift = hwy::AllocateAligned<float>(rows);
  p.shift_lo = hwy::AllocateAligned<float>(rows);
  p.delta = hwy::AllocateAligned<float>(rows);
  const size_t brows = static_cast<size_t>(a.batch * p.Tqp);
  p.pos = hwy::AllocateAligned<float>(brows);
  p.lo_minus1 = hwy::AllocateAligned<int32_t>(brows);
  p.hi = hwy::AllocateAligned<int32_t>(brows);
  p.tile_keys.assign(static_cast<size_t>(a.batch * p.tiles), TileKeys{});

  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t t = 0; t < p.tiles; ++t) {
      TileKeys& tk = p.tile_keys[static_cast<size_t>(b * p.tiles + t)];
      tk.union_lo = a.k_len, tk.union_hi = 0, tk.inter_lo = 0, tk.inter_hi = a.k_len;
      for (int64_t lane = 0; lane < TR; ++lane) {
        const int64_t i = t * TR + lane;
        const KeyInterval iv = i < a.q_len ? RowInterval(a, b, i) : KeyInterval{0, 0, 0};
        const size_t at = static_cast<size_t>(b * p.Tqp + i);
        p.pos[at] = static_cast<float>(iv.pos);
        p.lo_minus1[at] = static_cast<int32_t>(iv.lo - 1);
        p.hi[at] = static_cast<int32_t>(iv.hi);
        // Rows that see no key get P = 0 through shift = +inf, so they need no element-wise
        // mask and do not narrow the tile's unmasked range.
        if (iv.lo >= iv.hi) continue;
        tk.any_visible = true;
        tk.union_lo = std::min(tk.union_lo, iv.lo);
        tk.union_hi = std::max(tk.union_hi, iv.hi);
        tk.inter_lo = std::max(tk.inter_lo, iv.lo);
        tk.inter_hi = std::min(tk.inter_hi, iv.hi);
      }
    }
  }

}

// The transposed and padded copies and the row statistics of one (batch, query head).
void PrepareHead(const FlashBackwardArgs& a, Prepared& p, int64_t bh) {
  const int64_t D = a.head_dim, Dv = a.value_dim, TR = p.TR;
  const bool copy_q = p.qpad != nullptr, copy_dout = p.dopad != nullptr;
  const float qscale = a.scale * kLog2e;
  const float inf = std::numeric_limits<float>::infinity();
  {
    const int64_t b = bh / a.q_heads;
    for (int64_t t = 0; t < p.tiles; ++t) {
      float* qt = p.qt.get() + (bh * p.tiles + t) * D * TR;
      float* dot = p.dot.get() + (bh * p.tiles + t) * Dv * TR;
      for (int64_t lane = 0; lane < TR; ++lane) {
        const int64_t i = t * TR + lane;
        const int64_t row = bh * p.Tqp + i;
        p.shift[static_cast<size_t>(row)] = inf;
        p.shift_lo[static_cast<size_t>(row)] = 0.0f;
        p.delta[static_cast<size_t>(row)] = 0.0f;
        if (i >= a.q_len) {
          for (int64_t d = 0; d < D; ++d) qt[d * TR + lane] = 0.0f;
          for (int64_t c = 0; c < Dv; ++c) dot[c * TR + lane] = 0.0f;
          continue;
        }
        const float* q = a.q + (bh * a.q_len + i) * D;
        const float* o = a.out + (bh * a.q_len + i) * Dv;
        const float* dO = a.dout + (bh * a.q_len + i) * Dv;
        for (int64_t d = 0; d < D; ++d) qt[d * TR + lane] = q[d] * qscale;
        if (copy_q) {
          float* qpad = p.qpad.get() + (bh * a.q_len + i) * p.Dp;
          std::copy_n(q, D, qpad);
          std::fill(qpad + D, qpad + p.Dp, 0.0f);
        }
        if (copy_dout) {
          float* dopad = p.dopad.get() + (bh * a.q_len + i) * p.Dvp;
          std::copy_n(dO, Dv, dopad);
          std::fill(dopad + Dv, dopad + p.Dvp, 0.0f);
        }
        double dot_product = 0.0;  // (1) in double: Dv terms, once per row, cheap
        for (int64_t c = 0; c < Dv; ++c) {
          dot[c * TR + lane] = dO[c];
          dot_product += static_cast<double>(dO[c]) * static_cast<double>(o[c]);
        }
        const float lse = a.lse[bh * a.q_len + i];
        const bool masked = lse == -inf || p.hi[static_cast<size_t>(b * p.Tqp + i)] <=
                                               p.lo_minus1[static_cast<size_t>(b * p.Tqp + i)] + 1;
        // shift = +inf turns every score of a fully masked row into P = 2^-inf = 0 (NaN lse
        // propagates); otherwise the scores are in log2 units, so is the shift, kept as two
        // floats so that converting lse adds no rounding (ToLog2Shift).
        const Log2Shift shift = ToLog2Shift(lse);
        p.shift[static_cast<size_t>(row)] = masked ? inf : shift.hi;
        p.shift_lo[static_cast<size_t>(row)] = masked ? 0.0f : shift.lo;
        p.delta[static_cast<size_t>(row)] = masked ? 0.0f : static_cast<float>(dot_product);
      }
    }
  }
}

// acc[r][w] = sum_d A[r][d] * Bt[d][w-th vector]: R rows of a row-major A (row stride `depth`)
// against the TR lanes of a transposed Bt [depth][TR]. P^T = K Qt and dP^T = V dOt.
template <size_t R>
HWY_INLINE void RowsTimesTransposed(DF df, const float* HWY_RESTRICT arows, int64_t depth,
                                    const float* HWY_RESTRICT bt, VF (&acc)[R][kTileVecs]) {
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  for (size_t r = 0; r < R; ++r)
    for (size_t w = 0; w < kTileVecs; ++w) acc[r][w] = hn::Zero(df);
  for (int64_t d = 0; d < depth; ++d) {
    VF x[kTileVecs];
    for (size_t w = 0; w < kTileVecs; ++w) x[w] = hn::Load(df, bt + d * TR + w * N);
    HWY_UNROLL(8)
    for (size_t r = 0; r < R; ++r) {
      const VF s = hn::Set(df, arows[r * depth + d]);
      for (size_t w = 0; w < kTileVecs; ++w) acc[r][w] = hn::MulAdd(s, x[w], acc[r][w]);
    }
  }
}

// Everything one (tile, key range) step needs.
struct TileView {
  const float* qt;        // [D][TR]
  const float* dot;       // [Dv][TR]
  const float* qpad;      // [rows][Dp] rows of this tile
  const float* dopad;     // [rows][Dvp]
  const float* shift;     // [TR]
  const float* shift_lo;  // [TR]
  const float* delta;     // [TR]
  const float* pos;       // [TR]
  const int32_t* lo_minus1;
  const int32_t* hi;
  const int32_t* bias_offsets;  // [TR] or nullptr when the bias has no query stride
  const float* bias;            // bias at (b, head, row0, key 0) or nullptr
  int64_t bias_stride_k;
  float alibi_log2;
  bool alibi;
  bool mask;
  int64_t rows;           // valid rows (lanes) of the tile
  const float* drop_factor;  // [keys][TR] keep_ij / (1 - p) of this key range, or nullptr
  const float* allowed;      // [keys][TR] the boolean mask as 1 / 0, or nullptr without one
};

// (2) P^T rows for keys [j, j + R): scores with bias, ALiBi and interval mask, then
// P = 2^(s - lse log2 e), stored at pt[(key - jb) * TR].
template <size_t R>
HWY_INLINE void ProbabilityRows(DF df, const TileView& t, const float* HWY_RESTRICT k, int64_t D,
                                int64_t j, int64_t jb, float* HWY_RESTRICT pt) {
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  const DI di;
  VF acc[R][kTileVecs];
  RowsTimesTransposed<R>(df, k + j * D, D, t.qt, acc);
  for (size_t r = 0; r < R; ++r) {
    const int64_t key = j + static_cast<int64_t>(r);
    float* HWY_RESTRICT prow = pt + (key - jb) * static_cast<int64_t>(TR);
    for (size_t w = 0; w < kTileVecs; ++w) {
      VF s = acc[r][w];
      if (t.bias != nullptr) {
        const float* bp = t.bias + key * t.bias_stride_k;
        const VF bv = t.bias_offsets == nullptr
                          ? hn::Set(df, *bp)
                          : hn::GatherIndex(df, bp, hn::Load(di, t.bias_offsets + w * N));
        s = hn::MulAdd(bv, hn::Set(df, kLog2e), s);
      }
      if (t.alibi) {
        const VF dist = hn::Abs(hn::Sub(hn::Load(df, t.pos + w * N),
                                        hn::Set(df, static_cast<float>(key))));
        s = hn::NegMulAdd(hn::Set(df, t.alibi_log2), dist, s);
      }
      VF p = Exp2(df, hn::Sub(hn::Sub(s, hn::Load(df, t.shift + w * N)),
                              hn::Load(df, t.shift_lo + w * N)));
      if (t.mask) {
        const VI kj = hn::Set(di, static_cast<int32_t>(key));
        const auto visible = hn::And(kj > hn::Load(di, t.lo_minus1 + w * N),
                                     hn::Load(di, t.hi + w * N) > kj);
        p = hn::IfThenElseZero(hn::RebindMask(df, visible), p);
      }
      if (t.allowed != nullptr) {
        const VF ok = hn::Load(df, t.allowed + (key - jb) * static_cast<int64_t>(TR) + w * N);
        p = hn::IfThenElseZero(hn::Gt(ok, hn::Zero(df)), p);
      }
      hn::Store(p, df, prow + w * N);
    }
  }
}

// (4), (5) dS^T rows for keys [j, j + R): dP^T = V dOt, dS = P (dP - D). With dropout the
// product V dOt is the gradient of the dropped probabilities, and dP = dP_drop keep / (1 - p);
// D = rowsum(dO o O) is unchanged (O already holds the dropout).
template <size_t R>
HWY_INLINE void ScoreGradRows(DF df, const TileView& t, const float* HWY_RESTRICT v, int64_t Dv,
                              int64_t j, int64_t jb, const float* HWY_RESTRICT pt,
                              float* HWY_RESTRICT dst) {
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  VF acc[R][kTileVecs];
  RowsTimesTransposed<R>(df, v + j * Dv, Dv, t.dot, acc);
  for (size_t r = 0; r < R; ++r) {
    const int64_t at = (j + static_cast<int64_t>(r) - jb) * static_cast<int64_t>(TR);
    for (size_t w = 0; w < kTileVecs; ++w) {
      const VF p = hn::Load(df, pt + at + w * N);
      VF dp = acc[r][w];
      if (t.drop_factor != nullptr) dp = hn::Mul(dp, hn::Load(df, t.drop_factor + at + w * N));
      VF ds = hn::Mul(p, hn::Sub(dp, hn::Load(df, t.delta + w * N)));
      // A hidden key inside the tile's range may hold anything (NaN padding): P = 0 there must
      // give dS = 0, not 0 * NaN.
      if (t.mask || t.allowed != nullptr) ds = hn::IfThenZeroElse(hn::Eq(p, hn::Zero(df)), ds);
      hn::Store(ds, df, dst + at + w * N);
    }
  }
}

// (3), (7) out[j][c..] += sum_{i < lanes} xt[j][i] * b[i][c..] for R keys and C vectors of
// columns: dV += P^T dO and dK += dS^T Q with rows in lanes of xt = Pt / dSt.
template <size_t R, size_t C>
HWY_INLINE void AccumulateRowsBlock(DF df, const float* HWY_RESTRICT xt, int64_t lanes,
                                    const float* HWY_RESTRICT b, int64_t ldb,
                                    float* HWY_RESTRICT out, int64_t ldo) {
  const size_t N = hn::Lanes(df);
  const int64_t TR = static_cast<int64_t>(kTileVecs * N);
  VF acc[R][C];
  for (size_t r = 0; r < R; ++r)
    for (size_t c = 0; c < C; ++c) acc[r][c] = hn::Load(df, out + r * ldo + c * N);
  for (int64_t i = 0; i < lanes; ++i) {
    VF x[C];
    // Unaligned loads: b may be the caller's own q / dout rows.
    for (size_t c = 0; c < C; ++c) x[c] = hn::LoadU(df, b + i * ldb + c * N);
    HWY_UNROLL(6)
    for (size_t r = 0; r < R; ++r) {
      const VF s = hn::Set(df, xt[static_cast<int64_t>(r) * TR + i]);
      for (size_t c = 0; c < C; ++c) acc[r][c] = hn::MulAdd(s, x[c], acc[r][c]);
    }
  }
  for (size_t r = 0; r < R; ++r)
    for (size_t c = 0; c < C; ++c) hn::Store(acc[r][c], df, out + r * ldo + c * N);
}

template <size_t R>
HWY_INLINE void AccumulateRowsKeys(DF df, const float* xt, int64_t lanes, const float* b,
                                   int64_t ldb, float* out, int64_t ldo) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t vecs = ldb / N;  // ldb == ldo: the padded width, a whole number of vectors
  int64_t c = 0;
  for (; c + static_cast<int64_t>(kRowVecs) <= vecs; c += kRowVecs)
    AccumulateRowsBlock<R, kRowVecs>(df, xt, lanes, b + c * N, ldb, out + c * N, ldo);
  switch (vecs - c) {
    case 3: AccumulateRowsBlock<R, 3>(df, xt, lanes, b + c * N, ldb, out + c * N, ldo); break;
    case 2: AccumulateRowsBlock<R, 2>(df, xt, lanes, b + c * N, ldb, out + c * N, ldo); break;
    case 1: AccumulateRowsBlock<R, 1>(df, xt, lanes, b + c * N, ldb, out + c * N, ldo); break;
    default: break;
  }
}

// out[key - j0][:] += sum_i xt[key - jb][i] b[i][:] for keys [jb, je).
HWY_NOINLINE void AccumulateRows(const float* xt, int64_t keys, int64_t lanes, const float* b,
                                 int64_t ld, float* out) {
  const DF df;
  const int64_t TR = static_cast<int64_t>(kTileVecs * hn::Lanes(df));
  int64_t j = 0;
  for (; j + static_cast<int64_t>(kRowKeys) <= keys; j += kRowKeys)
    AccumulateRowsKeys<kRowKeys>(df, xt + j * TR, lanes, b, ld, out + j * ld, ld);
  for (; j + 2 <= keys; j += 2) AccumulateRowsKeys<2>(df, xt + j * TR, lanes, b, ld, out + j * ld, ld);
  for (; j < keys; ++j) AccumulateRowsKeys<1>(df, xt + j * TR, lanes, b, ld, out + j * ld, ld);
}

// (6) dQt[c][:] += sum_j K[j][c] dSt[j][:] for columns [c, c + R), keys [jb, je).
template <size_t R>
HWY_INLINE void AccumulateColumns(DF df, const float* HWY_RESTRICT dst, const float* HWY_RESTRICT k,
                                  int64_t D, int64_t c, int64_t jb, int64_t je,
                                  float* HWY_RESTRICT dqt) {
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  float* HWY_RESTRICT out = dqt + c * static_cast<int64_t>(TR);
  VF acc[R][kTileVecs];
  for (size_t r = 0; r < R; ++r)
    for (size_t w = 0; w < kTileVecs; ++w) acc[r][w] = hn::Load(df, out + r * TR + w * N);
  const float* HWY_RESTRICT ds = dst;
  for (int64_t j = jb; j < je; ++j, ds += TR) {
    VF x[kTileVecs];
    for (size_t w = 0; w < kTileVecs; ++w) x[w] = hn::Load(df, ds + w * N);
    const float* HWY_RESTRICT krow = k + j * D + c;
    HWY_UNROLL(8)
    for (size_t r = 0; r < R; ++r) {
      const VF s = hn::Set(df, krow[r]);
      for (size_t w = 0; w < kTileVecs; ++w) acc[r][w] = hn::MulAdd(s, x[w], acc[r][w]);
    }
  }
  for (size_t r = 0; r < R; ++r)
    for (size_t w = 0; w < kTileVecs; ++w) hn::Store(acc[r][w], df, out + r * TR + w * N);
}

// One tile against keys [jb, je) of the item's block starting at j0: (2)-(7) for this pair.
HWY_NOINLINE void TileKeyRange(const TileView& t, const float* HWY_RESTRICT k,
                               const float* HWY_RESTRICT v, int64_t D, int64_t Dv, int64_t Dp,
                               int64_t Dvp, int64_t j0, int64_t jb, int64_t je,
                               float* HWY_RESTRICT pt, float* HWY_RESTRICT dst,
                               float* HWY_RESTRICT dv_acc, float* HWY_RESTRICT dk_acc,
                               float* HWY_RESTRICT dqt) {
  const DF df;
  int64_t j = jb;
  for (; j + static_cast<int64_t>(kScoreKeys) <= je; j += kScoreKeys)
    ProbabilityRows<kScoreKeys>(df, t, k, D, j, jb, pt);
  for (; j + 4 <= je; j += 4) ProbabilityRows<4>(df, t, k, D, j, jb, pt);
  for (; j < je; ++j) ProbabilityRows<1>(df, t, k, D, j, jb, pt);

  j = jb;
  for (; j + static_cast<int64_t>(kScoreKeys) <= je; j += kScoreKeys)
    ScoreGradRows<kScoreKeys>(df, t, v, Dv, j, jb, pt, dst);
  for (; j + 4 <= je; j += 4) ScoreGradRows<4>(df, t, v, Dv, j, jb, pt, dst);
  for (; j < je; ++j) ScoreGradRows<1>(df, t, v, Dv, j, jb, pt, dst);

  if (t.drop_factor != nullptr) {
    // (3) with dropout: dV += (P keep / (1 - p))^T dO. A select so a dropped NaN becomes 0.
    const size_t N = hn::Lanes(df);
    const int64_t TR = static_cast<int64_t>(kTileVecs * N);
    for (int64_t e = 0; e < (je - jb) * TR; e += static_cast<int64_t>(N)) {
      const VF m = hn::Load(df, t.drop_factor + e);
      const VF p = hn::Mul(hn::Load(df, pt + e), m);
      hn::Store(hn::IfThenZeroElse(hn::Eq(m, hn::Zero(df)), p), df, pt + e);
    }
  }
  AccumulateRows(pt, je - jb, t.rows, t.dopad, Dvp, dv_acc + (jb - j0) * Dvp);
  AccumulateRows(dst, je - jb, t.rows, t.qpad, Dp, dk_acc + (jb - j0) * Dp);

  int64_t c = 0;
  for (; c + static_cast<int64_t>(kGradCols) <= D; c += kGradCols)
    AccumulateColumns<kGradCols>(df, dst, k, D, c, jb, je, dqt);
  for (; c + 4 <= D; c += 4) AccumulateColumns<4>(df, dst, k, D, c, jb, je, dqt);
  for (; c < D; ++c) AccumulateColumns<1>(df, dst, k, D, c, jb, je, dqt);
}

// Per-thread buffers.
struct Scratch {
  explicit Scratch(const Prepared& p)
      : pt(hwy::AllocateAligned<float>(static_cast<size_t>(kKeyBlock * p.TR))),
        dst(hwy::AllocateAligned<float>(static_cast<size_t>(kKeyBlock * p.TR))),
        dv_acc(hwy::AllocateAligned<float>(static_cast<size_t>(kKeyBlock * p.Dvp))),
        dk_acc(hwy::AllocateAligned<float>(static_cast<size_t>(kKeyBlock * p.Dp))),
        bias_offsets(hwy::AllocateAligned<int32_t>(static_cast<size_t>(p.TR))),
        drop_factor(hwy::AllocateAligned<float>(static_cast<size_t>(kKeyBlock * p.TR))),
        drop_lo(hwy::AllocateAligned<uint32_t>(static_cast<size_t>(p.TR))),
        drop_hi(hwy::AllocateAligned<uint32_t>(static_cast<size_t>(p.TR))),
        allowed(hwy::AllocateAligned<float>(static_cast<size_t>(kKeyBlock * p.TR))) {}
  hwy::AlignedFreeUniquePtr<float[]> pt, dst, dv_acc, dk_acc;
  hwy::AlignedFreeUniquePtr<int32_t[]> bias_offsets;
  hwy::AlignedFreeUniquePtr<float[]> drop_factor;  // [keys][TR], with dropout
  // [TR] per-row dropout keys (attn::dropout_row_key) split into 32-bit halves.
  hwy::AlignedFreeUniquePtr<uint32_t[]> drop_lo, drop_hi;
  hwy::AlignedFreeUniquePtr<float[]> allowed;      // [keys][TR], with a boolean mask
};

// One tile's block of the boolean mask, rows [row0, row0 + rows) of head h, keys [jb, je), as
// 1 / 0 floats (0 in lanes past the rows), read in place through its broadcast strides.
void FillAllowed(const FlashAllowed& al, int64_t b, int64_t h, int64_t row0, int64_t rows,
                 int64_t TR, int64_t jb, int64_t je, float* out) {
  const bool* base = al.data + b * al.stride_b + h * al.stride_h + row0 * al.stride_q;
  for (int64_t j = jb; j < je; ++j) {
    float* dst = out + (j - jb) * TR;
    const bool* src = base + j * al.stride_k;
    for (int64_t lane = 0; lane < rows; ++lane) dst[lane] = src[lane * al.stride_q] ? 1.0f : 0.0f;
    std::fill(dst + rows, dst + TR, 0.0f);
  }
}

// The dropout factors keep_ij / (1 - p) of one tile's rows [row0, row0 + rows) of head h for
// keys [jb, je), regenerated from the counter-based hash: the row keys once per row, then one
// 32-bit SIMD round per element (dropout_mask-inl.h). Lanes past the rows get 0.
void FillDropFactors(const DropoutMask& mask, int64_t b, int64_t h, int64_t row0, int64_t rows,
                     int64_t TR, int64_t jb, int64_t je, Scratch& sc) {
  const DF df;
  const size_t N = hn::Lanes(df);
  mask.fill_row_keys(b, h, row0, rows, TR, sc.drop_lo.get(), sc.drop_hi.get());
  for (size_t w = 0; w < kTileVecs; ++w) {
    const dropout::RowKeys<DF> keys(df, mask, sc.drop_lo.get() + w * N, sc.drop_hi.get() + w * N);
    float* HWY_RESTRICT f = sc.drop_factor.get() + w * N;
    for (int64_t j = jb; j < je; ++j, f += TR)
      hn::Store(keys.Factor(static_cast<uint32_t>(j)), df, f);
  }
  if (rows < TR)
    for (int64_t j = jb; j < je; ++j) {
      float* f = sc.drop_factor.get() + (j - jb) * TR;
      std::fill(f + rows, f + TR, 0.0f);
    }
}

// (8) dbias[b, h, i, j] += dS[i][j] at the bias's own (broadcast) offsets.
// dbias_base points at (b, head, row0, key 0) of the tile. Scalar: only runs with a bias.
void ScatterBiasGrad(const FlashBackwardArgs& a, const float* dst, int64_t TR, int64_t rows,
                     int64_t jb, int64_t je, float* dbias_base) {
  const int64_t sq = a.bias.stride_q, sk = a.bias.stride_k;
  for (int64_t j = jb; j < je; ++j) {
    const float* ds = dst + (j - jb) * TR;
    float* out = dbias_base + j * sk;
    if (sq == 0) {
      float sum = 0.0f;
      for (int64_t i = 0; i < rows; ++i) sum += ds[i];
      *out += sum;
    } else {
      for (int64_t i = 0; i < rows; ++i) out[i * sq] += ds[i];
    }
  }
}

// One work item: batch b, kv head kvh, keys [j0, j1); every query tile of the G heads.
void ProcessItem(const FlashBackwardArgs& a, const Prepared& p, Scratch& sc, int64_t b,
                 int64_t kvh, int64_t j0, int64_t j1, float* dq_part, float* dbias_part) {
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dv = a.value_dim;
  const int64_t TR = p.TR;
  const int64_t keys = j1 - j0;
  std::fill_n(sc.dv_acc.get(), keys * p.Dvp, 0.0f);
  std::fill_n(sc.dk_acc.get(), keys * p.Dp, 0.0f);
  const float* k = a.k + (b * a.kv_heads + kvh) * a.k_len * D;
  const float* v = a.v + (b * a.kv_heads + kvh) * a.k_len * Dv;
  const bool has_bias = a.bias.data != nullptr;
  const bool bias_per_row = has_bias && a.bias.stride_q != 0;
  const DropoutMask dropout(a.dropout.p, a.dropout.seed);

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = kvh * G + g, bh = b * a.q_heads + h;
    for (int64_t t = 0; t < p.tiles; ++t) {
      const TileKeys& tk = p.tile_keys[static_cast<size_t>(b * p.tiles + t)];
      if (!tk.any_visible) continue;
      const int64_t jb = std::max(j0, tk.union_lo), je = std::min(j1, tk.union_hi);
      if (jb >= je) continue;  // causal / window / key lengths: nothing visible here
      const int64_t row0 = t * TR;
      const int64_t rows = std::min(TR, a.q_len - row0);
      TileView view;
      view.qt = p.qt.get() + (bh * p.tiles + t) * D * TR;
      view.dot = p.dot.get() + (bh * p.tiles + t) * Dv * TR;
      view.qpad = p.qrows + (bh * a.q_len + row0) * p.Dp;
      view.dopad = p.dorows + (bh * a.q_len + row0) * p.Dvp;
      view.shift = p.shift.get() + bh * p.Tqp + row0;
      view.shift_lo = p.shift_lo.get() + bh * p.Tqp + row0;
      view.delta = p.delta.get() + bh * p.Tqp + row0;
      view.pos = p.pos.get() + b * p.Tqp + row0;
      view.lo_minus1 = p.lo_minus1.get() + b * p.Tqp + row0;
      view.hi = p.hi.get() + b * p.Tqp + row0;
      view.bias = nullptr;
      view.bias_offsets = nullptr;
      if (has_bias) {
        view.bias = a.bias.data + b * a.bias.stride_b + h * a.bias.stride_h +
                    row0 * a.bias.stride_q;
        if (bias_per_row) {
          // Rows past Tq reuse the last row's bias: their P is 0 anyway (shift = +inf).
          for (int64_t lane = 0; lane < TR; ++lane)
            sc.bias_offsets[static_cast<size_t>(lane)] =
                static_cast<int32_t>(std::min(lane, rows - 1) * a.bias.stride_q);
          view.bias_offsets = sc.bias_offsets.get();
        }
      }
      view.bias_stride_k = a.bias.stride_k;
      view.alibi = a.alibi_slopes != nullptr;
      view.alibi_log2 = view.alibi ? a.alibi_slopes[h] * kLog2e : 0.0f;
      view.mask = jb < tk.inter_lo || je > tk.inter_hi;
      view.rows = rows;
      view.drop_factor = nullptr;
      view.allowed = nullptr;
      if (a.allowed.data != nullptr) {
        FillAllowed(a.allowed, b, h, row0, rows, TR, jb, je, sc.allowed.get());
        view.allowed = sc.allowed.get();
      }
      if (dropout.active()) {
        FillDropFactors(dropout, b, h, row0, rows, TR, jb, je, sc);
        view.drop_factor = sc.drop_factor.get();
      }
      float* dqt = dq_part + (bh * p.tiles + t) * D * TR;
      TileKeyRange(view, k, v, D, Dv, p.Dp, p.Dvp, j0, jb, je, sc.pt.get(), sc.dst.get(),
                   sc.dv_acc.get(), sc.dk_acc.get(), dqt);
      if (has_bias && dbias_part != nullptr)
        ScatterBiasGrad(a, sc.dst.get(), TR, rows, jb, je,
                        dbias_part + b * a.bias.stride_b + h * a.bias.stride_h +
                            row0 * a.bias.stride_q);
    }
  }

  // dK = scale * sum dS^T Q (the scale was left out of the inner loops); rows past the
  // visible keys stay exactly 0.
  float* dk = a.dk + ((b * a.kv_heads + kvh) * a.k_len + j0) * D;
  float* dv = a.dv + ((b * a.kv_heads + kvh) * a.k_len + j0) * Dv;
  for (int64_t j = 0; j < keys; ++j) {
    const float* dk_row = sc.dk_acc.get() + j * p.Dp;
    const float* dv_row = sc.dv_acc.get() + j * p.Dvp;
    for (int64_t d = 0; d < D; ++d) dk[j * D + d] = a.scale * dk_row[d];
    std::memcpy(dv + j * Dv, dv_row, static_cast<size_t>(Dv) * sizeof(float));
  }
}

}  // namespace flash_bwd

void FlashBackward(const FlashBackwardArgs& a) {
  using namespace flash_bwd;
  const int64_t D = a.head_dim, Dv = a.value_dim;
  const int64_t kv_rows = a.batch * a.kv_heads * a.k_len;
  if (a.batch == 0 || a.q_heads == 0) return;
  if (a.q_len == 0 || a.k_len == 0) {
    // No query rows or no keys: every gradient is 0.
    std::fill_n(a.dq, a.batch * a.q_heads * a.q_len * D, 0.0f);
    std::fill_n(a.dk, kv_rows * D, 0.0f);
    std::fill_n(a.dv, kv_rows * Dv, 0.0f);
    if (a.bias.data != nullptr && a.dbias != nullptr) std::fill_n(a.dbias, a.bias_elements, 0.0f);
    return;
  }

  Prepared p;
  PrepareLayout(a, p);
  const int64_t BH = a.batch * a.q_heads;
  const int64_t key_blocks = (a.k_len + kKeyBlock - 1) / kKeyBlock;
  const int64_t items = key_blocks * a.batch * a.kv_heads;
  const int max_threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), items));
  const size_t dq_part_size = static_cast<size_t>(BH * p.tiles * D * p.TR);
  const bool want_dbias = a.bias.data != nullptr && a.dbias != nullptr;
  const size_t dbias_part_size = want_dbias ? static_cast<size_t>(a.bias_elements) : 0;
  auto dq_parts = hwy::AllocateAligned<float>(dq_part_size * static_cast<size_t>(max_threads) + 1);
  auto dbias_parts =
      hwy::AllocateAligned<float>(dbias_part_size * static_cast<size_t>(max_threads) + 1);

  // One parallel region with three barriers (after the copies, after the items, at the end):
  // on a shared machine every barrier waits for the most descheduled thread.
#pragma omp parallel num_threads(max_threads)
  {
    FlushDenormals ftz;
    const int threads = omp_get_num_threads();  // may be fewer than max_threads
    const int me = omp_get_thread_num();
    float* dq_part = dq_parts.get() + dq_part_size * static_cast<size_t>(me);
    float* dbias_part = want_dbias ? dbias_parts.get() + dbias_part_size * static_cast<size_t>(me)
                                   : nullptr;
    std::fill_n(dq_part, dq_part_size, 0.0f);
    if (want_dbias) std::fill_n(dbias_part, dbias_part_size, 0.0f);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) PrepareHead(a, p, bh);

    Scratch scratch(p);
    // Static round-robin: item -> thread is fixed for a given thread count, and each thread
    // adds its items into its own dQ partial in a fixed order, so the sums are reproducible.
    // Items run head by head, so a thread's next item streams the Q, dO and dQ partial of the
    // head it has just worked on, partly still in its L2 (measured 7% faster than key-block-major
    // order, d = 64 and 128, N = 2048, one thread). Under a causal mask a key block's cost falls
    // with its index; every other head walks its blocks backwards so that round-robin hands each
    // thread a balanced mix (with two threads: even blocks of one head, odd ones of the next).
#pragma omp for schedule(static, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t head = item / key_blocks, step = item % key_blocks;  // head = b * Hkv + kvh
      const int64_t kb = head % 2 == 0 ? step : key_blocks - 1 - step;
      const int64_t kvh = head % a.kv_heads;
      const int64_t b = head / a.kv_heads;
      const int64_t j0 = kb * kKeyBlock;
      ProcessItem(a, p, scratch, b, kvh, j0, std::min(j0 + kKeyBlock, a.k_len), dq_part,
                  dbias_part);
    }

    // dQ = scale * sum over threads of the partials (thread order fixed), transposed back to
    // [B, Hq, Tq, D].
    const int64_t TR = p.TR;
    const int64_t tiles_total = a.batch * a.q_heads * p.tiles;
#pragma omp for schedule(static) nowait
    for (int64_t bt = 0; bt < tiles_total; ++bt) {
      const int64_t bh = bt / p.tiles, t = bt % p.tiles;
      const int64_t row0 = t * TR, rows = std::min(TR, a.q_len - row0);
      float* dq = a.dq + (bh * a.q_len + row0) * D;
      const size_t base = static_cast<size_t>(bt * D * TR);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t d = 0; d < D; ++d) {
          float sum = 0.0f;
          for (int th = 0; th < threads; ++th)
            sum += dq_parts[dq_part_size * static_cast<size_t>(th) + base +
                            static_cast<size_t>(d * TR + i)];
          dq[i * D + d] = a.scale * sum;
        }
      }
    }
    if (want_dbias) {
#pragma omp for schedule(static) nowait
      for (int64_t e = 0; e < a.bias_elements; ++e) {
        float sum = 0.0f;
        for (int th = 0; th < threads; ++th)
          sum += dbias_parts[dbias_part_size * static_cast<size_t>(th) + static_cast<size_t>(e)];
        a.dbias[e] = sum;
      }
    }
  }
}

const char* BackwardTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_FLASH_BACKWARD_INL_H_
