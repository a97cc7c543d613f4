#include "nn/positions.h"

#include <cmath>

#include "nn/linear.h"

namespace attn::nn {

Tensor sinusoidal_positions(int64_t length, int64_t dim, DType dtype, int64_t offset, double base) {
  constexpr const char* op = "sinusoidal_positions";
  ATTN_CHECK(length >= 0 && dim >= 1, op, "length must be >= 0 and dim >= 1, got length ", length,
             ", dim ", dim);
  ATTN_CHECK(offset >= 0, op, "offset must be >= 0, got ", offset);
  ATTN_CHECK(base > 1.0, op, "base must be > 1, got ", base);
  Tensor table = Tensor::empty({length, dim}, dtype);
  visit_float(dtype, op, "dtype", [&](auto tag) {
    using T = decltype(tag);
    T* p = table.data<T>();
    for (int64_t t = 0; t < length; ++t) {
      const double pos = double(offset + t);
      for (int64_t j = 0; j < dim; ++j) {
        const int64_t pair = j / 2;
        const double angle = pos * std::pow(base, -2.0 * double(pair) / double(dim));
        p[t * dim + j] = T(j % 2 == 0 ? std::sin(angle) : std::cos(angle));
      }
    }
  });
  return table;
}

namespace {
constexpr const char* kRope = "rope";

// Rotates every pair by sign * p * theta_i; sign -1 is the inverse (backward).
Tensor rotate(const Tensor& x, const RopeConfig& config, double sign, const char* what) {
  ATTN_CHECK(x.defined(), kRope, what, " is undefined");
  ATTN_CHECK(x.dim() == 4, kRope, what, " must be [B, H, T, D], got ", x.shape_str());
  const int64_t batch = x.size(0), heads = x.size(1), len = x.size(2), d = x.size(3);
  ATTN_CHECK(d % 2 == 0, kRope, what, " head width D = ", d,
             " must be even (features rotate in pairs), ", what, " ", x.shape_str());
  ATTN_CHECK(config.base > 1.0, kRope, "base must be > 1, got ", config.base);
  ATTN_CHECK(config.offsets.empty() || static_cast<int64_t>(config.offsets.size()) == batch, kRope,
             "offsets has ", config.offsets.size(), " entries, ", what, " has batch ", batch, " (",
             x.shape_str(), ")");
  ATTN_CHECK(config.offset >= 0, kRope, "offset must be >= 0, got ", config.offset);
  for (std::size_t b = 0; b < config.offsets.size(); ++b)
    ATTN_CHECK(config.offsets[b] >= 0, kRope, "offsets[", b, "] must be >= 0, got ",
               config.offsets[b]);

  const int64_t half = d / 2;
  // Pair i is (first + i*step_pair, first + i*step_pair + partner).
  const bool interleaved = config.layout == RopeLayout::interleaved;
  const int64_t pair_stride = interleaved ? 2 : 1, partner = interleaved ? 1 : half;
  std::vector<double> theta(static_cast<std::size_t>(half));
  for (int64_t i = 0; i < half; ++i) theta[i] = std::pow(config.base, -2.0 * double(i) / double(d));

  const Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(xc.shape(), xc.dtype());
  visit_float(xc.dtype(), kRope, what, [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> cos_t(static_cast<std::size_t>(half)), sin_t(static_cast<std::size_t>(half));
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t offset = config.offsets.empty() ? config.offset : config.offsets[b];
      for (int64_t t = 0; t < len; ++t) {
        // One table of cos/sin per (b, t), shared by all H heads.
        for (int64_t i = 0; i < half; ++i) {
          const double angle = sign * double(offset + t) * theta[i];
          cos_t[i] = T(std::cos(angle));
          sin_t[i] = T(std::sin(angle));
        }
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t row = ((b * heads + h) * len + t) * d;
          const T* px = xc.data<T>() + row;
          T* py = y.data<T>() + row;
          for (int64_t i = 0; i < half; ++i) {
            const int64_t ia = i * pair_stride, ib = ia + partner;
            const T a = px[ia], bb = px[ib];
            py[ia] = a * cos_t[i] - bb * sin_t[i];
            py[ib] = a * sin_t[i] + bb * cos_t[i];
          }
        }
      }
    }
  });
  return y;
}
}  // namespace

Tensor rope_forward(const Tensor& x, const RopeConfig& config) {
  return rotate(x, config, 1.0, "input");
}

Tensor rope_backward(const Tensor& dout, const RopeConfig& config) {
  return rotate(dout, config, -1.0, "dout");
}

}  // namespace attn::nn
