// Decode attention (src/kernels/decode/decode_attention.*) against the float64 oracle
// attn::reference::attention, on every Highway target this machine supports (the test name
// carries the target). Sweeps key lengths 0..4099, odd head dims, grouped-query heads, Tq in
// {1, 2, 5, 16}, per-batch key/query lengths, causal masks (bottom-right: the new queries are the
// last positions), windows, fully masked rows, float32 and bf16 caches read in place through
// capacity strides, NaN inputs and bitwise determinism, and many (batch, kv head) pairs over
// short caches (Tk 1..129: the one-split path whose items finish their own rows). ALiBi slopes
// and additive biases (shapes [Tk], [B, 1, 1, Tk], [B, Hq, Tq, Tk], [Hq, 1, 1], read in place
// through broadcast strides), rows masked by a -inf bias, and attention() routing such calls to
// the decode kernel.
//
// Tolerance (forward error analysis, as in test_flash_attention): a score carries an absolute
// error ~ u (sqrt(D) + |s|); the output moves by <= 2 max|ds| max|v|, and the sums over Tk keys
// and D features add ~ u sqrt(D + Tk). That is the error of a plain float32 implementation. The
// bf16 cache is compared against the float64 reference on the bf16-rounded K and V, within twice
// that bound: rounding the cache is the caller's choice, the kernel must add no more than a
// plain float32 implementation would on the same rounded inputs. With ALiBi the |s| of that
// bound only counts keys that carry weight: see alibi_score_bound in
// tests/support/decode_kernel_checks.h.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/decode/decode_attention.h"
#include "kernels/common/fused_args.h"
#include "kernels/common/simd_target.h"
#include "support/bitwise_equal.h"
#include "support/decode_kernel_checks.h"
#include "support/simd_targets.h"
#include "support/test_support.h"

// GCC 12 warns about members left to their default initialisers in designated initialisers
// (GCC bug 96868); every member of Case below has a default.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace {

using attn::DType;
using attn::Shape;
using attn::Tensor;
using attn::kernels::DecodeAttentionArgs;
using attn::kernels::KvType;

constexpr int64_t kUnbounded = attn::Window::unbounded;

struct Case {
  int64_t B = 1, Hq = 8, Hkv = 2, Tq = 1, Tk = 0, D = 64, Dv = 0;  // Dv 0: = D
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = true;
  int64_t left = kUnbounded, right = kUnbounded;
  KvType kv = KvType::f32;
  int64_t extra_capacity = 0;  // cache rows beyond Tk (filled with NaN: must never be read)
  int64_t row_padding = 0;     // elements between cache rows (NaN too)
  uint64_t seed = 1;
  Shape bias_shape;    // empty: no bias; else uniform in [-1, 1), right-aligned broadcast
  bool alibi = false;  // the standard slopes attn::alibi_slopes(Hq)

  int64_t dv() const { return Dv == 0 ? D : Dv; }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(D)); }
  std::string str() const {
    std::string s = "B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) +
                    " Hkv=" + std::to_string(Hkv) + " Tq=" + std::to_string(Tq) +
                    " Tk=" + std::to_string(Tk) + " D=" + std::to_string(D) +
                    " Dv=" + std::to_string(dv());
    s += kv == KvType::bf16 ? " bf16" : " f32";
    s += attn::testing::interval_masks_str(*this);
    if (extra_capacity || row_padding)
      s += " capacity+" + std::to_string(extra_capacity) + " row_pad=" +
           std::to_string(row_padding);
    if (!bias_shape.empty()) s += " bias" + attn::shape_str(bias_shape);
    if (alibi) s += " alibi";
    return s;
  }
};

// A KV cache of capacity Tk + extra_capacity rows per head, rows of D + row_padding elements,
// holding the first Tk rows of a dense [B, Hkv, Tk, D] tensor; everything else is NaN.
struct Cache {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  attn::kernels::KvView view;
};

