#include "nn/recurrent.h"

#include <cmath>
#include <cstring>

#include "attn/activations.h"
#include "attn/profile.h"
#include "nn/linear.h"

namespace attn::nn {

const char* rnn_kind_name(RnnKind kind) { return kind == RnnKind::gru ? "gru" : "lstm"; }

namespace {

// ---------------------------------------------------------------------------------------------
// Pointwise gate math of one batch row (H features). xp = W_ih x + b_ih and hp = W_hh h + b_hh
// are the two projections; the backward returns the gradients of both (they differ only in the
// GRU's n gate, where r multiplies the hidden projection). The forwards run in passes over the
// row so that the activations go through the vectorised tanh_array / sigmoid_array (libm's
// scalar expf and tanhf took ~30% of the GRU translator's training time).

// GRU forward: gates = [r, z, n], hidden_n = hp_n, h = (1 - z) n + z h_prev.
template <class T>
void gru_row_forward(int64_t H, const T* xp, const T* hp, const T* h_prev, T* gates, T* hidden_n,
                     T* h) {
  for (int64_t j = 0; j < 2 * H; ++j) gates[j] = xp[j] + hp[j];
  sigmoid_array(gates, gates, 2 * H);  // r, z
  for (int64_t j = 0; j < H; ++j) {
    hidden_n[j] = hp[2 * H + j];
    gates[2 * H + j] = xp[2 * H + j] + gates[j] * hp[2 * H + j];
  }
  tanh_array(gates + 2 * H, gates + 2 * H, H);  // n
  for (int64_t j = 0; j < H; ++j) {
    const T z = gates[H + j], n = gates[2 * H + j];
    h[j] = (T(1) - z) * n + z * h_prev[j];
  }
}

// GRU backward, mirroring the forward (dh is the total gradient of the new state).
// Writes dxp, dhp [3H] and the direct part of dh_prev (z * dh); the W_hh part is added by GEMM.
template <class T>
void gru_row_backward(int64_t H, const T* gates, const T* hidden_n, const T* h_prev, const T* dh,
                      T* dxp, T* dhp, T* dh_prev) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = gates[j], z = gates[H + j], n = gates[2 * H + j];
    // 4. h = (1 - z) n + z h_prev
    const T dn = dh[j] * (T(1) - z);
    const T dz = dh[j] * (h_prev[j] - n);
    dh_prev[j] = dh[j] * z;
    // 3. n = tanh(xp_n + r hp_n)
    const T dan = dn * (T(1) - n * n);
    dxp[2 * H + j] = dan;
    dhp[2 * H + j] = dan * r;
    const T dr = dan * hidden_n[j];
    // 2. z = sigma(xp_z + hp_z)
    const T daz = dz * z * (T(1) - z);
    dxp[H + j] = daz;
    dhp[H + j] = daz;
    // 1. r = sigma(xp_r + hp_r)
    const T dar = dr * r * (T(1) - r);
    dxp[j] = dar;
    dhp[j] = dar;
  }
}

// LSTM forward: gates = [i, f, g, o], c = f c_prev + i g, h = o tanh(c).
template <class T>
void lstm_row_forward(int64_t H, const T* xp, const T* hp, const T* c_prev, T* gates, T* c, T* h) {
  for (int64_t j = 0; j < 4 * H; ++j) gates[j] = xp[j] + hp[j];
  sigmoid_array(gates, gates, 2 * H);                  // i, f
  tanh_array(gates + 2 * H, gates + 2 * H, H);         // g
  sigmoid_array(gates + 3 * H, gates + 3 * H, H);      // o
  for (int64_t j = 0; j < H; ++j) c[j] = gates[H + j] * c_prev[j] + gates[j] * gates[2 * H + j];
  tanh_array(c, h, H);
  for (int64_t j = 0; j < H; ++j) h[j] *= gates[3 * H + j];
}

// LSTM backward: dh, dc are the total gradients of the new h and c. Writes da [4H] (the gradient
// of both projections) and dc_prev; the LSTM's h_prev only enters through W_hh (GEMM).
template <class T>
void lstm_row_backward(int64_t H, const T* gates, const T* c, const T* c_prev, const T* dh,
                       const T* dc, T* da, T* dc_prev) {
  // tanh(c) of the forward, recomputed into da's o slot: iteration j reads slot j before it
  // writes it.
  T* tanh_c = da + 3 * H;
  tanh_array(c, tanh_c, H);
  for (int64_t j = 0; j < H; ++j) {
    const T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    // 2. h = o tanh(c)
    const T tc = tanh_c[j];
    const T d_o = dh[j] * tc;
    const T dct = dc[j] + dh[j] * o * (T(1) - tc * tc);
    // 1. c = f c_prev + i g
    const T di = dct * g, df = dct * c_prev[j], dg = dct * i;
    dc_prev[j] = dct * f;
    // 0. gate activations
    da[j] = di * i * (T(1) - i);
    da[H + j] = df * f * (T(1) - f);
    da[2 * H + j] = dg * (T(1) - g * g);
    da[3 * H + j] = d_o * o * (T(1) - o);
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM helpers on contiguous row-major buffers.

// y [rows, out] = x [rows, in] W^T + b   (b may be null)
template <class T>
void affine(int64_t rows, int64_t in, int64_t out, const T* x, int64_t ldx, const T* w, const T* b,
            T* y) {
  if (b)
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * out, b, sizeof(T) * out);
  gemm<T>(false, true, rows, out, in, T(1), x, ldx, w, in, b ? T(1) : T(0), y, out);
}

// dW [out, in] += dy^T [out, rows] x [rows, in];  db [out] += column sums of dy
template <class T>
void accumulate_weight_grad(int64_t rows, int64_t in, int64_t out, const T* dy, const T* x,
                            int64_t ldx, T* dw, T* db) {
  gemm<T>(true, false, out, in, rows, T(1), dy, out, x, ldx, T(1), dw, in);
  if (db)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) db[o] += dy[r * out + o];
}

