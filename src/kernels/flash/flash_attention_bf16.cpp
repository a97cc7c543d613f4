// bf16 fused attention forward on AVX512_BF16 (see flash_attention_bf16.h).
//
// Layout: unlike the float32 kernel (one query row per lane), here one KEY (for S) or one VALUE
// COLUMN (for O) per lane, because vdpbf16ps multiplies adjacent bf16 PAIRS and sums each pair
// into a float32 lane: the pair must run along the reduction dimension.
//   S = Q K^T reduces over the head dimension: a Q row's pair (q[2p], q[2p+1]) is one 32-bit word,
//     broadcast; K is packed per key/value head as Kp[key / 16][p][key % 16][2], so one 64-byte
//     load holds pair p of 16 keys.
//   O += P V reduces over keys: a P row's pair (P[j], P[j+1]) is one 32-bit word of the bf16 P
//     row, broadcast; V is packed as Vp[j / 2][column / 16][column % 16][2].
// Packing K and V costs one pass over them per call (O(Tk D), against O(Tq Tk D) products) and
// as much memory as K and V; rows and columns are zero padded (odd D, Dv not a multiple of 16,
// Tk not a multiple of the key block), and padded keys are masked like any invisible key.
//
// Work item: kItemRows query rows of one query head. Per key block (kKeyBlock keys: 16 KiB of
// K and of V at D = 128, kept in L1 while every 4-row group of the item uses them): S for all
// rows (register block 4 rows x 64 keys = 16 accumulators: per pair 4 loads and 4 broadcasts
// feed 16 vdpbf16ps), then the online softmax row by row (float32, exp2 of log2-scaled
// scores), then O += P V (register block 4 rows x 64 columns).
//
// Speed, measured on the 2-core Xeon (family 6 model 207, AVX512_BF16): a dependency-free
// stream of vdpbf16ps zmm retires one per ~2 cycles (32 MACs), against two vfmadd231ps zmm per
// cycle (2 x 16 MACs), so bf16 dot products peak at HALF the float32 FMA rate there. This
// kernel and the float32 one both reach ~80% of their instruction's peak (one thread, d = 64,
// N = 2048: 0.94 ns per vdpbf16ps against 0.76 peak; 0.23 ns per FMA against 0.18), so here the
// bf16 kernel takes ~2x the float32 kernel's time on the widened inputs (bench_flash
// BM_FlashForwardBf16). It pays off only where vdpbf16ps has full throughput; the memory saved
// by bf16 inputs holds on every CPU.
#include "kernels/flash/flash_attention_bf16.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <sstream>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/targets.h"
#include "kernels/common/bf16.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/common/fused_args.h"
#include "kernels/common/simd_common-inl.h"
#include "kernels/common/simd_target.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ATTN_HAVE_BF16_KERNEL 1
#define ATTN_BF16_TARGET \
  __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")))
#else
#define ATTN_HAVE_BF16_KERNEL 0
#endif

