// Per-target body of the decode attention kernel (see decode_attention.h). Included once per
// Highway target by decode_attention.cpp through foreach_target.h.
//
// Layout: "lanes over features". With Tq * G of a few rows there are not enough query rows to
// fill a vector (the flash kernel's transposed-query tiles would leave 15 of 16 lanes idle at
// Tq = G = 1), so vectors run along the feature dimension D (Dv) instead:
//   scores  s[r][j] = sum over chunks of q_r[chunk] * k_j[chunk], then one horizontal sum;
//   values  o_r[chunk] += p[r][j] * v_j[chunk] (p broadcast).
// A work item is (batch, kv head, key split) and owns R = G * Tq rows: every query of every
// query head sharing that kv head. It walks its keys in blocks of kKeyBlock (K and V blocks of
// 32 KiB each at D = Dv = 128 fp32, L1/L2-resident), so each K and V row comes from memory once
// and is re-read from cache for the other rows and column groups. Register blocks: 4 rows x 4
// keys of partial dot products for the scores (then 2 x 4, then 1 x 8 for the rows left over),
// 4 rows x 4 vectors (2 rows or 1 row: x 8) of output columns for P V. No software prefetch:
// the K and V rows of a head are contiguous streams the hardware prefetchers follow (measured
// on the 2-core Xeon, 1 thread: key blocks of 16, 32 and 64 keys, and prefetching K 96 keys
// ahead plus a block's V rows during its scores, all ran within the run-to-run noise from L3
// and DRAM, while the prefetch loops took 16% of the samples of an L2-resident run).
//
// Where the time goes (1 thread, B = 1, Hq = 8, d = 128, 64-byte aligned cache; each phase
// timed alone by skipping the other; BENCHMARKS.md "Decode" has the table): the P V phase
// reads V at the plain streaming rate (8.4 ns per 256-byte bf16 row from L3), the score phase
// does not: 11-12 ns per bf16 K row from L3, 7.4 ns from L2 (as for a float32 row twice its
// size) and still 6.7-6.9 ns with the cache pinned in L1, where the static schedule of its
// inner loop (llvm-mca, Sapphire Rapids model: 16 cycles per 8-key step) gives ~2.5 ns: the
// blocks of 8 keys (loop, horizontal sums, set-up) overlap poorly. Cheaper compute did not
// carry over to L3 (16 keys per block: -9-13% from L1, unchanged from L3), where the kernel
// takes about the streaming time plus half its compute time. Tried without gain from L3: key
// blocks of 16 to 256 keys, 2/4/8/16 keys per register block, key-by-key loop order, software
// prefetch (the block's V rows during its scores, the next block's K rows during P V), 2 MiB
// pages, interleaving the scores of block n + 1 with the P V of block n (3-4% faster on one
// thread, up to 9% slower on two); this VM exposes no hardware counters to perf.
// With 4 query heads per kv head (GQA) every cache element feeds 4 FMAs: 64 vector FMAs per
// key, plus the bf16 widening (16 shift/and) and 13 shuffle/add per key for the horizontal
// sums, ~45 cycles of the two FMA ports at ~3.2 GHz, ~36 GB/s of bf16 at best against the
// ~32 GB/s one core streams from L3; measured 23-26 ns per key from L1 and L2, 27-32 from L3
// (compute-bound, about half the ports' peak).
//
// bf16 K/V: one vector of 2N bf16 is widened to two float32 vectors with a shift and a mask (a
// bf16 is the upper half of a float32, so widening is exact): even elements to one, odd
// elements to the other. No lane crossing is needed because q is stored in the same even/odd
// order once per item, and the output accumulators live in that order until the merge. Highway
// 1.0.3 has no vdpbf16ps path (its bf16 ReorderWidenMulAccumulate is this same shift/mask and
// FMA), and the dot instruction would round q (scores) or p (P V) to bf16, 2^-9 relative, far
// outside the float32-level tolerances the tests derive; splitting q into three bf16 parts to
// stay exact takes 3 dot instructions per 32 elements and row, more than 2 FMAs plus a widening
// shared by the rows.

#if defined(ATTN_KERNELS_DECODE_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_DECODE_ATTENTION_INL_H_
#undef ATTN_KERNELS_DECODE_ATTENTION_INL_H_
#else
#define ATTN_KERNELS_DECODE_ATTENTION_INL_H_
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/decode/decode_attention.h"
#include "kernels/common/simd_common-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace decode {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

constexpr int64_t kKeyBlock = 64;   // keys per block: a multiple of every vector length
constexpr size_t kRowGroup = 4;     // query rows per register block
// Keys per register block of the scores with 4 rows: 4 x 4 accumulators and the (widened)
// keys fit the 32 registers of AVX-512 (with the loops fully unrolled by pragma: left to
// itself GCC 12 kept the accumulator array in memory, storing all 16 vectors on every chunk).
// With 16 registers a bf16 key pair (4 widened vectors) is the most that fits.
template <typename T>
constexpr size_t kKeyGroup = (HWY_TARGET <= HWY_AVX3 || sizeof(T) == 4) ? 4 : 2;
constexpr size_t kSingleRowKeys = 8;  // keys per register block when one row is left
constexpr size_t kColVecs = 4;      // float32 vectors of output columns per register block
// A single row has only its own accumulators to hide the 4-cycle FMA latency: 8 vectors.
constexpr size_t kSingleRowColVecs = 8;

// How one chunk of a K or V row (the elements covered by one SIMD load) becomes float32
// vectors. The chunk spans kVecs * N elements.
template <typename T>
struct Chunk;