template <class T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}
template <class T>
T* data_or_null(Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Validation shared by cells and layers.

int64_t hidden_size_of(const RnnCellParams& p, RnnKind kind, const char* op) {
  ATTN_CHECK(p.weight_ih.defined() && p.weight_hh.defined() && p.weight_ih.dim() == 2 &&
                 p.weight_hh.dim() == 2,
             op, "weight_ih and weight_hh must be defined 2-d tensors");
  const int64_t G = rnn_gate_count(kind);
  const int64_t gh = p.weight_hh.size(0), H = p.weight_hh.size(1);
  ATTN_CHECK(gh == G * H, op, "weight_hh is ", p.weight_hh.shape_str(), ", expected [", G * H, ", ",
             H, "] (", G, " gates)");
  ATTN_CHECK(p.weight_ih.size(0) == G * H, op, "weight_ih is ", p.weight_ih.shape_str(),
             ", expected [", G * H, ", In] for hidden size ", H);
  ATTN_CHECK(p.weight_ih.dtype() == p.weight_hh.dtype(), op, "weight_ih is ",
             dtype_name(p.weight_ih.dtype()), ", weight_hh is ", dtype_name(p.weight_hh.dtype()));
  ATTN_CHECK(p.bias_ih.defined() == p.bias_hh.defined(), op,
             "bias_ih and bias_hh must both be given or both be left out");
  for (const Tensor* b : {&p.bias_ih, &p.bias_hh})
    if (b->defined())
      ATTN_CHECK(b->shape() == Shape{G * H} && b->dtype() == p.weight_hh.dtype(), op, "bias is ",
                 b->shape_str(), " ", dtype_name(b->dtype()), ", expected [", G * H, "] ",
                 dtype_name(p.weight_hh.dtype()));
  for (const Tensor* t : {&p.weight_ih, &p.weight_hh, &p.bias_ih, &p.bias_hh})
    ATTN_CHECK(!t->defined() || t->is_contiguous(), op, "weights must be contiguous");
  return H;
}

void check_matrix(const Tensor& t, const char* op, const char* what, int64_t rows, int64_t cols,
                  DType dtype) {
  ATTN_CHECK(t.defined(), op, what, " is undefined");
  ATTN_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, what, " is ",
             t.shape_str(), ", expected [", rows, ", ", cols, "]");
  ATTN_CHECK(t.dtype() == dtype, op, what, " is ", dtype_name(t.dtype()), ", weights are ",
             dtype_name(dtype));
}

void check_cell_input(const RnnCellParams& p, const Tensor& x, const char* op) {
  ATTN_CHECK(x.defined() && x.dim() == 2, op, "input must be [B, In], got ",
             x.defined() ? x.shape_str() : "undefined");
  ATTN_CHECK(x.size(1) == p.weight_ih.size(1), op, "input has ", x.size(1),
             " features, weight_ih expects ", p.weight_ih.size(1), " (input ", x.shape_str(),
             ", weight_ih ", p.weight_ih.shape_str(), ")");
  ATTN_CHECK(x.dtype() == p.weight_ih.dtype(), op, "input is ", dtype_name(x.dtype()),
             ", weights are ", dtype_name(p.weight_ih.dtype()));
}

Tensor state_or_zeros(const Tensor& s, const char* op, const char* what, int64_t B, int64_t H,
                      DType dtype) {
  if (!s.defined()) return Tensor::zeros({B, H}, dtype);
  check_matrix(s, op, what, B, H, dtype);
  return s.contiguous();
}

}  // namespace

RnnCellParams rnn_cell_init(RnnKind kind, int64_t input_size, int64_t hidden_size, bool bias,
                            DType dtype, uint64_t seed) {
  const char* op = rnn_kind_name(kind);
  ATTN_CHECK(input_size >= 0 && hidden_size >= 1, op,
             "input_size must be >= 0 and hidden_size >= 1, got ", input_size, " and ",
             hidden_size);
  visit_float(dtype, op, "dtype", [](auto) {});
  const int64_t gh = rnn_gate_count(kind) * hidden_size;
  const double bound = 1.0 / std::sqrt(double(hidden_size));
  RnnCellParams p;
  p.weight_ih = Tensor::empty({gh, input_size}, dtype);
  p.weight_hh = Tensor::empty({gh, hidden_size}, dtype);
  init_uniform(p.weight_ih, -bound, bound, seed, 0);
  init_uniform(p.weight_hh, -bound, bound, seed, 1);
  if (bias) {
    p.bias_ih = Tensor::empty({gh}, dtype);
    p.bias_hh = Tensor::empty({gh}, dtype);
    init_uniform(p.bias_ih, -bound, bound, seed, 2);
    init_uniform(p.bias_hh, -bound, bound, seed, 3);
  }
  return p;
}

