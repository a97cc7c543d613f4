// Backward of the fused additive / concat attention (see additive_attention.h), per Highway
// target; included by additive_attention.cpp through foreach_target.h after the shared part.
// FlashAttention-2 style: P recomputed from lse per key block; work items are key blocks, so
// dKp and dV rows have one writer and dQp goes to per-thread partials.

#if defined(ATTN_KERNELS_ADDITIVE_ATTENTION_BACKWARD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_ADDITIVE_ATTENTION_BACKWARD_INL_H_
#undef ATTN_KERNELS_ADDITIVE_ATTENTION_BACKWARD_INL_H_
#else
#define ATTN_KERNELS_ADDITIVE_ATTENTION_BACKWARD_INL_H_
#endif

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "kernels/additive/additive_attention-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace additive {

// dst = 2^src over `rows` rows of `stride` floats (a multiple of the vector length).
inline void Exp2Rows(const float* src, float* dst, int64_t rows, int64_t stride) {
#pragma omp parallel for schedule(static) if (rows * stride > 65536)
  for (int64_t r = 0; r < rows; ++r) Exp2Row(DF(), src + r * stride, dst + r * stride, stride);
}

// The backward's operands (Packed): besides the score loop's, the unfolded 2^Qp', 2^Kp' rows
// of the gradient loop (split form) and V transposed per key block.
inline Packed PackBackwardOperands(const AdditiveAttentionArgs& a, const Layout& l) {
  const int64_t heads = a.batch * a.kv_heads, S = a.proj_stride;
  const int64_t q_rows = a.batch * a.q_heads * a.q_len, k_rows = heads * a.k_len;
  Packed p;
  const SplitScale scale = SplitScaleFor(a.score_v, a.hidden);
  SetScoreUnits(a, scale,
                scale.limit >= 0.0f && WithinSplitLimit(a.q_proj, q_rows * S, scale.limit) &&
                    WithinSplitLimit(a.k_proj, k_rows * S, scale.limit),
                p);
  const int64_t U = p.units;
  p.qsrc = a.q_proj, p.ksrc = a.k_proj;
  if (p.split) {
    p.eq = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * S)));
    p.ek = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_rows * S)));
    Exp2Rows(a.q_proj, p.eq.get(), q_rows, S);
    Exp2Rows(a.k_proj, p.ek.get(), k_rows, S);
    p.qsrc = p.eq.get(), p.ksrc = p.ek.get();
  }
  p.qscore = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * U)));
#pragma omp parallel for schedule(static) if (q_rows * U > 65536)
  for (int64_t row = 0; row < q_rows; ++row)
    FoldQueryRow(p, p.qsrc + row * S, false, S, nullptr, p.qscore.get() + row * U);

  p.kpt = hwy::AllocateAligned<float>(
      static_cast<size_t>(std::max<int64_t>(1, heads * l.blocks * U * l.Bc)));
  p.vt = hwy::AllocateAligned<float>(
      static_cast<size_t>(std::max<int64_t>(1, heads * l.blocks * l.Dvp * l.Bc)));
#pragma omp parallel for schedule(static) if (heads > 1)
  for (int64_t hk = 0; hk < heads; ++hk) {
    for (int64_t kb = 0; kb < l.blocks; ++kb) {
      PackKeyBlock(a, l, p, p.ksrc, false, hk, kb, nullptr,
                   p.kpt.get() + (hk * l.blocks + kb) * U * l.Bc);
      float* vt = p.vt.get() + (hk * l.blocks + kb) * l.Dvp * l.Bc;
      for (int64_t c = 0; c < l.Dvp; ++c)
        for (int64_t jj = 0; jj < l.Bc; ++jj) {
          const int64_t j = kb * l.Bc + jj;
          vt[c * l.Bc + jj] =
              j < a.k_len && c < a.value_dim ? a.v[(hk * a.k_len + j) * a.value_dim + c] : 0.0f;
        }
    }
  }
  return p;
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
    for (size_t n = 0; n < NV; ++n) {
      k[n] = hn::Load(df, kj + n * N);
      dk[n] = hn::Load(df, dkj + n * N);
    }
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
      const auto grads = [&](auto rows) {
        RowsProjectionGrads<decltype(rows)::value, kSplit>(df, qx, kp, S, in.v4, dsx, glo, ghi,
                                                           dkp, dqx, dva);
      };
      switch (R) {
        case 1: grads(std::integral_constant<size_t, 1>{}); break;
        case 2: grads(std::integral_constant<size_t, 2>{}); break;
        case 3: grads(std::integral_constant<size_t, 3>{}); break;
        default: grads(std::integral_constant<size_t, kGradRows>{});
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
      const Log2Shift shift = ToLog2Shift(lse);
      const VF shift_hi = hn::Set(df, shift.hi), shift_lo = hn::Set(df, shift.lo);
      for (size_t n = 0; n < v0; ++n) hn::Store(hn::Zero(df), df, p + n * N);
      for (size_t n = v0; n < v1; ++n) {
        const VF x = hn::Sub(hn::Sub(hn::Load(df, p + n * N), shift_hi), shift_lo);
        hn::Store(Exp2Clamped(df, x), df, p + n * N);
      }
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
  const Packed pk = PackBackwardOperands(a, l);
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
  for (int64_t e = 0; e < S; ++e)
    v4[static_cast<size_t>(e)] = e < a.hidden ? 4.0f * a.score_v[e] : 0.0f;
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
  const auto dv_sum = [&](int t, int64_t e) {
    return dv_partials[static_cast<size_t>(t)][static_cast<size_t>(e)];
  };
  for (int64_t e = 0; e < a.hidden; ++e) {
    double total = 0.0;
    for (int t = 0; t < used_threads; ++t)
      total += ds_sums[static_cast<size_t>(t)] -
               2.0 * static_cast<double>(dv_sum(t, e));
    g.d_score_v[e] = static_cast<float>(total);
  }
}

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_ADDITIVE_ATTENTION_BACKWARD_INL_H_
