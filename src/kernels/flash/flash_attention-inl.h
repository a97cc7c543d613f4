// Per-target body of the fused dot-product attention forward (see flash_attention.h).
// Included once per Highway target by flash_attention.cpp through foreach_target.h.
//
// Layout: the "transposed query" scheme. A tile holds kTileVecs * Lanes query rows of ONE head
// (48 rows with AVX-512), and every vector lane is one query row:
//   Qt [D][rows]   queries, pre-scaled by scale * log2(e), so softmax runs on exp2
//   St [keys][rows] scores, then probabilities, of one key block
//   Ot [Dv][rows]  the unnormalised output accumulator
// Why: (1) S^T = K Qt and Ot += V^T P^T broadcast one element of K (or V) straight from the
// caller's row-major arrays against vectors of Qt (or P), so neither K nor V is ever packed or
// transposed; (2) the running max and sum of the online softmax are per lane, so no horizontal
// reduction is needed anywhere; (3) rescaling Ot when the max grows is one multiply per vector.
// The GEMM-like inner loops keep kScoreKeys x kTileVecs (or kValueCols x kTileVecs) = 24
// accumulators in registers: per step 3 vector loads and 8 broadcasts feed 24 FMAs, so the two
// FMA ports, not the load ports, set the pace. (Measured on the 2-core Xeon, one thread,
// N = 2048: 3 x 8 ran 2-4% faster than 2 x 12, 2 x 8 and 4 x 6 at d = 128, the same at d = 64.)
//
// Memory traffic: a work item is (batch, kv head, block of query rows of each of the G query
// heads sharing that kv head), about kItemRows rows in all. K and V are read once per work item,
// one key block (kKeyBlock keys, 128 KiB at D = Dv = 128) at a time, the next block prefetched
// into L2 meanwhile; the block stays in L2 while all the item's tiles consume it, and St
// (24 KiB) stays in L1 across the Dv / kValueCols passes of P V. Qt and Ot of the item (384 KiB
// at d = 128) stay in L2. Larger items mean fewer passes over K and V, which at long Tk come from
// DRAM: 384 rows ran 5-15% faster than 192 and 64 (one thread, d = 128, N = 2048 and 8192).

#if defined(ATTN_KERNELS_FLASH_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_FLASH_ATTENTION_INL_H_
#undef ATTN_KERNELS_FLASH_ATTENTION_INL_H_
#else
#define ATTN_KERNELS_FLASH_ATTENTION_INL_H_
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "kernels/common/dropout_mask-inl.h"
#include "kernels/common/dropout_mask.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/common/simd_common-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace flash {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;
using simd::Exp2;

constexpr size_t kTileVecs = 3;      // query rows per tile = 3 vectors
constexpr int64_t kItemRows = 384;   // query rows (all G heads together) per work item
constexpr int64_t kKeyBlock = 128;   // keys per block (K + V block in L2, St in L1)
constexpr size_t kScoreKeys = 8;     // keys per register block of S^T = K Qt
constexpr size_t kValueCols = 8;     // value columns per register block of Ot += V^T P^T

// One tile: up to kTileVecs * Lanes query rows of one head.
struct Tile {
  int64_t head = 0;
  int64_t row0 = 0;   // first query row
  int64_t rows = 0;   // rows of the tile inside [0, Tq)
  bool any_visible = false;
  int64_t union_lo = 0, union_hi = 0;  // keys visible to at least one row
  int64_t inter_lo = 0, inter_hi = 0;  // keys visible to every valid row: no element-wise mask
  const float* bias = nullptr;         // bias at (b, head, row0, key 0)
};