RnnCellParams rnn_cell_zeros_like(const RnnCellParams& p) {
  return {zeros_like(p.weight_ih), zeros_like(p.weight_hh), zeros_like(p.bias_ih),
          zeros_like(p.bias_hh)};
}

// ---------------------------------------------------------------------------------------------
// Cells.

namespace {

template <class T>
GruCellForward gru_cell_forward_impl(const RnnCellParams& p, const Tensor& x, const Tensor& h_prev,
                                     int64_t H) {
  ATTN_PROFILE_SCOPE("rnn.gru_cell.forward");
  const int64_t B = x.size(0), I = x.size(1), GH = 3 * H;
  Tensor xp = Tensor::empty({B, GH}, x.dtype()), hp = Tensor::empty({B, GH}, x.dtype());
  affine<T>(B, I, GH, x.data<T>(), I, p.weight_ih.data<T>(), data_or_null<T>(p.bias_ih),
            xp.data<T>());
  affine<T>(B, H, GH, h_prev.data<T>(), H, p.weight_hh.data<T>(), data_or_null<T>(p.bias_hh),
            hp.data<T>());
  Tensor gates = Tensor::empty({B, GH}, x.dtype()), hidden_n = Tensor::empty({B, H}, x.dtype());
  Tensor h = Tensor::empty({B, H}, x.dtype());
  for (int64_t b = 0; b < B; ++b)
    gru_row_forward<T>(H, xp.data<T>() + b * GH, hp.data<T>() + b * GH, h_prev.data<T>() + b * H,
                       gates.data<T>() + b * GH, hidden_n.data<T>() + b * H, h.data<T>() + b * H);
  return {h, {x, h_prev, gates, hidden_n}};
}

template <class T>
GruCellGrads gru_cell_backward_impl(const RnnCellParams& p, RnnCellParams& g,
                                    const GruCellCache& cache, const Tensor& dh, int64_t H) {
  ATTN_PROFILE_SCOPE("rnn.gru_cell.backward");
  const int64_t B = cache.x.size(0), I = cache.x.size(1), GH = 3 * H;
  Tensor dxp = Tensor::empty({B, GH}, dh.dtype()), dhp = Tensor::empty({B, GH}, dh.dtype());
  Tensor dh_prev = Tensor::empty({B, H}, dh.dtype()), dx = Tensor::empty({B, I}, dh.dtype());
  for (int64_t b = 0; b < B; ++b)
    gru_row_backward<T>(H, cache.gates.data<T>() + b * GH, cache.hidden_n.data<T>() + b * H,
                        cache.h_prev.data<T>() + b * H, dh.data<T>() + b * H,
                        dxp.data<T>() + b * GH, dhp.data<T>() + b * GH, dh_prev.data<T>() + b * H);
  // xp = x W_ih^T + b_ih  and  hp = h_prev W_hh^T + b_hh
  gemm<T>(false, false, B, I, GH, T(1), dxp.data<T>(), GH, p.weight_ih.data<T>(), I, T(0),
          dx.data<T>(), I);
  gemm<T>(false, false, B, H, GH, T(1), dhp.data<T>(), GH, p.weight_hh.data<T>(), H, T(1),
          dh_prev.data<T>(), H);
  accumulate_weight_grad<T>(B, I, GH, dxp.data<T>(), cache.x.data<T>(), I, g.weight_ih.data<T>(),
                            data_or_null<T>(g.bias_ih));
  accumulate_weight_grad<T>(B, H, GH, dhp.data<T>(), cache.h_prev.data<T>(), H,
                            g.weight_hh.data<T>(), data_or_null<T>(g.bias_hh));
  return {dx, dh_prev};
}

template <class T>
LstmCellForward lstm_cell_forward_impl(const RnnCellParams& p, const Tensor& x,
                                       const Tensor& h_prev, const Tensor& c_prev, int64_t H) {
  ATTN_PROFILE_SCOPE("rnn.lstm_cell.forward");
  const int64_t B = x.size(0), I = x.size(1), GH = 4 * H;
  Tensor xp = Tensor::empty({B, GH}, x.dtype()), hp = Tensor::empty({B, GH}, x.dtype());
  affine<T>(B, I, GH, x.data<T>(), I, p.weight_ih.data<T>(), data_or_null<T>(p.bias_ih),
            xp.data<T>());
  affine<T>(B, H, GH, h_prev.data<T>(), H, p.weight_hh.data<T>(), data_or_null<T>(p.bias_hh),
            hp.data<T>());
  Tensor gates = Tensor::empty({B, GH}, x.dtype());
  Tensor h = Tensor::empty({B, H}, x.dtype()), c = Tensor::empty({B, H}, x.dtype());
  for (int64_t b = 0; b < B; ++b)
    lstm_row_forward<T>(H, xp.data<T>() + b * GH, hp.data<T>() + b * GH, c_prev.data<T>() + b * H,
                        gates.data<T>() + b * GH, c.data<T>() + b * H, h.data<T>() + b * H);
  return {h, c, {x, h_prev, c_prev, gates, c}};
}

template <class T>
LstmCellGrads lstm_cell_backward_impl(const RnnCellParams& p, RnnCellParams& g,
                                      const LstmCellCache& cache, const Tensor& dh,
                                      const Tensor& dc, int64_t H) {
  ATTN_PROFILE_SCOPE("rnn.lstm_cell.backward");
  const int64_t B = cache.x.size(0), I = cache.x.size(1), GH = 4 * H;
  Tensor da = Tensor::empty({B, GH}, dh.dtype());
  Tensor dh_prev = Tensor::empty({B, H}, dh.dtype()), dc_prev = Tensor::empty({B, H}, dh.dtype());
  Tensor dx = Tensor::empty({B, I}, dh.dtype());
  for (int64_t b = 0; b < B; ++b)
    lstm_row_backward<T>(H, cache.gates.data<T>() + b * GH, cache.c.data<T>() + b * H,
                         cache.c_prev.data<T>() + b * H, dh.data<T>() + b * H, dc.data<T>() + b * H,
                         da.data<T>() + b * GH, dc_prev.data<T>() + b * H);
  gemm<T>(false, false, B, I, GH, T(1), da.data<T>(), GH, p.weight_ih.data<T>(), I, T(0),
          dx.data<T>(), I);
  gemm<T>(false, false, B, H, GH, T(1), da.data<T>(), GH, p.weight_hh.data<T>(), H, T(0),
          dh_prev.data<T>(), H);
  accumulate_weight_grad<T>(B, I, GH, da.data<T>(), cache.x.data<T>(), I, g.weight_ih.data<T>(),
                            data_or_null<T>(g.bias_ih));
  accumulate_weight_grad<T>(B, H, GH, da.data<T>(), cache.h_prev.data<T>(), H,
                            g.weight_hh.data<T>(), data_or_null<T>(g.bias_hh));
  return {dx, dh_prev, dc_prev};
}

void check_grads_like(const RnnCellParams& p, const RnnCellParams& g, const char* op) {
  const Tensor* ps[] = {&p.weight_ih, &p.weight_hh, &p.bias_ih, &p.bias_hh};
  const Tensor* gs[] = {&g.weight_ih, &g.weight_hh, &g.bias_ih, &g.bias_hh};
  const char* names[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
  for (int k = 0; k < 4; ++k) {
    if (!ps[k]->defined()) continue;
    ATTN_CHECK(gs[k]->defined() && gs[k]->shape() == ps[k]->shape() &&
                   gs[k]->dtype() == ps[k]->dtype() && gs[k]->is_contiguous(),
               op, "gradient of ", names[k], " is ",
               gs[k]->defined() ? gs[k]->shape_str() : "undefined", ", expected ",
               ps[k]->shape_str(), " ", dtype_name(ps[k]->dtype()), " (see rnn_cell_zeros_like)");
  }
}

}  // namespace

GruCellForward gru_cell_forward(const RnnCellParams& params, const Tensor& x,
                                const Tensor& h_prev) {
  constexpr const char* op = "gru_cell";
  const int64_t H = hidden_size_of(params, RnnKind::gru, op);
  check_cell_input(params, x, op);
  const DType dtype = params.weight_ih.dtype();
  const Tensor xc = x.contiguous();
  const Tensor h = state_or_zeros(h_prev, op, "h_prev", x.size(0), H, dtype);
  return visit_float(dtype, op, "weights", [&](auto tag) {
    return gru_cell_forward_impl<decltype(tag)>(params, xc, h, H);
  });
}

GruCellGrads gru_cell_backward(const RnnCellParams& params, RnnCellParams& grads,
                               const GruCellCache& cache, const Tensor& dh) {
  constexpr const char* op = "gru_cell";
  const int64_t H = hidden_size_of(params, RnnKind::gru, op);
  check_grads_like(params, grads, op);
  ATTN_CHECK(cache.x.defined() && cache.gates.defined(), op,
             "backward needs the cache of a forward call");
  check_cell_input(params, cache.x, op);
  const DType dtype = params.weight_ih.dtype();
  check_matrix(dh, op, "dh", cache.x.size(0), H, dtype);
  const Tensor dhc = dh.contiguous();
  return visit_float(dtype, op, "weights", [&](auto tag) {
    return gru_cell_backward_impl<decltype(tag)>(params, grads, cache, dhc, H);
  });
}

LstmCellForward lstm_cell_forward(const RnnCellParams& params, const Tensor& x,
                                  const Tensor& h_prev, const Tensor& c_prev) {
  constexpr const char* op = "lstm_cell";
  const int64_t H = hidden_size_of(params, RnnKind::lstm, op);
  check_cell_input(params, x, op);
  const DType dtype = params.weight_ih.dtype();
  const Tensor xc = x.contiguous();
  const Tensor h = state_or_zeros(h_prev, op, "h_prev", x.size(0), H, dtype);
  const Tensor c = state_or_zeros(c_prev, op, "c_prev", x.size(0), H, dtype);
  return visit_float(dtype, op, "weights", [&](auto tag) {
    return lstm_cell_forward_impl<decltype(tag)>(params, xc, h, c, H);
  });
}

LstmCellGrads lstm_cell_backward(const RnnCellParams& params, RnnCellParams& grads,
                                 const LstmCellCache& cache, const Tensor& dh, const Tensor& dc) {
  constexpr const char* op = "lstm_cell";
  const int64_t H = hidden_size_of(params, RnnKind::lstm, op);
  check_grads_like(params, grads, op);
  ATTN_CHECK(cache.x.defined() && cache.gates.defined(), op,
             "backward needs the cache of a forward call");
  check_cell_input(params, cache.x, op);
  const DType dtype = params.weight_ih.dtype();
  const int64_t B = cache.x.size(0);
  const Tensor dhc = state_or_zeros(dh, op, "dh", B, H, dtype);
  const Tensor dcc = state_or_zeros(dc, op, "dc", B, H, dtype);
  return visit_float(dtype, op, "weights", [&](auto tag) {
    return lstm_cell_backward_impl<decltype(tag)>(params, grads, cache, dhc, dcc, H);
  });
}

// ---------------------------------------------------------------------------------------------
// Layers.

namespace {

// Shapes of one forward call, shared by the per-direction loops.
struct RunDims {
  int64_t B, T, H, G, D;
};

// Runs one layer and direction over all T steps. x [B, T, In] contiguous; h, c [B, H] hold the
// initial state and are overwritten with the final state; out [B, T, D H] receives this
// direction's columns.
template <class T, RnnKind kKind>
void direction_forward(const RunDims& d, const RnnCellParams& p, const Tensor& x,
                       const std::vector<int64_t>& lengths, bool reverse, int64_t dir, T* h, T* c,
                       T* out, RnnStepCache& cache) {
  ATTN_PROFILE_SCOPE("rnn.layer.forward");
  const int64_t B = d.B, Tn = d.T, H = d.H, GH = d.G * H, In = x.size(2), ldo = d.D * H;
  const DType dtype = x.dtype();
  // 1. Input projections of all steps at once: xp [B T, G H] (row b T + t).
  Tensor xp = Tensor::empty({B * Tn, GH}, dtype);
  affine<T>(B * Tn, In, GH, x.data<T>(), In, p.weight_ih.data<T>(), data_or_null<T>(p.bias_ih),
            xp.data<T>());
  cache.gates = Tensor::zeros({Tn, B, GH}, dtype);
  cache.aux = Tensor::zeros({Tn, B, H}, dtype);
  cache.h_prev = Tensor::empty({Tn, B, H}, dtype);
  if (kKind == RnnKind::lstm) cache.c_prev = Tensor::empty({Tn, B, H}, dtype);
  Tensor hp = Tensor::empty({B, GH}, dtype);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = reverse ? Tn - 1 - s : s;
    // 2. Hidden projection of this step: hp [B, G H] = h W_hh^T + b_hh.
    affine<T>(B, H, GH, h, H, p.weight_hh.data<T>(), data_or_null<T>(p.bias_hh), hp.data<T>());
    T* hprev_t = cache.h_prev.data<T>() + t * B * H;
    std::memcpy(hprev_t, h, sizeof(T) * B * H);
    T* cprev_t = nullptr;
    if (kKind == RnnKind::lstm) {
      cprev_t = cache.c_prev.data<T>() + t * B * H;
      std::memcpy(cprev_t, c, sizeof(T) * B * H);
    }
    // 3. Gates and new state of the rows still inside their sequence; padding rows keep the
    //    state and output zeros.
    for (int64_t b = 0; b < B; ++b) {
      T* o = out + (b * Tn + t) * ldo + dir * H;
      if (t >= lengths[b]) {
        std::memset(o, 0, sizeof(T) * H);
        continue;
      }
      const T* xp_row = xp.data<T>() + (b * Tn + t) * GH;
      T* gates = cache.gates.data<T>() + (t * B + b) * GH;
      T* aux = cache.aux.data<T>() + (t * B + b) * H;
      if constexpr (kKind == RnnKind::gru) {
        gru_row_forward<T>(H, xp_row, hp.data<T>() + b * GH, hprev_t + b * H, gates, aux,
                           h + b * H);
      } else {
        lstm_row_forward<T>(H, xp_row, hp.data<T>() + b * GH, cprev_t + b * H, gates, aux,
                            h + b * H);
        std::memcpy(c + b * H, aux, sizeof(T) * H);
      }
      std::memcpy(o, h + b * H, sizeof(T) * H);
    }
  }
}

// Backward of direction_forward. dout [B, T, D H] (this direction's columns are read);
// dh, dc [B, H] hold the gradient of the final state and are overwritten with the gradient of
// the initial state; dx [B, T, In] is accumulated into (both directions add their share).
template <class T, RnnKind kKind>
void direction_backward(const RunDims& d, const RnnCellParams& p, RnnCellParams& g, const Tensor& x,
                        const std::vector<int64_t>& lengths, bool reverse, int64_t dir,
                        const RnnStepCache& cache, const T* dout, T* dh, T* dc, T* dx) {
  ATTN_PROFILE_SCOPE("rnn.layer.backward");
  const int64_t B = d.B, Tn = d.T, H = d.H, GH = d.G * H, In = x.size(2), ldo = d.D * H;
  const DType dtype = x.dtype();
  // Gradients of the two projections: dxp per (b, t) like xp, dhp per (t, b) like the caches.
  Tensor dxp = Tensor::zeros({B * Tn, GH}, dtype);
  Tensor dhp = Tensor::zeros({Tn, B, GH}, dtype);
  std::vector<T> dh_total(static_cast<std::size_t>(H));
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = reverse ? Tn - 1 - s : s;
    const T* hprev_t = cache.h_prev.data<T>() + t * B * H;
    T* dhp_t = dhp.data<T>() + t * B * GH;
    // 3. Rows at padding steps passed the state through: dh and dc pass back unchanged.
    for (int64_t b = 0; b < B; ++b) {
      if (t >= lengths[b]) continue;
      const T* o = dout + (b * Tn + t) * ldo + dir * H;
      for (int64_t j = 0; j < H; ++j) dh_total[j] = dh[b * H + j] + o[j];
      const T* gates = cache.gates.data<T>() + (t * B + b) * GH;
      const T* aux = cache.aux.data<T>() + (t * B + b) * H;
      T* dxp_row = dxp.data<T>() + (b * Tn + t) * GH;
      if constexpr (kKind == RnnKind::gru) {
        gru_row_backward<T>(H, gates, aux, hprev_t + b * H, dh_total.data(), dxp_row,
                            dhp_t + b * GH, dh + b * H);
      } else {
        const T* cprev = cache.c_prev.data<T>() + (t * B + b) * H;
        lstm_row_backward<T>(H, gates, aux, cprev, dh_total.data(), dc + b * H, dxp_row,
                             dc + b * H);
        std::memcpy(dhp_t + b * GH, dxp_row, sizeof(T) * GH);
        std::memset(dh + b * H, 0, sizeof(T) * H);  // LSTM h_prev enters only through W_hh
      }
    }
    // 2. hp = h W_hh^T + b_hh  ->  dh_prev += dhp W_hh  (zero rows at padding steps add 0)
    gemm<T>(false, false, B, H, GH, T(1), dhp_t, GH, p.weight_hh.data<T>(), H, T(1), dh, H);
  }
  // Weight gradients of all steps in one GEMM each.
  accumulate_weight_grad<T>(Tn * B, H, GH, dhp.data<T>(), cache.h_prev.data<T>(), H,
                            g.weight_hh.data<T>(), data_or_null<T>(g.bias_hh));
  // 1. xp = x W_ih^T + b_ih  ->  dx += dxp W_ih, dW_ih += dxp^T x
  accumulate_weight_grad<T>(B * Tn, In, GH, dxp.data<T>(), x.data<T>(), In, g.weight_ih.data<T>(),
                            data_or_null<T>(g.bias_ih));
  gemm<T>(false, false, B * Tn, In, GH, T(1), dxp.data<T>(), GH, p.weight_ih.data<T>(), In, T(1),
          dx, In);
}