namespace attn::kernels {

namespace {

constexpr int64_t kItemRows = 64;   // query rows per work item (multiple of kMicroRows)
constexpr int64_t kKeyBlock = 64;   // keys per block = 4 vectors of 16 float32 scores
constexpr int64_t kMicroRows = 4;   // rows per register block
constexpr int64_t kLanes = 16;      // float32 lanes of a 512-bit vector
constexpr int64_t kKeyVecs = kKeyBlock / kLanes;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Sizes shared by the packing and the work items.
struct Geometry {
  int64_t pairs = 0;        // D rounded up to even, / 2
  int64_t dv_vecs = 0;      // Dv rounded up to 16, / 16
  int64_t keys_padded = 0;  // Tk rounded up to kKeyBlock
  int64_t k_head_elems = 0, v_head_elems = 0;  // packed bf16 elements per key/value head
};

Geometry geometry(const FlashBf16Args& a) {
  Geometry g;
  g.pairs = (a.head_dim + 1) / 2;
  g.dv_vecs = round_up(a.value_dim, kLanes) / kLanes;
  g.keys_padded = round_up(std::max<int64_t>(a.k_len, 1), kKeyBlock);
  g.k_head_elems = g.keys_padded * g.pairs * 2;
  g.v_head_elems = g.keys_padded * g.dv_vecs * kLanes;
  return g;
}

// Kp[key / 16][p][key % 16][2] of one key head (zero padded).
void pack_keys(const uint16_t* k, int64_t Tk, int64_t D, const Geometry& g, uint16_t* kp) {
  std::memset(kp, 0, static_cast<size_t>(g.k_head_elems) * sizeof(uint16_t));
  for (int64_t j = 0; j < Tk; ++j) {
    const uint16_t* row = k + j * D;
    uint16_t* dst = kp + ((j / kLanes) * g.pairs * kLanes + j % kLanes) * 2;
    for (int64_t d = 0; d < D; ++d) dst[(d / 2) * kLanes * 2 + d % 2] = row[d];
  }
}

// Vp[j / 2][c / 16][c % 16][2] of one value head (zero padded).
void pack_values(const uint16_t* v, int64_t Tk, int64_t Dv, const Geometry& g, uint16_t* vp) {
  std::memset(vp, 0, static_cast<size_t>(g.v_head_elems) * sizeof(uint16_t));
  for (int64_t j = 0; j < Tk; ++j) {
    const uint16_t* row = v + j * Dv;
    uint16_t* dst = vp + (j / 2) * g.dv_vecs * kLanes * 2 + j % 2;
    for (int64_t c = 0; c < Dv; ++c) dst[((c / kLanes) * kLanes + c % kLanes) * 2] = row[c];
  }
}

// Running softmax state of one row: max (log2 units) and two sums of the weights: of the bf16
// weights that multiply V (normalises out, so its weights sum to one) and of the float32 weights
// (gives lse to float32 accuracy, for the backward's P = exp(s - lse)).
struct RowState {
  float m = kNegInf;
  float l_rounded = 0.0f;
  float l_exact = 0.0f;
};

// Per-thread buffers of one work item.
struct Scratch {
  explicit Scratch(const Geometry& g)
      : q(hwy::AllocateAligned<uint16_t>(static_cast<size_t>(kItemRows * g.pairs * 2))),
        s(hwy::AllocateAligned<float>(static_cast<size_t>(kItemRows * kKeyBlock))),
        p(hwy::AllocateAligned<uint16_t>(static_cast<size_t>(kItemRows * kKeyBlock))),
        o(hwy::AllocateAligned<float>(static_cast<size_t>(kItemRows * g.dv_vecs * kLanes))),
        state(static_cast<size_t>(kItemRows)),
        rows(static_cast<size_t>(kItemRows)) {}
  hwy::AlignedFreeUniquePtr<uint16_t[]> q;  // [rows][2 * pairs] bf16, zero padded
  hwy::AlignedFreeUniquePtr<float[]> s;     // [rows][kKeyBlock] scores of the key block
  hwy::AlignedFreeUniquePtr<uint16_t[]> p;  // [rows][kKeyBlock] bf16 probabilities
  hwy::AlignedFreeUniquePtr<float[]> o;     // [rows][16 * dv_vecs] unnormalised output
  std::vector<RowState> state;              // online softmax per row
  std::vector<KeyInterval> rows;
};

// One work item's inputs.
struct Item {
  int64_t b = 0, h = 0, row0 = 0, rows = 0;
  const uint16_t* kp = nullptr;  // packed keys of the item's key/value head
  const uint16_t* vp = nullptr;
};

#if ATTN_HAVE_BF16_KERNEL

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip -Wmaybe-uninitialized
// once inlined (GCC bug 105593); the values are fully written by the instructions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 2^x for x <= 0 (log2-scaled scores minus the running max), float32: round x to n, a degree-7
// Taylor polynomial of 2^f on |f| <= 1/2 (truncation below 6e-9 relative, under float32's
// 6e-8) and scalef for 2^n. x < -126 (including -inf for masked keys) gives exactly 0.
ATTN_BF16_TARGET inline __m512 exp2_nonpositive(__m512 x) {
  const __mmask16 visible = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  // c_k = ln(2)^k / k!
  __m512 poly = _mm512_set1_ps(1.5252733804059841e-05f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.5403530393381609e-04f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.3333558146428443e-03f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.6181291076284772e-03f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.5504108664821580e-02f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.4022650695910071e-01f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.9314718055994531e-01f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(visible, _mm512_scalef_ps(poly, n));
}

ATTN_BF16_TARGET inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// The exact float32 values of 16 bf16 (a bf16 is the top half of a float32).
ATTN_BF16_TARGET inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// s[r][0..64) = q_r . k_j for 4 rows and the 64 keys of a block. q: pair words of row 0, rows
// `q_stride` words apart; kp: the block's first key vector, key vectors `pairs * 32` apart.
ATTN_BF16_TARGET void score_micro(const uint32_t* q, int64_t q_stride, const uint16_t* kp,
                                  int64_t pairs, float* s) {
  __m512 acc[kMicroRows][kKeyVecs];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  const int64_t vec_stride = pairs * kLanes * 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh kv[kKeyVecs];
    for (int64_t v = 0; v < kKeyVecs; ++v)
      kv[v] = as_bh(_mm512_load_si512(kp + v * vec_stride + p * kLanes * 2));
    for (int64_t r = 0; r < kMicroRows; ++r) {
      const __m512bh qb = as_bh(_mm512_set1_epi32(static_cast<int>(q[r * q_stride + p])));
      for (int64_t v = 0; v < kKeyVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qb, kv[v]);
    }
  }
  for (int64_t r = 0; r < kMicroRows; ++r)
    for (int64_t v = 0; v < kKeyVecs; ++v)
      _mm512_store_ps(s + r * kKeyBlock + v * kLanes, acc[r][v]);
}

// o[r][16 * cv0 ..) += P_r V for 4 rows and kCols column vectors. p: pair words of row 0 (rows
// kKeyBlock / 2 words apart); vp: the block's first key pair at column vector cv0, key pairs
// `dv_vecs * 32` apart; o rows `o_stride` floats apart.
template <int kCols>
ATTN_BF16_TARGET void value_micro(const uint32_t* p, int64_t key_pairs, const uint16_t* vp,
                                  int64_t dv_vecs, float* o, int64_t o_stride) {
  __m512 acc[kMicroRows][kCols];
  for (int64_t r = 0; r < kMicroRows; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_load_ps(o + r * o_stride + c * kLanes);
  const int64_t pair_stride = dv_vecs * kLanes * 2;
  for (int64_t j = 0; j < key_pairs; ++j) {
    __m512bh vv[kCols];
    for (int c = 0; c < kCols; ++c)
      vv[c] = as_bh(_mm512_load_si512(vp + j * pair_stride + c * kLanes * 2));
    for (int64_t r = 0; r < kMicroRows; ++r) {
      const __m512bh pb =
          as_bh(_mm512_set1_epi32(static_cast<int>(p[r * (kKeyBlock / 2) + j])));
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
    }
  }
  for (int64_t r = 0; r < kMicroRows; ++r)
    for (int c = 0; c < kCols; ++c) _mm512_store_ps(o + r * o_stride + c * kLanes, acc[r][c]);
}

// Online softmax of row r for one key block [jb, jb + kKeyBlock): masks keys outside the row's
// interval, updates the running max and sum, rescales the row's output accumulator, and writes
// the bf16 probabilities (0 for invisible keys).
ATTN_BF16_TARGET void softmax_row(const float* s, const KeyInterval& iv, int64_t jb, float scale2,
                                  RowState& st, float* o, int64_t o_len, uint16_t* p) {
  if (iv.hi <= jb || iv.lo >= jb + kKeyBlock || iv.lo >= iv.hi) {
    std::memset(p, 0, kKeyBlock * sizeof(uint16_t));
    return;
  }
  const bool partial = iv.lo > jb || iv.hi < jb + kKeyBlock;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 x[kKeyVecs];
  __m512 block_max = _mm512_set1_ps(kNegInf);
  for (int64_t v = 0; v < kKeyVecs; ++v) {
    x[v] = _mm512_mul_ps(_mm512_load_ps(s + v * kLanes), _mm512_set1_ps(scale2));
    if (partial) {
      const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(jb + v * kLanes)));
      const __mmask16 in = _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(iv.lo))) &
                           _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(iv.hi)));
      x[v] = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), in, x[v]);
    }
    block_max = _mm512_max_ps(block_max, x[v]);
  }
  const float m_new = std::max(st.m, _mm512_reduce_max_ps(block_max));  // finite: a key is visible
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum_rounded = _mm512_setzero_ps(), sum_exact = _mm512_setzero_ps();
  for (int64_t v = 0; v < kKeyVecs; ++v) {
    const __m512 pf = exp2_nonpositive(_mm512_sub_ps(x[v], mv));
    const __m256i pb = (__m256i)_mm512_cvtneps_pbh(pf);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + v * kLanes), pb);
    sum_rounded = _mm512_add_ps(sum_rounded, widen(pb));
    sum_exact = _mm512_add_ps(sum_exact, pf);
  }
  const float alpha = std::exp2(st.m - m_new);  // 0 on the first visible block (m = -inf)
  if (alpha != 1.0f) {
    const __m512 av = _mm512_set1_ps(alpha);
    for (int64_t c = 0; c < o_len; c += kLanes)
      _mm512_store_ps(o + c, _mm512_mul_ps(_mm512_load_ps(o + c), av));
  }
  st.l_rounded = st.l_rounded * alpha + _mm512_reduce_add_ps(sum_rounded);
  st.l_exact = st.l_exact * alpha + _mm512_reduce_add_ps(sum_exact);
  st.m = m_new;
}

