// GRU and LSTM: the layer against a plain float64 loop written from the gate equations, every
// gradient (inputs, initial states, each weight of each layer and direction) against central
// finite differences, padding semantics, the single-step cell API against the layer, and the
// error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "nn/recurrent.h"
#include "support/test_support.h"

namespace attn::nn {
namespace {

using attn::testing::expect_error;

using attn::testing::all_close;
using attn::testing::check_gradient;
using attn::testing::random_tensor;
using attn::testing::tolerance_for;
using attn::testing::weighted_sum;

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// ---------------------------------------------------------------------------------------------
// Reference: one sequence at a time, one step at a time, every product a plain loop in float64.

struct ReferenceResult {
  Tensor out;  // [B, T, D H]
  Tensor h;    // [L D, B, H]
  Tensor c;    // [L D, B, H] (LSTM)
};

// W [rows, cols] row-major times v [cols], added to acc [rows].
void add_matvec(const std::vector<double>& w, int64_t rows, int64_t cols, const double* v,
                std::vector<double>& acc) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) acc[r] += w[r * cols + k] * v[k];
}

ReferenceResult reference_rnn(const Rnn& rnn, const Tensor& x, const std::vector<int64_t>& lengths,
                              const RnnState& initial) {
  const RnnConfig& cfg = rnn.config;
  const int64_t B = x.size(0), T = x.size(1), H = cfg.hidden_size, D = rnn.num_directions();
  const int64_t L = cfg.num_layers, G = rnn_gate_count(cfg.kind);
  const bool lstm = cfg.kind == RnnKind::lstm;
  std::vector<double> input = x.to_vector();
  int64_t in_size = x.size(2);
  const std::vector<double> h0 =
      initial.h.defined() ? initial.h.to_vector() : std::vector<double>(L * D * B * H, 0.0);
  const std::vector<double> c0 =
      initial.c.defined() ? initial.c.to_vector() : std::vector<double>(L * D * B * H, 0.0);
  ReferenceResult result{Tensor::zeros({B, T, D * H}, DType::f64),
                         Tensor::zeros({L * D, B, H}, DType::f64),
                         Tensor::zeros({L * D, B, H}, DType::f64)};
  for (int64_t layer = 0; layer < L; ++layer) {
    std::vector<double> output(B * T * D * H, 0.0);
    for (int64_t dir = 0; dir < D; ++dir) {
      const int64_t k = layer * D + dir;
      const RnnCellParams& p = rnn.params[k];
      const std::vector<double> w_ih = p.weight_ih.to_vector(), w_hh = p.weight_hh.to_vector();
      const std::vector<double> b_ih =
          p.bias_ih.defined() ? p.bias_ih.to_vector() : std::vector<double>(G * H, 0.0);
      const std::vector<double> b_hh =
          p.bias_hh.defined() ? p.bias_hh.to_vector() : std::vector<double>(G * H, 0.0);
      for (int64_t b = 0; b < B; ++b) {
        std::vector<double> h(h0.begin() + (k * B + b) * H, h0.begin() + (k * B + b + 1) * H);
        std::vector<double> c(c0.begin() + (k * B + b) * H, c0.begin() + (k * B + b + 1) * H);
        for (int64_t s = 0; s < lengths[b]; ++s) {
          const int64_t t = dir == 0 ? s : lengths[b] - 1 - s;
          std::vector<double> xp = b_ih, hp = b_hh;
          add_matvec(w_ih, G * H, in_size, &input[(b * T + t) * in_size], xp);
          add_matvec(w_hh, G * H, H, h.data(), hp);
          for (int64_t j = 0; j < H; ++j) {
            if (lstm) {
              const double i = sigmoid(xp[j] + hp[j]);
              const double f = sigmoid(xp[H + j] + hp[H + j]);
              const double g = std::tanh(xp[2 * H + j] + hp[2 * H + j]);
              const double o = sigmoid(xp[3 * H + j] + hp[3 * H + j]);
              c[j] = f * c[j] + i * g;
              h[j] = o * std::tanh(c[j]);
            } else {
              const double r = sigmoid(xp[j] + hp[j]);
              const double z = sigmoid(xp[H + j] + hp[H + j]);
              const double n = std::tanh(xp[2 * H + j] + r * hp[2 * H + j]);
              h[j] = (1.0 - z) * n + z * h[j];
            }
          }
          for (int64_t j = 0; j < H; ++j) output[(b * T + t) * D * H + dir * H + j] = h[j];
        }
        for (int64_t j = 0; j < H; ++j) {
          result.h.set({k, b, j}, h[j]);
          result.c.set({k, b, j}, c[j]);
        }
      }
    }
    input = output;
    in_size = D * H;
  }
  result.out = Tensor::from(input, {B, T, D * H});
  return result;
}