template <>
struct Chunk<float> {
  static constexpr size_t kVecs = 1;
  static HWY_INLINE void Load(DF df, const float* HWY_RESTRICT p, VF* out) {
    out[0] = hn::LoadU(df, p);
  }
  static HWY_INLINE float Scalar(float x) { return x; }
};

template <>
struct Chunk<uint16_t> {
  static constexpr size_t kVecs = 2;  // 2N bf16 -> N even + N odd elements
  static HWY_INLINE void Load(DF df, const uint16_t* HWY_RESTRICT p, VF* out) {
#if HWY_TARGET == HWY_SCALAR
    out[0] = hn::Set(df, bf16_to_float(p[0]));
    out[1] = hn::Set(df, bf16_to_float(p[1]));
#else
    // Little-endian: 32-bit lane l holds element 2l in its low half and 2l + 1 in its high half.
    const hn::RebindToUnsigned<DF> du32;
    const hn::Repartition<uint16_t, DF> du16;
    const auto pair = hn::BitCast(du32, hn::LoadU(du16, p));
    out[0] = hn::BitCast(df, hn::ShiftLeft<16>(pair));
    out[1] = hn::BitCast(df, hn::And(pair, hn::Set(du32, 0xFFFF0000u)));
#endif
  }
  static HWY_INLINE float Scalar(uint16_t x) { return bf16_to_float(x); }
};

// 8-bit K/V (attn/quantized.h): N int8 sign-extended and converted to float32. The block scale
// is applied by the caller (BlockScale), one multiply per chunk shared by all the rows: a chunk
// of N <= 16 elements lies inside one block of 32 because N divides 32 (the front-end sends
// only D and Dv that are multiples of 32 here, so there is no scalar tail either).
template <>
struct Chunk<int8_t> {
  static constexpr size_t kVecs = 1;
  static HWY_INLINE void Load(DF df, const int8_t* HWY_RESTRICT p, VF* out) {
    const hn::RebindToSigned<DF> di32;
    const hn::Rebind<int8_t, DF> di8;
    out[0] = hn::ConvertTo(df, hn::PromoteTo(di32, hn::LoadU(di8, p)));
  }
  static HWY_INLINE float Scalar(int8_t x) { return static_cast<float>(x); }
};

// Position of element e of a chunk-arranged row (q and the output accumulators): inside each
// full chunk of W = kVecs * N elements, vector v lane i holds element kVecs * i + v; the tail
// after the last full chunk is in natural order.
template <typename T>
HWY_INLINE int64_t ArrangedIndex(int64_t e, int64_t full, int64_t N) {
  constexpr int64_t V = static_cast<int64_t>(Chunk<T>::kVecs);
  if (e >= full) return e;
  const int64_t W = V * N, c = e / W * W, within = e - c;
  return c + (within % V) * N + within / V;
}

// Per-thread buffers, sized once per call (the bias and ALiBi rows only when the call has them).
struct Scratch {
  Scratch(int64_t rows, int64_t head_dim, bool bias_or_alibi)
      : q(hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, rows * head_dim)))),
        s(hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, rows) * kKeyBlock))),
        q_rows(static_cast<size_t>(rows)),
        s_rows(static_cast<size_t>(rows)),
        o_rows(static_cast<size_t>(rows)),
        intervals(static_cast<size_t>(rows)),
        active(static_cast<size_t>(rows)),
        bias_rows(bias_or_alibi ? static_cast<size_t>(rows) : 0),
        slopes(bias_or_alibi ? static_cast<size_t>(rows) : 0) {}
  hwy::AlignedFreeUniquePtr<float[]> q;  // [R][D] scaled queries, chunk-arranged
  hwy::AlignedFreeUniquePtr<float[]> s;  // [R][kKeyBlock] scores, then probabilities
  std::vector<const float*> q_rows;
  std::vector<float*> s_rows, o_rows;
  std::vector<KeyInterval> intervals;
  std::vector<char> active;  // row saw a visible key in the current block
  // Bias and ALiBi (only when the call has them): the row's bias at key 0 (nullptr: no bias)
  // and its head's slope (0: no ALiBi).
  std::vector<const float*> bias_rows;
  std::vector<float> slopes;
  // 8-bit K/V: the item's scale rows (key j's scales at k_scales + j * k_scale_stride).
  const float* k_scales = nullptr;
  const float* v_scales = nullptr;
  int64_t k_scale_stride = 0, v_scale_stride = 0;
};

// Element e of a row as float32 (scaled by its block scale for 8-bit K/V): the scalar tails.
template <typename T>
HWY_INLINE float ScalarAt(const T* HWY_RESTRICT row, const float* HWY_RESTRICT scale_row,
                          int64_t e) {
  if constexpr (std::is_same_v<T, int8_t>) return static_cast<float>(row[e]) * scale_row[e / 32];
  return Chunk<T>::Scalar(row[e]);
}

// Multiplies chunk vectors of row j starting at feature c by their block scale (8-bit K/V).
template <typename T>
HWY_INLINE void BlockScale(DF df, const float* HWY_RESTRICT scale_row, int64_t c, VF* x) {
  if constexpr (std::is_same_v<T, int8_t>) x[0] = hn::Mul(x[0], hn::Set(df, scale_row[c / 32]));
}

// Per-split partial results: running max m, sum l (relative to m) and the unnormalised output
// accumulator o (chunk-arranged) of every row of every item.
struct Partials {
  float* m;  // [items][R]
  float* l;  // [items][R]
  float* o;  // [items][R][Dv]
};