Cache make_cache(const Case& c, const Tensor& dense, int64_t width) {
  const int64_t row = width + c.row_padding, capacity = c.Tk + c.extra_capacity;
  const size_t n = static_cast<size_t>(std::max<int64_t>(1, c.B * c.Hkv * capacity * row));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Cache cache;
  std::vector<float> values(n, nan);
  const float* src = dense.data<float>();
  for (int64_t bh = 0; bh < c.B * c.Hkv; ++bh)
    for (int64_t t = 0; t < c.Tk; ++t)
      std::memcpy(&values[static_cast<size_t>((bh * capacity + t) * row)],
                  src + (bh * c.Tk + t) * width, static_cast<size_t>(width) * sizeof(float));
  if (c.kv == KvType::bf16) {
    cache.bf16.resize(n);
    attn::kernels::float_to_bf16(values.data(), cache.bf16.data(), n);
    cache.view.data = cache.bf16.data();
  } else {
    cache.f32 = std::move(values);
    cache.view.data = cache.f32.data();
  }
  cache.view.stride_b = c.Hkv * capacity * row;
  cache.view.stride_h = capacity * row;
  cache.view.stride_t = row;
  return cache;
}

// The dense tensor as the kernel sees it: rounded to bf16 for a bf16 cache.
Tensor as_stored(const Case& c, const Tensor& dense) {
  if (c.kv == KvType::f32) return dense;
  Tensor rounded = dense.clone();
  float* p = rounded.data<float>();
  for (int64_t i = 0; i < rounded.numel(); ++i)
    p[i] = attn::kernels::bf16_to_float(attn::kernels::float_to_bf16(p[i]));
  return rounded;
}

struct Inputs {
  Tensor q, k, v;  // dense float32; k and v as stored (bf16-rounded for a bf16 cache)
  Cache kc, vc;
  Tensor bias;                // float32 of c.bias_shape, or undefined
  std::vector<double> slopes;  // ALiBi slopes (powers of two for Hq = 8: exact in float32)
};

Inputs make_inputs(const Case& c) {
  Inputs in;
  in.q = attn::testing::random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, c.seed);
  const Tensor k = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, c.seed + 1);
  const Tensor v =
      attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.dv()}, DType::f32, c.seed + 2);
  in.kc = make_cache(c, k, c.D);
  in.vc = make_cache(c, v, c.dv());
  in.k = as_stored(c, k);
  in.v = as_stored(c, v);
  if (!c.bias_shape.empty())
    in.bias = attn::testing::random_tensor(c.bias_shape, DType::f32, c.seed + 3);
  if (c.alibi) in.slopes = attn::alibi_slopes(c.Hq);
  return in;
}

struct Result {
  Tensor out, lse;
};

// The problem's dims, for the bias's broadcast strides.
attn::detail::AttentionDims dims_of(const Case& c) {
  return {.B = c.B, .Hq = c.Hq, .Hkv = c.Hkv, .Tq = c.Tq, .Tk = c.Tk, .Dq = c.D, .Dk = c.D,
          .Dv = c.dv()};
}

Result run_kernel(const Case& c, const Inputs& in) {
  Result r;
  r.out = Tensor::full({c.B, c.Hq, c.Tq, c.dv()}, 12345.0, DType::f32);  // poison: all written?
  r.lse = Tensor::full({c.B, c.Hq, c.Tq}, 12345.0, DType::f32);
  DecodeAttentionArgs a;
  a.q = in.q.data<float>();
  a.k = in.kc.view;
  a.v = in.vc.view;
  a.kv_type = c.kv;
  a.out = r.out.data<float>();
  a.lse = r.lse.data<float>();
  attn::testing::set_kernel_problem(c, a);
  a.scale = static_cast<float>(c.scale());
  if (in.bias.defined()) a.bias = attn::kernels::broadcast_bias(in.bias, dims_of(c));
  const std::vector<float> slopes(in.slopes.begin(), in.slopes.end());
  if (!slopes.empty()) a.alibi_slopes = slopes.data();
  attn::kernels::decode_attention_forward(a);
  return r;
}

attn::AttentionParams params_of(const Case& c, const Inputs& in) {
  attn::AttentionParams p;
  p.score = attn::ScaledDotScore{c.scale()};
  attn::testing::set_interval_masks(c, p.mask);
  p.mask.bias = in.bias;
  p.mask.alibi_slopes = in.slopes;
  return p;
}