// Per-thread buffers, sized once per call.
struct Scratch {
  explicit Scratch(const FlashAttentionArgs& a, size_t tile_rows, size_t max_tiles)
      : qt(hwy::AllocateAligned<float>(max_tiles * a.head_dim * tile_rows)),
        ot(hwy::AllocateAligned<float>(max_tiles * a.value_dim * tile_rows)),
        st(hwy::AllocateAligned<float>(kKeyBlock * tile_rows)),
        max(hwy::AllocateAligned<float>(max_tiles * tile_rows)),
        sum(hwy::AllocateAligned<float>(max_tiles * tile_rows)),
        pos(hwy::AllocateAligned<float>(max_tiles * tile_rows)),
        lo_minus1(hwy::AllocateAligned<int32_t>(max_tiles * tile_rows)),
        hi(hwy::AllocateAligned<int32_t>(max_tiles * tile_rows)),
        bias_offsets(hwy::AllocateAligned<int32_t>(tile_rows)),
        drop_lo(hwy::AllocateAligned<uint32_t>(max_tiles * tile_rows)),
        drop_hi(hwy::AllocateAligned<uint32_t>(max_tiles * tile_rows)),
        allowed(hwy::AllocateAligned<float>(kKeyBlock * tile_rows)),
        dropout(a.dropout.p, a.dropout.seed),
        tiles(max_tiles) {}
  hwy::AlignedFreeUniquePtr<float[]> qt, ot, st, max, sum, pos;
  hwy::AlignedFreeUniquePtr<int32_t[]> lo_minus1, hi, bias_offsets;
  // Per-row dropout keys (attn::dropout_row_key) split into 32-bit halves, [tiles][TR].
  hwy::AlignedFreeUniquePtr<uint32_t[]> drop_lo, drop_hi;
  hwy::AlignedFreeUniquePtr<float[]> allowed;       // one tile's block of the mask [keys][TR]
  DropoutMask dropout;
  std::vector<Tile> tiles;
};

// Everything one tile's key-block step needs, gathered so the micro-kernels take one argument.
struct TileView {
  const float* qt;        // [D][TR]
  float* st;              // [keys][TR]
  float* ot;              // [Dv][TR]
  const float* pos;       // [TR] pos(i) as float, for ALiBi
  const int32_t* lo_minus1;
  const int32_t* hi;
  const int32_t* bias_offsets;  // [TR] row offsets into the bias, nullptr when stride_q == 0
  const float* bias;            // bias at (b, head, row0, key 0) or nullptr
  int64_t bias_stride_k;
  float alibi_log2;       // slope * log2(e), 0 without ALiBi
  bool alibi;
  bool mask;              // element-wise interval mask needed in this key range
  int64_t rows;                  // valid rows (lanes) of the tile
  const float* allowed;          // [keys][TR] 1 allowed, 0 not; nullptr without a boolean mask
  const DropoutMask* dropout;    // nullptr without dropout
  const uint32_t* drop_lo;       // [TR] per-row dropout keys, low halves
  const uint32_t* drop_hi;       // [TR] and high halves
};

