// Front-end glue shared by the fused kernels (see fused_args.h).
#include "kernels/common/fused_args.h"

#include <algorithm>

namespace attn::kernels {

Tensor mean_over_heads(const Tensor& weights) {
  const int64_t B = weights.size(0), H = weights.size(1), Tq = weights.size(2),
                Tk = weights.size(3);
  Tensor mean = Tensor::empty({B, Tq, Tk}, DType::f32);
  const float* w = weights.data<float>();
  float* m = mean.data<float>();
  const float inv_heads = H > 0 ? 1.0f / static_cast<float>(H) : 0.0f;
  // One row (b, i) per iteration: Tk contiguous floats of each head in turn, streamed once.
#pragma omp parallel for schedule(static) if (B * Tq * Tk > 65536)
  for (int64_t row = 0; row < B * Tq; ++row) {
    const int64_t b = row / Tq, i = row % Tq;
    float* dst = m + row * Tk;
    std::fill_n(dst, Tk, 0.0f);
    for (int64_t h = 0; h < H; ++h) {
      const float* src = w + ((b * H + h) * Tq + i) * Tk;
      for (int64_t j = 0; j < Tk; ++j) dst[j] += src[j];
    }
    for (int64_t j = 0; j < Tk; ++j) dst[j] *= inv_heads;
  }
  return mean;
}

}  // namespace attn::kernels