Result run_reference(const Case& c, const Inputs& in) {
  const attn::AttentionOutput ref =
      attn::reference::attention(in.q, in.k, in.v, params_of(c, in));
  return {ref.out, ref.lse};
}

attn::testing::Tolerance tolerance(const Case& c) { return attn::testing::decode_tolerance(c); }

// Out and lse within tolerance; fully masked rows exactly 0 and -inf.
void expect_matches(const Case& c, const Result& got, const Result& want) {
  const auto tol = tolerance(c);
  EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tol, "out"));
  EXPECT_TRUE(attn::testing::all_close(got.lse, want.lse, tol, "lse"));
  const float* out = got.out.data<float>();
  const float* lse = got.lse.data<float>();
  const double* ref_lse = want.lse.data<double>();
  for (int64_t row = 0; row < c.B * c.Hq * c.Tq; ++row) {
    if (!(std::isinf(ref_lse[row]) && ref_lse[row] < 0)) continue;
    ASSERT_TRUE(std::isinf(lse[row]) && lse[row] < 0) << "fully masked row " << row;
    for (int64_t e = 0; e < c.dv(); ++e)
      ASSERT_EQ(out[row * c.dv() + e], 0.0f) << "fully masked row " << row << " column " << e;
  }
}

class DecodeAttentionTest
    : public attn::testing::EveryTargetTest<attn::kernels::decode_attention_target_name> {
 protected:
  // Runs one case (float32 and bf16 cache) on the forced target against the oracle.
  void check(Case c) {
    for (KvType kv : {KvType::f32, KvType::bf16}) {
      c.kv = kv;
      SCOPED_TRACE(target_label() + ": " + c.str());
      const Inputs in = make_inputs(c);
      expect_matches(c, run_kernel(c, in), run_reference(c, in));
    }
  }
};

const int64_t kKeyLens[] = {0, 1, 2, 3, 127, 128, 129, 513, 4099};
const int64_t kDims[] = {1, 3, 59, 64, 128};
const int64_t kQueryLens[] = {1, 2, 5, 16};

TEST_P(DecodeAttentionTest, SizeSweep) {
  const std::pair<int64_t, int64_t> heads[] = {{8, 2}, {8, 1}, {4, 4}};
  int n = 0;
  for (int64_t tk : kKeyLens)
    for (int64_t d : kDims) {
      const auto [hq, hkv] = heads[n % 3];
      const int64_t tq = kQueryLens[n % 4];
      ++n;
      // The float64 oracle costs Hq Tq Tk (D + Dv): keep the largest products at small D.
      if (tk > 513 && tq * d > 5 * 64) continue;
      check({.Hq = hq, .Hkv = hkv, .Tq = tq, .Tk = tk, .D = d,
             .seed = static_cast<uint64_t>(n)});
    }
  check({.Tq = 1, .Tk = 4099, .D = 128, .seed = 77});
}

TEST_P(DecodeAttentionTest, ValueWidthDiffers) {
  for (int64_t dv : {1, 5, 31, 130})
    check({.Hq = 4, .Hkv = 2, .Tq = 2, .Tk = 300, .D = 64, .Dv = dv});
}

TEST_P(DecodeAttentionTest, GroupedQueryHeadsCausal) {
  const std::pair<int64_t, int64_t> heads[] = {{8, 1}, {8, 2}, {4, 4}};
  for (auto [hq, hkv] : heads)
    for (int64_t tq : kQueryLens)
      check({.B = 2, .Hq = hq, .Hkv = hkv, .Tq = tq, .Tk = 1030, .D = 64, .causal = true,
             .seed = static_cast<uint64_t>(hq * 100 + hkv * 10 + tq)});
}

TEST_P(DecodeAttentionTest, LengthsWindowsAlignment) {
  for (bool causal : {false, true})
    for (bool bottom_right : {false, true}) {
      check({.B = 4, .Hq = 4, .Hkv = 2, .Tq = 5, .Tk = 1100, .D = 59,
             .key_lengths = {1100, 1, 600, 0}, .causal = causal, .bottom_right = bottom_right});
      check({.B = 3, .Hq = 4, .Hkv = 1, .Tq = 16, .Tk = 700, .D = 32,
             .key_lengths = {700, 300, 5}, .query_lengths = {16, 3, 0}, .causal = causal,
             .bottom_right = bottom_right, .left = 200});
      check({.Hq = 2, .Hkv = 2, .Tq = 2, .Tk = 2000, .D = 16, .causal = causal,
             .bottom_right = bottom_right, .left = 1500, .right = 3});
    }
}