struct Case {
  RnnKind kind;
  int64_t layers;
  bool bidirectional;
  bool bias = true;
};

std::string case_name(const Case& c) {
  return std::string(rnn_kind_name(c.kind)) + " L=" + std::to_string(c.layers) +
         (c.bidirectional ? " bidirectional" : " unidirectional") + (c.bias ? "" : " no bias");
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm})
    for (int64_t layers : {1, 2})
      for (bool bidirectional : {false, true}) cases.push_back({kind, layers, bidirectional});
  cases.push_back({RnnKind::gru, 1, true, false});
  cases.push_back({RnnKind::lstm, 2, false, false});
  return cases;
}

RnnState random_state(const Rnn& rnn, int64_t B, uint64_t seed) {
  const RnnConfig& c = rnn.config;
  const Shape shape{c.num_layers * rnn.num_directions(), B, c.hidden_size};
  RnnState s;
  s.h = random_tensor(shape, c.dtype, seed, -0.5, 0.5);
  if (c.kind == RnnKind::lstm) s.c = random_tensor(shape, c.dtype, seed + 1, -0.5, 0.5);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward.

TEST(Recurrent, ForwardMatchesFloat64Reference) {
  const int64_t B = 4, T = 6, I = 5, H = 7;
  const std::vector<int64_t> lengths{6, 3, 1, 0};
  for (const Case& tc : all_cases()) {
    for (DType dtype : {DType::f32, DType::f64}) {
      for (bool with_initial : {false, true}) {
        SCOPED_TRACE(case_name(tc) + " " + dtype_name(dtype) +
                     (with_initial ? " initial state" : " zero state"));
        const Rnn rnn =
            Rnn::create({tc.kind, I, H, tc.layers, tc.bidirectional, tc.bias, dtype}, 11);
        const Tensor x = random_tensor({B, T, I}, dtype, 12);
        const RnnState initial = with_initial ? random_state(rnn, B, 13) : RnnState{};
        const RnnForward got = rnn.forward(x, lengths, initial);
        const ReferenceResult want = reference_rnn(rnn, x, lengths, initial);
        // Each state element is a dot product of In + H terms per step, and the error of
        // every step feeds the next: bound by the terms of the whole recurrence.
        const auto tol = tolerance_for(dtype, tc.layers * T * (I + H));
        EXPECT_TRUE(all_close(got.out, want.out, tol, "out"));
        EXPECT_TRUE(all_close(got.final.h, want.h, tol, "final h"));
        if (tc.kind == RnnKind::lstm) {
          EXPECT_TRUE(all_close(got.final.c, want.c, tol, "final c"));
        } else {
          EXPECT_FALSE(got.final.c.defined());
        }
      }
    }
  }
}

TEST(Recurrent, AwkwardWidthsInFloat32) {
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm})
    for (int64_t width : {127, 128, 129}) {
      SCOPED_TRACE(std::string(rnn_kind_name(kind)) + " width " + std::to_string(width));
      const Rnn rnn = Rnn::create({kind, width, width, 1, true, true, DType::f32}, 15);
      const Tensor x = random_tensor({3, 4, width}, DType::f32, 16);
      const std::vector<int64_t> lengths{4, 3, 1};
      const RnnForward got = rnn.forward(x, lengths);
      const ReferenceResult want = reference_rnn(rnn, x, lengths, {});
      const auto tol = tolerance_for(DType::f32, 4 * 2 * width);
      EXPECT_TRUE(all_close(got.out, want.out, tol, "out"));
      EXPECT_TRUE(all_close(got.final.h, want.h, tol, "final h"));
    }
}

