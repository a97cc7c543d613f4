// Recurrent layers: GRU and LSTM with PyTorch's gate equations, gate order and weight layout.
//
// Letters: B batch, T time steps, I input features, H hidden width, G gates (GRU 3, LSTM 4),
// L layers, D directions (2 when bidirectional, else 1).
//
// GRU (Cho et al. 2014; gate order r, z, n):
//   r = sigma(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigma(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
// LSTM (Hochreiter & Schmidhuber 1997, forget gate of Gers et al. 2000; gate order i, f, g, o):
//   [i, f, g, o] = [sigma, sigma, tanh, sigma](W_ih x + b_ih + W_hh h + b_hh)
//   c' = f * c + i * g,   h' = o * tanh(c')
//
// Weights of one layer and direction: weight_ih [G H, In], weight_hh [G H, H], bias_ih [G H],
// bias_hh [G H], gates stacked in the order above. In = I for layer 0, D H above it.
//
// Layer (batch first):
//   x [B, T, I]  ->  out [B, T, D H]   (directions concatenated: forward first, then reverse)
//   initial / final states: h [L D, B, H] (and c [L D, B, H] for LSTM), index layer * D + dir.
//   lengths[b] (optional): steps t >= lengths[b] are padding. They do not update the state and
//   their outputs are 0; sequence b's final state is its state after step lengths[b] - 1 (the
//   reverse direction starts at lengths[b] - 1 and ends at 0), as with PyTorch packed sequences.
//   A length of 0 returns the initial state and an all-zero output.
//
// Cost: each direction does one GEMM for the input projections of all T steps, then one
// [B, H] x [H, G H] GEMM per step; the backward mirrors it and gathers the weight gradients of
// all steps into one GEMM per weight.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "attn/tensor.h"
#include "nn/dropout.h"
#include "nn/parameters.h"

namespace attn::nn {

enum class RnnKind { gru, lstm };

const char* rnn_kind_name(RnnKind kind);  // "gru", "lstm"
constexpr int64_t rnn_gate_count(RnnKind kind) { return kind == RnnKind::gru ? 3 : 4; }

// Weights of one layer and direction (or of one cell).
struct RnnCellParams {
  Tensor weight_ih;  // [G H, In]
  Tensor weight_hh;  // [G H, H]
  Tensor bias_ih;    // [G H], undefined without bias
  Tensor bias_hh;    // [G H], undefined without bias
};

// PyTorch's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)).
RnnCellParams rnn_cell_init(RnnKind kind, int64_t input_size, int64_t hidden_size, bool bias,
                            DType dtype, uint64_t seed);
// Zero tensors shaped like each defined field: a gradient accumulator.
RnnCellParams rnn_cell_zeros_like(const RnnCellParams& params);

// ---------------------------------------------------------------------------------------------
// Single-step cells, for decoders that run one token at a time. x [B, In], states [B, H].
// An undefined previous state means zeros. Backward adds the weight gradients into `grads`
// (shaped like the params, e.g. from rnn_cell_zeros_like).

struct GruCellCache {
  Tensor x;         // [B, In]
  Tensor h_prev;    // [B, H]
  Tensor gates;     // [B, 3H]: r, z, n after their activations
  Tensor hidden_n;  // [B, H]: W_hn h + b_hn (r multiplies it, so its backward needs it)
};
struct GruCellForward {
  Tensor h;  // [B, H]
  GruCellCache cache;
};
struct GruCellGrads {
  Tensor dx;       // [B, In]
  Tensor dh_prev;  // [B, H]
};
GruCellForward gru_cell_forward(const RnnCellParams& params, const Tensor& x, const Tensor& h_prev);
GruCellGrads gru_cell_backward(const RnnCellParams& params, RnnCellParams& grads,
                               const GruCellCache& cache, const Tensor& dh);

struct LstmCellCache {
  Tensor x;       // [B, In]
  Tensor h_prev;  // [B, H]
  Tensor c_prev;  // [B, H]
  Tensor gates;   // [B, 4H]: i, f, g, o after their activations
  Tensor c;       // [B, H]: the new cell state
};
struct LstmCellForward {
  Tensor h;  // [B, H]
  Tensor c;  // [B, H]
  LstmCellCache cache;
};
struct LstmCellGrads {
  Tensor dx;       // [B, In]
  Tensor dh_prev;  // [B, H]
  Tensor dc_prev;  // [B, H]
};
LstmCellForward lstm_cell_forward(const RnnCellParams& params, const Tensor& x,
                                  const Tensor& h_prev, const Tensor& c_prev);
// dh and dc are gradients with respect to the new h and c; dc may be undefined (zero).
LstmCellGrads lstm_cell_backward(const RnnCellParams& params, RnnCellParams& grads,
                                 const LstmCellCache& cache, const Tensor& dh, const Tensor& dc);

// ---------------------------------------------------------------------------------------------
// Multi-layer, optionally bidirectional layer.

struct RnnConfig {
  RnnKind kind = RnnKind::gru;
  int64_t input_size = 0;   // I
  int64_t hidden_size = 0;  // H
  int64_t num_layers = 1;   // L
  bool bidirectional = false;
  bool bias = true;
  DType dtype = DType::f32;
};

struct RnnState {
  Tensor h;  // [L D, B, H]
  Tensor c;  // [L D, B, H], LSTM only
};

// Saved activations of one layer and direction, time-major so each step's rows are contiguous.
struct RnnStepCache {
  Tensor gates;   // [T, B, G H] after activations (zero at padding steps)
  Tensor aux;     // [T, B, H]: GRU W_hn h + b_hn; LSTM the new cell state c
  Tensor h_prev;  // [T, B, H]: the state each step read
  Tensor c_prev;  // [T, B, H], LSTM only
};

struct RnnCache {
  std::vector<Tensor> layer_inputs;  // [B, T, In] per layer (after dropout), contiguous
  std::vector<RnnStepCache> steps;   // per layer * D + direction
  std::vector<int64_t> lengths;      // size B (all T when none were given)
  DropoutSpec dropout;               // between layers
};

struct RnnForward {
  Tensor out;      // [B, T, D H]
  RnnState final;  // h (and c) at each sequence's last valid step
  RnnCache cache;
};

struct RnnBackward {
  Tensor dx;          // [B, T, I]
  RnnState dinitial;  // gradients of the initial states (zeros when none were given)
};

struct Rnn {
  RnnConfig config;
  std::vector<RnnCellParams> params;  // index layer * D + direction
  std::vector<RnnCellParams> grads;

  static Rnn create(const RnnConfig& config, uint64_t seed);

  int64_t num_directions() const { return config.bidirectional ? 2 : 1; }

  // Throws on bad shapes, e.g. "[gru] input has 7 features, the layer expects 8".
  // `dropout` applies to the output of every layer but the last, as PyTorch's `dropout`
  // argument does; layer l's mask uses stream dropout.stream + l. Leave p = 0 for inference.
  RnnForward forward(const Tensor& x, const std::vector<int64_t>& lengths = {},
                     const RnnState& initial = {}, const DropoutSpec& dropout = {}) const;
  // dout [B, T, D H]; dfinal (either field may be undefined = zero) is the gradient of the loss
  // with respect to forward's final states. Adds every weight gradient into grads.
  RnnBackward backward(const RnnCache& cache, const Tensor& dout, const RnnState& dfinal = {});

  // PyTorch names after the prefix: weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, and the
  // same with a "_reverse" suffix for the reverse direction.
  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

}  // namespace attn::nn