// Layer l's dropout mask: its own stream, so layers never share a mask.
DropoutSpec layer_dropout(const DropoutSpec& spec, int64_t layer) {
  return {spec.p, spec.seed, spec.stream + static_cast<uint64_t>(layer)};
}

template <class T>
RnnForward rnn_forward_impl(const Rnn& rnn, const Tensor& x, const std::vector<int64_t>& lengths,
                            const RnnState& initial, const DropoutSpec& dropout) {
  const RnnConfig& cfg = rnn.config;
  const RunDims d{x.size(0), x.size(1), cfg.hidden_size, rnn_gate_count(cfg.kind),
                  rnn.num_directions()};
  const bool lstm = cfg.kind == RnnKind::lstm;
  const DType dtype = x.dtype();
  RnnForward result;
  result.cache.lengths = lengths;
  result.cache.dropout = dropout;
  result.final.h = initial.h.defined() ? initial.h.clone()
                                       : Tensor::zeros({cfg.num_layers * d.D, d.B, d.H}, dtype);
  if (lstm)
    result.final.c = initial.c.defined() ? initial.c.clone()
                                         : Tensor::zeros({cfg.num_layers * d.D, d.B, d.H}, dtype);
  Tensor input = x;
  for (int64_t layer = 0; layer < cfg.num_layers; ++layer) {
    // 1. Dropout on the previous layer's output (padding positions are 0 and stay 0).
    if (layer > 0) input = dropout_forward(input, layer_dropout(dropout, layer));
    result.cache.layer_inputs.push_back(input);
    Tensor out = Tensor::empty({d.B, d.T, d.D * d.H}, dtype);
    for (int64_t dir = 0; dir < d.D; ++dir) {
      const int64_t k = layer * d.D + dir;
      T* h = result.final.h.data<T>() + k * d.B * d.H;
      T* c = lstm ? result.final.c.data<T>() + k * d.B * d.H : nullptr;
      RnnStepCache steps;
      if (lstm)
        direction_forward<T, RnnKind::lstm>(d, rnn.params[k], input, lengths, dir == 1, dir, h, c,
                                            out.data<T>(), steps);
      else
        direction_forward<T, RnnKind::gru>(d, rnn.params[k], input, lengths, dir == 1, dir, h, c,
                                           out.data<T>(), steps);
      result.cache.steps.push_back(std::move(steps));
    }
    input = out;
  }
  result.out = input;
  return result;
}