TEST_P(DecodeAttentionTest, FullyMaskedRows) {
  // Bottom-right with Tq > key length: the first rows see no key at all.
  check({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 16, .Tk = 600, .D = 64, .key_lengths = {600, 7},
         .causal = true});
  // A window entirely before the keys of late rows (top-left positions beyond key_len).
  check({.Hq = 2, .Hkv = 1, .Tq = 5, .Tk = 3, .D = 8, .bottom_right = false, .left = 0,
         .right = 0});
  // No keys at all.
  check({.B = 2, .Hq = 2, .Hkv = 1, .Tq = 2, .Tk = 1000, .D = 8, .key_lengths = {0, 0}});
}

TEST_P(DecodeAttentionTest, CacheReadInPlaceWithCapacityStrides) {
  // Capacity beyond the length and rows padded by an odd count (misaligned rows): the slack
  // holds NaN, so reading a single element of it would poison the output.
  for (int64_t d : {3, 64, 128})
    check({.B = 2, .Hq = 8, .Hkv = 2, .Tq = 2, .Tk = 1029, .D = d, .key_lengths = {1029, 517},
           .causal = true, .extra_capacity = 333, .row_padding = 3});
}

TEST_P(DecodeAttentionTest, NanStaysInItsRow) {
  for (KvType kv : {KvType::f32, KvType::bf16}) {
    const Case c{.B = 1, .Hq = 4, .Hkv = 1, .Tq = 2, .Tk = 1500, .D = 16, .kv = kv};
    SCOPED_TRACE(c.str());
    Inputs in = make_inputs(c);
    const int64_t bad_row = 5;  // head 2, query 1
    in.q.data<float>()[bad_row * c.D + 3] = std::numeric_limits<float>::quiet_NaN();
    const Result got = run_kernel(c, in);
    const float* out = got.out.data<float>();
    for (int64_t row = 0; row < c.Hq * c.Tq; ++row)
      for (int64_t e = 0; e < c.dv(); ++e)
        EXPECT_EQ(std::isnan(out[row * c.dv() + e]), row == bad_row) << row << " " << e;
    EXPECT_TRUE(std::isnan(got.lse.data<float>()[bad_row]));
  }
}

// The kernel's bits on all threads, again, and on one thread must be the same: the split and
// the merge order depend only on the problem sizes.
void expect_same_bits_on_one_thread(const Case& c, const Inputs& in) {
  using attn::testing::bitwise_equal;
  const int threads = omp_get_max_threads();
  const Result first = run_kernel(c, in);
  const Result again = run_kernel(c, in);
  omp_set_num_threads(1);
  const Result single = run_kernel(c, in);
  omp_set_num_threads(threads);
  EXPECT_TRUE(bitwise_equal(first.out, again.out, "out, second run"));
  EXPECT_TRUE(bitwise_equal(first.lse, again.lse, "lse, second run"));
  EXPECT_TRUE(bitwise_equal(first.out, single.out, "out, one thread"));
  EXPECT_TRUE(bitwise_equal(first.lse, single.lse, "lse, one thread"));
}

TEST_P(DecodeAttentionTest, BitwiseReproducibleAcrossRunsAndThreadCounts) {
  for (KvType kv : {KvType::f32, KvType::bf16}) {
    // Over 4 MiB of K and V even as bf16, so that the kernel runs threaded.
    const Case c{.B = 1, .Hq = 8, .Hkv = 1, .Tq = 2, .Tk = 18000, .D = 64, .causal = true,
                 .kv = kv};
    SCOPED_TRACE(c.str());
    // The case must really be split, or the merge order is not exercised.
    ASSERT_GT(attn::kernels::decode_attention_split(c.B, c.Hkv, c.Tk).count, 1);
    expect_same_bits_on_one_thread(c, make_inputs(c));
  }
}

