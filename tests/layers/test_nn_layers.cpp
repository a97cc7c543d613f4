// nn/ layers other than the recurrent ones: Linear, Embedding, LayerNorm, the feed-forward block
// and its activations, dropout, sinusoidal positions, RoPE and the parameter list. Each forward
// is checked against a plain float64 loop, each gradient against central finite differences in
// float64, and each validation against its message.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "nn/dropout.h"
#include "nn/embedding.h"
#include "nn/feed_forward.h"
#include "nn/layer_norm.h"
#include "nn/linear.h"
#include "nn/parameters.h"
#include "nn/positions.h"
#include "support/test_support.h"

namespace attn::nn {
namespace {

using attn::testing::expect_error;

using attn::testing::all_close;
using attn::testing::check_gradient;
using attn::testing::random_tensor;
using attn::testing::tolerance_for;
using attn::testing::weighted_sum;


// ---------------------------------------------------------------------------------------------
// Linear.

Tensor reference_linear(const Tensor& x, const LinearParams& p) {
  const int64_t in = p.weight.size(1), out = p.weight.size(0), rows = in ? x.numel() / in : 0;
  const std::vector<double> xv = x.to_vector(), w = p.weight.to_vector();
  const std::vector<double> b =
      p.bias.defined() ? p.bias.to_vector() : std::vector<double>(out, 0.0);
  std::vector<double> y(rows * out);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = b[o];
      for (int64_t i = 0; i < in; ++i) s += xv[r * in + i] * w[o * in + i];
      y[r * out + o] = s;
    }
  Shape shape = x.shape();
  shape.back() = out;
  return Tensor::from(y, shape);
}

TEST(Linear, ForwardMatchesFloat64LoopAcrossSizes) {
  for (DType dtype : {DType::f32, DType::f64})
    for (int64_t in : {1, 3, 17, 128, 129})
      for (int64_t out : {1, 5, 127})
        for (int64_t rows : {0, 1, 6})
          for (bool bias : {true, false}) {
            SCOPED_TRACE(std::string(dtype_name(dtype)) + " in " + std::to_string(in) + " out " +
                         std::to_string(out) + " rows " + std::to_string(rows) +
                         (bias ? " bias" : " no bias"));
            const Linear lin = Linear::create({in, out, bias, dtype}, 7);
            const Tensor x = random_tensor({2, rows, in}, dtype, 8);
            const Tensor y = lin.forward(x).out;
            EXPECT_TRUE(
                all_close(y, reference_linear(x, lin.params), tolerance_for(dtype, in + 1)));
          }
}

TEST(Linear, AcceptsStridedInput) {
  const Linear lin = Linear::create({4, 3, true, DType::f64}, 1);
  const Tensor base = random_tensor({4, 5}, DType::f64, 2);
  const Tensor x = base.transpose(0, 1);  // [5, 4], not contiguous
  EXPECT_TRUE(all_close(lin.forward(x).out, reference_linear(x.contiguous(), lin.params),
                        tolerance_for(DType::f64, 5)));
}

TEST(Linear, GradientsMatchFiniteDifferences) {
  for (bool bias : {true, false}) {
    SCOPED_TRACE(bias ? "bias" : "no bias");
    Linear lin = Linear::create({5, 4, bias, DType::f64}, 3);
    Tensor x = random_tensor({2, 3, 5}, DType::f64, 4);
    const Tensor w = random_tensor({2, 3, 4}, DType::f64, 5);
    auto loss = [&] { return weighted_sum(lin.forward(x).out, w); };
    const Tensor dx = lin.backward(lin.forward(x).cache, w);
    EXPECT_TRUE(check_gradient(loss, x, dx, "dx"));
    EXPECT_TRUE(check_gradient(loss, lin.params.weight, lin.grads.weight, "dweight"));
    if (bias) {
      EXPECT_TRUE(check_gradient(loss, lin.params.bias, lin.grads.bias, "dbias"));
    }
  }
}

TEST(Linear, InitialisationBound) {
  const Linear lin = Linear::create({64, 32, true, DType::f32}, 9);
  const double bound = 1.0 / 8.0;
  double max_abs = 0.0;
  for (double v : lin.params.weight.to_vector()) max_abs = std::max(max_abs, std::abs(v));
  EXPECT_LE(max_abs, bound);
  EXPECT_GT(max_abs, 0.9 * bound);  // 2048 uniform draws come close to the bound
  EXPECT_TRUE(all_close(Linear::create({64, 32, true, DType::f32}, 9).params.weight,
                        lin.params.weight, {0.0, 0.0}, "same seed"));
}

TEST(Linear, Errors) {
  Linear lin = Linear::create({8, 3, true, DType::f32}, 1);
  expect_error(
      [&] {
        lin.forward(Tensor::zeros({2, 7}));
      },
      "[linear] input has 7 features, weight expects 8");
  expect_error(
      [&] {
        lin.forward(Tensor::zeros({2, 8}, DType::f64));
      },
      "[linear] input is float64, weight is float32");
  const LinearForward f = lin.forward(Tensor::zeros({2, 8}));
  expect_error(
      [&] {
        lin.backward(f.cache, Tensor::zeros({2, 4}));
      },
      "[linear] dout is [2, 4], output was [2, 3]");
  expect_error(
      [&] {
        lin.backward(LinearCache{}, Tensor::zeros({2, 3}));
      },
      "[linear] backward needs the cache");
  Linear transposed = lin;
  transposed.params.weight = Tensor::zeros({8, 3}).transpose(0, 1);
  expect_error(
      [&] {
        transposed.forward(Tensor::zeros({2, 8}));
      },
      "[linear] weight must be a contiguous [Out, In] tensor");
  expect_error(
      [&] {
        Linear::from_params({Tensor::zeros({3, 8}), Tensor::zeros({4})});
      },
      "[linear] bias is [4], expected [3] for weight [3, 8]");
}

// ---------------------------------------------------------------------------------------------
// Embedding.

TEST(Embedding, ForwardGathersRows) {
  for (DType dtype : {DType::f32, DType::f64}) {
    const Embedding e = Embedding::create({10, 6, std::nullopt, dtype}, 3);
    const TokenIds ids{{1, 9, 0, 1, 4, 4}, {2, 3}};
    const Tensor out = e.forward(ids).out;
    ASSERT_EQ(out.shape(), (Shape{2, 3, 6}));
    for (int64_t i = 0; i < 6; ++i)
      for (int64_t c = 0; c < 6; ++c)
        EXPECT_EQ(out.get({i / 3, i % 3, c}), e.weight.get({ids.ids[i], c}));
  }
  // Default shape: one dimension.
  const Embedding e = Embedding::create({4, 2, std::nullopt, DType::f32}, 3);
  EXPECT_EQ(e.forward({{3, 2, 1}, {}}).out.shape(), (Shape{3, 2}));
  EXPECT_EQ(e.forward({{}, {0, 5}}).out.shape(), (Shape{0, 5, 2}));
}

TEST(Embedding, BackwardAccumulatesRepeatsAndSkipsPadding) {
  Embedding e = Embedding::create({6, 3, 0, DType::f64}, 4);
  // PyTorch keeps the padding row at zero from the start.
  EXPECT_TRUE(all_close(e.weight.select(0, 0).contiguous(), Tensor::zeros({3}, DType::f64),
                        {0.0, 0.0}, "padding row"));
  const TokenIds ids{{2, 0, 2, 5, 0, 1}, {2, 3}};
  const Tensor w = random_tensor({2, 3, 3}, DType::f64, 5);
  auto loss = [&] { return weighted_sum(e.forward(ids).out, w); };
  e.backward(e.forward(ids).cache, w);
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_DOUBLE_EQ(e.weight_grad.get({2, c}), w.get({0, 0, c}) + w.get({0, 2, c}));
    EXPECT_EQ(e.weight_grad.get({0, c}), 0.0) << "the padding row gets no gradient";
    EXPECT_EQ(e.weight_grad.get({3, c}), 0.0) << "an unused row gets no gradient";
  }
  // Finite differences agree everywhere except the padding row, where the forward does
  // depend on the weight but the gradient is zero by definition.
  Tensor rows = e.weight.slice(0, 1, 6);  // view sharing storage; check_gradient needs contiguous
  ASSERT_TRUE(rows.is_contiguous());
  EXPECT_TRUE(check_gradient(loss, rows, e.weight_grad.slice(0, 1, 6).contiguous(), "dweight"));
}