TEST(Recurrent, EdgeSizes) {
  // Empty batch, empty sequences, one step, one hidden unit.
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm}) {
    for (const Shape& shape : {Shape{0, 3, 2}, Shape{2, 0, 2}, Shape{1, 1, 2}, Shape{3, 2, 2}}) {
      SCOPED_TRACE(std::string(rnn_kind_name(kind)) + " x " + shape_str(shape));
      Rnn rnn = Rnn::create({kind, 2, 1, 2, true, true, DType::f64}, 3);
      const Tensor x = random_tensor(shape, DType::f64, 4);
      const RnnForward f = rnn.forward(x);
      const std::vector<int64_t> lengths(static_cast<std::size_t>(shape[0]), shape[1]);
      const ReferenceResult want = reference_rnn(rnn, x, lengths, {});
      const auto tol = tolerance_for(DType::f64, 64);
      EXPECT_TRUE(all_close(f.out, want.out, tol, "out"));
      EXPECT_TRUE(all_close(f.final.h, want.h, tol, "final h"));
      const RnnBackward g = rnn.backward(f.cache, Tensor::full(f.out.shape(), 1.0, DType::f64));
      EXPECT_EQ(g.dx.shape(), shape);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients by central finite differences in float64.

TEST(Recurrent, GradientsMatchFiniteDifferences) {
  const int64_t B = 3, T = 4, I = 3, H = 2;
  const std::vector<int64_t> lengths{4, 2, 3};
  for (const Case& tc : all_cases()) {
    SCOPED_TRACE(case_name(tc));
    Rnn rnn = Rnn::create({tc.kind, I, H, tc.layers, tc.bidirectional, tc.bias, DType::f64}, 21);
    const bool lstm = tc.kind == RnnKind::lstm;
    Tensor x = random_tensor({B, T, I}, DType::f64, 22);
    RnnState initial = random_state(rnn, B, 23);
    const RnnForward f = rnn.forward(x, lengths, initial);
    // Loss = <out, w_out> + <h_n, w_h> (+ <c_n, w_c>): exercises dout and the final-state
    // gradients together.
    const Tensor w_out = random_tensor(f.out.shape(), DType::f64, 24);
    const Tensor w_h = random_tensor(f.final.h.shape(), DType::f64, 25);
    const Tensor w_c = lstm ? random_tensor(f.final.c.shape(), DType::f64, 26) : Tensor();
    auto loss = [&] {
      const RnnForward g = rnn.forward(x, lengths, initial);
      return weighted_sum(g.out, w_out) + weighted_sum(g.final.h, w_h) +
             (lstm ? weighted_sum(g.final.c, w_c) : 0.0);
    };
    rnn.zero_grad();
    const RnnBackward grads = rnn.backward(f.cache, w_out, {w_h, w_c});
    EXPECT_TRUE(check_gradient(loss, x, grads.dx, "dx"));
    EXPECT_TRUE(check_gradient(loss, initial.h, grads.dinitial.h, "dh0"));
    if (lstm) {
      EXPECT_TRUE(check_gradient(loss, initial.c, grads.dinitial.c, "dc0"));
    }
    ParameterList list;
    rnn.parameters("rnn.", list);
    EXPECT_EQ(list.size(), rnn.params.size() * (tc.bias ? 4 : 2));
    for (const Parameter& p : list) EXPECT_TRUE(check_gradient(loss, p.value, p.grad, p.name));
  }
}

// Dropout between layers: the forward equals composing single layers with dropout_forward on
// the first layer's output, and the backward matches finite differences with the mask fixed.
TEST(Recurrent, DropoutBetweenLayers) {
  const int64_t B = 2, T = 4, I = 3, H = 3;
  const std::vector<int64_t> lengths{4, 2};
  const DropoutSpec dropout{0.4, 99, 10};
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm}) {
    SCOPED_TRACE(rnn_kind_name(kind));
    Rnn rnn = Rnn::create({kind, I, H, 2, true, true, DType::f64}, 111);
    Tensor x = random_tensor({B, T, I}, DType::f64, 112);
    const RnnForward f = rnn.forward(x, lengths, {}, dropout);

    Rnn first = Rnn::create({kind, I, H, 1, true, true, DType::f64}, 0);
    Rnn second = Rnn::create({kind, 2 * H, H, 1, true, true, DType::f64}, 0);
    first.params = {rnn.params[0], rnn.params[1]};
    second.params = {rnn.params[2], rnn.params[3]};
    const Tensor mid = first.forward(x, lengths).out;
    const Tensor dropped = dropout_forward(mid, {dropout.p, dropout.seed, dropout.stream + 1});
    const RnnForward composed = second.forward(dropped, lengths);
    const auto tol = tolerance_for(DType::f64, 2 * T * (I + 3 * H));
    EXPECT_TRUE(all_close(f.out, composed.out, tol, "out"));
    EXPECT_FALSE(all_close(f.out, rnn.forward(x, lengths).out, tol, "dropout changes the output"));

    const Tensor w_out = random_tensor(f.out.shape(), DType::f64, 113);
    const Tensor w_h = random_tensor(f.final.h.shape(), DType::f64, 114);
    auto loss = [&] {
      const RnnForward g = rnn.forward(x, lengths, {}, dropout);
      return weighted_sum(g.out, w_out) + weighted_sum(g.final.h, w_h);
    };
    rnn.zero_grad();
    const RnnBackward grads = rnn.backward(f.cache, w_out, {w_h, Tensor()});
    EXPECT_TRUE(check_gradient(loss, x, grads.dx, "dx"));
    ParameterList list;
    rnn.parameters("rnn.", list);
    for (const Parameter& p : list) EXPECT_TRUE(check_gradient(loss, p.value, p.grad, p.name));
  }
}

