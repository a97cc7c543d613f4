// attention() with bf16 inputs: the AVX512_BF16 kernel and the widening fallback against the
// float64 reference on the SAME bf16 inputs, with a tolerance derived from a plain float32 loop
// that rounds P to bf16 like the kernel (the one rounding a bf16 dot-product kernel must add);
// the backward with bf16 inputs; dtype errors.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "attn/attention.h"
#include "attn/reference.h"
#include "attn/runtime.h"
#include "kernels/common/bf16.h"
#include "kernels/flash/flash_attention_bf16.h"
#include "kernels/common/simd_target.h"
#include "support/test_support.h"

namespace attn {
namespace {

using testing::all_close;
using testing::random_tensor;
using testing::Tolerance;
using testing::tolerance_for;

// A problem of the sweep: sizes and the structured masks the bf16 kernel supports.
struct Case {
  int64_t B = 1, Hq = 2, Hkv = 2, Tq = 16, Tk = 16, D = 64, Dv = 64;
  bool causal = false;
  bool bottom_right = false;
  std::optional<Window> window;
  std::vector<int64_t> key_lengths, query_lengths;
  double scale_factor = 1.0;  // multiplies q: larger logits make the softmax peakier

  std::string name() const {
    std::ostringstream s;
    s << "B" << B << " Hq" << Hq << " Hkv" << Hkv << " Tq" << Tq << " Tk" << Tk << " D" << D
      << " Dv" << Dv;
    if (causal) s << (bottom_right ? " causal-br" : " causal-tl");
    if (window) s << " window";
    if (!key_lengths.empty()) s << " key_lengths";
    if (!query_lengths.empty()) s << " query_lengths";
    return s.str();
  }
  AttentionParams params() const {
    AttentionParams p;
    p.score = ScaledDotScore{};
    p.mask.causal = causal;
    p.mask.alignment = bottom_right ? Alignment::bottom_right : Alignment::top_left;
    p.mask.window = window;
    p.mask.key_lengths = key_lengths;
    p.mask.query_lengths = query_lengths;
    return p;
  }
};

struct Inputs {
  Tensor q, k, v;  // bf16
};

Inputs make_inputs(const Case& c, uint64_t seed) {
  const double qs = c.scale_factor;
  return {random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, seed, -qs, qs).to(DType::bf16),
          random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, seed + 1).to(DType::bf16),
          random_tensor({c.B, c.Hkv, c.Tk, c.Dv}, DType::f32, seed + 2).to(DType::bf16)};
}