// S^T rows [j, j + R) of one tile: St[j - jb][lane] = Qt . K[j], plus bias and ALiBi, masked
// to -inf outside each row's key interval; folds the rows into the running block max.
template <size_t R>
HWY_INLINE void ScoreRows(DF df, const TileView& t, const float* HWY_RESTRICT k, int64_t D,
                          int64_t j, int64_t jb, VF (&block_max)[kTileVecs]) {
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  const float* HWY_RESTRICT krow = k + j * D;
  VF acc[R][kTileVecs];
  for (size_t r = 0; r < R; ++r)
    for (size_t v = 0; v < kTileVecs; ++v) acc[r][v] = hn::Zero(df);
  const float* HWY_RESTRICT qt = t.qt;
  for (int64_t d = 0; d < D; ++d) {
    VF q[kTileVecs];
    for (size_t v = 0; v < kTileVecs; ++v) q[v] = hn::Load(df, qt + d * TR + v * N);
    HWY_UNROLL(12)
    for (size_t r = 0; r < R; ++r) {
      const VF kv = hn::Set(df, krow[r * D + d]);
      for (size_t v = 0; v < kTileVecs; ++v) acc[r][v] = hn::MulAdd(kv, q[v], acc[r][v]);
    }
  }
  const DI di;
  for (size_t r = 0; r < R; ++r) {
    const int64_t key = j + static_cast<int64_t>(r);
    float* HWY_RESTRICT srow = t.st + (key - jb) * TR;
    for (size_t v = 0; v < kTileVecs; ++v) {
      VF s = acc[r][v];
      if (t.bias != nullptr) {
        const float* b = t.bias + key * t.bias_stride_k;
        const VF bv = t.bias_offsets == nullptr
                          ? hn::Set(df, *b)
                          : hn::GatherIndex(df, b, hn::Load(di, t.bias_offsets + v * N));
        s = hn::MulAdd(bv, hn::Set(df, kLog2e), s);
      }
      if (t.alibi) {
        const VF dist = hn::Abs(hn::Sub(hn::Load(df, t.pos + v * N),
                                        hn::Set(df, static_cast<float>(key))));
        s = hn::NegMulAdd(hn::Set(df, t.alibi_log2), dist, s);
      }
      if (t.mask) {
        const VI kj = hn::Set(di, static_cast<int32_t>(key));
        const auto visible = hn::And(kj > hn::Load(di, t.lo_minus1 + v * N),
                                     hn::Load(di, t.hi + v * N) > kj);
        s = hn::IfThenElse(hn::RebindMask(df, visible), s,
                           hn::Set(df, -std::numeric_limits<float>::infinity()));
      }
      if (t.allowed != nullptr) {
        // A select, not an added -inf: a NaN score of a disallowed key must not leak.
        const VF ok = hn::Load(df, t.allowed + (key - jb) * static_cast<int64_t>(TR) + v * N);
        s = hn::IfThenElse(hn::Gt(ok, hn::Zero(df)), s,
                           hn::Set(df, -std::numeric_limits<float>::infinity()));
      }
      block_max[v] = hn::Max(block_max[v], s);
      hn::Store(s, df, srow + v * N);
    }
  }
}

// Ot[c][lane] += sum_j V[j][c] * P[j][lane] for columns [c, c + R) over keys [jb, je).
template <size_t R>
HWY_INLINE void AccumulateColumns(DF df, const TileView& t, const float* HWY_RESTRICT v,
                                  int64_t Dv, int64_t c, int64_t jb, int64_t je) {
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  float* HWY_RESTRICT ot = t.ot + c * TR;
  VF acc[R][kTileVecs];
  for (size_t r = 0; r < R; ++r)
    for (size_t w = 0; w < kTileVecs; ++w) acc[r][w] = hn::Load(df, ot + r * TR + w * N);
  const float* HWY_RESTRICT vcol = v + c;
  const float* HWY_RESTRICT p = t.st;
  for (int64_t j = jb; j < je; ++j, p += TR) {
    VF pj[kTileVecs];
    for (size_t w = 0; w < kTileVecs; ++w) pj[w] = hn::Load(df, p + w * N);
    const float* HWY_RESTRICT vrow = vcol + j * Dv;
    HWY_UNROLL(12)
    for (size_t r = 0; r < R; ++r) {
      const VF vv = hn::Set(df, vrow[r]);
      for (size_t w = 0; w < kTileVecs; ++w) acc[r][w] = hn::MulAdd(vv, pj[w], acc[r][w]);
    }
  }
  for (size_t r = 0; r < R; ++r)
    for (size_t w = 0; w < kTileVecs; ++w) hn::Store(acc[r][w], df, ot + r * TR + w * N);
}

