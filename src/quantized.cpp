#include "attn/quantized.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention_validate.h"
#include "attn/error.h"
#include "kernels/decode/decode_attention.h"

namespace attn {

namespace {

// Calls f(values offset, scales tensor index...) for every row (all indices but the last) of a
// tensor of `shape`, in row-major order; `index` holds the row's leading indices.
template <class F>
void for_each_row(const Shape& shape, F&& f) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < nd; ++d) rows *= shape[static_cast<std::size_t>(d)];
  Shape index(static_cast<std::size_t>(std::max<int64_t>(nd - 1, 0)), 0);
  for (int64_t r = 0; r < rows; ++r) {
    f(index);
    for (int64_t d = nd - 2; d >= 0; --d) {
      auto& i = index[static_cast<std::size_t>(d)];
      if (++i < shape[static_cast<std::size_t>(d)]) break;
      i = 0;
    }
  }
}

int64_t offset_of(const Shape& index, const Shape& strides) {
  int64_t at = 0;
  for (std::size_t d = 0; d < index.size(); ++d) at += index[d] * strides[d];
  return at;
}

// The scales a QuantizedTensor of `shape` must carry (scales() is mutable: a caller may have
// replaced them), checked before a kernel trusts them.
void check_scales(const char* op, const char* name, const QuantizedTensor& t) {
  const Tensor& s = t.scales();
  Shape want = t.shape();
  want.back() = int8_blocks(want.back());
  ATTN_CHECK(s.defined() && s.dtype() == DType::f32 && s.shape() == want && s.stride(-1) == 1,
             op, name, " scales must be float32 ", attn::shape_str(want),
             " with a contiguous last dimension, got ",
             s.defined() ? std::string(dtype_name(s.dtype())) + " " + s.shape_str()
                         : std::string("undefined"));
}

}  // namespace

QuantizedTensor QuantizedTensor::zeros(const Shape& shape) {
  ATTN_CHECK(!shape.empty(), "QuantizedTensor", "needs rank >= 1, got shape ",
             attn::shape_str(shape));
  for (int64_t s : shape)
    ATTN_CHECK(s >= 0, "QuantizedTensor", "negative size in shape ", attn::shape_str(shape));
  QuantizedTensor t;
  const auto n = static_cast<std::size_t>(std::max<int64_t>(1, shape_numel(shape)));
  t.values_ = std::shared_ptr<int8_t>(new int8_t[n](), std::default_delete<int8_t[]>());
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  Shape scale_shape = shape;
  scale_shape.back() = int8_blocks(shape.back());
  t.scales_ = Tensor::zeros(scale_shape, DType::f32);
  return t;
}

int64_t QuantizedTensor::size(int64_t d) const {
  const int64_t nd = dim();
  if (d < 0) d += nd;
  ATTN_CHECK(d >= 0 && d < nd, "QuantizedTensor", "dimension ", d, " out of range for shape ",
             shape_str());
  return shape_[static_cast<std::size_t>(d)];
}

int64_t QuantizedTensor::stride(int64_t d) const {
  const int64_t nd = dim();
  if (d < 0) d += nd;
  ATTN_CHECK(d >= 0 && d < nd, "QuantizedTensor", "dimension ", d, " out of range for shape ",
             shape_str());
  return strides_[static_cast<std::size_t>(d)];
}

QuantizedTensor QuantizedTensor::slice(int64_t d, int64_t start, int64_t end) const {
  const int64_t nd = dim();
  ATTN_CHECK(d >= 0 && d + 1 < nd, "QuantizedTensor::slice", "dimension ", d,
             " must be one of the leading dimensions of ", shape_str());
  const int64_t n = shape_[static_cast<std::size_t>(d)];
  ATTN_CHECK(0 <= start && start <= end && end <= n, "QuantizedTensor::slice", "range [", start,
             ", ", end, ") outside [0, ", n, ") of dimension ", d, " of ", shape_str());
  QuantizedTensor t = *this;
  t.shape_[static_cast<std::size_t>(d)] = end - start;
  // Aliasing constructor: shares ownership, points at the first element of the view.
  t.values_ = std::shared_ptr<int8_t>(values_, values_.get() + start * stride(d));
  t.scales_ = scales_.slice(d, start, end);
  return t;
}