// out[x] = sum of the lanes of acc[x] for x < count. With AVX-512, four vectors are reduced
// together by a transposing add tree (13 instructions instead of about 40 for four separate
// reductions): at 4 query rows the horizontal sums were a fifth of the kernel's instructions.
template <size_t kCount>
HWY_INLINE void SumLanes(DF df, const VF (&acc)[kCount], float* HWY_RESTRICT out) {
  size_t x = 0;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  for (; x + 4 <= kCount; x += 4) {
    const __m512 a = acc[x].raw, b = acc[x + 1].raw, c = acc[x + 2].raw, d = acc[x + 3].raw;
    // Per 128-bit block: (a, b, a, b) partials, then (c, d, c, d), then (a, b, c, d).
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    // Add the four 128-bit blocks together.
    abcd = _mm512_add_ps(abcd, _mm512_shuffle_f32x4(abcd, abcd, 0x4E));
    abcd = _mm512_add_ps(abcd, _mm512_shuffle_f32x4(abcd, abcd, 0xB1));
    _mm_storeu_ps(out + x, _mm512_castps512_ps128(abcd));
  }
#endif
  for (; x < kCount; ++x) out[x] = hn::GetLane(hn::SumOfLanes(df, acc[x]));
}

// Scores of rows [r, r + RR) against keys [j, j + KR), masked to -inf outside each row's
// interval, into s[row][j - jb].
template <typename T, size_t RR, size_t KR>
HWY_INLINE void ScoreBlock(DF df, Scratch& sc, size_t r, const T* HWY_RESTRICT k,
                           int64_t k_stride, int64_t D, int64_t j, int64_t jb) {
  constexpr size_t V = Chunk<T>::kVecs;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t W = static_cast<int64_t>(V) * N;
  const int64_t full = D / W * W;
  const T* HWY_RESTRICT krow[KR];
  const float* HWY_RESTRICT kscale[KR];
#pragma GCC unroll 16
  for (size_t kk = 0; kk < KR; ++kk) {
    krow[kk] = k + (j + static_cast<int64_t>(kk)) * k_stride;
    kscale[kk] = sc.k_scales + (j + static_cast<int64_t>(kk)) * sc.k_scale_stride;
  }
  const float* HWY_RESTRICT qrow[RR];
#pragma GCC unroll 16
  for (size_t rr = 0; rr < RR; ++rr) qrow[rr] = sc.q_rows[r + rr];

  VF acc[RR * KR];  // [row][key]
#pragma GCC unroll 16
  for (size_t x = 0; x < RR * KR; ++x) acc[x] = hn::Zero(df);
  for (int64_t c = 0; c < full; c += W) {
    VF kv[KR][V];
#pragma GCC unroll 16
    for (size_t kk = 0; kk < KR; ++kk) {
      Chunk<T>::Load(df, krow[kk] + c, kv[kk]);
      BlockScale<T>(df, kscale[kk], c, kv[kk]);
    }
#pragma GCC unroll 16
    for (size_t rr = 0; rr < RR; ++rr)
#pragma GCC unroll 16
      for (size_t v = 0; v < V; ++v) {
        const VF qv = hn::LoadU(df, qrow[rr] + c + static_cast<int64_t>(v) * N);
#pragma GCC unroll 16
        for (size_t kk = 0; kk < KR; ++kk)
          acc[rr * KR + kk] = hn::MulAdd(qv, kv[kk][v], acc[rr * KR + kk]);
      }
  }
  float sums[RR * KR];
  SumLanes(df, acc, sums);
  if (HWY_UNLIKELY(full < D)) {  // features after the last full chunk (odd D), scalar
    for (size_t rr = 0; rr < RR; ++rr)
      for (size_t kk = 0; kk < KR; ++kk)
        for (int64_t d = full; d < D; ++d)
          sums[rr * KR + kk] += qrow[rr][d] * ScalarAt<T>(krow[kk], kscale[kk], d);
  }
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t j_end = j + static_cast<int64_t>(KR);
#pragma GCC unroll 16
  for (size_t rr = 0; rr < RR; ++rr) {
    const KeyInterval iv = sc.intervals[r + rr];
    float* HWY_RESTRICT srow = sc.s_rows[r + rr] + (j - jb);
    if (HWY_LIKELY(iv.lo <= j && j_end <= iv.hi)) {
      // Every key visible (all but the blocks at a mask edge): a plain copy, no per-key
      // compare and select (those were a tenth of the instructions at 4 rows).
#pragma GCC unroll 16
      for (size_t kk = 0; kk < KR; ++kk) srow[kk] = sums[rr * KR + kk];
      continue;
    }
#pragma GCC unroll 16
    for (size_t kk = 0; kk < KR; ++kk) {
      const int64_t key = j + static_cast<int64_t>(kk);
      srow[kk] = (key >= iv.lo && key < iv.hi) ? sums[rr * KR + kk] : -inf;
    }
  }
}

// Scores of rows [r, r + RR) against the keys [jb, je) of one block: KR keys per register
// block, then one at a time.
template <typename T, size_t RR, size_t KR>
HWY_INLINE void ScoreRows(DF df, Scratch& sc, size_t r, const T* HWY_RESTRICT k,
                          int64_t k_stride, int64_t D, int64_t jb, int64_t je) {
  int64_t j = jb;
  for (; j + static_cast<int64_t>(KR) <= je; j += static_cast<int64_t>(KR))
    ScoreBlock<T, RR, KR>(df, sc, r, k, k_stride, D, j, jb);
  for (; j < je; ++j) ScoreBlock<T, RR, 1>(df, sc, r, k, k_stride, D, j, jb);
}