ATTN_BF16_TARGET void run_item(const FlashBf16Args& a, const Geometry& g, const Item& it,
                               Scratch& sc) {
  const int64_t D = a.head_dim, Dv = a.value_dim;
  const int64_t q_words = g.pairs;             // 32-bit pair words per staged Q row
  const int64_t o_len = g.dv_vecs * kLanes;    // floats per accumulator row
  const int64_t micro_groups = (it.rows + kMicroRows - 1) / kMicroRows;
  const int64_t rows_padded = micro_groups * kMicroRows;

  // Stage the item's Q rows as bf16 with an even width (zero pair for odd D, zero rows past
  // the item), and find each row's key interval.
  std::memset(sc.q.get(), 0, static_cast<size_t>(rows_padded * q_words * 2) * sizeof(uint16_t));
  const uint16_t* q_head = a.q + ((it.b * a.q_heads + it.h) * a.q_len) * D;
  int64_t key_lo = a.k_len, key_hi = 0;
  for (int64_t r = 0; r < rows_padded; ++r) {
    KeyInterval iv{};
    if (r < it.rows) {
      std::memcpy(sc.q.get() + r * q_words * 2, q_head + (it.row0 + r) * D,
                  static_cast<size_t>(D) * sizeof(uint16_t));
      iv = RowInterval(a, it.b, it.row0 + r);
    }
    if (iv.lo >= iv.hi) iv = {0, 0, 0};
    else key_lo = std::min(key_lo, iv.lo), key_hi = std::max(key_hi, iv.hi);
    sc.rows[static_cast<size_t>(r)] = iv;
    sc.state[static_cast<size_t>(r)] = RowState{};
  }
  std::memset(sc.o.get(), 0, static_cast<size_t>(rows_padded * o_len) * sizeof(float));
  const float scale2 = a.scale * kLog2e;  // softmax on exp2
  const auto* q32 = reinterpret_cast<const uint32_t*>(sc.q.get());
  const auto* p32 = reinterpret_cast<const uint32_t*>(sc.p.get());

  for (int64_t jb = key_lo / kKeyBlock * kKeyBlock; jb < key_hi; jb += kKeyBlock) {
    const uint16_t* kp = it.kp + (jb / kLanes) * g.pairs * kLanes * 2;
    for (int64_t r = 0; r < rows_padded; r += kMicroRows)
      score_micro(q32 + r * q_words, q_words, kp, g.pairs, sc.s.get() + r * kKeyBlock);
    for (int64_t r = 0; r < rows_padded; ++r)
      softmax_row(sc.s.get() + r * kKeyBlock, sc.rows[static_cast<size_t>(r)], jb, scale2,
                  sc.state[static_cast<size_t>(r)], sc.o.get() + r * o_len, o_len,
                  sc.p.get() + r * kKeyBlock);
    // Keys past Tk are zero in Vp and have P = 0; a block never extends past keys_padded.
    const uint16_t* vp = it.vp + (jb / 2) * g.dv_vecs * kLanes * 2;
    for (int64_t r = 0; r < rows_padded; r += kMicroRows) {
      const uint32_t* pr = p32 + r * (kKeyBlock / 2);
      float* orow = sc.o.get() + r * o_len;
      int64_t cv = 0;
      for (; cv + 4 <= g.dv_vecs; cv += 4)
        value_micro<4>(pr, kKeyBlock / 2, vp + cv * kLanes * 2, g.dv_vecs, orow + cv * kLanes, o_len);
      switch (g.dv_vecs - cv) {
        case 3: value_micro<3>(pr, kKeyBlock / 2, vp + cv * kLanes * 2, g.dv_vecs, orow + cv * kLanes, o_len); break;
        case 2: value_micro<2>(pr, kKeyBlock / 2, vp + cv * kLanes * 2, g.dv_vecs, orow + cv * kLanes, o_len); break;
        case 1: value_micro<1>(pr, kKeyBlock / 2, vp + cv * kLanes * 2, g.dv_vecs, orow + cv * kLanes, o_len); break;
        default: break;
      }
    }
  }

  // Normalise; rows that saw no key keep out = 0 and lse = -inf.
  const int64_t out_row0 = (it.b * a.q_heads + it.h) * a.q_len + it.row0;
  for (int64_t r = 0; r < it.rows; ++r) {
    const RowState& st = sc.state[static_cast<size_t>(r)];
    float* out = a.out + (out_row0 + r) * Dv;
    const float* o = sc.o.get() + r * o_len;
    const float inv = st.l_rounded > 0.0f ? 1.0f / st.l_rounded : 0.0f;
    for (int64_t c = 0; c < Dv; ++c) out[c] = o[c] * inv;
    if (a.lse)
      a.lse[out_row0 + r] = st.l_exact > 0.0f
                                ? static_cast<float>(st.m * kLn2 + std::log(st.l_exact))
                                : kNegInf;
  }
}