TEST(Recurrent, GradientsAccumulateAcrossCalls) {
  Rnn rnn = Rnn::create({RnnKind::lstm, 3, 4, 1, true, true, DType::f64}, 5);
  const Tensor x = random_tensor({2, 3, 3}, DType::f64, 6);
  const RnnForward f = rnn.forward(x);
  const Tensor dout = random_tensor(f.out.shape(), DType::f64, 7);
  rnn.backward(f.cache, dout);
  const Tensor once = rnn.grads[1].weight_hh.clone();
  rnn.backward(f.cache, dout);
  Tensor twice = once.clone();
  for (int64_t i = 0; i < twice.numel(); ++i) twice.data<double>()[i] *= 2.0;
  EXPECT_TRUE(all_close(rnn.grads[1].weight_hh, twice, tolerance_for(DType::f64, 8), "2x grad"));
}

// ---------------------------------------------------------------------------------------------
// Padding.

TEST(Recurrent, PaddingDoesNotChangeTheValidPart) {
  const int64_t B = 3, T = 5, I = 4, H = 3;
  const std::vector<int64_t> lengths{5, 2, 0};
  for (const Case& tc : all_cases()) {
    SCOPED_TRACE(case_name(tc));
    const Rnn rnn =
        Rnn::create({tc.kind, I, H, tc.layers, tc.bidirectional, tc.bias, DType::f64}, 31);
    Tensor x = random_tensor({B, T, I}, DType::f64, 32);
    const RnnState initial = random_state(rnn, B, 33);
    const RnnForward padded = rnn.forward(x, lengths, initial);
    // Garbage in the padding positions of the input must not matter.
    Tensor noisy = x.clone();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = lengths[b]; t < T; ++t)
        for (int64_t i = 0; i < I; ++i) noisy.set({b, t, i}, 1e3 * (i + 1));
    const RnnForward padded_noisy = rnn.forward(noisy, lengths, initial);
    EXPECT_TRUE(all_close(padded_noisy.out, padded.out, {0.0, 0.0}, "noisy padding out"));
    EXPECT_TRUE(all_close(padded_noisy.final.h, padded.final.h, {0.0, 0.0}, "noisy padding h"));

    const auto tol = tolerance_for(DType::f64, tc.layers * T * (I + H));
    const int64_t LD = tc.layers * rnn.num_directions();
    for (int64_t b = 0; b < B; ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      const int64_t len = lengths[b];
      // The same sequence alone, cut to its length.
      const Tensor alone_x = x.slice(0, b, b + 1).slice(1, 0, len).contiguous();
      RnnState alone_initial{
          initial.h.slice(1, b, b + 1).contiguous(),
          initial.c.defined() ? initial.c.slice(1, b, b + 1).contiguous() : Tensor()};
      const RnnForward alone = rnn.forward(alone_x, {}, alone_initial);
      EXPECT_TRUE(all_close(padded.out.slice(0, b, b + 1).slice(1, 0, len).contiguous(), alone.out,
                            tol, "valid outputs"));
      EXPECT_TRUE(
          all_close(padded.final.h.slice(1, b, b + 1).contiguous(), alone.final.h, tol, "final h"));
      if (tc.kind == RnnKind::lstm) {
        EXPECT_TRUE(all_close(padded.final.c.slice(1, b, b + 1).contiguous(), alone.final.c, tol,
                              "final c"));
      }
      // Outputs at padding positions are exactly zero.
      const Tensor pad_out = padded.out.slice(0, b, b + 1).slice(1, len, T).contiguous();
      EXPECT_TRUE(all_close(pad_out, Tensor::zeros(pad_out.shape(), DType::f64), {0.0, 0.0},
                            "padding outputs"));
      // A zero-length sequence returns its initial state.
      if (len == 0) {
        EXPECT_TRUE(all_close(padded.final.h.slice(1, b, b + 1).contiguous(),
                              initial.h.slice(1, b, b + 1).contiguous(), {0.0, 0.0},
                              "empty sequence keeps h0"));
      }
    }
    EXPECT_EQ(padded.final.h.shape(), (Shape{LD, B, H}));
  }
}