// The plain bf16 attention the tolerance is measured on: float32 scores of the (exact) bf16
// inputs, P = exp(s - max) rounded to bf16, denominator = sum of the rounded P, O = P V / sum in
// float32. Masks written from attention.h's definitions, independently of the kernels.
AttentionOutput plain_bf16_attention(const Case& c, const Inputs& in) {
  const std::vector<double> q = in.q.to_vector(), k = in.k.to_vector(), v = in.v.to_vector();
  AttentionOutput o;
  o.out = Tensor::zeros({c.B, c.Hq, c.Tq, c.Dv});
  o.lse = Tensor::zeros({c.B, c.Hq, c.Tq});
  float* out = o.out.data<float>();
  float* lse = o.lse.data<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.D)));
  const int64_t group = c.Hq / c.Hkv;
  std::vector<float> s(static_cast<std::size_t>(c.Tk)), p(s.size());
  std::vector<bool> visible(s.size());
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t key_len = c.key_lengths.empty() ? c.Tk : c.key_lengths[b];
    const int64_t query_len = c.query_lengths.empty() ? c.Tq : c.query_lengths[b];
    for (int64_t h = 0; h < c.Hq; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < c.Tq; ++i) {
        const int64_t pos = i + (c.bottom_right ? key_len - query_len : 0);
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < c.Tk; ++j) {
          bool ok = j < key_len && i < query_len;
          if (c.causal) ok = ok && j <= pos;
          if (c.window) {
            if (c.window->left != Window::unbounded) ok = ok && j >= pos - c.window->left;
            if (c.window->right != Window::unbounded) ok = ok && j <= pos + c.window->right;
          }
          visible[j] = ok;
          if (!ok) continue;
          float dot = 0.0f;
          for (int64_t d = 0; d < c.D; ++d)
            dot += static_cast<float>(q[((b * c.Hq + h) * c.Tq + i) * c.D + d]) *
                   static_cast<float>(k[((b * c.Hkv + hk) * c.Tk + j) * c.D + d]);
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        const int64_t row = (b * c.Hq + h) * c.Tq + i;
        if (m == -std::numeric_limits<float>::infinity()) {
          lse[row] = m;  // fully masked: out stays 0
          continue;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < c.Tk; ++j) {
          p[j] = visible[j] ? kernels::bf16_to_float(kernels::float_to_bf16(std::exp(s[j] - m)))
                            : 0.0f;
          sum += p[j];
        }
        for (int64_t e = 0; e < c.Dv; ++e) {
          float acc = 0.0f;
          for (int64_t j = 0; j < c.Tk; ++j)
            acc += p[j] * static_cast<float>(v[((b * c.Hkv + hk) * c.Tk + j) * c.Dv + e]);
          out[row * c.Dv + e] = acc / sum;
        }
        lse[row] = m + std::log(sum);
      }
    }
  }
  return o;
}

// Largest |a - b| over finite pairs (masked rows are checked exactly by all_close).
double max_abs_error(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  double worst = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (std::isfinite(x[i]) && std::isfinite(y[i])) worst = std::max(worst, std::fabs(x[i] - y[i]));
  return worst;
}

// The two ways attention() runs bf16 inputs.
enum class Path { bf16_kernel, widening_fallback };

std::string path_name(const ::testing::TestParamInfo<Path>& info) {
  return info.param == Path::bf16_kernel ? "Bf16Kernel" : "WideningFallback";
}

// A target below AVX3 (the fallback), or nullopt when the machine has none.
std::optional<int64_t> target_below_avx3() {
  for (const kernels::SimdTarget& t : kernels::available_simd_targets())
    if (t.name != "AVX3" && t.name != "AVX3_DL" && t.name != "AVX3_ZEN4") return t.bits;
  return std::nullopt;
}

// Selects the vdpbf16ps kernel (ATTN_BF16_KERNEL=dot) for the scope; the default is measured
// per CPU (KernelChoiceIsMeasuredOrFollowsTheEnvironment).
class ScopedBf16DotKernel {
 public:
  ScopedBf16DotKernel() { setenv("ATTN_BF16_KERNEL", "dot", 1); }
  ~ScopedBf16DotKernel() { unsetenv("ATTN_BF16_KERNEL"); }
  ScopedBf16DotKernel(const ScopedBf16DotKernel&) = delete;
  ScopedBf16DotKernel& operator=(const ScopedBf16DotKernel&) = delete;
};

class Bf16AttentionTest : public ::testing::TestWithParam<Path> {
 protected:
  void SetUp() override {
    if (GetParam() == Path::bf16_kernel) {
      if (!kernels::flash_attention_bf16_available())
        GTEST_SKIP() << "CPU without AVX512_BF16 (or SIMD target capped below AVX3)";
      dot_kernel_.emplace();
    } else {
      const std::optional<int64_t> below = target_below_avx3();
      if (!below) GTEST_SKIP() << "no SIMD target below AVX3";
      pin_.emplace(*below);
    }
  }
  std::optional<kernels::ScopedSimdTarget> pin_;
  std::optional<ScopedBf16DotKernel> dot_kernel_;

