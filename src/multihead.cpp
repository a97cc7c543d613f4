// Multi-head attention front-end: validation, the four projections as BLAS GEMMs over all
// B * T rows at once, head split/merge copies, and the KV cache. Step 4 (the attention itself) is
// attn::attention / attn::attention_backward, so every scoring function and mask works per head.
#include "attn/multihead.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "attn/profile.h"
#include "attn/random.h"
#include "blas_kernel.h"

namespace attn {

// ---------------------------------------------------------------------------------------------
// Validation.

namespace detail {

namespace {

bool is_float(DType d) { return d == DType::f32 || d == DType::f64; }

std::string shape_or_undefined(const Tensor& t) {
  return t.defined() ? t.shape_str() : "undefined";
}

void expect_weight(const char* op, const char* name, const Tensor& t, const Shape& shape) {
  ATTN_CHECK(t.defined(), op, "weights.", name, " is undefined, expected ", shape_str(shape));
  ATTN_CHECK(t.shape() == shape, op, "weights.", name, " must be ", shape_str(shape), ", got ",
             t.shape_str());
  ATTN_CHECK(is_float(t.dtype()), op, "weights.", name, " must be float32 or float64, got ",
             dtype_name(t.dtype()));
}

void expect_bias(const char* op, const char* name, const Tensor& t, int64_t size, bool wanted) {
  if (wanted) {
    expect_weight(op, name, t, {size});
  } else {
    ATTN_CHECK(!t.defined(), op, "weights.", name, " is ", t.shape_str(),
               " but config.bias is false (leave it undefined)");
  }
}

}  // namespace

MultiHeadDims resolve_multihead_config(const char* op, const MultiHeadConfig& c) {
  ATTN_CHECK(c.d_model > 0, op, "config.d_model must be > 0, got ", c.d_model);
  ATTN_CHECK(c.num_heads > 0, op, "config.num_heads must be > 0, got ", c.num_heads);
  ATTN_CHECK(c.num_kv_heads >= 0 && c.head_dim >= 0 && c.value_head_dim >= 0 &&
                 c.key_input_dim >= 0 && c.value_input_dim >= 0,
             op, "config sizes must be >= 0 (0 = default): num_kv_heads ", c.num_kv_heads,
             ", head_dim ", c.head_dim, ", value_head_dim ", c.value_head_dim, ", key_input_dim ",
             c.key_input_dim, ", value_input_dim ", c.value_input_dim);
  MultiHeadDims d;
  d.E = c.d_model;
  d.Hq = c.num_heads;
  d.Hkv = c.num_kv_heads > 0 ? c.num_kv_heads : c.num_heads;
  ATTN_CHECK(d.Hq % d.Hkv == 0, op, "config.num_kv_heads (", d.Hkv,
             ") must divide config.num_heads (", d.Hq, ")");
  if (c.head_dim > 0) {
    d.Dk = c.head_dim;
  } else {
    ATTN_CHECK(c.d_model % c.num_heads == 0, op, "config.num_heads (", c.num_heads,
               ") must divide config.d_model (", c.d_model, ") when head_dim is 0");
    d.Dk = c.d_model / c.num_heads;
  }
  d.Dv = c.value_head_dim > 0 ? c.value_head_dim : d.Dk;
  d.Ek = c.key_input_dim > 0 ? c.key_input_dim : c.d_model;
  d.Ev = c.value_input_dim > 0 ? c.value_input_dim : c.d_model;
  d.bias = c.bias;
  return d;
}

void validate_multihead_weights(const char* op, const MultiHeadDims& d, const MultiHeadWeights& w) {
  expect_weight(op, "w_q", w.w_q, {d.Hq * d.Dk, d.E});
  expect_weight(op, "w_k", w.w_k, {d.Hkv * d.Dk, d.Ek});
  expect_weight(op, "w_v", w.w_v, {d.Hkv * d.Dv, d.Ev});
  expect_weight(op, "w_o", w.w_o, {d.E, d.Hq * d.Dv});
  expect_bias(op, "b_q", w.b_q, d.Hq * d.Dk, d.bias);
  expect_bias(op, "b_k", w.b_k, d.Hkv * d.Dk, d.bias);
  expect_bias(op, "b_v", w.b_v, d.Hkv * d.Dv, d.bias);
  expect_bias(op, "b_o", w.b_o, d.E, d.bias);
}

MultiHeadProblem validate_multihead(const char* op, const MultiHeadConfig& config,
                                    const MultiHeadWeights& weights, const Tensor& query,
                                    const Tensor& key, const Tensor& value) {
  MultiHeadProblem p;
  p.dims = resolve_multihead_config(op, config);
  const MultiHeadDims& d = p.dims;
  validate_multihead_weights(op, d, weights);
  ATTN_CHECK(query.defined() && key.defined() && value.defined(), op,
             "query, key and value are required");
  ATTN_CHECK(query.dim() == 3, op, "query must be [B, Tq, d_model], got ", query.shape_str());
  ATTN_CHECK(key.dim() == 3, op, "key must be [B, Tk, key_input_dim], got ", key.shape_str());
  ATTN_CHECK(value.dim() == 3, op, "value must be [B, Tk, value_input_dim], got ",
             value.shape_str());
  ATTN_CHECK(is_float(query.dtype()), op, "query must be float32 or float64, got ",
             dtype_name(query.dtype()));
  ATTN_CHECK(key.dtype() == query.dtype() && value.dtype() == query.dtype(), op,
             "query, key and value dtypes differ: ", dtype_name(query.dtype()), ", ",
             dtype_name(key.dtype()), ", ", dtype_name(value.dtype()));
  ATTN_CHECK(query.size(2) == d.E, op, "query has ", query.size(2), " features, d_model is ", d.E,
             " (query ", query.shape_str(), ")");
  ATTN_CHECK(key.size(2) == d.Ek, op, "key has ", key.size(2), " features, key_input_dim is ", d.Ek,
             " (key ", key.shape_str(), ")");
  ATTN_CHECK(value.size(2) == d.Ev, op, "value has ", value.size(2),
             " features, value_input_dim is ", d.Ev, " (value ", value.shape_str(), ")");
  p.B = query.size(0);
  p.Tq = query.size(1);
  p.Tk = key.size(1);
  ATTN_CHECK(key.size(0) == p.B && value.size(0) == p.B, op, "batch sizes differ: query ",
             query.shape_str(), ", key ", key.shape_str(), ", value ", value.shape_str());
  ATTN_CHECK(value.size(1) == p.Tk, op, "key and value lengths differ: key ", key.shape_str(),
             ", value ", value.shape_str());
  return p;
}

void validate_multihead_backward(const char* op, const MultiHeadProblem& p,
                                 const MultiHeadOutput& saved, const Tensor& doutput) {
  const MultiHeadDims& d = p.dims;
  const Shape q_shape{p.B, d.Hq, p.Tq, d.Dk}, k_shape{p.B, d.Hkv, p.Tk, d.Dk},
      v_shape{p.B, d.Hkv, p.Tk, d.Dv}, a_shape{p.B, d.Hq, p.Tq, d.Dv};
  ATTN_CHECK(saved.q.defined() && saved.q.shape() == q_shape, op, "saved.q must be ",
             shape_str(q_shape), ", got ", shape_or_undefined(saved.q));
  ATTN_CHECK(saved.k.defined() && saved.k.shape() == k_shape, op, "saved.k must be ",
             shape_str(k_shape), ", got ", shape_or_undefined(saved.k));
  ATTN_CHECK(saved.v.defined() && saved.v.shape() == v_shape, op, "saved.v must be ",
             shape_str(v_shape), ", got ", shape_or_undefined(saved.v));
  ATTN_CHECK(saved.attention.out.defined() && saved.attention.out.shape() == a_shape, op,
             "saved.attention.out must be ", shape_str(a_shape), ", got ",
             shape_or_undefined(saved.attention.out));
  const Shape out_shape{p.B, p.Tq, d.E};
  ATTN_CHECK(doutput.defined() && doutput.shape() == out_shape, op,
             "doutput must match the output ", shape_str(out_shape), ", got ",
             shape_or_undefined(doutput));
  ATTN_CHECK(is_float(doutput.dtype()), op, "doutput must be float32 or float64, got ",
             dtype_name(doutput.dtype()));
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Initialisation.

MultiHeadWeights MultiHeadWeights::init(const MultiHeadConfig& config, DType dtype, uint64_t seed) {
  const char* op = "MultiHeadWeights::init";
  ATTN_CHECK(dtype == DType::f32 || dtype == DType::f64, op,
             "dtype must be float32 or float64, got ", dtype_name(dtype));
  const detail::MultiHeadDims d = detail::resolve_multihead_config(op, config);
  // Each matrix draws from its own counter stream (`which`), so changing one shape leaves the
  // other matrices' values unchanged.
  auto xavier = [&](uint64_t which, int64_t rows, int64_t cols) {
    Tensor w = Tensor::empty({rows, cols}, DType::f64);
    const double limit = std::sqrt(6.0 / static_cast<double>(rows + cols));
    double* p = w.data<double>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        p[r * cols + c] = limit * (2.0 * counter_uniform(seed, which, 0, static_cast<uint64_t>(r),
                                                         static_cast<uint64_t>(c)) -
                                   1.0);
    return w.to(dtype);
  };
  MultiHeadWeights w;
  w.w_q = xavier(0, d.Hq * d.Dk, d.E);
  w.w_k = xavier(1, d.Hkv * d.Dk, d.Ek);
  w.w_v = xavier(2, d.Hkv * d.Dv, d.Ev);
  w.w_o = xavier(3, d.E, d.Hq * d.Dv);
  if (d.bias) {
    w.b_q = Tensor::zeros({d.Hq * d.Dk}, dtype);
    w.b_k = Tensor::zeros({d.Hkv * d.Dk}, dtype);
    w.b_v = Tensor::zeros({d.Hkv * d.Dv}, dtype);
    w.b_o = Tensor::zeros({d.E}, dtype);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// Kernels of the projections.

namespace {

int blas_int(int64_t n) {
  ATTN_CHECK(n <= INT_MAX, "multihead_attention", "dimension ", n, " exceeds the BLAS int range");
  return static_cast<int>(n);
}

// C[M, N] = op(A) op(B) + beta * C, row-major; op(X) = X^T when the flag is set.
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  ATTN_PROFILE_GEMM(profile::gemm_phase(trans_a, trans_b), M, N, K);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // e.g. dW over zero rows: BLAS rejects lda = 0, and the empty product is 0
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  detail::ensure_blas_kernel();
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, blas_int(M), blas_int(N), blas_int(K), 1.0f, A,
                blas_int(lda), B, blas_int(ldb), beta, C, blas_int(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, ta, tb, blas_int(M), blas_int(N), blas_int(K), 1.0, A, blas_int(lda),
                B, blas_int(ldb), beta, C, blas_int(ldc));
  }
}

// A weight or bias converted to T and made contiguous (no copy when it already is).
Tensor as(const Tensor& t, DType dtype) { return t.defined() ? t.to(dtype).contiguous() : t; }

// y [M, N] = x [M, K] W^T + b, with W [N, K] and b [N] (optional): torch.nn.Linear.
template <class T>
Tensor linear(const Tensor& x, int64_t M, int64_t K, const Tensor& w, const Tensor& b) {
  const int64_t N = w.size(0);
  Tensor y = Tensor::empty({M, N}, dtype_of<T>());
  T* yp = y.data<T>();
  if (b.defined()) {
    // Seed C with the bias and let the GEMM accumulate into it (beta = 1): one pass over y.
    const T* bp = b.data<T>();
    for (int64_t i = 0; i < M; ++i) std::memcpy(yp + i * N, bp, sizeof(T) * N);
  }
  gemm<T>(false, true, M, N, K, x.data<T>(), K, w.data<T>(), K, b.defined() ? T(1) : T(0), yp, N);
  return y;
}

// The three gradients of linear(): dx = dy W, dW = dy^T x, db = column sums of dy.
struct LinearGrads {
  Tensor dx, dw, db;
};
template <class T>
LinearGrads linear_backward(const Tensor& x, const Tensor& dy, int64_t M, int64_t K,
                            const Tensor& w, bool has_bias) {
  const int64_t N = w.size(0);
  LinearGrads g;
  g.dx = Tensor::empty({M, K}, dtype_of<T>());
  gemm<T>(false, false, M, K, N, dy.data<T>(), N, w.data<T>(), K, T(0), g.dx.data<T>(), K);
  g.dw = Tensor::empty({N, K}, dtype_of<T>());
  gemm<T>(true, false, N, K, M, dy.data<T>(), N, x.data<T>(), K, T(0), g.dw.data<T>(), K);
  if (has_bias) {
    g.db = Tensor::zeros({N}, dtype_of<T>());
    T* db = g.db.data<T>();
    const T* dyp = dy.data<T>();
    for (int64_t i = 0; i < M; ++i)
      for (int64_t n = 0; n < N; ++n) db[n] += dyp[i * N + n];
  }
  return g;
}

// [B, T, H * D] -> [B, H, T, D], both contiguous: one memcpy of D elements per (b, t, h).
template <class T>
Tensor split_heads(const Tensor& x, int64_t B, int64_t Tn, int64_t H, int64_t D) {
  Tensor y = Tensor::empty({B, H, Tn, D}, dtype_of<T>());
  const T* src = x.data<T>();
  T* dst = y.data<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + ((b * H + h) * Tn + t) * D, src + ((b * Tn + t) * H + h) * D,
                    sizeof(T) * D);
  return y;
}

// [B, H, T, D] (contiguous) -> [B * T, H * D]: the concatenation of the heads.
template <class T>
Tensor merge_heads(const Tensor& x, int64_t B, int64_t Tn, int64_t H, int64_t D) {
  Tensor y = Tensor::empty({B * Tn, H * D}, dtype_of<T>());
  const T* src = x.data<T>();
  T* dst = y.data<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < Tn; ++t)
        std::memcpy(dst + ((b * Tn + t) * H + h) * D, src + ((b * H + h) * Tn + t) * D,
                    sizeof(T) * D);
  return y;
}

// Inputs flattened to [B * T, width] rows in T.
Tensor rows(const Tensor& x, DType dtype) {
  return x.to(dtype).contiguous().reshape({x.size(0) * x.size(1), x.size(2)});
}

// Steps 1-3 for one input: [B, T, in] -> [B, H, T, D].
template <class T>
Tensor project_heads(const Tensor& x, const Tensor& w, const Tensor& b, int64_t H, int64_t D) {
  const int64_t B = x.size(0), Tn = x.size(1), K = x.size(2);
  const DType dtype = dtype_of<T>();
  const Tensor y = linear<T>(rows(x, dtype), B * Tn, K, as(w, dtype), as(b, dtype));
  return split_heads<T>(y, B, Tn, H, D);
}

// Steps 5-6: [B, Hq, Tq, Dv] -> [B, Tq, E].
template <class T>
Tensor output_projection(const Tensor& heads, const MultiHeadWeights& weights) {
  const int64_t B = heads.size(0), H = heads.size(1), Tn = heads.size(2), D = heads.size(3);
  const DType dtype = dtype_of<T>();
  const Tensor c = merge_heads<T>(heads.to(dtype).contiguous(), B, Tn, H, D);
  const Tensor w_o = as(weights.w_o, dtype);
  return linear<T>(c, B * Tn, H * D, w_o, as(weights.b_o, dtype)).reshape({B, Tn, w_o.size(0)});
}

template <class T>
MultiHeadOutput forward(const detail::MultiHeadDims& d, const MultiHeadWeights& weights,
                        const Tensor& query, const Tensor& key, const Tensor& value,
                        const AttentionParams& params) {
  ATTN_PROFILE_SCOPE("multihead.forward");
  MultiHeadOutput out;
  out.q = project_heads<T>(query, weights.w_q, weights.b_q, d.Hq, d.Dk);   // 1
  out.k = project_heads<T>(key, weights.w_k, weights.b_k, d.Hkv, d.Dk);    // 2
  out.v = project_heads<T>(value, weights.w_v, weights.b_v, d.Hkv, d.Dv);  // 3
  out.attention = attn::attention(out.q, out.k, out.v, params);            // 4
  out.output = output_projection<T>(out.attention.out, weights);           // 5, 6
  return out;
}

template <class T>
MultiHeadGrads backward(const detail::MultiHeadProblem& p, const MultiHeadWeights& weights,
                        const Tensor& query, const Tensor& key, const Tensor& value,
                        const AttentionParams& params, const MultiHeadOutput& saved,
                        const Tensor& doutput) {
  ATTN_PROFILE_SCOPE("multihead.backward");
  const detail::MultiHeadDims& d = p.dims;
  const DType dtype = dtype_of<T>();
  MultiHeadGrads g;
  // 6. output = c W_o^T + b_o
  const Tensor c =
      merge_heads<T>(saved.attention.out.to(dtype).contiguous(), p.B, p.Tq, d.Hq, d.Dv);
  const LinearGrads g6 = linear_backward<T>(c, rows(doutput, dtype), p.B * p.Tq, d.Hq * d.Dv,
                                            as(weights.w_o, dtype), d.bias);
  g.dweights.w_o = g6.dw;
  g.dweights.b_o = g6.db;
  // 5. c = merge_heads(a)
  const Tensor da = split_heads<T>(g6.dx, p.B, p.Tq, d.Hq, d.Dv);
  // 4. a = attention(q, k, v)
  g.attention = attn::attention_backward(saved.q.to(dtype), saved.k.to(dtype), saved.v.to(dtype),
                                         params, saved.attention, da);
  // 3, 2, 1: x_heads = split_heads(x W^T + b)
  auto input_grads = [&](const Tensor& x, const Tensor& dheads, const Tensor& w, Tensor& dx,
                         Tensor& dw, Tensor& db) {
    const int64_t B = x.size(0), Tn = x.size(1), K = x.size(2);
    const Tensor dy =
        merge_heads<T>(dheads.to(dtype).contiguous(), B, Tn, dheads.size(1), dheads.size(3));
    LinearGrads lg = linear_backward<T>(rows(x, dtype), dy, B * Tn, K, as(w, dtype), d.bias);
    dx = lg.dx.reshape({B, Tn, K});
    dw = lg.dw;
    db = lg.db;
  };
  input_grads(value, g.attention.dv, weights.w_v, g.dvalue, g.dweights.w_v, g.dweights.b_v);  // 3
  input_grads(key, g.attention.dk, weights.w_k, g.dkey, g.dweights.w_k, g.dweights.b_k);      // 2
  input_grads(query, g.attention.dq, weights.w_q, g.dquery, g.dweights.w_q, g.dweights.b_q);  // 1
  return g;
}

}  // namespace

MultiHeadOutput multihead_attention(const MultiHeadConfig& config, const MultiHeadWeights& weights,
                                    const Tensor& query, const Tensor& key, const Tensor& value,
                                    const AttentionParams& params) {
  const detail::MultiHeadProblem p =
      detail::validate_multihead("multihead_attention", config, weights, query, key, value);
  if (query.dtype() == DType::f32)
    return forward<float>(p.dims, weights, query, key, value, params);
  return forward<double>(p.dims, weights, query, key, value, params);
}

MultiHeadGrads multihead_attention_backward(const MultiHeadConfig& config,
                                            const MultiHeadWeights& weights, const Tensor& query,
                                            const Tensor& key, const Tensor& value,
                                            const AttentionParams& params,
                                            const MultiHeadOutput& saved, const Tensor& doutput) {
  const char* op = "multihead_attention_backward";
  const detail::MultiHeadProblem p =
      detail::validate_multihead(op, config, weights, query, key, value);
  detail::validate_multihead_backward(op, p, saved, doutput);
  if (query.dtype() == DType::f32)
    return backward<float>(p, weights, query, key, value, params, saved, doutput);
  return backward<double>(p, weights, query, key, value, params, saved, doutput);
}

// ---------------------------------------------------------------------------------------------
// KV cache.

KVCache KVCache::create(const MultiHeadConfig& config, const KVCacheOptions& options) {
  const char* op = "KVCache::create";
  const detail::MultiHeadDims d = detail::resolve_multihead_config(op, config);
  ATTN_CHECK(options.batch >= 0 && options.capacity >= 0, op,
             "batch and capacity must be >= 0, got batch ", options.batch, ", capacity ",
             options.capacity);
  ATTN_CHECK(options.dtype == DType::f32 || options.dtype == DType::f64 ||
                 options.dtype == DType::bf16,
             op, "dtype must be float32, float64 or bf16, got ", dtype_name(options.dtype));
  KVCache cache;
  if (options.int8) {
    ATTN_CHECK(options.dtype != DType::bf16, op,
               "an 8-bit cache takes float32 or float64 queries (dtype), got bf16");
    cache.k_int8 = QuantizedTensor::zeros({options.batch, d.Hkv, options.capacity, d.Dk});
    cache.v_int8 = QuantizedTensor::zeros({options.batch, d.Hkv, options.capacity, d.Dv});
    return cache;
  }
  cache.k = Tensor::zeros({options.batch, d.Hkv, options.capacity, d.Dk}, options.dtype);
  cache.v = Tensor::zeros({options.batch, d.Hkv, options.capacity, d.Dv}, options.dtype);
  return cache;
}

Tensor KVCache::keys() const { return k.defined() ? k.slice(2, 0, length) : k; }
Tensor KVCache::values() const { return v.defined() ? v.slice(2, 0, length) : v; }
QuantizedTensor KVCache::int8_keys() const {
  return k_int8.defined() ? k_int8.slice(2, 0, length) : k_int8;
}
QuantizedTensor KVCache::int8_values() const {
  return v_int8.defined() ? v_int8.slice(2, 0, length) : v_int8;
}

namespace {

// Copies rows [0, count) of every (b, h) block of src [BH, src_rows, D] into dst [BH, dst_rows, D]
// starting at row `at`. Both contiguous and of one dtype; `elem` is its size in bytes.
void copy_rows(const Tensor& src, int64_t src_rows, Tensor& dst, int64_t dst_rows, int64_t at,
               int64_t count, int64_t BH, int64_t D) {
  if (count == 0 || D == 0) return;
  const auto elem = static_cast<int64_t>(dtype_size(src.dtype()));
  const auto* s = static_cast<const std::byte*>(src.raw_data());
  auto* t = static_cast<std::byte*>(dst.raw_data());
  for (int64_t bh = 0; bh < BH; ++bh)
    std::memcpy(t + ((bh * dst_rows + at) * D) * elem, s + (bh * src_rows * D) * elem,
                static_cast<std::size_t>(count * D * elem));
}

// An 8-bit cache tensor [B, H, cap, D] grown to `grown` rows, its first `length` rows kept.
QuantizedTensor grow_int8(const QuantizedTensor& t, int64_t length, int64_t grown) {
  const int64_t B = t.size(0), H = t.size(1), cap = t.size(2), D = t.size(3);
  QuantizedTensor g = QuantizedTensor::zeros({B, H, grown, D});
  const int64_t blocks = int8_blocks(D);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    if (length == 0) break;
    std::memcpy(g.values() + bh * grown * D, t.values() + bh * cap * D,
                static_cast<std::size_t>(length * D));
    std::memcpy(g.scales().data<float>() + bh * grown * blocks,
                t.scales().data<float>() + bh * cap * blocks,
                static_cast<std::size_t>(length * blocks) * sizeof(float));
  }
  return g;
}

}  // namespace