void quantize_int8_into(const Tensor& src, QuantizedTensor& dst) {
  const char* op = "quantize_int8";
  ATTN_CHECK(src.defined() && src.dim() >= 1, op, "input must have rank >= 1");
  ATTN_CHECK(src.dtype() == DType::f32 || src.dtype() == DType::f64 || src.dtype() == DType::bf16,
             op, "input must be float32, float64 or bf16, got ", dtype_name(src.dtype()));
  ATTN_CHECK(dst.defined() && dst.shape() == src.shape(), op, "destination ",
             dst.defined() ? dst.shape_str() : std::string("(undefined)"),
             " differs from the input ", src.shape_str());
  check_scales(op, "destination", dst);
  const Tensor x = src.to(DType::f64).contiguous();
  const double* in = x.data<double>();
  const int64_t D = src.size(-1), blocks = int8_blocks(D);
  for (int64_t i = 0; i < x.numel(); ++i)
    ATTN_CHECK(std::isfinite(in[i]), op, "input ", src.shape_str(), " holds a non-finite value ",
               in[i], " at flat index ", i, " (a block scale cannot represent it)");
  Tensor& scales = dst.scales();
  float* scale_base = scales.data<float>();
  int8_t* value_base = dst.values();
  const Shape& vstrides = dst.strides();
  const Shape& sstrides = scales.strides();
  for_each_row(src.shape(), [&](const Shape& index) {
    int8_t* q = value_base + offset_of(index, vstrides);
    float* s = scale_base + offset_of(index, sstrides);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t lo = blk * kInt8Block, hi = std::min(D, lo + kInt8Block);
      double amax = 0.0;
      for (int64_t e = lo; e < hi; ++e) amax = std::max(amax, std::abs(in[e]));
      const float scale = static_cast<float>(amax / 127.0);
      s[blk * sstrides.back()] = scale;
      for (int64_t e = lo; e < hi; ++e) {
        const double r = scale == 0.0f ? 0.0 : std::round(in[e] / static_cast<double>(scale));
        q[e] = static_cast<int8_t>(std::clamp(r, -127.0, 127.0));
      }
    }
    in += D;
  });
}

QuantizedTensor quantize_int8(const Tensor& x) {
  ATTN_CHECK(x.defined() && x.dim() >= 1, "quantize_int8", "input must have rank >= 1");
  QuantizedTensor out = QuantizedTensor::zeros(x.shape());
  quantize_int8_into(x, out);
  return out;
}

Tensor dequantize(const QuantizedTensor& x, DType dtype) {
  const char* op = "dequantize";
  ATTN_CHECK(x.defined(), op, "input is undefined");
  check_scales(op, "input", x);
  ATTN_CHECK(dtype == DType::f32 || dtype == DType::f64, op,
             "dtype must be float32 or float64, got ", dtype_name(dtype));
  Tensor out = Tensor::empty(x.shape(), DType::f64);
  double* o = out.data<double>();
  const int64_t D = x.size(-1);
  const Tensor& scales = x.scales();
  const float* scale_base = scales.data<float>();
  for_each_row(x.shape(), [&](const Shape& index) {
    const int8_t* q = x.values() + offset_of(index, x.strides());
    const float* s = scale_base + offset_of(index, scales.strides());
    for (int64_t e = 0; e < D; ++e)
      o[e] = static_cast<double>(s[(e / kInt8Block) * scales.strides().back()]) * q[e];
    o += D;
  });
  return out.to(dtype);
}

AttentionOutput attention(const Tensor& q, const QuantizedTensor& k, const QuantizedTensor& v,
                          const AttentionParams& params) {
  const char* op = "attention";
  ATTN_CHECK(k.defined() && v.defined() && k.dim() == 4 && v.dim() == 4, op,
             "8-bit k must be [B, Hkv, Tk, Dk] and v [B, Hkv, Tk, Dv], got ",
             k.defined() ? k.shape_str() : std::string("(undefined)"), " and ",
             v.defined() ? v.shape_str() : std::string("(undefined)"));
  ATTN_CHECK(q.defined(), op, "q is undefined");
  check_scales(op, "8-bit k", k);
  check_scales(op, "8-bit v", v);
  ATTN_CHECK(q.dtype() == DType::f32 || q.dtype() == DType::f64 || q.dtype() == DType::bf16, op,
             "q must be float32, float64 or bf16 against 8-bit k and v, got ",
             dtype_name(q.dtype()));
  const DType wide = q.dtype() == DType::f64 ? DType::f64 : DType::f32;
  // Shape-only stand-ins (every stride 0 over one zero) let the one validation of attention()
  // check the 8-bit K and V's shapes against q and the params.
  static float zero32 = 0.0f;
  static double zero64 = 0.0;
  const auto stand_in = [&](const QuantizedTensor& t) {
    return wide == DType::f32 ? Tensor::wrap(&zero32, t.shape(), Shape(4, 0))
                              : Tensor::wrap(&zero64, t.shape(), Shape(4, 0));
  };
  const Tensor qw = q.to(wide);
  const detail::AttentionDims dims =
      detail::validate_attention(op, qw, stand_in(k), stand_in(v), params);
  if (wide == DType::f32) {
    const AttentionParams params32 = detail::convert_params(params, DType::f32);
    if (dims.Dk % kInt8Block == 0 && dims.Dv % kInt8Block == 0 &&
        kernels::decode_attention_supported(DType::f32, dims, params32))
      return kernels::decode_attention(dims, qw.contiguous(), k, v, params32);
  }
  return attention(qw, dequantize(k, wide), dequantize(v, wide), params);
}

}  // namespace attn