TEST(Embedding, InitialisationIsStandardNormal) {
  const Embedding e = Embedding::create({200, 50, std::nullopt, DType::f64}, 6);
  const std::vector<double> v = e.weight.to_vector();
  double mean = 0.0, sq = 0.0;
  for (double x : v) mean += x;
  mean /= double(v.size());
  for (double x : v) sq += (x - mean) * (x - mean);
  const double var = sq / double(v.size());
  // 10,000 draws: the standard error of the mean is 0.01, of the variance about 0.014.
  EXPECT_NEAR(mean, 0.0, 0.05);
  EXPECT_NEAR(var, 1.0, 0.07);
}

TEST(Embedding, Errors) {
  Embedding e = Embedding::create({10, 4, std::nullopt, DType::f32}, 1);
  expect_error(
      [&] {
        e.forward({{1, 12, 3}, {}});
      },
      "[embedding] token id 12 at position 1 is out of range for 10 embeddings");
  expect_error(
      [&] {
        e.forward({{-1}, {}});
      },
      "[embedding] token id -1 at position 0 is out of range for 10 embeddings");
  expect_error(
      [&] {
        e.forward({{1, 2, 3}, {2, 2}});
      },
      "[embedding] ids shape [2, 2] holds 4 ids, got 3");
  const EmbeddingForward f = e.forward({{1, 2}, {}});
  expect_error(
      [&] {
        e.backward(f.cache, Tensor::zeros({2, 5}));
      },
      "[embedding] dout is [2, 5], output was [2, 4]");
  expect_error(
      [&] {
        Embedding::create({10, 4, 10, DType::f32}, 1);
      },
      "[embedding] padding id 10 is out of range for 10 embeddings");
}