// Many (batch, kv head) pairs over short caches: the one-split path, where each work item
// finishes its own output rows (no merge pass). A seq2seq decoder step is B = 64, Tq = 1,
// Tk = 50; here smaller batches with the same shape of work, every row-group size of the
// register blocks (R = G * Tq from 1 to 7: groups of 4, 2 and single rows), key lengths that
// leave rows fully masked, and key counts around the 64-key blocks.
TEST_P(DecodeAttentionTest, ManyRowsShortCaches) {
  struct Heads {
    int64_t hq, hkv, tq;
  };
  const Heads heads[] = {{8, 8, 1}, {8, 4, 1}, {6, 2, 1}, {4, 1, 1}, {4, 4, 2}, {6, 2, 2},
                         {7, 1, 1}, {4, 4, 5}};
  const int64_t dims[] = {32, 256, 59, 1};
  int n = 0;
  for (int64_t tk : {1, 8, 49, 50, 127, 128, 129}) {
    const Heads h = heads[n % 8];
    const int64_t d = dims[n % 4];
    ++n;
    const int64_t B = d == 256 ? 6 : 16;
    ASSERT_EQ(attn::kernels::decode_attention_split(B, h.hkv, tk).count, 1);
    // Lengths: full, one key, none (fully masked rows), and in between.
    std::vector<int64_t> lengths(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pick[] = {tk, 1, 0, tk / 2, tk - 1};
      lengths[static_cast<size_t>(b)] = std::max<int64_t>(0, pick[b % 5]);
    }
    check({.B = B, .Hq = h.hq, .Hkv = h.hkv, .Tq = h.tq, .Tk = tk, .D = d,
           .key_lengths = lengths, .causal = n % 2 == 0, .seed = static_cast<uint64_t>(n)});
  }
  // The decoder step itself, B = 64 and d = 32 or 256, causal bottom-right (all keys).
  check({.B = 64, .Hq = 8, .Hkv = 8, .Tq = 1, .Tk = 50, .D = 32, .causal = true});
  check({.B = 64, .Hq = 1, .Hkv = 1, .Tq = 1, .Tk = 50, .D = 256, .causal = true});
}

TEST_P(DecodeAttentionTest, ManyRowsBitwiseReproducibleAcrossThreadCounts) {
  for (KvType kv : {KvType::f32, KvType::bf16}) {
    // Over 4 MiB of K and V even as bf16, so that the kernel runs threaded.
    const Case c{.B = 128, .Hq = 8, .Hkv = 4, .Tq = 1, .Tk = 50, .D = 64,
                 .key_lengths = std::vector<int64_t>(128, 50), .kv = kv};
    SCOPED_TRACE(c.str());
    ASSERT_EQ(attn::kernels::decode_attention_split(c.B, c.Hkv, c.Tk).count, 1);
    expect_same_bits_on_one_thread(c, make_inputs(c));
  }
}

// ALiBi (BLOOM/MPT-style decoding): the penalty slope_h |pos(i) - j| follows pos(i), so both
// alignments with and without causal, Tq != Tk, plain and grouped heads, key lengths (Tk = 1
// gives a batch row with no key: fully masked rows), Tk around the 64-key blocks, and caches
// split over the keys (the merge then combines penalised partials).
TEST_P(DecodeAttentionTest, Alibi) {
  uint64_t n = 0;
  for (int64_t hkv : {8, 2})
    for (int64_t tq : {1, 3, 16})
      for (int64_t tk : {1, 50, 127, 128, 129})
        for (bool causal : {false, true})
          for (bool bottom_right : {false, true})
            check({.B = 2, .Hq = 8, .Hkv = hkv, .Tq = tq, .Tk = tk, .D = 32,
                   .key_lengths = {tk, tk / 3}, .causal = causal, .bottom_right = bottom_right,
                   .seed = ++n, .alibi = true});
  ASSERT_GT(attn::kernels::decode_attention_split(1, 2, 4099).count, 1);
  check({.Hq = 8, .Hkv = 2, .Tq = 3, .Tk = 4099, .D = 64, .causal = true, .alibi = true});
  // Top-left, not causal: the one query sits at position 0, the penalty grows over the cache.
  check({.Hq = 8, .Hkv = 8, .Tq = 1, .Tk = 4099, .D = 64, .bottom_right = false,
         .alibi = true});
}