template <class T>
RnnBackward rnn_backward_impl(Rnn& rnn, const RnnCache& cache, const Tensor& dout,
                              const RnnState& dfinal) {
  const RnnConfig& cfg = rnn.config;
  const Tensor& x0 = cache.layer_inputs.front();
  const RunDims d{x0.size(0), x0.size(1), cfg.hidden_size, rnn_gate_count(cfg.kind),
                  rnn.num_directions()};
  const bool lstm = cfg.kind == RnnKind::lstm;
  const DType dtype = x0.dtype();
  RnnBackward result;
  result.dinitial.h = dfinal.h.defined() ? dfinal.h.clone()
                                         : Tensor::zeros({cfg.num_layers * d.D, d.B, d.H}, dtype);
  if (lstm)
    result.dinitial.c = dfinal.c.defined() ? dfinal.c.clone()
                                           : Tensor::zeros({cfg.num_layers * d.D, d.B, d.H}, dtype);
  Tensor dlayer_out = dout;
  for (int64_t layer = cfg.num_layers - 1; layer >= 0; --layer) {
    const Tensor& input = cache.layer_inputs[layer];
    Tensor dinput = Tensor::zeros(input.shape(), dtype);
    for (int64_t dir = 0; dir < d.D; ++dir) {
      const int64_t k = layer * d.D + dir;
      T* dh = result.dinitial.h.data<T>() + k * d.B * d.H;
      T* dc = lstm ? result.dinitial.c.data<T>() + k * d.B * d.H : nullptr;
      if (lstm)
        direction_backward<T, RnnKind::lstm>(d, rnn.params[k], rnn.grads[k], input, cache.lengths,
                                             dir == 1, dir, cache.steps[k], dlayer_out.data<T>(),
                                             dh, dc, dinput.data<T>());
      else
        direction_backward<T, RnnKind::gru>(d, rnn.params[k], rnn.grads[k], input, cache.lengths,
                                            dir == 1, dir, cache.steps[k], dlayer_out.data<T>(), dh,
                                            dc, dinput.data<T>());
    }
    // 1. Dropout between layers -> the same mask on the gradient.
    dlayer_out = layer > 0 ? dropout_backward(dinput, layer_dropout(cache.dropout, layer)) : dinput;
  }
  result.dx = dlayer_out;
  return result;
}