TEST(Recurrent, NoGradientReachesPaddingInputs) {
  Rnn rnn = Rnn::create({RnnKind::gru, 2, 3, 2, true, true, DType::f64}, 41);
  const Tensor x = random_tensor({2, 4, 2}, DType::f64, 42);
  const RnnForward f = rnn.forward(x, {4, 1});
  const RnnBackward g = rnn.backward(f.cache, random_tensor(f.out.shape(), DType::f64, 43));
  const Tensor pad = g.dx.slice(0, 1, 2).slice(1, 1, 4).contiguous();
  EXPECT_TRUE(all_close(pad, Tensor::zeros(pad.shape(), DType::f64), {0.0, 0.0}, "dx at padding"));
}

// The reverse direction reads each sequence backwards from its own last valid step.
TEST(Recurrent, ReverseDirectionIsTheForwardOfTheReversedSequence) {
  const int64_t I = 3, H = 4, T = 5;
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm}) {
    SCOPED_TRACE(rnn_kind_name(kind));
    const Rnn bi = Rnn::create({kind, I, H, 1, true, true, DType::f64}, 51);
    Rnn uni = Rnn::create({kind, I, H, 1, false, true, DType::f64}, 0);
    uni.params = {bi.params[1]};
    const Tensor x = random_tensor({1, T, I}, DType::f64, 52);
    const int64_t len = 3;
    Tensor reversed = Tensor::zeros({1, len, I}, DType::f64);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t i = 0; i < I; ++i) reversed.set({0, t, i}, x.get({0, len - 1 - t, i}));
    const RnnForward b = bi.forward(x, {len});
    const RnnForward u = uni.forward(reversed);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t j = 0; j < H; ++j)
        EXPECT_NEAR(b.out.get({0, t, H + j}), u.out.get({0, len - 1 - t, j}), 1e-14);
    EXPECT_TRUE(all_close(b.final.h.slice(0, 1, 2).contiguous(), u.final.h,
                          tolerance_for(DType::f64, 16), "reverse final h"));
  }
}

// ---------------------------------------------------------------------------------------------
// Cells.

TEST(RecurrentCell, GruCellEqualsOneStepOfTheLayer) {
  const int64_t B = 3, I = 4, H = 5;
  for (DType dtype : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(dtype));
    Rnn rnn = Rnn::create({RnnKind::gru, I, H, 1, false, true, dtype}, 61);
    const Tensor x = random_tensor({B, 1, I}, dtype, 62);
    const RnnState initial = random_state(rnn, B, 63);
    const RnnForward layer = rnn.forward(x, {}, initial);
    const GruCellForward cell =
        gru_cell_forward(rnn.params[0], x.select(1, 0), initial.h.select(0, 0));
    const auto tol = tolerance_for(dtype, I + H);
    EXPECT_TRUE(all_close(cell.h, layer.out.select(1, 0).contiguous(), tol, "h"));

    const Tensor dout = random_tensor({B, 1, H}, dtype, 64);
    rnn.zero_grad();
    const RnnBackward lg = rnn.backward(layer.cache, dout);
    RnnCellParams cg = rnn_cell_zeros_like(rnn.params[0]);
    const GruCellGrads g = gru_cell_backward(rnn.params[0], cg, cell.cache, dout.select(1, 0));
    const auto gtol = tolerance_for(dtype, B * (I + H) * 3);
    EXPECT_TRUE(all_close(g.dx, lg.dx.select(1, 0).contiguous(), gtol, "dx"));
    EXPECT_TRUE(all_close(g.dh_prev, lg.dinitial.h.select(0, 0).contiguous(), gtol, "dh_prev"));
    EXPECT_TRUE(all_close(cg.weight_ih, rnn.grads[0].weight_ih, gtol, "dweight_ih"));
    EXPECT_TRUE(all_close(cg.weight_hh, rnn.grads[0].weight_hh, gtol, "dweight_hh"));
    EXPECT_TRUE(all_close(cg.bias_ih, rnn.grads[0].bias_ih, gtol, "dbias_ih"));
    EXPECT_TRUE(all_close(cg.bias_hh, rnn.grads[0].bias_hh, gtol, "dbias_hh"));
  }
}