// S^T = K Qt (+ bias, ALiBi, masks) for keys [jb, je) of one tile into t.st, and the block's
// max per row. Not inlined: its 24 accumulators must stay in registers, which GCC gave up when
// this was inlined into the weights pass.
HWY_NOINLINE void TileScores(const TileView& t, const float* HWY_RESTRICT k, int64_t D,
                             int64_t jb, int64_t je, VF (&block_max)[kTileVecs]) {
  const DF df;
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  for (size_t w = 0; w < kTileVecs; ++w) block_max[w] = neg_inf;
  int64_t j = jb;
  for (; j + static_cast<int64_t>(kScoreKeys) <= je; j += kScoreKeys)
    ScoreRows<kScoreKeys>(df, t, k, D, j, jb, block_max);
  for (; j + 4 <= je; j += 4) ScoreRows<4>(df, t, k, D, j, jb, block_max);
  for (; j < je; ++j) ScoreRows<1>(df, t, k, D, j, jb, block_max);
}

// One key block [jb, je) of one tile: scores, online-softmax update, P V.
HWY_NOINLINE void TileKeyBlock(const TileView& t, const float* HWY_RESTRICT k,
                               const float* HWY_RESTRICT v, int64_t D, int64_t Dv, int64_t jb,
                               int64_t je, float* HWY_RESTRICT row_max,
                               float* HWY_RESTRICT row_sum) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const size_t TR = kTileVecs * N;
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());

  // 1. S^T = K Qt (+ bias, ALiBi, mask), block max per row.
  VF block_max[kTileVecs];
  TileScores(t, k, D, jb, je, block_max);

  // 2. Online softmax (Milakov & Gimelshein 2018): new max, rescale the accumulator only when
  // some row's max grew, then P = exp2(S - max) in place and the row sums.
  for (size_t w = 0; w < kTileVecs; ++w) {
    const VF old_max = hn::Load(df, row_max + w * N);
    const VF new_max = hn::Max(old_max, block_max[w]);
    hn::Store(new_max, df, row_max + w * N);
    // Rows with every score so far masked keep max = -inf; subtracting 0 instead of -inf makes
    // their probabilities exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
    const VF shift = hn::IfThenZeroElse(new_max == neg_inf, new_max);
    VF sum = hn::Load(df, row_sum + w * N);
    if (!hn::AllFalse(df, new_max > old_max)) {
      // alpha = 2^(old - new): exactly 1 where the max did not move, 0 where old was -inf.
      const VF alpha = Exp2(df, hn::Sub(old_max, shift));
      sum = hn::Mul(sum, alpha);
      float* HWY_RESTRICT o = t.ot + w * N;
      for (int64_t c = 0; c < Dv; ++c, o += TR)
        hn::Store(hn::Mul(hn::Load(df, o), alpha), df, o);
    }
    float* HWY_RESTRICT s = t.st + w * N;
    for (int64_t jj = jb; jj < je; ++jj, s += TR) {
      const VF p = Exp2(df, hn::Sub(hn::Load(df, s), shift));
      sum = hn::Add(sum, p);
      hn::Store(p, df, s);
    }
    hn::Store(sum, df, row_sum + w * N);
  }

  // Dropout after the sums (the softmax normalisation and lse are those before dropout):
  // P_ij keep_ij / (1 - p), the keep decision one 32-bit SIMD round per element from the rows'
  // keys (dropout_mask-inl.h); a select, so a dropped NaN becomes 0 as on the composed path.
  if (t.dropout != nullptr) {
    for (size_t w = 0; w < kTileVecs; ++w) {
      const dropout::RowKeys<DF> keys(df, *t.dropout, t.drop_lo + w * N, t.drop_hi + w * N);
      float* HWY_RESTRICT s = t.st + w * N;
      for (int64_t jj = jb; jj < je; ++jj, s += TR)
        hn::Store(keys.Apply(static_cast<uint32_t>(jj), hn::Load(df, s)), df, s);
    }
  }

  // 3. Ot += V^T P^T, kValueCols columns at a time while St stays in L1.
  int64_t c = 0;
  for (; c + static_cast<int64_t>(kValueCols) <= Dv; c += kValueCols)
    AccumulateColumns<kValueCols>(df, t, v, Dv, c, jb, je);
  for (; c + 4 <= Dv; c += 4) AccumulateColumns<4>(df, t, v, Dv, c, jb, je);
  for (; c < Dv; ++c) AccumulateColumns<1>(df, t, v, Dv, c, jb, je);
}