// o[row][columns of chunks starting at element c] += sum_{j in [jb, je)} p[row][j - jb] * v_j,
// for rows [r, r + RR) and CG chunks (CG * kVecs float32 vectors per row). Each accumulator
// takes one FMA per key, so fewer than 8 of them leave the FMA pipes waiting on the 4-cycle
// latency: small blocks (one row, Dv = 32) alternate between two sets over the keys, added at
// the end (a fixed order: still deterministic).
template <typename T, size_t RR, size_t CG>
HWY_INLINE void AccumulateBlock(DF df, Scratch& sc, size_t r, const T* HWY_RESTRICT v,
                                int64_t v_stride, int64_t c, int64_t jb, int64_t je) {
  constexpr size_t V = Chunk<T>::kVecs;
  constexpr size_t NV = CG * V;
  constexpr size_t KI = RR * NV >= 8 ? 1 : 2;  // accumulator sets, alternating keys
  const size_t N = hn::Lanes(df);
  const int64_t W = static_cast<int64_t>(V * N);
  float* HWY_RESTRICT orow[RR];
  const float* HWY_RESTRICT prow[RR];
  for (size_t rr = 0; rr < RR; ++rr) {
    orow[rr] = sc.o_rows[r + rr] + c;
    prow[rr] = sc.s_rows[r + rr];
  }
  VF acc[KI][RR][NV];
#pragma GCC unroll 16
  for (size_t rr = 0; rr < RR; ++rr)
#pragma GCC unroll 16
    for (size_t x = 0; x < NV; ++x) {
      acc[0][rr][x] = hn::LoadU(df, orow[rr] + x * N);
      if constexpr (KI == 2) acc[1][rr][x] = hn::Zero(df);
    }
  const T* HWY_RESTRICT vcol = v + c;
  const auto step = [&](size_t set, int64_t j) HWY_ATTR {
    VF vv[NV];
    const T* HWY_RESTRICT vrow = vcol + j * v_stride;
    const float* HWY_RESTRICT vscale = sc.v_scales + j * sc.v_scale_stride;
#pragma GCC unroll 16
    for (size_t cg = 0; cg < CG; ++cg) {
      Chunk<T>::Load(df, vrow + cg * W, vv + cg * V);
      BlockScale<T>(df, vscale, c + static_cast<int64_t>(cg) * W, vv + cg * V);
    }
#pragma GCC unroll 16
    for (size_t rr = 0; rr < RR; ++rr) {
      const VF p = hn::Set(df, prow[rr][j - jb]);
#pragma GCC unroll 16
      for (size_t x = 0; x < NV; ++x) acc[set][rr][x] = hn::MulAdd(p, vv[x], acc[set][rr][x]);
    }
  };
  int64_t j = jb;
  if constexpr (KI == 2) {
    for (; j + 2 <= je; j += 2) {
      step(0, j);
      step(1, j + 1);
    }
  }
  for (; j < je; ++j) step(0, j);
#pragma GCC unroll 16
  for (size_t rr = 0; rr < RR; ++rr)
#pragma GCC unroll 16
    for (size_t x = 0; x < NV; ++x) {
      VF sum = acc[0][rr][x];
      if constexpr (KI == 2) sum = hn::Add(sum, acc[1][rr][x]);
      hn::StoreU(sum, df, orow[rr] + x * N);
    }
}

// o[rows r..r+RR) += P V over the keys [jb, je) of one block, for the full chunks of the
// columns [0, full_dv): register blocks of CG chunks while they fit, then halves of that
// (so that Dv = 32 or 64 still takes one block per row, not one per chunk).
template <typename T, size_t RR, size_t CG>
HWY_INLINE void AccumulateChunks(DF df, Scratch& sc, size_t r, const T* HWY_RESTRICT v,
                                 int64_t v_stride, int64_t c, int64_t full_dv, int64_t jb,
                                 int64_t je) {
  const int64_t W = static_cast<int64_t>(Chunk<T>::kVecs * hn::Lanes(df));
  const int64_t group_cols = static_cast<int64_t>(CG) * W;
  for (; c + group_cols <= full_dv; c += group_cols)
    AccumulateBlock<T, RR, CG>(df, sc, r, v, v_stride, c, jb, je);
  if constexpr (CG > 1) {
    if (c < full_dv) AccumulateChunks<T, RR, CG / 2>(df, sc, r, v, v_stride, c, full_dv, jb, je);
  }
}

template <typename T, size_t RR, size_t kVecs>
HWY_INLINE void AccumulateRows(DF df, Scratch& sc, size_t r, const T* HWY_RESTRICT v,
                               int64_t v_stride, int64_t full_dv, int64_t jb, int64_t je) {
  AccumulateChunks<T, RR, kVecs / Chunk<T>::kVecs>(df, sc, r, v, v_stride, 0, full_dv, jb, je);
}