TEST(RecurrentCell, LstmCellEqualsOneStepOfTheLayer) {
  const int64_t B = 3, I = 4, H = 5;
  for (DType dtype : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(dtype));
    Rnn rnn = Rnn::create({RnnKind::lstm, I, H, 1, false, true, dtype}, 71);
    const Tensor x = random_tensor({B, 1, I}, dtype, 72);
    const RnnState initial = random_state(rnn, B, 73);
    const RnnForward layer = rnn.forward(x, {}, initial);
    const LstmCellForward cell = lstm_cell_forward(rnn.params[0], x.select(1, 0),
                                                   initial.h.select(0, 0), initial.c.select(0, 0));
    const auto tol = tolerance_for(dtype, I + H);
    EXPECT_TRUE(all_close(cell.h, layer.out.select(1, 0).contiguous(), tol, "h"));
    EXPECT_TRUE(all_close(cell.c, layer.final.c.select(0, 0).contiguous(), tol, "c"));

    const Tensor dout = random_tensor({B, 1, H}, dtype, 74);
    const Tensor dc = random_tensor({1, B, H}, dtype, 75);
    rnn.zero_grad();
    const RnnBackward lg = rnn.backward(layer.cache, dout, {Tensor(), dc});
    RnnCellParams cg = rnn_cell_zeros_like(rnn.params[0]);
    const LstmCellGrads g =
        lstm_cell_backward(rnn.params[0], cg, cell.cache, dout.select(1, 0), dc.select(0, 0));
    const auto gtol = tolerance_for(dtype, B * (I + H) * 4);
    EXPECT_TRUE(all_close(g.dx, lg.dx.select(1, 0).contiguous(), gtol, "dx"));
    EXPECT_TRUE(all_close(g.dh_prev, lg.dinitial.h.select(0, 0).contiguous(), gtol, "dh_prev"));
    EXPECT_TRUE(all_close(g.dc_prev, lg.dinitial.c.select(0, 0).contiguous(), gtol, "dc_prev"));
    EXPECT_TRUE(all_close(cg.weight_ih, rnn.grads[0].weight_ih, gtol, "dweight_ih"));
    EXPECT_TRUE(all_close(cg.weight_hh, rnn.grads[0].weight_hh, gtol, "dweight_hh"));
    EXPECT_TRUE(all_close(cg.bias_ih, rnn.grads[0].bias_ih, gtol, "dbias_ih"));
    EXPECT_TRUE(all_close(cg.bias_hh, rnn.grads[0].bias_hh, gtol, "dbias_hh"));
  }
}

// A decoder loop: stepping the cell T times and back-propagating step by step equals the layer.
TEST(RecurrentCell, SteppingTheCellEqualsTheLayer) {
  const int64_t B = 2, T = 4, I = 3, H = 4;
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm}) {
    SCOPED_TRACE(rnn_kind_name(kind));
    const bool lstm = kind == RnnKind::lstm;
    Rnn rnn = Rnn::create({kind, I, H, 1, false, true, DType::f64}, 81);
    const Tensor x = random_tensor({B, T, I}, DType::f64, 82);
    const Tensor dout = random_tensor({B, T, H}, DType::f64, 83);
    const RnnForward layer = rnn.forward(x);
    rnn.zero_grad();
    const RnnBackward lg = rnn.backward(layer.cache, dout);

    std::vector<GruCellCache> gru_caches;
    std::vector<LstmCellCache> lstm_caches;
    Tensor h, c;  // undefined: zero initial state
    for (int64_t t = 0; t < T; ++t) {
      const Tensor xt = x.select(1, t);
      if (lstm) {
        LstmCellForward f = lstm_cell_forward(rnn.params[0], xt, h, c);
        h = f.h;
        c = f.c;
        lstm_caches.push_back(f.cache);
      } else {
        GruCellForward f = gru_cell_forward(rnn.params[0], xt, h);
        h = f.h;
        gru_caches.push_back(f.cache);
      }
      EXPECT_TRUE(all_close(h, layer.out.select(1, t).contiguous(), tolerance_for(DType::f64, 64),
                            "h at step " + std::to_string(t)));
    }
    RnnCellParams cg = rnn_cell_zeros_like(rnn.params[0]);
    Tensor dh = Tensor::zeros({B, H}, DType::f64), dc;
    Tensor dx = Tensor::zeros({B, T, I}, DType::f64);
    for (int64_t t = T - 1; t >= 0; --t) {
      Tensor dh_t = dh.clone();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < H; ++j) dh_t.set({b, j}, dh_t.get({b, j}) + dout.get({b, t, j}));
      Tensor dxt;
      if (lstm) {
        const LstmCellGrads g = lstm_cell_backward(rnn.params[0], cg, lstm_caches[t], dh_t, dc);
        dh = g.dh_prev;
        dc = g.dc_prev;
        dxt = g.dx;
      } else {
        const GruCellGrads g = gru_cell_backward(rnn.params[0], cg, gru_caches[t], dh_t);
        dh = g.dh_prev;
        dxt = g.dx;
      }
      dx.select(1, t).copy_from(dxt);
    }
    const auto tol = tolerance_for(DType::f64, 256);
    EXPECT_TRUE(all_close(dx, lg.dx, tol, "dx"));
    EXPECT_TRUE(all_close(cg.weight_ih, rnn.grads[0].weight_ih, tol, "dweight_ih"));
    EXPECT_TRUE(all_close(cg.weight_hh, rnn.grads[0].weight_hh, tol, "dweight_hh"));
    EXPECT_TRUE(all_close(cg.bias_hh, rnn.grads[0].bias_hh, tol, "dbias_hh"));
  }
}