// The view of tile t of the current work item (batch b) for keys [jb, je). With a boolean mask
// it copies the tile's block of it, [keys][TR] as 1 / 0 floats (0 in lanes past the tile's
// rows), read in place through the broadcast strides: O(keys x rows) scalar byte loads per block,
// against D / Lanes vector FMAs per element for the scores themselves.
inline TileView MakeTileView(const FlashAttentionArgs& a, Scratch& sc, int64_t b, int64_t t,
                             int64_t TR, int64_t jb, int64_t je) {
  const Tile& tile = sc.tiles[static_cast<size_t>(t)];
  const FlashAllowed& al = a.allowed;
  if (al.data != nullptr) {
    const bool* base = al.data + b * al.stride_b + tile.head * al.stride_h +
                       tile.row0 * al.stride_q;
    for (int64_t j = jb; j < je; ++j) {
      float* dst = sc.allowed.get() + (j - jb) * TR;
      const bool* src = base + j * al.stride_k;
      for (int64_t lane = 0; lane < tile.rows; ++lane)
        dst[lane] = src[lane * al.stride_q] ? 1.0f : 0.0f;
      std::fill(dst + tile.rows, dst + TR, 0.0f);
    }
  }
  const bool bias_per_row = a.bias.data != nullptr && a.bias.stride_q != 0;
  if (bias_per_row) {
    // Gather offsets of bias rows inside a tile (rows past Tq reuse the last row: masked anyway).
    for (int64_t lane = 0; lane < TR; ++lane)
      sc.bias_offsets[static_cast<size_t>(lane)] =
          static_cast<int32_t>(std::min<int64_t>(lane, tile.rows - 1) * a.bias.stride_q);
  }
  TileView view;
  view.qt = sc.qt.get() + t * a.head_dim * TR;
  view.st = sc.st.get();
  view.ot = sc.ot.get() + t * a.value_dim * TR;
  view.pos = sc.pos.get() + t * TR;
  view.lo_minus1 = sc.lo_minus1.get() + t * TR;
  view.hi = sc.hi.get() + t * TR;
  view.bias_offsets = bias_per_row ? sc.bias_offsets.get() : nullptr;
  view.bias = tile.bias;
  view.bias_stride_k = a.bias.stride_k;
  view.alibi = a.alibi_slopes != nullptr;
  view.alibi_log2 = view.alibi ? a.alibi_slopes[tile.head] * kLog2e : 0.0f;
  view.mask = jb < tile.inter_lo || je > tile.inter_hi;
  view.rows = tile.rows;
  view.allowed = al.data != nullptr ? sc.allowed.get() : nullptr;
  view.dropout = sc.dropout.active() ? &sc.dropout : nullptr;
  view.drop_lo = sc.drop_lo.get() + t * TR;
  view.drop_hi = sc.drop_hi.get() + t * TR;
  return view;
}

