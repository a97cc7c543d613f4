// Forward of the fused additive / concat attention (see additive_attention.h), per Highway
// target; included by additive_attention.cpp through foreach_target.h after the shared part.
//
// Besides the kernel's own work the forward writes only the packed key operands (A floats per
// key, once per call) and, when V's rows are not whole aligned vectors, a padded copy of V.
// The query operands are folded per work item into thread scratch, and every pass runs inside
// the one OpenMP region: at B = 1, H = 8, N = 2048, A = 128 on 2 threads, the serial passes,
// their 8 MiB temporaries and the page faults on them took ~8% of the call (222 -> 206 ms).

#if defined(ATTN_KERNELS_ADDITIVE_ATTENTION_FORWARD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_ADDITIVE_ATTENTION_FORWARD_INL_H_
#undef ATTN_KERNELS_ADDITIVE_ATTENTION_FORWARD_INL_H_
#else
#define ATTN_KERNELS_ADDITIVE_ATTENTION_FORWARD_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "kernels/additive/additive_attention-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace additive {

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
  ForwardScratch(const AdditiveAttentionArgs& a, const Layout& l)
      : o(hwy::AllocateAligned<float>(static_cast<size_t>(kQueryRows * l.Dvp))),
        p(hwy::AllocateAligned<float>(static_cast<size_t>(kQueryRows * l.Bc))),
        q(hwy::AllocateAligned<float>(static_cast<size_t>(kQueryRows * std::max<int64_t>(
            1, a.hidden)))),
        row(hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(
            1, a.proj_stride)))),
        iv(static_cast<size_t>(kQueryRows)),
        max(static_cast<size_t>(kQueryRows)),
        sum(static_cast<size_t>(kQueryRows)) {
    active.reserve(static_cast<size_t>(kQueryRows));
  }
  hwy::AlignedFreeUniquePtr<float[]> o;  // unnormalised output rows [kQueryRows][Dvp]
  hwy::AlignedFreeUniquePtr<float[]> p;  // one key block's scores, then P, [kQueryRows][Bc]
  hwy::AlignedFreeUniquePtr<float[]> q;  // the item's query operands [kQueryRows][units]
  hwy::AlignedFreeUniquePtr<float[]> row;  // one exponentiated projection row [proj_stride]
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
  const float* vp = pk.vrows + hk * a.k_len * Dvp;
  const int64_t row_base = (b * a.q_heads + h) * a.q_len + i0;
  // The item's query operands, folded here rather than in a pass over all queries: each row
  // belongs to one item, so the work is the same, spread over the threads, with no O(N A)
  // temporary to allocate (and page-fault) per call.
  for (int64_t r = 0; r < rows; ++r)
    FoldQueryRow(pk, a.q_proj + (row_base + r) * a.proj_stride, pk.split, a.proj_stride,
                 sc.row.get(), sc.q.get() + r * U);

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
      rb.q_proj = sc.q.get() + r * U;
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
    rb.q_proj = sc.q.get() + r * U;
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

}  // namespace additive

void AdditiveAttentionForwardImpl(const AdditiveAttentionArgs& a, float* out, float* lse,
                                  float* weights) {
  using namespace additive;
  if (a.batch == 0 || a.q_heads == 0 || a.q_len == 0) return;
  const Layout l = MakeLayout(a);
  const int64_t heads = a.batch * a.kv_heads, S = a.proj_stride;
  const int64_t q_rows = a.batch * a.q_heads * a.q_len, k_rows = heads * a.k_len;
  const int64_t key_blocks = heads * l.blocks;
  const int64_t q_blocks = (a.q_len + kQueryRows - 1) / kQueryRows;
  const int64_t items = a.batch * a.q_heads * q_blocks;
  const SplitScale scale = SplitScaleFor(a.score_v, a.hidden);
  Packed pk;
  // Sized for all A units (the split form may drop some): pages never written are never
  // faulted in, and each thread faults in the blocks it packs.
  pk.kpt = hwy::AllocateAligned<float>(
      static_cast<size_t>(std::max<int64_t>(1, key_blocks * a.hidden * l.Bc)));
  // V is read in place when its rows are whole aligned vectors (Dv a multiple of
  // kAdditiveRowPad, as at the usual head widths), else copied with padded rows.
  const bool v_in_place = a.value_dim == l.Dvp &&
                          reinterpret_cast<uintptr_t>(a.v) % HWY_ALIGNMENT == 0;
  if (!v_in_place)
    pk.vp = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_rows * l.Dvp)));
  pk.vrows = v_in_place ? a.v : pk.vp.get();
  bool within = scale.limit >= 0.0f;
  // One parallel region for every pass: the range check, the key packing and the work items,
  // each split over the threads (run serially they idled the other core; see the top comment)
  // with no fork and join between them.
#pragma omp parallel if (items > 1 || key_blocks > 1)
  {
    FlushDenormals ftz;
    // 1. Whether the split form applies: every projection element within the limit.
    if (scale.limit >= 0.0f) {
#pragma omp for schedule(static) reduction(&& : within)
      for (int64_t r = 0; r < q_rows + k_rows; ++r) {
        const float* x = r < q_rows ? a.q_proj + r * S : a.k_proj + (r - q_rows) * S;
        within = within && WithinSplitLimit(x, S, scale.limit);
      }
    }
#pragma omp single
    SetScoreUnits(a, scale, within, pk);
    ForwardScratch scratch(a, l);
    // 2. The key operands per block (exponentiated here in the split form: no 2^Kp' copy) and
    // the padded values when V cannot be read in place.
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < key_blocks; ++blk)
      PackKeyBlock(a, l, pk, a.k_proj, pk.split, blk / l.blocks, blk % l.blocks,
                   scratch.row.get(), pk.kpt.get() + blk * pk.units * l.Bc);
    if (!v_in_place) {
#pragma omp for schedule(static) nowait
      for (int64_t j = 0; j < k_rows; ++j) {
        float* dst = pk.vp.get() + j * l.Dvp;
        std::copy_n(a.v + j * a.value_dim, a.value_dim, dst);
        std::fill(dst + a.value_dim, dst + l.Dvp, 0.0f);
      }
    }
#pragma omp barrier
    // 3. The work items. Last query blocks first: under a causal mask they see the most keys.
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

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_ADDITIVE_ATTENTION_FORWARD_INL_H_