TEST(RecurrentCell, CellGradientsMatchFiniteDifferences) {
  const int64_t B = 2, I = 3, H = 3;
  for (RnnKind kind : {RnnKind::gru, RnnKind::lstm}) {
    SCOPED_TRACE(rnn_kind_name(kind));
    const bool lstm = kind == RnnKind::lstm;
    RnnCellParams p = rnn_cell_init(kind, I, H, true, DType::f64, 91);
    Tensor x = random_tensor({B, I}, DType::f64, 92);
    Tensor h = random_tensor({B, H}, DType::f64, 93);
    Tensor c = random_tensor({B, H}, DType::f64, 94);
    const Tensor wh = random_tensor({B, H}, DType::f64, 95);
    const Tensor wc = random_tensor({B, H}, DType::f64, 96);
    RnnCellParams g = rnn_cell_zeros_like(p);
    Tensor dx, dh, dc;
    std::function<double()> loss;
    if (lstm) {
      loss = [&] {
        const LstmCellForward f = lstm_cell_forward(p, x, h, c);
        return weighted_sum(f.h, wh) + weighted_sum(f.c, wc);
      };
      const LstmCellGrads grads =
          lstm_cell_backward(p, g, lstm_cell_forward(p, x, h, c).cache, wh, wc);
      dx = grads.dx;
      dh = grads.dh_prev;
      dc = grads.dc_prev;
    } else {
      loss = [&] { return weighted_sum(gru_cell_forward(p, x, h).h, wh); };
      const GruCellGrads grads = gru_cell_backward(p, g, gru_cell_forward(p, x, h).cache, wh);
      dx = grads.dx;
      dh = grads.dh_prev;
    }
    EXPECT_TRUE(check_gradient(loss, x, dx, "dx"));
    EXPECT_TRUE(check_gradient(loss, h, dh, "dh_prev"));
    if (lstm) {
      EXPECT_TRUE(check_gradient(loss, c, dc, "dc_prev"));
    }
    EXPECT_TRUE(check_gradient(loss, p.weight_ih, g.weight_ih, "weight_ih"));
    EXPECT_TRUE(check_gradient(loss, p.weight_hh, g.weight_hh, "weight_hh"));
    EXPECT_TRUE(check_gradient(loss, p.bias_ih, g.bias_ih, "bias_ih"));
    EXPECT_TRUE(check_gradient(loss, p.bias_hh, g.bias_hh, "bias_hh"));
  }
}

// ---------------------------------------------------------------------------------------------
// Initialisation and parameters.

TEST(Recurrent, InitialisationAndParameterNames) {
  const Rnn rnn = Rnn::create({RnnKind::lstm, 3, 4, 2, true, true, DType::f32}, 101);
  ParameterList list;
  rnn.parameters("enc.", list);
  ASSERT_EQ(list.size(), 16u);
  EXPECT_EQ(list[0].name, "enc.weight_ih_l0");
  EXPECT_EQ(list[4].name, "enc.weight_ih_l0_reverse");
  EXPECT_EQ(list[11].name, "enc.bias_hh_l1");
  EXPECT_EQ(list[15].name, "enc.bias_hh_l1_reverse");
  EXPECT_EQ(rnn.params[2].weight_ih.shape(), (Shape{16, 8}));  // layer 1 reads both directions
  // U(-1/sqrt(H), 1/sqrt(H)), and the tensors are not copies of one another.
  for (const Parameter& p : list)
    for (double v : p.value.to_vector()) ASSERT_LE(std::abs(v), 0.5) << p.name;
  EXPECT_NE(list[0].value.get({0, 0}), list[4].value.get({0, 0}));
  // Same seed, same weights.
  const Rnn again = Rnn::create(rnn.config, 101);
  EXPECT_TRUE(all_close(again.params[3].weight_hh, rnn.params[3].weight_hh, {0.0, 0.0}, "seeded"));
}

// ---------------------------------------------------------------------------------------------
// Errors.