// Weights on request (args.weights): a second pass over the item's tiles once their softmax
// statistics are final. It recomputes each tile's scores block by block (ScoreRows, the same
// arithmetic as the first pass) and writes P = exp2(s - max) / sum, exactly the probabilities
// the output was normalised with, transposed from St [keys][rows] to weights [row][Tk]. Keys
// outside a tile's visible union are written as 0 without computing anything. Costs one more
// S = K Qt per tile (about a third of the forward's FMAs) plus the Tq x Tk store itself, which
// dominates at d = 64.
void WriteItemWeights(const FlashAttentionArgs& a, Scratch& sc, int64_t b, int64_t num_tiles) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const int64_t TR = static_cast<int64_t>(kTileVecs * N);
  const int64_t D = a.head_dim, Tk = a.k_len;
  const float* k = a.k;
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  HWY_ALIGN float inv_sum[kTileVecs * HWY_MAX_BYTES / sizeof(float)];
  for (int64_t t = 0; t < num_tiles; ++t) {
    const Tile& tile = sc.tiles[static_cast<size_t>(t)];
    const int64_t kvh = tile.head / (a.q_heads / a.kv_heads);
    const float* kh = k + (b * a.kv_heads + kvh) * Tk * D;
    float* w = a.weights + ((b * a.q_heads + tile.head) * a.q_len + tile.row0) * Tk;
    const int64_t lo = tile.any_visible ? tile.union_lo : 0;
    const int64_t hi = tile.any_visible ? tile.union_hi : 0;
    for (int64_t lane = 0; lane < tile.rows; ++lane) {
      std::fill(w + lane * Tk, w + lane * Tk + lo, 0.0f);
      std::fill(w + lane * Tk + hi, w + (lane + 1) * Tk, 0.0f);
    }
    const float* row_max = sc.max.get() + t * TR;
    const float* row_sum = sc.sum.get() + t * TR;
    // 1 / sum as in the output's normalisation; 0 for fully masked lanes (their P is 0 anyway).
    for (int64_t lane = 0; lane < TR; ++lane)
      inv_sum[lane] = row_sum[lane] == 0.0f ? 0.0f : 1.0f / row_sum[lane];
    for (int64_t jb = lo; jb < hi; jb += kKeyBlock) {
      const int64_t je = std::min(jb + kKeyBlock, hi);
      const TileView view = MakeTileView(a, sc, b, t, TR, jb, je);
      VF block_max[kTileVecs];  // unused here: the first pass's max is final
      TileScores(view, kh, D, jb, je, block_max);
      for (size_t v = 0; v < kTileVecs; ++v) {
        const VF m = hn::Load(df, row_max + v * N);
        const VF shift = hn::IfThenZeroElse(m == neg_inf, m);
        const VF inv = hn::Load(df, inv_sum + v * N);
        float* s = view.st + v * N;
        for (int64_t jj = jb; jj < je; ++jj, s += TR)
          hn::Store(hn::Mul(Exp2(df, hn::Sub(hn::Load(df, s), shift)), inv), df, s);
      }
      // Transpose out: contiguous writes along each weights row, strided reads from L1.
      for (int64_t lane = 0; lane < tile.rows; ++lane) {
        float* wrow = w + lane * Tk;
        const float* src = view.st + lane;
        for (int64_t jj = jb; jj < je; ++jj) wrow[jj] = src[(jj - jb) * TR];
      }
    }
  }
}