// ---------------------------------------------------------------------------------------------
// LayerNorm.

Tensor reference_layer_norm(const Tensor& x, const LayerNorm& ln) {
  const int64_t c = ln.dim, rows = x.numel() / c;
  const std::vector<double> xv = x.to_vector();
  const std::vector<double> g =
      ln.params.gamma.defined() ? ln.params.gamma.to_vector() : std::vector<double>(c, 1.0);
  const std::vector<double> b =
      ln.params.beta.defined() ? ln.params.beta.to_vector() : std::vector<double>(c, 0.0);
  std::vector<double> y(xv.size());
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0.0, var = 0.0;
    for (int64_t j = 0; j < c; ++j) mean += xv[r * c + j] / double(c);
    for (int64_t j = 0; j < c; ++j)
      var += (xv[r * c + j] - mean) * (xv[r * c + j] - mean) / double(c);
    for (int64_t j = 0; j < c; ++j)
      y[r * c + j] = (xv[r * c + j] - mean) / std::sqrt(var + ln.eps) * g[j] + b[j];
  }
  return Tensor::from(y, x.shape());
}

TEST(LayerNorm, ForwardMatchesFloat64Loop) {
  for (DType dtype : {DType::f32, DType::f64})
    for (int64_t c : {1, 2, 7, 128, 129})
      for (bool affine : {true, false}) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " C " + std::to_string(c));
        LayerNorm ln = LayerNorm::create({c, 1e-5, affine, dtype});
        if (affine) {
          ln.params.gamma.copy_from(random_tensor({c}, dtype, 1, 0.5, 1.5));
          ln.params.beta.copy_from(random_tensor({c}, dtype, 2));
        }
        const Tensor x = random_tensor({3, 4, c}, dtype, 3, -2.0, 2.0);
        EXPECT_TRUE(
            all_close(ln.forward(x).out, reference_layer_norm(x, ln), tolerance_for(dtype, c)));
      }
}