  // Runs the case on the path under test and checks it against the reference.
  void check(const Case& c, uint64_t seed) {
    SCOPED_TRACE(c.name());
    const AttentionParams params = c.params();
    // The path under test is the one the front-end takes.
    EXPECT_EQ(kernels::flash_attention_bf16_supported(params), GetParam() == Path::bf16_kernel);
    const Inputs in = make_inputs(c, seed);
    const AttentionOutput got = attention(in.q, in.k, in.v, params);
    ASSERT_EQ(got.out.dtype(), DType::f32);
    ASSERT_EQ(got.lse.dtype(), DType::f32);
    const AttentionOutput want = reference::attention(in.q, in.k, in.v, params);
    const AttentionOutput plain = plain_bf16_attention(c, in);
    // Tolerance: twice the plain bf16 loop's error on the same inputs, plus a float32
    // accumulation bound (the floor when P rounding costs nothing, e.g. one visible key).
    const Tolerance f32 = tolerance_for(DType::f32, std::max<int64_t>(c.Tk, c.D));
    const double out_err = max_abs_error(plain.out, want.out);
    const double lse_err = max_abs_error(plain.lse, want.lse);
    EXPECT_TRUE(all_close(got.out, want.out, {2.0 * out_err + f32.atol, f32.rtol}, "out"));
    EXPECT_TRUE(all_close(got.lse, want.lse, {2.0 * lse_err + f32.atol, f32.rtol}, "lse"));
  }
};

TEST_P(Bf16AttentionTest, SizeSweep) {
  // (Tq = 1 takes the decode kernel, which reads bf16 K/V in place: attention.h.)
  uint64_t seed = 100;
  for (int64_t tq : {1, 16, 127, 128, 129})
    for (int64_t tk : {1, 16, 127, 128, 129}) {
      Case c;
      c.Tq = tq, c.Tk = tk, c.D = 64, c.Dv = 64;
      check(c, seed += 3);
    }
}

TEST_P(Bf16AttentionTest, OddAndLargeHeadDims) {
  uint64_t seed = 200;
  for (auto [d, dv] : std::vector<std::pair<int64_t, int64_t>>{
           {3, 3}, {59, 59}, {64, 17}, {1, 130}, {128, 128}, {80, 48}}) {
    Case c;
    c.Tq = 33, c.Tk = 70, c.D = d, c.Dv = dv;
    check(c, seed += 3);
  }
}

TEST_P(Bf16AttentionTest, CausalBothAlignmentsAndWindows) {
  uint64_t seed = 300;
  for (bool bottom_right : {false, true})
    for (auto [tq, tk] : std::vector<std::pair<int64_t, int64_t>>{{129, 129}, {40, 150}, {150, 40}}) {
      Case c;
      c.Tq = tq, c.Tk = tk, c.causal = true, c.bottom_right = bottom_right;
      check(c, seed += 3);
      c.causal = false;
      c.window = Window{5, 70};
      check(c, seed += 3);
      c.causal = true;
      c.window = Window{20, 0};
      check(c, seed += 3);
    }
}

TEST_P(Bf16AttentionTest, LengthsIncludingEmptyAndFullyMaskedRows) {
  Case c;
  c.B = 3, c.Tq = 70, c.Tk = 131;
  c.key_lengths = {0, 131, 65};  // batch 0: every row fully masked (out 0, lse -inf)
  c.query_lengths = {70, 17, 70};
  check(c, 400);
  c.causal = true, c.bottom_right = true;  // rows before the first key: fully masked
  check(c, 403);
  Case empty;  // Tk == 0: every row fully masked
  empty.Tq = 20, empty.Tk = 0;
  check(empty, 406);
}

TEST_P(Bf16AttentionTest, GroupedQueryHeadsAndPeakySoftmax) {
  Case c;
  c.B = 2, c.Hq = 8, c.Hkv = 2, c.Tq = 65, c.Tk = 200, c.D = 64, c.Dv = 64;
  check(c, 500);
  c.scale_factor = 8.0;  // logits of tens: the running max moves between key blocks
  check(c, 503);
}