// Bias and ALiBi of one row for the keys [jb, je) of a block: s += bias[j] - slope |pos - j|
// (natural units, as the scores), on the row's visible keys only, so masked keys stay exactly
// -inf whatever the bias holds there (a +inf bias must not turn them into NaN). A separate pass
// over the block's R x 64 scores, against the D multiply-adds each score took: calls without
// bias and ALiBi never enter it. The distance |pos - j| is exact in float32 below 2^24 keys.
HWY_INLINE void AddBiasAlibiRow(const Scratch& sc, size_t r, int64_t bias_stride_k, int64_t jb,
                                int64_t je) {
  const KeyInterval iv = sc.intervals[r];
  const int64_t lo = std::max(jb, iv.lo), hi = std::min(je, iv.hi);
  float* HWY_RESTRICT srow = sc.s_rows[r] - jb;  // indexed by key
  const float* HWY_RESTRICT bias = sc.bias_rows[r];
  if (bias != nullptr)
    for (int64_t j = lo; j < hi; ++j) srow[j] += bias[j * bias_stride_k];
  const float slope = sc.slopes[r];
  if (slope != 0.0f) {
    const float pos = static_cast<float>(iv.pos);
    for (int64_t j = lo; j < hi; ++j) srow[j] -= slope * std::abs(pos - static_cast<float>(j));
  }
}

// Online-softmax update of one row for the key block in s[0, n): new running max, rescale of
// l and o when it grew, probabilities in place. Returns false when the row has seen no visible
// key yet (its probabilities stay all zero and P V can skip it).
HWY_INLINE bool SoftmaxRow(DF df, float* HWY_RESTRICT srow, int64_t n, int64_t Dv,
                           float* HWY_RESTRICT o, float& m, float& l) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t padded = (n + N - 1) / N * N;  // <= kKeyBlock: kKeyBlock is a multiple of N
  for (int64_t j = n; j < padded; ++j) srow[j] = -inf;
  VF vmax = hn::Load(df, srow);  // n >= 1, so padded >= N
  auto nan = hn::IsNaN(vmax);
  for (int64_t j = N; j < padded; j += N) {
    const VF x = hn::Load(df, srow + j);
    vmax = hn::Max(vmax, x);
    nan = hn::Or(nan, hn::IsNaN(x));
  }
  // A NaN score makes the whole row NaN, as in the reference (hn::Max would drop it).
  const float block_max = hn::AllFalse(df, nan)
                              ? hn::GetLane(hn::MaxOfLanes(df, vmax))
                              : std::numeric_limits<float>::quiet_NaN();
  const float m_new = std::isnan(m) || std::isnan(block_max) ? block_max + m
                                                              : std::max(m, block_max);
  if (m_new == -inf) {
    std::fill_n(srow, padded, 0.0f);
    return false;
  }
  if (!(m_new == m)) {
    // alpha = e^(m - m_new): 0 when m was -inf (l and o are still 0 then), NaN stays NaN.
    const float alpha = m == -inf ? 0.0f : std::exp(m - m_new);
    l *= alpha;
    const VF va = hn::Set(df, alpha);
    const int64_t full = Dv / N * N;
    for (int64_t e = 0; e < full; e += N) hn::StoreU(hn::Mul(hn::LoadU(df, o + e), va), df, o + e);
    for (int64_t e = full; e < Dv; ++e) o[e] *= alpha;
    m = m_new;
  }
  const VF vm = hn::Set(df, m_new);
  VF sum = hn::Zero(df);
  for (int64_t j = 0; j < padded; j += N) {
    const VF x = hn::Sub(hn::Load(df, srow + j), vm);
    // hn::Exp returns exactly 0 below -104 (and for the -inf of masked keys) but also for NaN:
    // keep NaN.
    const VF p = hn::IfThenElse(hn::IsNaN(x), x, hn::Exp(df, x));
    sum = hn::Add(sum, p);
    hn::Store(p, df, srow + j);
  }
  l += hn::GetLane(hn::SumOfLanes(df, sum));
  return true;
}

// Geometry shared by every item of one call.
struct Problem {
  int64_t G, R, D, Dv, splits, split_keys;
};