// Rows far from zero: the two-pass float64 statistics keep float32 results accurate where
// E[x^2] - E[x]^2 in float32 would cancel catastrophically.
TEST(LayerNorm, LargeOffsetRowsStayAccurate) {
  const LayerNorm ln = LayerNorm::create({64, 1e-5, true, DType::f32});
  Tensor x = random_tensor({4, 64}, DType::f32, 4);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] += 1e4f;
  // The float32 input itself is exact; compare against float64 on the same values.
  EXPECT_TRUE(
      all_close(ln.forward(x).out, reference_layer_norm(x, ln), tolerance_for(DType::f32, 64)));
}

TEST(LayerNorm, GradientsMatchFiniteDifferences) {
  LayerNorm ln = LayerNorm::create({6, 1e-5, true, DType::f64});
  ln.params.gamma.copy_from(random_tensor({6}, DType::f64, 5, 0.5, 1.5));
  ln.params.beta.copy_from(random_tensor({6}, DType::f64, 6));
  Tensor x = random_tensor({2, 3, 6}, DType::f64, 7);
  const Tensor w = random_tensor({2, 3, 6}, DType::f64, 8);
  auto loss = [&] { return weighted_sum(ln.forward(x).out, w); };
  const Tensor dx = ln.backward(ln.forward(x).cache, w);
  EXPECT_TRUE(check_gradient(loss, x, dx, "dx"));
  EXPECT_TRUE(check_gradient(loss, ln.params.gamma, ln.grads.gamma, "dgamma"));
  EXPECT_TRUE(check_gradient(loss, ln.params.beta, ln.grads.beta, "dbeta"));
}

TEST(LayerNorm, Errors) {
  LayerNorm ln = LayerNorm::create({8, 1e-5, true, DType::f32});
  expect_error(
      [&] {
        ln.forward(Tensor::zeros({2, 7}));
      },
      "[layer_norm] input has 7 features, layer norm expects 8");
  expect_error(
      [&] {
        ln.forward(Tensor::zeros({2, 8}, DType::f64));
      },
      "[layer_norm] input is float64, gamma is float32");
  const LayerNormForward f = ln.forward(Tensor::zeros({2, 8}));
  expect_error(
      [&] {
        ln.backward(f.cache, Tensor::zeros({2, 9}));
      },
      "[layer_norm] dout is [2, 9], input was [2, 8]");
  expect_error(
      [&] {
        LayerNorm::create({8, 0.0, true, DType::f32});
      },
      "[layer_norm] eps must be > 0");
}

// ---------------------------------------------------------------------------------------------
// Activations and the feed-forward block.