// One work item: batch b, kv head kvh, query rows [i0, i0 + rows) of each of its G heads.
void ProcessItem(const FlashAttentionArgs& a, Scratch& sc, int64_t b, int64_t kvh, int64_t i0,
                 int64_t rows) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const int64_t TR = static_cast<int64_t>(kTileVecs * N);
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dv = a.value_dim;
  const int64_t tiles_per_head = (rows + TR - 1) / TR;
  const int64_t num_tiles = G * tiles_per_head;
  const float qscale = a.scale * kLog2e;
  const float inf = std::numeric_limits<float>::infinity();

  // Set up the tiles: transposed scaled queries, key intervals, accumulators.
  int64_t item_lo = a.k_len, item_hi = 0;
  for (int64_t t = 0; t < num_tiles; ++t) {
    Tile& tile = sc.tiles[static_cast<size_t>(t)];
    tile.head = kvh * G + t / tiles_per_head;
    tile.row0 = i0 + (t % tiles_per_head) * TR;
    tile.rows = std::min<int64_t>(TR, i0 + rows - tile.row0);
    tile.any_visible = false;
    tile.union_lo = a.k_len, tile.union_hi = 0, tile.inter_lo = 0, tile.inter_hi = a.k_len;
    tile.bias = a.bias.data == nullptr ? nullptr
                                       : a.bias.data + b * a.bias.stride_b +
                                             tile.head * a.bias.stride_h +
                                             tile.row0 * a.bias.stride_q;
    const float* q = a.q + ((b * a.q_heads + tile.head) * a.q_len + tile.row0) * D;
    float* qt = sc.qt.get() + t * D * TR;
    float* lane_pos = sc.pos.get() + t * TR;
    int32_t* lo_m1 = sc.lo_minus1.get() + t * TR;
    int32_t* hi = sc.hi.get() + t * TR;
    for (int64_t lane = 0; lane < TR; ++lane) {
      KeyInterval iv{0, 0, 0};
      if (lane < tile.rows) {
        iv = RowInterval(a, b, tile.row0 + lane);
        for (int64_t d = 0; d < D; ++d) qt[d * TR + lane] = q[lane * D + d] * qscale;
      } else {
        for (int64_t d = 0; d < D; ++d) qt[d * TR + lane] = 0.0f;
      }
      lane_pos[lane] = static_cast<float>(iv.pos);
      lo_m1[lane] = static_cast<int32_t>(iv.lo - 1);
      hi[lane] = static_cast<int32_t>(iv.hi);
      if (iv.lo < iv.hi) {
        tile.any_visible = true;
        tile.union_lo = std::min(tile.union_lo, iv.lo);
        tile.union_hi = std::max(tile.union_hi, iv.hi);
        tile.inter_lo = std::max(tile.inter_lo, iv.lo);
        tile.inter_hi = std::min(tile.inter_hi, iv.hi);
      } else if (lane < tile.rows) {
        // A fully masked real row: every key needs the element-wise mask for this tile.
        tile.inter_lo = a.k_len, tile.inter_hi = 0;
      }
    }
    if (tile.any_visible) {
      item_lo = std::min(item_lo, tile.union_lo);
      item_hi = std::max(item_hi, tile.union_hi);
    }
    if (sc.dropout.active())
      sc.dropout.fill_row_keys(b, tile.head, tile.row0, tile.rows, TR,
                               sc.drop_lo.get() + t * TR, sc.drop_hi.get() + t * TR);
    std::fill_n(sc.max.get() + t * TR, TR, -inf);
    std::fill_n(sc.sum.get() + t * TR, TR, 0.0f);
    std::fill_n(sc.ot.get() + t * Dv * TR, Dv * TR, 0.0f);
  }
  const float* k = a.k + (b * a.kv_heads + kvh) * a.k_len * D;
  const float* v = a.v + (b * a.kv_heads + kvh) * a.k_len * Dv;

  // Key blocks outermost so one K/V block serves every tile of the item from L2.
  for (int64_t j0 = item_lo; j0 < item_hi; j0 += kKeyBlock) {
    const int64_t j1 = std::min(j0 + kKeyBlock, item_hi);
    // The next K and V blocks, prefetched into L2 a slice per tile while this block computes:
    // at long Tk they come from DRAM (K and V of one head are 8 MiB at N = 8192, d = 128), and
    // the hardware prefetchers alone left the FMA units idle about 5% of the time.
    const int64_t next_keys = std::max<int64_t>(0, std::min(j1 + kKeyBlock, item_hi) - j1);
    const char* next_k = reinterpret_cast<const char*>(k + j1 * D);
    const char* next_v = reinterpret_cast<const char*>(v + j1 * Dv);
    const int64_t k_lines = next_keys * D * 4 / 64, v_lines = next_keys * Dv * 4 / 64;
    for (int64_t t = 0; t < num_tiles; ++t) {
      for (int64_t line = k_lines * t / num_tiles; line < k_lines * (t + 1) / num_tiles; ++line)
        __builtin_prefetch(next_k + line * 64, 0, 2);
      for (int64_t line = v_lines * t / num_tiles; line < v_lines * (t + 1) / num_tiles; ++line)
        __builtin_prefetch(next_v + line * 64, 0, 2);
      const Tile& tile = sc.tiles[static_cast<size_t>(t)];
      if (!tile.any_visible) continue;
      const int64_t jb = std::max(j0, tile.union_lo), je = std::min(j1, tile.union_hi);
      if (jb >= je) continue;  // causal / window: the whole block is masked for this tile
      const TileView view = MakeTileView(a, sc, b, t, TR, jb, je);
      TileKeyBlock(view, k, v, D, Dv, jb, je, sc.max.get() + t * TR, sc.sum.get() + t * TR);
    }
  }

  if (a.weights != nullptr) WriteItemWeights(a, sc, b, num_tiles);

  // Normalise and write back in [B, Hq, Tq, Dv] order; lse in natural log.
  for (int64_t t = 0; t < num_tiles; ++t) {
    const Tile& tile = sc.tiles[static_cast<size_t>(t)];
    const float* ot = sc.ot.get() + t * Dv * TR;
    const float* row_max = sc.max.get() + t * TR;
    const float* row_sum = sc.sum.get() + t * TR;
    const int64_t row_base = (b * a.q_heads + tile.head) * a.q_len + tile.row0;
    for (int64_t lane = 0; lane < tile.rows; ++lane) {
      const float l = row_sum[lane];
      // l == 0 only when every key was masked (the max term contributes 2^0 = 1 otherwise);
      // a NaN sum falls through and keeps the row NaN.
      const bool masked = l == 0.0f;
      const float inv = masked ? 0.0f : 1.0f / l;
      float* out = a.out + (row_base + lane) * Dv;
      for (int64_t c = 0; c < Dv; ++c) out[c] = masked ? 0.0f : ot[c * TR + lane] * inv;
      if (a.lse != nullptr)
        a.lse[row_base + lane] =
            masked ? -inf
                   : static_cast<float>(row_max[lane] * kLn2 + std::log(static_cast<double>(l)));
    }
  }
}

}  // namespace flash

