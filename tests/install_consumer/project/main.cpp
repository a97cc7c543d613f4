// Runs one attention call through the installed package and checks the result is a convex
// combination of the values (each output lies within the values' range).
#include <attn/attention.h>

#include <cstdio>

int main() {
  attn::Tensor q = attn::Tensor::full({1, 1, 2, 4}, 0.5);
  attn::Tensor k = attn::Tensor::full({1, 1, 3, 4}, 0.25);
  attn::Tensor v = attn::Tensor::from(std::vector<float>{1, 2, 3}, {1, 1, 3, 1});
  attn::AttentionOutput r = attn::attention(q, k, v);
  const double out = r.out.get({0, 0, 1, 0});
  std::printf("consumer: out = %.6f\n", out);
  return (out > 1.999 && out < 2.001) ? 0 : 1;  // equal scores: the mean of 1, 2, 3
}