TEST(Recurrent, Errors) {
  Rnn gru = Rnn::create({RnnKind::gru, 8, 4, 2, true, true, DType::f32}, 1);
  Rnn lstm = Rnn::create({RnnKind::lstm, 8, 4, 1, false, true, DType::f32}, 1);
  const Tensor x = random_tensor({2, 3, 8}, DType::f32, 2);
  expect_error(
      [&] {
        gru.forward(random_tensor({2, 3, 7}, DType::f32, 3));
      },
      "[gru] input has 7 features, the layer expects 8");
  expect_error(
      [&] {
        gru.forward(random_tensor({2, 8}, DType::f32, 3));
      },
      "[gru] input must be [B, T, I], got [2, 8]");
  expect_error([&] { gru.forward(x.to(DType::f64)); },
               "[gru] input is float64, weights are float32");
  expect_error([&] { gru.forward(x, {3}); }, "[gru] lengths has 1 entries, input has batch 2");
  expect_error([&] { gru.forward(x, {3, 4}); }, "[gru] lengths[1] = 4 is outside [0, 3]");
  expect_error([&] { gru.forward(x, {3, -1}); }, "[gru] lengths[1] = -1 is outside [0, 3]");
  expect_error(
      [&] {
        gru.forward(x, {}, {Tensor::zeros({2, 2, 4}), Tensor()});
      },
      "[gru] initial h is [2, 2, 4], expected [4, 2, 4]");
  expect_error(
      [&] {
        gru.forward(x, {}, {Tensor::zeros({4, 2, 4}), Tensor::zeros({4, 2, 4})});
      },
      "[gru] a GRU has no cell state");
  expect_error(
      [&] {
        lstm.forward(x, {}, {Tensor(), Tensor::zeros({1, 2, 5})});
      },
      "[lstm] initial c is [1, 2, 5], expected [1, 2, 4]");
  const RnnForward f = gru.forward(x);
  expect_error(
      [&] {
        gru.backward(f.cache, Tensor::zeros({2, 3, 4}));
      },
      "[gru] dout is [2, 3, 4], output was [2, 3, 8]");
  expect_error([&] { gru.backward(RnnCache{}, f.out); }, "[gru] backward needs the cache");
  Rnn broken = gru;
  broken.params[2].weight_ih = Tensor::zeros({12, 5});
  expect_error([&] { broken.forward(x); },
               "[gru] weight_ih of layer 1 is [12, 5], expected 8 input features");
  expect_error(
      [&] {
        gru.forward(x, {}, {}, {1.0, 0, 0});
      },
      "[gru] dropout p must be in [0, 1), got 1");
  expect_error(
      [&] {
        Rnn::create({RnnKind::gru, 8, 0, 1, false, true, DType::f32}, 1);
      },
      "[gru] input_size must be >= 0 and hidden_size >= 1");
  expect_error(
      [&] {
        Rnn::create({RnnKind::lstm, 8, 4, 0, false, true, DType::f32}, 1);
      },
      "[lstm] num_layers must be >= 1, got 0");

  const RnnCellParams p = rnn_cell_init(RnnKind::gru, 8, 4, true, DType::f32, 1);
  expect_error(
      [&] {
        gru_cell_forward(p, Tensor::zeros({2, 7}), Tensor());
      },
      "[gru_cell] input has 7 features, weight_ih expects 8");
  expect_error(
      [&] {
        gru_cell_forward(p, Tensor::zeros({2, 8}), Tensor::zeros({3, 4}));
      },
      "[gru_cell] h_prev is [3, 4], expected [2, 4]");
  expect_error(
      [&] {
        lstm_cell_forward(p, Tensor::zeros({2, 8}), Tensor(), Tensor());
      },
      "[lstm_cell] weight_hh is [12, 4], expected [16, 4] (4 gates)");
  RnnCellParams wrong = rnn_cell_zeros_like(rnn_cell_init(RnnKind::gru, 5, 4, true, DType::f32, 1));
  const GruCellForward cf = gru_cell_forward(p, Tensor::zeros({2, 8}), Tensor());
  expect_error(
      [&] {
        gru_cell_backward(p, wrong, cf.cache, Tensor::zeros({2, 4}));
      },
      "[gru_cell] gradient of weight_ih is [12, 5], expected [12, 8]");
  RnnCellParams g = rnn_cell_zeros_like(p);
  expect_error(
      [&] {
        gru_cell_backward(p, g, cf.cache, Tensor::zeros({2, 5}));
      },
      "[gru_cell] dh is [2, 5], expected [2, 4]");
}

}  // namespace
}  // namespace attn::nn