void check_state(const Tensor& s, const char* op, const char* what, const Shape& expected,
                 DType dtype) {
  if (!s.defined()) return;
  ATTN_CHECK(s.shape() == expected, op, what, " is ", s.shape_str(), ", expected ",
             shape_str(expected), " [L D, B, H]");
  ATTN_CHECK(s.dtype() == dtype, op, what, " is ", dtype_name(s.dtype()), ", weights are ",
             dtype_name(dtype));
}

}  // namespace

Rnn Rnn::create(const RnnConfig& config, uint64_t seed) {
  const char* op = rnn_kind_name(config.kind);
  ATTN_CHECK(config.num_layers >= 1, op, "num_layers must be >= 1, got ", config.num_layers);
  Rnn rnn;
  rnn.config = config;
  const int64_t D = rnn.num_directions();
  for (int64_t layer = 0; layer < config.num_layers; ++layer)
    for (int64_t dir = 0; dir < D; ++dir) {
      const int64_t in = layer == 0 ? config.input_size : D * config.hidden_size;
      // Distinct seeds per layer and direction (the stream inside separates the four tensors).
      rnn.params.push_back(rnn_cell_init(config.kind, in, config.hidden_size, config.bias,
                                         config.dtype, mix64(seed + uint64_t(layer * D + dir))));
      rnn.grads.push_back(rnn_cell_zeros_like(rnn.params.back()));
    }
  return rnn;
}