// One work item: batch b, kv head kvh, key split `split`; writes its partials.
template <typename T>
void ProcessItem(const DecodeAttentionArgs& a, const Problem& pb, Scratch& sc, int64_t b,
                 int64_t kvh, int64_t split, const Partials& part, int64_t item) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  constexpr int64_t V = static_cast<int64_t>(Chunk<T>::kVecs);
  const int64_t W = V * N;
  const int64_t R = pb.R, D = pb.D, Dv = pb.Dv;
  const float inf = std::numeric_limits<float>::infinity();
  float* m = part.m + item * R;
  float* l = part.l + item * R;
  float* o = part.o + item * R * Dv;
  std::fill_n(m, R, -inf);
  std::fill_n(l, R, 0.0f);
  std::fill_n(o, R * Dv, 0.0f);

  // Rows r = g * Tq + i: query i of query head kvh * G + g. The item's keys: its split,
  // narrowed to the union of the rows' visible intervals.
  const int64_t split_lo = split * pb.split_keys;
  const int64_t split_hi = std::min(a.k_len, split_lo + pb.split_keys);
  int64_t lo = split_hi, hi = split_lo;
  for (int64_t r = 0; r < R; ++r) {
    const KeyInterval iv = RowInterval(a, b, r % a.q_len);
    sc.intervals[static_cast<size_t>(r)] = iv;
    if (iv.lo < iv.hi) lo = std::min(lo, iv.lo), hi = std::max(hi, iv.hi);
  }
  lo = std::max(lo, split_lo), hi = std::min(hi, split_hi);
  // Weights requested: the raw scores of the split go to the rows' weights rows (normalised
  // after the merge, NormaliseWeightsRow); keys of the split outside [lo, hi) are -inf there.
  const auto weights_row = [&](int64_t r) {
    return a.weights + ((b * a.q_heads + kvh * pb.G + r / a.q_len) * a.q_len + r % a.q_len) *
                           a.k_len;
  };
  if (a.weights != nullptr) {
    const int64_t seen_lo = std::min(lo, split_hi), seen_hi = std::max(hi, seen_lo);
    for (int64_t r = 0; r < R; ++r) {
      std::fill(weights_row(r) + split_lo, weights_row(r) + seen_lo, -inf);
      std::fill(weights_row(r) + seen_hi, weights_row(r) + split_hi, -inf);
    }
  }
  if (lo >= hi) return;

  // Queries scaled once (the scale folds into q), in the chunk order of the K loads.
  const int64_t full_d = D / W * W;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head = kvh * pb.G + r / a.q_len;
    const float* q = a.q + ((b * a.q_heads + head) * a.q_len + r % a.q_len) * D;
    float* qs = sc.q.get() + r * D;
    for (int64_t e = 0; e < D; ++e) qs[ArrangedIndex<T>(e, full_d, N)] = q[e] * a.scale;
    sc.q_rows[static_cast<size_t>(r)] = qs;
    sc.s_rows[static_cast<size_t>(r)] = sc.s.get() + r * kKeyBlock;
    sc.o_rows[static_cast<size_t>(r)] = o + r * Dv;
  }
  const bool bias_or_alibi = a.bias.data != nullptr || a.alibi_slopes != nullptr;
  if (bias_or_alibi) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t head = kvh * pb.G + r / a.q_len, i = r % a.q_len;
      sc.bias_rows[static_cast<size_t>(r)] =
          a.bias.data == nullptr ? nullptr
                                 : a.bias.data + b * a.bias.stride_b + head * a.bias.stride_h +
                                       i * a.bias.stride_q;
      sc.slopes[static_cast<size_t>(r)] = a.alibi_slopes == nullptr ? 0.0f : a.alibi_slopes[head];
    }
  }

  const bool paged = a.page_table != nullptr;
  const T* k = static_cast<const T*>(a.k.data) + (paged ? 0 : b * a.k.stride_b) + kvh * a.k.stride_h;
  const T* v = static_cast<const T*>(a.v.data) + (paged ? 0 : b * a.v.stride_b) + kvh * a.v.stride_h;
  const int32_t* pages = paged ? a.page_table + b * a.page_table_stride : nullptr;
  if constexpr (std::is_same_v<T, int8_t>) {
    sc.k_scales = a.k.scales + b * a.k.scale_stride_b + kvh * a.k.scale_stride_h;
    sc.v_scales = a.v.scales + b * a.v.scale_stride_b + kvh * a.v.scale_stride_h;
    sc.k_scale_stride = a.k.scale_stride_t;
    sc.v_scale_stride = a.v.scale_stride_t;
  }
  const int64_t full_dv = Dv / W * W;
  const size_t rows = static_cast<size_t>(R);
  for (int64_t jb = lo, je = lo; jb < hi; jb = je) {
    je = std::min(jb + kKeyBlock, hi);
    if (paged) {
      // A block stays inside one page. k and v become the origins from which key j of this
      // page is row j (addresses computed as integers: the origin itself lies outside the pool).
      const int64_t page = jb / a.page_size, first = page * a.page_size;
      je = std::min(je, first + a.page_size);
      const int64_t at = pages[page];
      const auto origin = [&](const KvView& kv) {
        const T* row0 = static_cast<const T*>(kv.data) + at * kv.stride_b + kvh * kv.stride_h;
        return reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(row0) -
                                          static_cast<uintptr_t>(first * kv.stride_t) * sizeof(T));
      };
      k = origin(a.k);
      v = origin(a.v);
    }

    // 1. Scores, in register blocks of 4 rows x kKeyGroup keys, then 2 rows x 4 keys, then
    // 1 row x 8 keys for the rows left over. No software prefetch: K and V rows of a head are
    // contiguous streams that the hardware prefetchers follow; requesting every line ahead
    // cost 16% of the instructions of an L2-resident run and gained nothing measurable from
    // L3 or DRAM.
    size_t r = 0;
    for (; r + kRowGroup <= rows; r += kRowGroup)
      ScoreRows<T, kRowGroup, kKeyGroup<T>>(df, sc, r, k, a.k.stride_t, D, jb, je);
    for (; r + 2 <= rows; r += 2) ScoreRows<T, 2, 4>(df, sc, r, k, a.k.stride_t, D, jb, je);
    for (; r < rows; ++r)
      ScoreRows<T, 1, kSingleRowKeys>(df, sc, r, k, a.k.stride_t, D, jb, je);
    if (bias_or_alibi)  // before the weights copy: the stored raw scores include them
      for (size_t rr = 0; rr < rows; ++rr) AddBiasAlibiRow(sc, rr, a.bias.stride_k, jb, je);
    if (a.weights != nullptr)
      for (size_t rr = 0; rr < rows; ++rr)
        std::copy_n(sc.s_rows[rr], je - jb, weights_row(static_cast<int64_t>(rr)) + jb);

    // 2. Online softmax per row (Milakov & Gimelshein 2018).
    bool any_active = false;
    for (size_t rr = 0; rr < rows; ++rr) {
      const bool act = SoftmaxRow(df, sc.s_rows[rr], je - jb, Dv, sc.o_rows[rr],
                                  m[rr], l[rr]);
      sc.active[rr] = act;
      any_active = any_active || act;
    }
    if (!any_active) continue;

    // 3. o += P V: column groups outer so the V block is re-read from L1/L2, never DRAM.
    // Row groups as for the scores: a group of RR rows reads each V chunk once for all RR.
    // Fully masked rows in a group still multiply their zero probabilities (harmless: 0 * v
    // adds 0); single rows skip them.
    r = 0;
    for (; r + kRowGroup <= rows; r += kRowGroup)
      AccumulateRows<T, kRowGroup, kColVecs>(df, sc, r, v, a.v.stride_t, full_dv, jb, je);
    for (; r + 2 <= rows; r += 2)
      AccumulateRows<T, 2, kSingleRowColVecs>(df, sc, r, v, a.v.stride_t, full_dv, jb, je);
    for (; r < rows; ++r)
      if (sc.active[r])
        AccumulateRows<T, 1, kSingleRowColVecs>(df, sc, r, v, a.v.stride_t, full_dv, jb, je);
    // Columns after the last full chunk (odd Dv), scalar.
    if (full_dv < Dv) {
      for (size_t rr = 0; rr < rows; ++rr) {
        if (!sc.active[rr]) continue;
        const float* p = sc.s_rows[rr];
        float* orow = sc.o_rows[rr];
        for (int64_t j = jb; j < je; ++j) {
          const T* vrow = v + j * a.v.stride_t;
          for (int64_t e = full_dv; e < Dv; ++e)
            orow[e] += p[j - jb] * ScalarAt<T>(vrow, sc.v_scales + j * sc.v_scale_stride, e);
        }
      }
    }
  }
}