// Additive biases read in place through broadcast strides: a key-padding row [Tk], per batch
// [B, 1, 1, Tk], full [B, Hq, Tq, Tk] and a per-head scalar [Hq, 1, 1]; plain and grouped heads,
// one-split and split caches; then bias and ALiBi together.
TEST_P(DecodeAttentionTest, BiasBroadcastShapes) {
  const int64_t B = 2, Hq = 8, Tq = 3;
  for (int64_t tk : {50, 129, 1100}) {
    const Shape shapes[] = {{tk}, {B, 1, 1, tk}, {B, Hq, Tq, tk}, {Hq, 1, 1}};
    for (const Shape& shape : shapes)
      for (int64_t hkv : {8, 2})
        check({.B = B, .Hq = Hq, .Hkv = hkv, .Tq = Tq, .Tk = tk, .D = 64,
               .key_lengths = {tk, tk / 2}, .causal = true, .bias_shape = shape});
  }
  check({.B = 2, .Hq = 8, .Hkv = 2, .Tq = 1, .Tk = 1100, .D = 64, .bias_shape = {2, 1, 1, 1100},
         .alibi = true});
  check({.B = 2, .Hq = 8, .Hkv = 2, .Tq = 16, .Tk = 129, .D = 64, .causal = true,
         .bottom_right = false, .bias_shape = {2, 8, 16, 129}, .alibi = true});
}

// A -inf bias masks its keys; a row with -inf on every key is fully masked: out 0 and lse -inf,
// as in the reference (and no NaN from -inf - -inf in the online softmax or the merge).
TEST_P(DecodeAttentionTest, RowsMaskedByBias) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t tk : {129, 1100})
    for (KvType kv : {KvType::f32, KvType::bf16}) {
      const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 2, .Tk = tk, .D = 32, .kv = kv,
                   .bias_shape = {2, 4, 2, tk}, .alibi = true};
      SCOPED_TRACE(target_label() + ": " + c.str());
      Inputs in = make_inputs(c);
      float* bias = in.bias.data<float>();
      const auto row_bias = [&](int64_t b, int64_t h, int64_t i) {
        return bias + ((b * c.Hq + h) * c.Tq + i) * c.Tk;
      };
      const int64_t fully_masked_row = (0 * c.Hq + 1) * c.Tq + 0;  // batch 0, head 1, query 0
      std::fill_n(row_bias(0, 1, 0), tk, -inf);
      for (int64_t j = 0; j < tk; j += 2) row_bias(1, 3, 1)[j] = -inf;  // every other key
      std::fill_n(row_bias(1, 0, 0) + 5, tk - 5, -inf);                 // only keys 0..4
      const Result want = run_reference(c, in);
      ASSERT_TRUE(std::isinf(want.lse.data<double>()[fully_masked_row]));
      expect_matches(c, run_kernel(c, in), want);
    }
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(DecodeAttentionTest);

// ---------------------------------------------------------------------------------------------

TEST(DecodeAttentionSplit, EnoughItemsAndIndependentOfThreads) {
  // B = 1, Hkv = 1: the keys alone must feed both cores.
  const auto one = attn::kernels::decode_attention_split(1, 1, 4096);
  EXPECT_GE(one.count, 2);
  EXPECT_GE(one.count * one.keys, 4096);
  EXPECT_LT((one.count - 1) * one.keys, 4096);
  // Plenty of (batch, head) pairs: no split needed.
  EXPECT_EQ(attn::kernels::decode_attention_split(64, 8, 50).count, 1);
  // Short caches are never cut below the minimum split length.
  const auto short_cache = attn::kernels::decode_attention_split(1, 1, 700);
  EXPECT_EQ(short_cache.count, 1);
  EXPECT_EQ(attn::kernels::decode_attention_split(1, 1, 0).count, 1);
}

