// Statistics behind `attn experiments`: of attention rows (largest weight, entropy, the norm of
// the softmax Jacobian), of samples (mean, variance, spread over seeds) and histograms.
// Plain functions of numbers, no I/O: tests/tools/test_experiments.cpp checks them against closed forms.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace attn::experiments {

// One softmax row p (non-negative, summing to 1).
struct RowStats {
  double largest = 0.0;  // max_j p_j
  double entropy = 0.0;  // -sum p log p, nats (log n for a uniform row of n)
  // Frobenius norm of the softmax Jacobian J = diag(p) - p p^T: how much of a gradient on the
  // weights reaches the scores. 0 for a one-hot row, about 1/sqrt(n) for a uniform one.
  double jacobian_norm = 0.0;
};
RowStats row_stats(const double* p, int64_t n);
RowStats row_stats(const std::vector<double>& p);

// row_stats of every row (a target word's attention weights over the source), as two lists.
struct WeightRowStats {
  std::vector<double> largest;
  std::vector<double> entropy;
};
WeightRowStats weight_row_stats(const std::vector<std::vector<double>>& rows);

// softmax of `scores` (row maximum subtracted), in double.
std::vector<double> softmax(const std::vector<double>& scores);

struct Summary {
  int64_t count = 0;
  double mean = 0.0;
  double variance = 0.0;  // unbiased (n - 1); 0 for fewer than 2 values
  double stddev = 0.0;
  double min = 0.0;
  double max = 0.0;
};
Summary summarize(const std::vector<double>& values);

// The median (the mean of the two middle values for an even count); 0 for no values.
double median(std::vector<double> values);

// Equal-width bins over [lo, hi); values outside are clamped into the first / last bin, so the
// counts always sum to the number of values.
struct Histogram {
  double lo = 0.0;
  double hi = 1.0;
  std::vector<int64_t> counts;

  double bin_width() const { return (hi - lo) / static_cast<double>(counts.size()); }
  double bin_center(size_t i) const { return lo + (static_cast<double>(i) + 0.5) * bin_width(); }
  int64_t total() const;
};
// Throws attn::Error for bins < 1 or hi <= lo.
Histogram histogram(const std::vector<double>& values, double lo, double hi, int64_t bins);

// Variance of q . k over `samples` pairs of vectors of width d with independent N(0, 1) entries
// (expected value d), scaled by `scale` (1 / sqrt(d) gives 1); fixed seed.
double dot_product_variance(int64_t d, int64_t samples, double scale, uint64_t seed);

}  // namespace attn::experiments