double reference_activation(Activation a, double x) {
  switch (a) {
    case Activation::relu:
      return std::max(x, 0.0);
    case Activation::gelu:
      return x * 0.5 * std::erfc(-x / std::sqrt(2.0));
    case Activation::gelu_tanh:
      return 0.5 * x *
             (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
  }
  return 0.0;
}

TEST(Activation, KnownValues) {
  // GELU(1) = Phi(1) and GELU(-1) = -Phi(-1), from the normal CDF table.
  const Tensor x = Tensor::from(std::vector<double>{1.0, -1.0, 0.0, 3.0}, {4});
  const Tensor gelu = activation_forward(Activation::gelu, x);
  EXPECT_NEAR(gelu.get({0}), 0.8413447460685429, 1e-15);
  EXPECT_NEAR(gelu.get({1}), -0.15865525393145705, 1e-15);
  EXPECT_EQ(gelu.get({2}), 0.0);
  const Tensor relu = activation_forward(Activation::relu, x);
  EXPECT_EQ(relu.to_vector(), (std::vector<double>{1.0, 0.0, 0.0, 3.0}));
}

TEST(Activation, DerivativesMatchFiniteDifferences) {
  for (Activation a : {Activation::relu, Activation::gelu, Activation::gelu_tanh}) {
    SCOPED_TRACE(activation_name(a));
    // Keep ReLU inputs away from its kink, where the finite difference is meaningless.
    Tensor x = random_tensor({40}, DType::f64, 9, -3.0, 3.0);
    for (int64_t i = 0; i < x.numel(); ++i)
      if (std::abs(x.data<double>()[i]) < 1e-3) x.data<double>()[i] = 0.5;
    const Tensor w = random_tensor({40}, DType::f64, 10);
    auto loss = [&] { return weighted_sum(activation_forward(a, x), w); };
    EXPECT_TRUE(check_gradient(loss, x, activation_backward(a, x, w), "dx"));
  }
}

Tensor reference_feed_forward(const Tensor& x, const FeedForward& ff) {
  Tensor h = reference_linear(x, ff.in.params);
  for (int64_t i = 0; i < h.numel(); ++i)
    h.data<double>()[i] = reference_activation(ff.activation, h.data<double>()[i]);
  return reference_linear(h, ff.out.params);
}

TEST(FeedForward, ForwardMatchesFloat64Loop) {
  for (Activation a : {Activation::relu, Activation::gelu, Activation::gelu_tanh})
    for (DType dtype : {DType::f32, DType::f64}) {
      SCOPED_TRACE(std::string(activation_name(a)) + " " + dtype_name(dtype));
      const FeedForward ff = FeedForward::create({12, 48, a, true, dtype}, 11);
      const Tensor x = random_tensor({2, 5, 12}, dtype, 12);
      EXPECT_TRUE(all_close(ff.forward(x).out, reference_feed_forward(x, ff),
                            tolerance_for(dtype, 12 + 48)));
    }
}

TEST(FeedForward, GradientsMatchFiniteDifferences) {
  for (Activation a : {Activation::relu, Activation::gelu, Activation::gelu_tanh})
    for (double p : {0.0, 0.3}) {
      SCOPED_TRACE(std::string(activation_name(a)) + " dropout " + std::to_string(p));
      FeedForward ff = FeedForward::create({4, 6, a, true, DType::f64}, 13);
      Tensor x = random_tensor({2, 3, 4}, DType::f64, 14);
      const Tensor w = random_tensor({2, 3, 4}, DType::f64, 15);
      const DropoutSpec dropout{p, 77, 3};
      auto loss = [&] { return weighted_sum(ff.forward(x, dropout).out, w); };
      const Tensor dx = ff.backward(ff.forward(x, dropout).cache, w);
      EXPECT_TRUE(check_gradient(loss, x, dx, "dx"));
      ParameterList list;
      ff.parameters("ffn.", list);
      ASSERT_EQ(list.size(), 4u);
      EXPECT_EQ(list[0].name, "ffn.in.weight");
      EXPECT_EQ(list[3].name, "ffn.out.bias");
      for (const Parameter& param : list)
        EXPECT_TRUE(check_gradient(loss, param.value, param.grad, param.name));
    }
}

TEST(FeedForward, Errors) {
  const FeedForward ff = FeedForward::create({8, 16, Activation::relu, true, DType::f32}, 1);
  expect_error(
      [&] {
        ff.forward(Tensor::zeros({2, 7}));
      },
      "[feed_forward] input has 7 features, the block expects 8");
  expect_error(
      [&] {
        FeedForward::create({8, 0, Activation::relu, true, DType::f32}, 1);
      },
      "[feed_forward] dim and hidden must be >= 1");
  expect_error(
      [&] { activation_backward(Activation::gelu, Tensor::zeros({3}), Tensor::zeros({4})); },
      "[gelu] dout [4] must match the input [3]");
}

// ---------------------------------------------------------------------------------------------
// Dropout.

TEST(Dropout, KeepsTheExpectedFractionAndScales) {
  const int64_t n = 100000;
  const double p = 0.25;
  const Tensor x = Tensor::full({n}, 1.0, DType::f32);
  const Tensor y = dropout_forward(x, {p, 5, 0});
  int64_t kept = 0;
  for (double v : y.to_vector()) {
    if (v != 0.0) {
      ++kept;
      EXPECT_FLOAT_EQ(v, 1.0 / (1.0 - p));
    }
  }
  // Binomial(n, 0.75): standard deviation sqrt(n p (1 - p)) ~ 137; allow 6 of them.
  EXPECT_NEAR(double(kept), double(n) * (1.0 - p), 6.0 * std::sqrt(n * p * (1.0 - p)));
}

TEST(Dropout, BackwardUsesTheForwardMaskAndIsReproducible) {
  const Tensor x = random_tensor({7, 9}, DType::f64, 6);
  const DropoutSpec spec{0.4, 123, 2};
  const Tensor y = dropout_forward(x, spec);
  EXPECT_TRUE(all_close(dropout_forward(x, spec), y, {0.0, 0.0}, "same spec, same mask"));
  const Tensor dy = random_tensor({7, 9}, DType::f64, 7);
  const Tensor dx = dropout_backward(dy, spec);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const bool kept = dropout_keeps(spec, i);
    EXPECT_EQ(y.get_flat(i), kept ? x.get_flat(i) / 0.6 : 0.0);
    EXPECT_EQ(dx.get_flat(i), kept ? dy.get_flat(i) / 0.6 : 0.0);
  }
  // Another stream or seed draws another mask.
  int64_t differ = 0;
  for (int64_t i = 0; i < 200; ++i)
    differ += dropout_keeps(spec, i) != dropout_keeps({0.4, 123, 3}, i);
  EXPECT_GT(differ, 40);
  // p = 0 is the identity and shares storage.
  EXPECT_EQ(dropout_forward(x, {}).raw_data(), x.raw_data());
}