// Weights on request (args.weights). The items store each row's raw scores (-inf where masked,
// the very values their online softmax used) into the weights rows as they go; once the merge
// has fixed the row's max M and 1 / L, this turns them into P = e^(s - M) / L in place. Storing
// the scores costs Tk floats per row, where recomputing them after the merge would re-read the
// K cache (Tk x D values per kv head: measured 35 us of a 150 us seq2seq step at d = 256).
// Masked keys give exactly 0; fully masked rows (1 / L = 0) are all 0; a NaN row stays NaN.
HWY_INLINE void NormaliseWeightsRow(DF df, float* HWY_RESTRICT w, int64_t Tk, float M,
                                    float inv) {
  if (inv == 0.0f) {
    std::fill_n(w, Tk, 0.0f);
    return;
  }
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const VF vm = hn::Set(df, M), vinv = hn::Set(df, inv);
  const VF neg_inf = hn::Set(df, -std::numeric_limits<float>::infinity());
  const auto probabilities = [&](VF s) {
    const VF x = hn::Sub(s, vm);
    // As in SoftmaxRow: hn::Exp gives 0 for NaN, keep NaN; masked keys exactly 0.
    const VF p = hn::IfThenElse(hn::IsNaN(x), x, hn::Mul(hn::Exp(df, x), vinv));
    return hn::IfThenZeroElse(hn::Eq(s, neg_inf), p);
  };
  int64_t j = 0;
  for (; j + N <= Tk; j += N) hn::StoreU(probabilities(hn::LoadU(df, w + j)), df, w + j);
  if (j < Tk) {  // the tail through a padded copy, so every key takes the same vector math
    HWY_ALIGN float tail[HWY_MAX_BYTES / sizeof(float)];
    std::fill_n(tail, N, -std::numeric_limits<float>::infinity());
    std::copy(w + j, w + Tk, tail);
    hn::Store(probabilities(hn::Load(df, tail)), df, tail);
    std::copy_n(tail, Tk - j, w + j);
  }
}

// Log-sum-exp merge of the splits of one output row, in split order (deterministic):
// M = max_s m_s, L = sum_s l_s e^(m_s - M), out = sum_s o_s e^(m_s - M) / L, lse = M + log L.
// With weights requested, the row's raw scores (stored there by the items) become
// probabilities in place: P = e^(s - M) / L, the output's own normalisation.
// The row's partials of split s are part.{m, l}[first + s * R] and part.o + (first + s * R) Dv.
// With one split, e^(m - M) = 1 exactly: out = o / l, bit for bit what the merge gives.
template <typename T>
void MergeRow(const DecodeAttentionArgs& a, const Problem& pb, const Partials& part,
              int64_t first, int64_t b, int64_t head, int64_t i, float* HWY_RESTRICT acc) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t W = static_cast<int64_t>(Chunk<T>::kVecs) * N;
  const int64_t Dv = pb.Dv;
  const float inf = std::numeric_limits<float>::infinity();
  float M = -inf;
  for (int64_t s = 0; s < pb.splits; ++s) {
    const int64_t at = first + s * pb.R;
    if (part.l[at] == 0.0f) continue;  // no visible key in this split
    M = std::isnan(part.m[at]) || std::isnan(M) ? M + part.m[at] : std::max(M, part.m[at]);
  }
  float L = 0.0f;
  std::fill_n(acc, Dv, 0.0f);
  for (int64_t s = 0; s < pb.splits; ++s) {
    const int64_t at = first + s * pb.R;
    if (part.l[at] == 0.0f) continue;
    const float w = std::exp(part.m[at] - M);
    L += w * part.l[at];
    const float* o = part.o + at * Dv;
    for (int64_t e = 0; e < Dv; ++e) acc[e] += w * o[e];
  }
  const int64_t row = (b * a.q_heads + head) * a.q_len + i;
  float* out = a.out + row * Dv;
  const bool masked = L == 0.0f;  // NaN falls through and keeps the row NaN
  const float inv = masked ? 0.0f : 1.0f / L;
  const int64_t full_dv = Dv / W * W;
  for (int64_t e = 0; e < Dv; ++e)
    out[e] = masked ? 0.0f : acc[ArrangedIndex<T>(e, full_dv, N)] * inv;
  if (a.weights != nullptr) NormaliseWeightsRow(df, a.weights + row * a.k_len, a.k_len, M, inv);
  if (a.lse != nullptr)
    a.lse[row] = masked ? -inf
                        : static_cast<float>(static_cast<double>(M) +
                                             std::log(static_cast<double>(L)));
}