TEST(Bf16Conversion, RoundsToNearestEven) {
  using attn::kernels::bf16_to_float;
  using attn::kernels::float_to_bf16;
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to the even significand (1).
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
  EXPECT_EQ(float_to_bf16(1.0f + 3.0f * std::ldexp(1.0f, -8)), 0x3F82);
  // Just above halfway rounds up, just below rounds down.
  EXPECT_EQ(float_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3F81);
  EXPECT_EQ(float_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 0.0f)), 0x3F80);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(float_to_bf16(inf), 0x7F80);
  EXPECT_EQ(float_to_bf16(-inf), 0xFF80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // overflows to inf
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload lies only in the dropped bits must not become inf.
  uint32_t low_payload_nan_bits = 0x7F800001u;
  float low_payload_nan;
  std::memcpy(&low_payload_nan, &low_payload_nan_bits, sizeof low_payload_nan);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(low_payload_nan))));
  // Subnormals keep their top bits; widening is exact for every bf16.
  const float tiny = std::numeric_limits<float>::denorm_min() * 65536.0f;
  EXPECT_EQ(bf16_to_float(float_to_bf16(tiny)), tiny);
  for (uint32_t h = 0; h < 0x10000u; h += 97) {
    const float x = bf16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(x)) {
      EXPECT_EQ(float_to_bf16(x), h) << h;
    }
  }
  // Relative rounding error at most 2^-9 for normal values.
  for (float x : {3.14159f, -1e-20f, 6.5e30f, 0.1f}) {
    const float r = bf16_to_float(float_to_bf16(x));
    EXPECT_LE(std::abs(r - x), std::ldexp(std::abs(x), -9)) << x;
  }
}

// The Tensor-level glue the front-end calls, against the library's float64 oracle.
TEST(DecodeAttentionGlue, MatchesReferenceOracle) {
  const int64_t B = 2, Hq = 8, Hkv = 2, Tq = 3, Tk = 1300, D = 64;
  const Tensor q = attn::testing::random_tensor({B, Hq, Tq, D}, DType::f32, 7);
  const Tensor k = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 8);
  const Tensor v = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 9);
  for (bool dot : {false, true}) {
    attn::AttentionParams params;
    if (dot) {
      params.score = attn::DotScore{};
    } else {
      params.score = attn::ScaledDotScore{};  // default 1 / sqrt(D)
      params.mask.key_lengths = {1300, 900};
      params.mask.causal = true;
      params.mask.alignment = attn::Alignment::bottom_right;
      params.mask.window = attn::Window{.left = 700, .right = attn::Window::unbounded};
    }
    SCOPED_TRACE(dot ? "dot" : "scaled_dot, causal, window, key_lengths");
    const attn::detail::AttentionDims dims =
        attn::detail::validate_attention("attention", q, k, v, params);
    ASSERT_TRUE(attn::kernels::decode_attention_supported(DType::f32, dims, params));
    const attn::AttentionOutput got = attn::kernels::decode_attention(dims, q, k, v, params);
    const attn::AttentionOutput want = attn::reference::attention(q, k, v, params);
    const Case c{.Tk = Tk, .D = D};
    attn::testing::Tolerance tol = tolerance(c);
    if (dot) {
      // Unscaled scores are sqrt(D) times larger, and so is their error.
      const double u = attn::testing::unit_roundoff(DType::f32);
      tol.atol += 32.0 * u * static_cast<double>(D);
      tol.rtol = tol.atol;
    }
    EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tol, "out"));
    EXPECT_TRUE(attn::testing::all_close(got.lse, want.lse, tol, "lse"));
  }
}