TEST(Dropout, Errors) {
  expect_error(
      [] {
        dropout_forward(Tensor::zeros({3}), {1.0, 0, 0});
      },
      "[dropout] p must be in [0, 1), got 1");
  expect_error(
      [] {
        dropout_forward(Tensor::zeros({3}), {-0.1, 0, 0});
      },
      "[dropout] p must be in [0, 1)");
  expect_error(
      [] {
        dropout_forward(Tensor::zeros({3}, DType::b8), {0.5, 0, 0});
      },
      "[dropout] input must be float32 or float64, got");
}

// ---------------------------------------------------------------------------------------------
// Sinusoidal positions.

TEST(Positions, SinusoidalTableMatchesTheFormula) {
  for (int64_t dim : {1, 2, 7, 16}) {
    const Tensor table = sinusoidal_positions(9, dim, DType::f64);
    for (int64_t t = 0; t < 9; ++t)
      for (int64_t j = 0; j < dim; ++j) {
        const double freq = 1.0 / std::pow(10000.0, double(2 * (j / 2)) / double(dim));
        const double want = j % 2 == 0 ? std::sin(t * freq) : std::cos(t * freq);
        EXPECT_NEAR(table.get({t, j}), want, 1e-15) << "t " << t << " j " << j;
      }
  }
  // Position 0 is [0, 1, 0, 1, ...].
  const Tensor first = sinusoidal_positions(1, 4, DType::f32);
  EXPECT_EQ(first.to_vector(), (std::vector<double>{0.0, 1.0, 0.0, 1.0}));
  // An offset table is a slice of the longer table (decoding one step at a time).
  const Tensor full = sinusoidal_positions(12, 6, DType::f32);
  EXPECT_TRUE(all_close(sinusoidal_positions(4, 6, DType::f32, 8),
                        full.slice(0, 8, 12).contiguous(), {0.0, 0.0}, "offset"));
  expect_error([] { sinusoidal_positions(4, 0); },
               "[sinusoidal_positions] length must be >= 0 and dim >= 1");
}