template <typename T>
void Run(const DecodeAttentionArgs& a) {
  if (a.batch == 0 || a.q_heads == 0 || a.q_len == 0) return;
  const DecodeSplit split = decode_attention_split(a.batch, a.kv_heads, a.k_len);
  Problem pb;
  pb.G = a.q_heads / a.kv_heads;
  pb.R = pb.G * a.q_len;
  pb.D = a.head_dim;
  pb.Dv = a.value_dim;
  pb.splits = split.count;
  pb.split_keys = split.keys;
  const int64_t items = a.batch * a.kv_heads * pb.splits;
  const bool bias_or_alibi = a.bias.data != nullptr || a.alibi_slopes != nullptr;
  const int64_t out_rows = a.batch * a.q_heads * a.q_len;

  // Threads only when there is enough to read. Inside a model the decoder step runs between
  // multi-threaded BLAS calls whose OpenBLAS workers keep spinning for a while, so a parallel
  // region over a few microseconds of work waits for a descheduled thread at its barrier:
  // training the demo's GRU translator (B = 64, Tq = 1, Tk ~ 10, 640 KiB of K and V per step)
  // took 25.7 s per epoch with a 128 KiB threshold against 8.4 s on the composed path, which runs
  // such calls serially. Below 4 MiB (~150 us at one core's L3 rate) the call stays on the
  // calling thread. Results do not depend on it. The size counts 4 bytes per element for a bf16
  // cache too: its work per element is the float32 one (plus the widening), so a bf16 seq2seq
  // step (B = 64, Tk = 50, d = 256: 3.3 MB) runs threaded like its 6.5 MB float32 twin.
  const double kv_bytes = static_cast<double>(a.batch * a.kv_heads * a.k_len) *
                          static_cast<double>(pb.D + pb.Dv) * 4.0;
  constexpr double kMinParallelBytes = 4.0 * 1024.0 * 1024.0;
  const bool parallel = items > 1 && kv_bytes >= kMinParallelBytes;

  if (pb.splits == 1) {
    // Many (batch, kv head) pairs, e.g. a seq2seq decoder step (B = 64, Tk = 50): each item
    // owns whole output rows, so it finishes them itself from per-thread partials (the same
    // arithmetic as the one-split merge: identical bits) and no second pass, no barrier
    // between passes and no [items, R, Dv] buffer are needed.
#pragma omp parallel if (parallel)
    {
      FlushDenormals ftz;
      Scratch scratch(pb.R, pb.D, bias_or_alibi);
      hwy::AlignedFreeUniquePtr<float[]> own = hwy::AllocateAligned<float>(
          static_cast<size_t>(pb.R * (2 + pb.Dv) + std::max<int64_t>(1, pb.Dv)));
      const Partials mine{own.get(), own.get() + pb.R, own.get() + 2 * pb.R};
      float* acc = mine.o + pb.R * pb.Dv;
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) {
        const int64_t kvh = item % a.kv_heads, b = item / a.kv_heads;
        ProcessItem<T>(a, pb, scratch, b, kvh, 0, mine, 0);
        for (int64_t r = 0; r < pb.R; ++r)
          MergeRow<T>(a, pb, mine, r, b, kvh * pb.G + r / a.q_len, r % a.q_len, acc);
      }
    }
    return;
  }

  // Partials: a few KiB per item (R rows of Dv + 2 floats), against the split's hundreds of
  // KiB of K and V: the merge traffic is negligible.
  std::vector<float> m(static_cast<size_t>(items * pb.R)), l(m.size());
  std::vector<float> o(static_cast<size_t>(items * pb.R * pb.Dv));
  const Partials part{m.data(), l.data(), o.data()};
#pragma omp parallel if (parallel)
  {
    FlushDenormals ftz;
    Scratch scratch(pb.R, pb.D, bias_or_alibi);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t split_index = item % pb.splits;
      const int64_t kvh = item / pb.splits % a.kv_heads;
      const int64_t b = item / pb.splits / a.kv_heads;
      ProcessItem<T>(a, pb, scratch, b, kvh, split_index, part, item);
    }
    std::vector<float> acc(static_cast<size_t>(std::max<int64_t>(1, pb.Dv)));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < out_rows; ++row) {
      const int64_t i = row % a.q_len;
      const int64_t head = row / a.q_len % a.q_heads;
      const int64_t b = row / a.q_len / a.q_heads;
      const int64_t kvh = head / pb.G, r = (head % pb.G) * a.q_len + i;
      const int64_t first = (b * a.kv_heads + kvh) * pb.splits * pb.R + r;
      MergeRow<T>(a, pb, part, first, b, head, i, acc.data());
    }
  }
}

}  // namespace decode

void DecodeAttentionForward(const DecodeAttentionArgs& a) {
  if (a.kv_type == KvType::bf16)
    decode::Run<uint16_t>(a);
  else if (a.kv_type == KvType::int8)
    decode::Run<int8_t>(a);
  else
    decode::Run<float>(a);
}

const char* DecodeTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_DECODE_ATTENTION_INL_H_