RnnForward Rnn::forward(const Tensor& x, const std::vector<int64_t>& lengths,
                        const RnnState& initial, const DropoutSpec& dropout) const {
  const char* op = rnn_kind_name(config.kind);
  const int64_t D = num_directions();
  ATTN_CHECK(static_cast<int64_t>(params.size()) == config.num_layers * D, op, "the layer holds ",
             params.size(), " weight sets, expected ", config.num_layers * D);
  const DType dtype = params.front().weight_ih.dtype();
  for (std::size_t k = 0; k < params.size(); ++k) {
    const RnnCellParams& p = params[k];
    ATTN_CHECK(hidden_size_of(p, config.kind, op) == config.hidden_size, op,
               "weights have hidden size ", p.weight_hh.size(1), ", config says ",
               config.hidden_size);
    const int64_t layer = static_cast<int64_t>(k) / D;
    const int64_t in = layer == 0 ? config.input_size : D * config.hidden_size;
    ATTN_CHECK(p.weight_ih.size(1) == in, op, "weight_ih of layer ", layer, " is ",
               p.weight_ih.shape_str(), ", expected ", in, " input features");
    ATTN_CHECK(p.weight_ih.dtype() == dtype, op, "weights of layer ", layer, " are ",
               dtype_name(p.weight_ih.dtype()), ", layer 0 has ", dtype_name(dtype));
  }
  ATTN_CHECK(x.defined() && x.dim() == 3, op, "input must be [B, T, I], got ",
             x.defined() ? x.shape_str() : "undefined");
  ATTN_CHECK(x.size(2) == config.input_size, op, "input has ", x.size(2),
             " features, the layer expects ", config.input_size, " (input ", x.shape_str(), ")");
  ATTN_CHECK(x.dtype() == dtype, op, "input is ", dtype_name(x.dtype()), ", weights are ",
             dtype_name(dtype));
  const int64_t B = x.size(0), Tn = x.size(1);
  std::vector<int64_t> lens = lengths;
  if (lens.empty()) lens.assign(static_cast<std::size_t>(B), Tn);
  ATTN_CHECK(static_cast<int64_t>(lens.size()) == B, op, "lengths has ", lens.size(),
             " entries, input has batch ", B, " (", x.shape_str(), ")");
  for (std::size_t b = 0; b < lens.size(); ++b)
    ATTN_CHECK(lens[b] >= 0 && lens[b] <= Tn, op, "lengths[", b, "] = ", lens[b],
               " is outside [0, ", Tn, "] (input ", x.shape_str(), ")");
  const Shape state_shape{config.num_layers * D, B, config.hidden_size};
  check_state(initial.h, op, "initial h", state_shape, dtype);
  ATTN_CHECK(config.kind == RnnKind::lstm || !initial.c.defined(), op,
             "a GRU has no cell state, but initial c was given");
  check_state(initial.c, op, "initial c", state_shape, dtype);
  ATTN_CHECK(dropout.p >= 0.0 && dropout.p < 1.0, op, "dropout p must be in [0, 1), got ",
             dropout.p);
  const Tensor xc = x.contiguous();
  return visit_float(dtype, op, "weights", [&](auto tag) {
    return rnn_forward_impl<decltype(tag)>(*this, xc, lens, initial, dropout);
  });
}