// ---------------------------------------------------------------------------------------------
// RoPE.

RopeConfig rope_at(int64_t offset, RopeLayout layout = RopeLayout::interleaved,
                   std::vector<int64_t> offsets = {}) {
  RopeConfig config;
  config.offset = offset;
  config.layout = layout;
  config.offsets = std::move(offsets);
  return config;
}

// Float64 loop straight from the paper's pairing (interleaved) or the half split.
Tensor reference_rope(const Tensor& x, RopeLayout layout, int64_t offset) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  Tensor y = Tensor::zeros(x.shape(), DType::f64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double angle = double(offset + t) * std::pow(10000.0, -2.0 * double(i) / double(D));
          const int64_t ia = layout == RopeLayout::interleaved ? 2 * i : i;
          const int64_t ib = layout == RopeLayout::interleaved ? 2 * i + 1 : i + D / 2;
          const double a = x.get({b, h, t, ia}), c = x.get({b, h, t, ib});
          y.set({b, h, t, ia}, a * std::cos(angle) - c * std::sin(angle));
          y.set({b, h, t, ib}, a * std::sin(angle) + c * std::cos(angle));
        }
  return y;
}

TEST(Rope, ForwardMatchesFloat64Loop) {
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::half})
    for (DType dtype : {DType::f32, DType::f64})
      for (int64_t d : {2, 6, 64}) {
        SCOPED_TRACE(std::string(layout == RopeLayout::half ? "half " : "interleaved ") +
                     dtype_name(dtype) + " D " + std::to_string(d));
        const Tensor x = random_tensor({2, 3, 5, d}, dtype, 21);
        const Tensor y = rope_forward(x, rope_at(7, layout));
        EXPECT_TRUE(all_close(y, reference_rope(x, layout, 7), tolerance_for(dtype, 4)));
      }
}

TEST(Rope, PreservesNormsOfEveryPair) {
  const Tensor x = random_tensor({1, 2, 6, 8}, DType::f64, 22);
  const Tensor y = rope_forward(x, rope_at(1000));
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t t = 0; t < 6; ++t)
      for (int64_t i = 0; i < 4; ++i) {
        const double before = std::hypot(x.get({0, h, t, 2 * i}), x.get({0, h, t, 2 * i + 1}));
        const double after = std::hypot(y.get({0, h, t, 2 * i}), y.get({0, h, t, 2 * i + 1}));
        EXPECT_NEAR(after, before, 4e-16 * 8);
      }
}

// q_m . k_n depends only on m - n: shifting both positions leaves every score unchanged.
TEST(Rope, ScoresDependOnlyOnRelativePosition) {
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::half}) {
    const int64_t D = 16;
    const Tensor q = random_tensor({1, 1, 1, D}, DType::f64, 23);
    const Tensor k = random_tensor({1, 1, 1, D}, DType::f64, 24);
    auto score = [&](int64_t m, int64_t n) {
      const Tensor qm = rope_forward(q, rope_at(m, layout));
      const Tensor kn = rope_forward(k, rope_at(n, layout));
      double s = 0.0;
      for (int64_t j = 0; j < D; ++j) s += qm.get({0, 0, 0, j}) * kn.get({0, 0, 0, j});
      return s;
    };
    for (int64_t m : {0, 3, 11})
      for (int64_t n : {0, 5, 9})
        for (int64_t shift : {1, 17, 500}) {
          // Angles up to ~500 rad: float64 keeps ~1e-13 of the rotation exact.
          EXPECT_NEAR(score(m + shift, n + shift), score(m, n), 1e-12)
              << "m " << m << " n " << n << " shift " << shift;
        }
  }
}