TEST(DecodeAttentionGlue, SupportedPredicate) {
  using attn::kernels::decode_attention_supported;
  const attn::detail::AttentionDims decode{.B = 1, .Hq = 8, .Hkv = 2, .Tq = 1, .Tk = 4096,
                                           .Dq = 64, .Dk = 64, .Dv = 64};
  attn::AttentionParams params;
  EXPECT_TRUE(decode_attention_supported(DType::f32, decode, params));
  params.mask.causal = true;
  params.mask.alignment = attn::Alignment::bottom_right;
  params.mask.key_lengths = {100};
  params.mask.window = attn::Window{.left = 10, .right = 0};
  EXPECT_TRUE(decode_attention_supported(DType::f32, decode, params));
  EXPECT_FALSE(decode_attention_supported(DType::f64, decode, params));

  attn::detail::AttentionDims many_queries = decode;
  many_queries.Tq = attn::kernels::kDecodeMaxQueries + 1;
  EXPECT_FALSE(decode_attention_supported(DType::f32, many_queries, params));
  attn::detail::AttentionDims few_keys = decode;
  few_keys.Tk = attn::kernels::kDecodeMinKeys - 1;
  EXPECT_FALSE(decode_attention_supported(DType::f32, few_keys, params));

  const auto rejects = [&](auto edit) {
    attn::AttentionParams p;
    edit(p);
    return !decode_attention_supported(DType::f32, decode, p);
  };
  EXPECT_TRUE(rejects([](attn::AttentionParams& p) { p.score = attn::CosineScore{}; }));
  EXPECT_TRUE(rejects([](attn::AttentionParams& p) { p.head_scores = {attn::DotScore{}}; }));
  EXPECT_TRUE(rejects([](attn::AttentionParams& p) {
    p.mask.allowed = Tensor::full({1}, 1.0, DType::b8);
  }));
  // An additive bias and ALiBi are applied by the kernel (tests above).
  EXPECT_FALSE(rejects([](attn::AttentionParams& p) { p.mask.bias = Tensor::zeros({1}); }));
  EXPECT_FALSE(rejects([](attn::AttentionParams& p) { p.mask.alibi_slopes = {0.5}; }));
  EXPECT_TRUE(rejects([](attn::AttentionParams& p) {
    p.mask.local.kind = attn::LocalKind::monotonic;
  }));
  EXPECT_TRUE(rejects([](attn::AttentionParams& p) { p.dropout.p = 0.1; }));
  // Weights on request are computed by the kernel (tests/ops/test_decode_weights.cpp).
  EXPECT_FALSE(rejects([](attn::AttentionParams& p) { p.return_weights = true; }));
}

// Decoder steps with ALiBi and/or a bias take the decode kernel: attention() returns bitwise what
// the decode glue computes, which matches the oracle.
TEST(DecodeAttentionGlue, AlibiAndBiasRouteToDecodeKernel) {
  const int64_t B = 2, Hq = 8, Hkv = 2, Tk = 300, D = 64;
  for (int64_t Tq : {1, 3})
    for (int variant = 0; variant < 3; ++variant) {
      const bool alibi = variant != 1, bias = variant != 0;
      const Tensor q = attn::testing::random_tensor({B, Hq, Tq, D}, DType::f32, 31);
      const Tensor k = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 32);
      const Tensor v = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 33);
      attn::AttentionParams params;
      params.score = attn::ScaledDotScore{};
      params.mask.causal = true;
      params.mask.alignment = attn::Alignment::bottom_right;
      params.mask.key_lengths = {300, 170};
      if (alibi) params.mask.alibi_slopes = attn::alibi_slopes(Hq);
      if (bias) params.mask.bias = attn::testing::random_tensor({B, 1, 1, Tk}, DType::f32, 34);
      SCOPED_TRACE("Tq=" + std::to_string(Tq) + (alibi ? " alibi" : "") + (bias ? " bias" : ""));
      const attn::detail::AttentionDims dims =
          attn::detail::validate_attention("attention", q, k, v, params);
      ASSERT_TRUE(attn::kernels::decode_attention_supported(DType::f32, dims, params));
      const attn::AttentionOutput front = attn::attention(q, k, v, params);
      const attn::AttentionOutput direct = attn::kernels::decode_attention(dims, q, k, v, params);
      EXPECT_TRUE(attn::testing::bitwise_equal(front.out, direct.out, "out"));
      EXPECT_TRUE(attn::testing::bitwise_equal(front.lse, direct.lse, "lse"));
      const attn::AttentionOutput want = attn::reference::attention(q, k, v, params);
      const Case c{.B = B, .Hq = Hq, .Hkv = Hkv, .Tq = Tq, .Tk = Tk, .D = D,
                   .bias_shape = bias ? Shape{B, 1, 1, Tk} : Shape{}, .alibi = alibi};
      EXPECT_TRUE(attn::testing::all_close(direct.out, want.out, tolerance(c), "out"));
      EXPECT_TRUE(attn::testing::all_close(direct.lse, want.lse, tolerance(c), "lse"));
    }
}

}  // namespace