void FlashAttentionForward(const FlashAttentionArgs& a) {
  using namespace flash;
  const DF df;
  const int64_t TR = static_cast<int64_t>(kTileVecs * hn::Lanes(df));
  if (a.batch == 0 || a.q_heads == 0 || a.q_len == 0) return;
  const int64_t G = a.q_heads / a.kv_heads;
  // Rows per head: kItemRows split over the G heads that share K/V, whole tiles, at least one.
  const int64_t block_rows = std::max<int64_t>(TR, kItemRows / G / TR * TR);
  const int64_t q_blocks = (a.q_len + block_rows - 1) / block_rows;
  const int64_t items = a.batch * a.kv_heads * q_blocks;
  const size_t max_tiles = static_cast<size_t>(G * ((std::min(block_rows, a.q_len) + TR - 1) / TR));

#pragma omp parallel if (items > 1)
  {
    FlushDenormals ftz;
    Scratch scratch(a, static_cast<size_t>(TR), max_tiles);
    // Dynamic schedule over items in (batch, kv head, query block) order: a thread's next item
    // usually reads the K and V it has just read, still in its L2 at moderate Tk (and the two
    // threads read the same head from L3): measured 6% faster than head-interleaved order at
    // d = 64, N = 2048, one thread, 2.5% at d = 128. Inside a head the last query blocks come
    // first: under a causal mask they see the most keys, so the light blocks fill the tail. Each
    // item is computed by one thread in a fixed order, so results do not depend on the thread
    // count or the schedule.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = q_blocks - 1 - item % q_blocks;
      const int64_t kvh = item / q_blocks % a.kv_heads;
      const int64_t b = item / q_blocks / a.kv_heads;
      const int64_t i0 = qb * block_rows;
      ProcessItem(a, scratch, b, kvh, i0, std::min(block_rows, a.q_len - i0));
    }
  }
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_FLASH_ATTENTION_INL_H_