INSTANTIATE_TEST_SUITE_P(Paths, Bf16AttentionTest,
                         ::testing::Values(Path::bf16_kernel, Path::widening_fallback), path_name);

// Bias, allowed, ALiBi and dropout are not in the bf16 kernel: the front-end widens and runs the
// float32 paths, so the result matches the reference on the same inputs to float32 accuracy.
TEST(Bf16Attention, UnsupportedParamsWidenToFloat32) {
  const int64_t B = 1, H = 2, Tq = 20, Tk = 33, D = 16;
  const Tensor q = random_tensor({B, H, Tq, D}, DType::f32, 1).to(DType::bf16);
  const Tensor k = random_tensor({B, H, Tk, D}, DType::f32, 2).to(DType::bf16);
  const Tensor v = random_tensor({B, H, Tk, D}, DType::f32, 3).to(DType::bf16);
  AttentionParams params;
  params.score = ScaledDotScore{};
  params.mask.bias = random_tensor({1, 1, Tq, Tk}, DType::f32, 4);
  params.mask.alibi_slopes = alibi_slopes(H);
  EXPECT_FALSE(kernels::flash_attention_bf16_supported(params));
  const AttentionOutput got = attention(q, k, v, params);
  const AttentionOutput want = reference::attention(q, k, v, params);
  EXPECT_TRUE(all_close(got.out, want.out, tolerance_for(DType::f32, Tk), "out"));
  EXPECT_TRUE(all_close(got.lse, want.lse, tolerance_for(DType::f32, Tk), "lse"));
}

// The backward widens bf16 inputs exactly and computes in float32: it matches the reference
// backward on the same inputs to float32 accuracy (both given the reference forward). Also with
// a float32 query against bf16 K and V (mixed precision, attention.h): dk and dv are float32.
TEST(Bf16Attention, BackwardMatchesReferenceOnSameInputs) {
  for (bool causal : {false, true})
  for (bool mixed : {false, true}) {
    SCOPED_TRACE(std::string(causal ? "causal" : "full") + (mixed ? ", float32 query" : ""));
    const int64_t B = 2, Hq = 4, Hkv = 2, Tq = 40, Tk = 57, D = 24;
    const Tensor q32 = random_tensor({B, Hq, Tq, D}, DType::f32, 11);
    const Tensor q = mixed ? q32 : q32.to(DType::bf16);
    const Tensor k = random_tensor({B, Hkv, Tk, D}, DType::f32, 12).to(DType::bf16);
    const Tensor v = random_tensor({B, Hkv, Tk, D}, DType::f32, 13).to(DType::bf16);
    const Tensor dout = random_tensor({B, Hq, Tq, D}, DType::f32, 14);
    AttentionParams params;
    params.score = ScaledDotScore{};
    params.mask.causal = causal;
    const AttentionOutput fwd = reference::attention(q, k, v, params);
    const AttentionGrads got = attention_backward(q, k, v, params, fwd, dout);
    const AttentionGrads want = reference::attention_backward(q, k, v, params, fwd, dout);
    EXPECT_EQ(got.dq.dtype(), DType::f32);
    EXPECT_EQ(got.dk.dtype(), DType::f32);
    const Tolerance tol = tolerance_for(DType::f32, Tk * D);
    EXPECT_TRUE(all_close(got.dq, want.dq, tol, "dq"));
    EXPECT_TRUE(all_close(got.dk, want.dk, tol, "dk"));
    EXPECT_TRUE(all_close(got.dv, want.dv, tol, "dv"));
  }
}