RnnBackward Rnn::backward(const RnnCache& cache, const Tensor& dout, const RnnState& dfinal) {
  const char* op = rnn_kind_name(config.kind);
  const int64_t D = num_directions();
  ATTN_CHECK(static_cast<int64_t>(cache.layer_inputs.size()) == config.num_layers &&
                 static_cast<int64_t>(cache.steps.size()) == config.num_layers * D,
             op, "backward needs the cache of a forward call of this layer");
  ATTN_CHECK(static_cast<int64_t>(grads.size()) == config.num_layers * D, op, "the layer holds ",
             grads.size(), " gradient sets, expected ", config.num_layers * D);
  for (std::size_t k = 0; k < params.size(); ++k) check_grads_like(params[k], grads[k], op);
  const Tensor& x = cache.layer_inputs.front();
  const int64_t B = x.size(0), Tn = x.size(1), H = config.hidden_size;
  const DType dtype = x.dtype();
  const Shape out_shape{B, Tn, D * H};
  ATTN_CHECK(dout.defined() && dout.shape() == out_shape, op, "dout is ",
             dout.defined() ? dout.shape_str() : "undefined", ", output was ",
             shape_str(out_shape));
  ATTN_CHECK(dout.dtype() == dtype, op, "dout is ", dtype_name(dout.dtype()), ", weights are ",
             dtype_name(dtype));
  const Shape state_shape{config.num_layers * D, B, H};
  check_state(dfinal.h, op, "final h gradient", state_shape, dtype);
  ATTN_CHECK(config.kind == RnnKind::lstm || !dfinal.c.defined(), op,
             "a GRU has no cell state, but a final c gradient was given");
  check_state(dfinal.c, op, "final c gradient", state_shape, dtype);
  const Tensor dc = dout.contiguous();
  return visit_float(dtype, op, "weights", [&](auto tag) {
    return rnn_backward_impl<decltype(tag)>(*this, cache, dc, dfinal);
  });
}

void Rnn::parameters(const std::string& prefix, ParameterList& list) const {
  const int64_t D = num_directions();
  for (std::size_t k = 0; k < params.size(); ++k) {
    const std::string suffix =
        "_l" + std::to_string(int64_t(k) / D) + (k % D == 1 ? "_reverse" : "");
    add_parameter(list, prefix, "weight_ih" + suffix, params[k].weight_ih, grads[k].weight_ih);
    add_parameter(list, prefix, "weight_hh" + suffix, params[k].weight_hh, grads[k].weight_hh);
    add_parameter(list, prefix, "bias_ih" + suffix, params[k].bias_ih, grads[k].bias_ih);
    add_parameter(list, prefix, "bias_hh" + suffix, params[k].bias_hh, grads[k].bias_hh);
  }
}

void Rnn::zero_grad() {
  for (RnnCellParams& g : grads)
    for (Tensor* t : {&g.weight_ih, &g.weight_hh, &g.bias_ih, &g.bias_hh})
      if (t->defined()) t->fill(0.0);
}

}  // namespace attn::nn