TEST(Rope, OffsetsMatchTheFullSequence) {
  // Decoding with a KV cache: rotating step t alone with offset t equals slicing the full result.
  const Tensor x = random_tensor({2, 2, 6, 8}, DType::f32, 25);
  const Tensor full = rope_forward(x);
  for (int64_t t = 0; t < 6; ++t) {
    const Tensor step = rope_forward(x.slice(2, t, t + 1), rope_at(t));
    EXPECT_TRUE(all_close(step, full.slice(2, t, t + 1).contiguous(), {0.0, 0.0}, "step"));
  }
  // Per-batch offsets: batch 1 at offset 3 equals the shared offset 3.
  const Tensor per_batch = rope_forward(x, rope_at(0, RopeLayout::interleaved, {0, 3}));
  const Tensor shifted = rope_forward(x, rope_at(3));
  EXPECT_TRUE(all_close(per_batch.slice(0, 1, 2).contiguous(), shifted.slice(0, 1, 2).contiguous(),
                        {0.0, 0.0}, "per-batch offset"));
  EXPECT_TRUE(all_close(per_batch.slice(0, 0, 1).contiguous(), full.slice(0, 0, 1).contiguous(),
                        {0.0, 0.0}, "batch 0"));
}

TEST(Rope, BackwardMatchesFiniteDifferencesAndInverts) {
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::half}) {
    const RopeConfig config = rope_at(4, layout);
    Tensor x = random_tensor({2, 2, 3, 6}, DType::f64, 26);
    const Tensor w = random_tensor({2, 2, 3, 6}, DType::f64, 27);
    auto loss = [&] { return weighted_sum(rope_forward(x, config), w); };
    EXPECT_TRUE(check_gradient(loss, x, rope_backward(w, config), "dx"));
    EXPECT_TRUE(all_close(rope_backward(rope_forward(x, config), config), x,
                          tolerance_for(DType::f64, 4), "inverse"));
  }
}

TEST(Rope, Errors) {
  expect_error(
      [] {
        rope_forward(Tensor::zeros({1, 2, 3, 5}));
      },
      "[rope] input head width D = 5 must be even");
  expect_error(
      [] {
        rope_forward(Tensor::zeros({2, 3, 4}));
      },
      "[rope] input must be [B, H, T, D], got [2, 3, 4]");
  expect_error(
      [] {
        rope_forward(Tensor::zeros({2, 1, 3, 4}), rope_at(0, RopeLayout::half, {1}));
      },
      "[rope] offsets has 1 entries, input has batch 2");
  expect_error(
      [] {
        rope_backward(Tensor::zeros({1, 1, 1, 4}), rope_at(-2, RopeLayout::half));
      },
      "[rope] offset must be >= 0, got -2");
}

// ---------------------------------------------------------------------------------------------
// Parameter list.

TEST(Parameters, ListSharesStorageWithTheLayers) {
  Linear lin = Linear::create({3, 2, true, DType::f32}, 1);
  LayerNorm ln = LayerNorm::create({2, 1e-5, true, DType::f32});
  ParameterList list;
  lin.parameters("proj.", list);
  ln.parameters("norm.", list);
  ASSERT_EQ(list.size(), 4u);
  EXPECT_EQ(list[2].name, "norm.weight");
  EXPECT_EQ(parameter_count(list), 3 * 2 + 2 + 2 + 2);
  // An optimiser writing through the list changes the layer.
  list[0].value.data<float>()[0] = 42.0f;
  EXPECT_EQ(lin.params.weight.get({0, 0}), 42.0);
  // Gradients accumulate into the listed tensors, and zero_grads clears them.
  lin.backward(lin.forward(Tensor::full({1, 3}, 1.0)).cache, Tensor::full({1, 2}, 1.0));
  EXPECT_EQ(list[1].grad.get({0}), 1.0);
  zero_grads(list);
  EXPECT_EQ(lin.grads.bias.get({0}), 0.0);
  EXPECT_EQ(lin.grads.weight.get({1, 2}), 0.0);
}

}  // namespace
}  // namespace attn::nn