// Thread count never changes the bits (the item decomposition is fixed).
TEST(Bf16Attention, BitwiseReproducibleAcrossThreadCounts) {
  if (!kernels::flash_attention_bf16_available()) GTEST_SKIP() << "no AVX512_BF16";
  const ScopedBf16DotKernel dot_kernel;
  Case c;
  c.Hq = 4, c.Hkv = 4, c.Tq = 150, c.Tk = 170, c.causal = true;
  const Inputs in = make_inputs(c, 600);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const AttentionOutput one = attention(in.q, in.k, in.v, c.params());
  omp_set_num_threads(2);
  const AttentionOutput two = attention(in.q, in.k, in.v, c.params());
  omp_set_num_threads(saved);
  EXPECT_EQ(one.out.to_vector(), two.out.to_vector());
}

TEST(Bf16Attention, MixedDtypesAreRejected) {
  const Tensor q32 = random_tensor({1, 1, 4, 8}, DType::f32, 1);
  const Tensor qbf = q32.to(DType::bf16);
  testing::expect_error([&] { attention(qbf, q32, q32); },
                        {"[attention]", "dtypes differ", "bf16", "float32"});
  // (bf16 key AND value against a float32 query is mixed precision: test_mixed_precision.)
  testing::expect_error([&] { attention(q32, qbf, q32); },
                        {"[attention]", "dtypes differ", "float32", "bf16"});
  const AttentionOutput fwd = attention(qbf, qbf, qbf);
  testing::expect_error([&] { attention_backward(qbf, q32, qbf, {}, fwd, q32); },
                        {"[attention_backward]", "dtypes differ"});
  const Tensor mask = Tensor::zeros({1, 1, 4, 8}, DType::b8);
  testing::expect_error([&] { attention(mask, mask, mask); }, {"[attention]", "query", "bool"});
}

}  // namespace
// Without ATTN_BF16_KERNEL the choice is measured once per process on CPUs that can run the
// kernel (attn/runtime.h reports it); "dot" and "widen" override it; anything else is an error
// naming the variable.
TEST(Bf16Attention, KernelChoiceIsMeasuredOrFollowsTheEnvironment) {
  AttentionParams params;
  params.score = ScaledDotScore{};
  unsetenv("ATTN_BF16_KERNEL");
  const kernels::Bf16KernelChoice measured = kernels::bf16_kernel_choice();
  SCOPED_TRACE(measured.by);
  if (kernels::flash_attention_bf16_available()) {
    EXPECT_EQ(measured.by.rfind("measured: ", 0), 0u);
    EXPECT_GT(measured.time_ratio, 0.0);
    EXPECT_EQ(measured.dot, measured.time_ratio < kernels::kBf16DotThreshold);
    // Kept for the process: asked again, the same answer without a second measurement.
    const kernels::Bf16KernelChoice again = kernels::bf16_kernel_choice();
    EXPECT_EQ(again.time_ratio, measured.time_ratio);
  } else {
    EXPECT_FALSE(measured.dot);
  }
  EXPECT_EQ(kernels::flash_attention_bf16_supported(params),
            measured.dot && kernels::flash_attention_bf16_available());
  EXPECT_EQ(runtime_info().bf16_kernel, measured.dot ? "dot" : "widen");
  setenv("ATTN_BF16_KERNEL", "widen", 1);
  EXPECT_FALSE(kernels::bf16_dot_kernel_requested());
  EXPECT_FALSE(kernels::flash_attention_bf16_supported(params));
  EXPECT_EQ(runtime_info().bf16_kernel_by, "ATTN_BF16_KERNEL");
  {
    const ScopedBf16DotKernel dot_kernel;
    EXPECT_TRUE(kernels::bf16_dot_kernel_requested());
    EXPECT_EQ(kernels::flash_attention_bf16_supported(params),
              kernels::flash_attention_bf16_available());
  }
  setenv("ATTN_BF16_KERNEL", "fast", 1);
  attn::testing::expect_error([&] { kernels::bf16_dot_kernel_requested(); },
                              {"ATTN_BF16_KERNEL", "fast"});
  unsetenv("ATTN_BF16_KERNEL");
}

}  // namespace attn