void KVCache::append(const Tensor& new_k, const Tensor& new_v) {
  const char* op = "KVCache::append";
  ATTN_CHECK(new_k.defined() && new_v.defined() && new_k.dim() == 4 && new_v.dim() == 4, op,
             "new_k must be [B, Hkv, n, Dk] and new_v [B, Hkv, n, Dv], got ",
             detail::shape_or_undefined(new_k), " and ", detail::shape_or_undefined(new_v));
  ATTN_CHECK(new_v.size(0) == new_k.size(0) && new_v.size(1) == new_k.size(1) &&
                 new_v.size(2) == new_k.size(2),
             op, "new_k ", new_k.shape_str(), " and new_v ", new_v.shape_str(),
             " differ in batch, heads or length");
  if (is_int8()) {
    ATTN_CHECK(v_int8.defined() && k_int8.dim() == 4 && v_int8.dim() == 4 &&
                   k_int8.size(0) == v_int8.size(0) && k_int8.size(1) == v_int8.size(1) &&
                   k_int8.size(2) == v_int8.size(2),
               op, "8-bit cache tensors must be [B, Hkv, capacity, D], got k ",
               k_int8.shape_str(), ", v ", v_int8.defined() ? v_int8.shape_str() : "(undefined)");
    ATTN_CHECK(length >= 0 && length <= capacity(), op, "length ", length,
               " is outside the capacity ", capacity());
    ATTN_CHECK(new_k.size(0) == k_int8.size(0) && new_k.size(1) == k_int8.size(1) &&
                   new_k.size(3) == k_int8.size(3) && new_v.size(3) == v_int8.size(3),
               op, "new_k ", new_k.shape_str(), " and new_v ", new_v.shape_str(),
               " do not match the 8-bit cache k ", k_int8.shape_str(), ", v ",
               v_int8.shape_str());
    const int64_t n = new_k.size(2);
    if (length + n > capacity()) {
      const int64_t grown = std::max(2 * capacity(), length + n);
      k_int8 = grow_int8(k_int8, length, grown);
      v_int8 = grow_int8(v_int8, length, grown);
    }
    QuantizedTensor k_rows = k_int8.slice(2, length, length + n);
    QuantizedTensor v_rows = v_int8.slice(2, length, length + n);
    quantize_int8_into(new_k, k_rows);
    quantize_int8_into(new_v, v_rows);
    length += n;
    return;
  }
  if (!k.defined()) {  // the first append fixes batch, heads, widths and dtype
    ATTN_CHECK(new_k.dtype() == DType::f32 || new_k.dtype() == DType::f64 ||
                   new_k.dtype() == DType::bf16,
               op, "new_k must be float32, float64 or bf16, got ", dtype_name(new_k.dtype()));
    k = Tensor::zeros({new_k.size(0), new_k.size(1), 0, new_k.size(3)}, new_k.dtype());
    v = Tensor::zeros({new_v.size(0), new_v.size(1), 0, new_v.size(3)}, new_k.dtype());
    length = 0;
  }
  // Row-major strides exactly (not is_contiguous(), which rejects a zero-capacity cache).
  ATTN_CHECK(k.dim() == 4 && v.dim() == 4 && k.strides() == contiguous_strides(k.shape()) &&
                 v.strides() == contiguous_strides(v.shape()) && v.dtype() == k.dtype() &&
                 k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2),
             op, "cache tensors must be contiguous [B, Hkv, capacity, D] of one dtype, got k ",
             k.shape_str(), ", v ", v.shape_str());
  ATTN_CHECK(length >= 0 && length <= capacity(), op, "length ", length,
             " is outside the capacity ", capacity());
  const int64_t B = k.size(0), H = k.size(1), Dk = k.size(3), Dv = v.size(3);
  ATTN_CHECK(new_k.size(0) == B, op, "new_k has batch ", new_k.size(0), ", the cache ", B,
             " (cache k ", k.shape_str(), ")");
  ATTN_CHECK(new_k.size(1) == H, op, "new_k has ", new_k.size(1), " heads, the cache ", H,
             " (cache k ", k.shape_str(), ")");
  ATTN_CHECK(new_k.size(3) == Dk && new_v.size(3) == Dv, op, "widths differ: new_k ",
             new_k.shape_str(), ", new_v ", new_v.shape_str(), ", cache k ", k.shape_str(),
             ", cache v ", v.shape_str());
  const int64_t n = new_k.size(2);
  const int64_t cap = capacity();
  if (length + n > cap) {
    // Doubling keeps the total copy cost of a sequence of appends linear in its final length.
    const int64_t grown = std::max(2 * cap, length + n);
    Tensor k2 = Tensor::empty({B, H, grown, Dk}, k.dtype());
    Tensor v2 = Tensor::empty({B, H, grown, Dv}, v.dtype());
    copy_rows(k, cap, k2, grown, 0, length, B * H, Dk);
    copy_rows(v, cap, v2, grown, 0, length, B * H, Dv);
    k = k2;
    v = v2;
  }
  const Tensor nk = new_k.to(k.dtype()).contiguous(), nv = new_v.to(v.dtype()).contiguous();
  copy_rows(nk, n, k, capacity(), length, n, B * H, Dk);
  copy_rows(nv, n, v, capacity(), length, n, B * H, Dv);
  length += n;
}

