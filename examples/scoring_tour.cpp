// A tour of attn's scoring functions: runs every one of them, forward and backward, on the same
// random batch and prints a slice of the output, the alignment (attention weights) of one query,
// and the time each took.
//
//   ./build/examples/scoring_tour [--length T] [--width D] [--heads H]
#include <attn/attention.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

attn::Tensor random_tensor(const attn::Shape& shape, std::mt19937& rng, double scale = 1.0) {
  attn::Tensor t = attn::Tensor::empty(shape, attn::DType::f32);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

struct Case {
  std::string label;
  attn::Score score;
};

std::vector<Case> all_scores(int64_t d, int64_t max_len, std::mt19937& rng) {
  const double w = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t hidden = d;
  return {
      {"dot", attn::DotScore{}},
      {"scaled_dot", attn::ScaledDotScore{}},
      {"general (full W)", attn::GeneralScore{.weight = random_tensor({d, d}, rng, w)}},
      {"general (rank 8)", attn::GeneralScore{.u = random_tensor({8, d}, rng, w),
                                              .v = random_tensor({8, d}, rng, w)}},
      {"additive (Bahdanau)", attn::AdditiveScore{.w_query = random_tensor({hidden, d}, rng, w),
                                                  .w_key = random_tensor({hidden, d}, rng, w),
                                                  .bias = random_tensor({hidden}, rng, 0.1),
                                                  .v = random_tensor({hidden}, rng, w)}},
      {"concat (Luong)", attn::ConcatScore{.weight = random_tensor({hidden, 2 * d}, rng, w),
                                           .v = random_tensor({hidden}, rng, w)}},
      {"cosine", attn::CosineScore{.tau = attn::Tensor::full({1}, 5.0)}},
      {"location (Luong)", attn::LocationScore{.weight = random_tensor({max_len, d}, rng, w)}},
      {"trilinear (BiDAF)", attn::TrilinearScore{.weight = random_tensor({3 * d}, rng, w)}},
  };
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

int64_t flag(int argc, char** argv, const char* name, int64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoll(argv[i + 1]);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t T = flag(argc, argv, "--length", 256);
  const int64_t D = flag(argc, argv, "--width", 64);
  const int64_t H = flag(argc, argv, "--heads", 4);
  const int64_t B = 2;
  std::mt19937 rng(42);
  const attn::Tensor q = random_tensor({B, H, T, D}, rng);
  const attn::Tensor k = random_tensor({B, H, T, D}, rng);
  const attn::Tensor v = random_tensor({B, H, T, D}, rng);
  const attn::Tensor dout = random_tensor({B, H, T, D}, rng);

  std::printf("attn scoring tour: B=%lld H=%lld T=%lld D=%lld, float32, causal, second sequence "
              "padded to %lld keys\n\n",
              static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(T),
              static_cast<long long>(D), static_cast<long long>(T * 3 / 4));
  std::printf("%-20s %10s %10s  %-28s %s\n", "score", "fwd ms", "bwd ms", "out[0,0,T-1,0:3]",
              "weights of query 3 over keys 0..3");
  for (const Case& c : all_scores(D, T, rng)) {
    attn::AttentionParams params;
    params.score = c.score;
    params.mask.causal = true;
    params.mask.key_lengths = {T, T * 3 / 4};
    params.return_weights = true;
    auto start = std::chrono::steady_clock::now();
    const attn::AttentionOutput fwd = attn::attention(q, k, v, params);
    const double forward_ms = milliseconds_since(start);
    start = std::chrono::steady_clock::now();
    const attn::AttentionGrads grads = attn::attention_backward(q, k, v, params, fwd, dout);
    const double backward_ms = milliseconds_since(start);
    char out_text[64];
    std::snprintf(out_text, sizeof out_text, "%+.4f %+.4f %+.4f", fwd.out.get({0, 0, T - 1, 0}),
                  fwd.out.get({0, 0, T - 1, 1}), fwd.out.get({0, 0, T - 1, 2}));
    std::printf("%-20s %10.2f %10.2f  %-28s %.3f %.3f %.3f %.3f   |dq|max %.2e\n", c.label.c_str(),
                forward_ms, backward_ms, out_text, fwd.weights.get({0, 0, 3, 0}),
                fwd.weights.get({0, 0, 3, 1}), fwd.weights.get({0, 0, 3, 2}),
                fwd.weights.get({0, 0, 3, 3}), [&] {
                  double m = 0;
                  for (double x : grads.dq.to_vector()) m = std::max(m, std::abs(x));
                  return m;
                }());
  }
  std::printf("\nEach row's weights sum to 1 over the keys a query may see (causal: query 3 sees "
              "keys 0..3).\n");
  return 0;
}