#pragma GCC diagnostic pop

#endif  // ATTN_HAVE_BF16_KERNEL

bool cpu_has_bf16_dot() {
#if ATTN_HAVE_BF16_KERNEL
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool flash_attention_bf16_available() {
  if (!cpu_has_bf16_dot()) return false;
  apply_simd_target_from_env();
  // The cap (ATTN_SIMD_TARGET or a test's ScopedSimdTarget) shows in Highway's supported set.
  return (hwy::SupportedTargets() & (HWY_AVX3 | HWY_AVX3_DL)) != 0;
}

namespace {

// The measurement behind the default (flash_attention_bf16.h): one head, Tq = Tk = 512,
// D = Dv = 64, one thread, each way timed alternately kTrials times after a warm-up, best call
// of each. Under 1 ms per call: about 10 ms once per process.
Bf16KernelChoice measure_bf16_kernels() {
  constexpr int64_t T = 512, D = 64;
  constexpr int kTrials = 5;
  const detail::AttentionDims dims{.B = 1, .Hq = 1, .Hkv = 1, .Tq = T, .Tk = T,
                                   .Dq = D, .Dk = D, .Dv = D};
  const auto input = [&](uint32_t seed) {  // values in [-1, 1), bf16
    Tensor t = Tensor::empty({1, 1, T, D}, DType::bf16);
    auto* bits = static_cast<uint16_t*>(t.raw_data());
    uint32_t x = seed;
    for (int64_t i = 0; i < T * D; ++i) {
      x = x * 1664525u + 1013904223u;
      bits[i] = float_to_bf16(static_cast<float>(x >> 8) * 0x1p-23f - 1.0f);
    }
    return t;
  };
  const Tensor q = input(1), k = input(2), v = input(3);
  AttentionParams params;
  params.score = ScaledDotScore{};
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto seconds = [](auto&& run) {
    const auto start = std::chrono::steady_clock::now();
    run();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const auto dot = [&] { (void)flash_attention_bf16(dims, q, k, v, params); };
  const auto widen = [&] {
    (void)flash_attention(dims, q.to(DType::f32), k.to(DType::f32), v.to(DType::f32), params);
  };
  dot();
  widen();
  double best_dot = 1e30, best_widen = 1e30;
  for (int i = 0; i < kTrials; ++i) {
    best_dot = std::min(best_dot, seconds(dot));
    best_widen = std::min(best_widen, seconds(widen));
  }
  omp_set_num_threads(threads);
  Bf16KernelChoice c;
  c.time_ratio = best_dot / best_widen;
  c.dot = c.time_ratio < kBf16DotThreshold;
  std::ostringstream by;
  by << "measured: dot kernel " << std::fixed << std::setprecision(2) << c.time_ratio
     << "x the time of widening";
  c.by = by.str();
  return c;
}

}  // namespace

Bf16KernelChoice bf16_kernel_choice() {
  if (const char* value = std::getenv("ATTN_BF16_KERNEL"); value != nullptr && *value != '\0') {
    const std::string choice(value);
    ATTN_CHECK(choice == "dot" || choice == "widen", "attention",
               "ATTN_BF16_KERNEL must be \"dot\" or \"widen\", got \"", choice, "\"");
    return {choice == "dot", 0.0, "ATTN_BF16_KERNEL"};
  }
  if (!cpu_has_bf16_dot()) return {false, 0.0, "CPU without AVX512_BF16"};
  if (!flash_attention_bf16_available()) return {false, 0.0, "SIMD target capped below AVX3"};
  static const Bf16KernelChoice measured = measure_bf16_kernels();  // once per process
  return measured;
}

bool bf16_dot_kernel_requested() { return bf16_kernel_choice().dot; }

bool flash_attention_bf16_supported(const AttentionParams& params) {
  const bool dot_family = std::holds_alternative<DotScore>(params.score) ||
                          std::holds_alternative<ScaledDotScore>(params.score);
  const Mask& m = params.mask;
  return dot_family && params.head_scores.empty() && !m.bias.defined() && !m.allowed.defined() &&
         m.alibi_slopes.empty() && m.local.kind == LocalKind::none && params.dropout.p == 0.0 &&
         !params.return_weights && bf16_dot_kernel_requested() && flash_attention_bf16_available();
}

void flash_attention_bf16_forward(const FlashBf16Args& a) {
#if ATTN_HAVE_BF16_KERNEL
  ATTN_CHECK(cpu_has_bf16_dot(), "attention", "bf16 kernel called on a CPU without AVX512_BF16");
  const Geometry g = geometry(a);
  const int64_t kv_heads_total = a.batch * a.kv_heads;
  // Packed K and V of every key/value head (64-byte aligned rows for the vector loads).
  auto kp = hwy::AllocateAligned<uint16_t>(static_cast<size_t>(kv_heads_total * g.k_head_elems));
  auto vp = hwy::AllocateAligned<uint16_t>(static_cast<size_t>(kv_heads_total * g.v_head_elems));
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < kv_heads_total; ++bh) {
    pack_keys(a.k + bh * a.k_len * a.head_dim, a.k_len, a.head_dim, g, kp.get() + bh * g.k_head_elems);
    pack_values(a.v + bh * a.k_len * a.value_dim, a.k_len, a.value_dim, g,
                vp.get() + bh * g.v_head_elems);
  }
  const int64_t blocks = (a.q_len + kItemRows - 1) / kItemRows;
  const int64_t items = a.batch * a.q_heads * blocks;
  const int64_t group = a.q_heads / a.kv_heads;
#pragma omp parallel
  {
    FlushDenormals ftz;
    Scratch sc(g);
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < items; ++i) {
      Item it;
      it.b = i / (a.q_heads * blocks);
      it.h = (i / blocks) % a.q_heads;
      it.row0 = (i % blocks) * kItemRows;
      it.rows = std::min(kItemRows, a.q_len - it.row0);
      const int64_t kvh = it.b * a.kv_heads + it.h / group;
      it.kp = kp.get() + kvh * g.k_head_elems;
      it.vp = vp.get() + kvh * g.v_head_elems;
      run_item(a, g, it, sc);
    }
  }
#else
  (void)a;
  ATTN_CHECK(false, "attention", "bf16 kernel not compiled for this architecture");
#endif
}

AttentionOutput flash_attention_bf16(const detail::AttentionDims& dims, const Tensor& q,
                                     const Tensor& k, const Tensor& v,
                                     const AttentionParams& params) {
  AttentionOutput result;
  result.out = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Dv}, DType::f32);
  result.lse = Tensor::empty({dims.B, dims.Hq, dims.Tq}, DType::f32);
  if (result.out.numel() == 0 && result.lse.numel() == 0) return result;
  FlashBf16Args a;
  a.q = reinterpret_cast<const uint16_t*>(q.raw_data());
  a.k = reinterpret_cast<const uint16_t*>(k.raw_data());
  a.v = reinterpret_cast<const uint16_t*>(v.raw_data());
  a.out = result.out.data<float>();
  a.lse = result.lse.data<float>();
  fill_interval_masks(a, dims, params.mask);
  a.scale = dot_scale(params.score, dims);
  flash_attention_bf16_forward(a);
  return result;
}

}  // namespace attn::kernels