MultiHeadOutput multihead_attention_step(const MultiHeadConfig& config,
                                         const MultiHeadWeights& weights, KVCache& cache,
                                         const Tensor& query_step, const Tensor& key_step,
                                         const Tensor& value_step, const AttentionParams& params) {
  const char* op = "multihead_attention_step";
  const detail::MultiHeadProblem p =
      detail::validate_multihead(op, config, weights, query_step, key_step, value_step);
  const detail::MultiHeadDims& d = p.dims;
  const DType dtype = query_step.dtype();
  if (cache.is_int8()) {
    ATTN_CHECK(cache.k_int8.dim() == 4 && cache.v_int8.defined() && cache.k_int8.size(0) == p.B &&
                   cache.k_int8.size(1) == d.Hkv && cache.k_int8.size(3) == d.Dk &&
                   cache.v_int8.size(3) == d.Dv,
               op, "8-bit cache k ", cache.k_int8.shape_str(),
               " does not match the step: batch ", p.B, ", ", d.Hkv, " kv heads, head_dim ",
               d.Dk, ", value_head_dim ", d.Dv);
  } else if (cache.k.defined()) {
    // Name the step's op (not KVCache::append) for the mismatches a caller is likely to make.
    ATTN_CHECK(cache.k.dim() == 4 && cache.v.defined() && cache.v.dim() == 4, op,
               "cache must hold k [B, Hkv, capacity, Dk] and v [B, Hkv, capacity, Dv], got ",
               cache.k.shape_str(), " and ", detail::shape_or_undefined(cache.v));
    ATTN_CHECK(cache.k.size(0) == p.B, op, "cache batch ", cache.k.size(0),
               " differs from the step's batch ", p.B, " (cache k ", cache.k.shape_str(),
               ", query ", query_step.shape_str(), ")");
    ATTN_CHECK(cache.k.size(1) == d.Hkv && cache.k.size(3) == d.Dk && cache.v.size(3) == d.Dv, op,
               "cache k ", cache.k.shape_str(), " and v ", cache.v.shape_str(),
               " do not match the config: ", d.Hkv, " kv heads, head_dim ", d.Dk,
               ", value_head_dim ", d.Dv);
    ATTN_CHECK(cache.k.dtype() == dtype || cache.k.dtype() == DType::bf16, op, "cache dtype ",
               dtype_name(cache.k.dtype()), " differs from the query's ", dtype_name(dtype),
               " (a cache holds the query's dtype, or bf16)");
  }
  MultiHeadOutput out;
  if (dtype == DType::f32) {
    out.q = project_heads<float>(query_step, weights.w_q, weights.b_q, d.Hq, d.Dk);
    cache.append(project_heads<float>(key_step, weights.w_k, weights.b_k, d.Hkv, d.Dk),
                 project_heads<float>(value_step, weights.w_v, weights.b_v, d.Hkv, d.Dv));
  } else {
    out.q = project_heads<double>(query_step, weights.w_q, weights.b_q, d.Hq, d.Dk);
    cache.append(project_heads<double>(key_step, weights.w_k, weights.b_k, d.Hkv, d.Dk),
                 project_heads<double>(value_step, weights.w_v, weights.b_v, d.Hkv, d.Dv));
  }
  // The valid rows, strided over the capacity dimension: attention() reads them in place on the
  // decode path (a bf16 cache too, widened row by row in registers), so a step reads the cache
  // once and copies nothing.
  // The new rows are the last `n` positions of the sequence the cache holds.
  AttentionParams step_params = params;
  step_params.mask.alignment = Alignment::bottom_right;
  if (cache.is_int8()) {
    out.attention =
        attn::attention(out.q, cache.int8_keys(), cache.int8_values(), step_params);
  } else {
    out.k = cache.keys();
    out.v = cache.values();
    out.attention = attn::attention(out.q, out.k, out.v, step_params);
  }
  out.output = dtype == DType::f32 ? output_projection<float>(out.attention.out, weights)
                                   : output_projection<double>(out.attention.out, weights);
  return out;
}

}  // namespace attn
