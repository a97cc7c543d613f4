#include "tools/experiments/statistics.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "attn/error.h"

namespace attn::experiments {

RowStats row_stats(const double* p, int64_t n) {
  RowStats s;
  double sum_p2 = 0.0, sum_p4 = 0.0, diagonal = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double x = p[j];
    s.largest = std::max(s.largest, x);
    if (x > 0.0) s.entropy -= x * std::log(x);
    sum_p2 += x * x;
    sum_p4 += x * x * x * x;
    diagonal += x * x * (1.0 - x) * (1.0 - x);
  }
  // ||J||_F^2 = sum_i p_i^2 (1 - p_i)^2 + sum_{i != j} p_i^2 p_j^2
  s.jacobian_norm = std::sqrt(std::max(0.0, diagonal + sum_p2 * sum_p2 - sum_p4));
  return s;
}

RowStats row_stats(const std::vector<double>& p) {
  return row_stats(p.data(), static_cast<int64_t>(p.size()));
}

WeightRowStats weight_row_stats(const std::vector<std::vector<double>>& rows) {
  WeightRowStats out;
  for (const auto& row : rows) {
    const RowStats s = row_stats(row);
    out.largest.push_back(s.largest), out.entropy.push_back(s.entropy);
  }
  return out;
}

std::vector<double> softmax(const std::vector<double>& scores) {
  std::vector<double> p(scores.size());
  if (scores.empty()) return p;
  const double top = *std::max_element(scores.begin(), scores.end());
  double sum = 0.0;
  for (size_t i = 0; i < scores.size(); ++i) sum += p[i] = std::exp(scores[i] - top);
  for (double& x : p) x /= sum;
  return p;
}

Summary summarize(const std::vector<double>& values) {
  Summary s;
  s.count = static_cast<int64_t>(values.size());
  if (values.empty()) return s;
  s.min = *std::min_element(values.begin(), values.end());
  s.max = *std::max_element(values.begin(), values.end());
  double sum = 0.0;
  for (const double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  if (values.size() > 1) {
    double sq = 0.0;
    for (const double v : values) sq += (v - s.mean) * (v - s.mean);
    s.variance = sq / static_cast<double>(values.size() - 1);
  }
  s.stddev = std::sqrt(s.variance);
  return s;
}

double median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

int64_t Histogram::total() const {
  int64_t t = 0;
  for (const int64_t c : counts) t += c;
  return t;
}

Histogram histogram(const std::vector<double>& values, double lo, double hi, int64_t bins) {
  if (bins < 1 || !(hi > lo)) {
    throw Error("experiments", "histogram needs bins >= 1 and hi > lo");
  }
  Histogram h;
  h.lo = lo;
  h.hi = hi;
  h.counts.assign(static_cast<size_t>(bins), 0);
  for (const double v : values) {
    int64_t b = static_cast<int64_t>(std::floor((v - lo) / (hi - lo) * static_cast<double>(bins)));
    if (!(b >= 0)) b = 0;  // also NaN
    b = std::min(b, bins - 1);
    ++h.counts[static_cast<size_t>(b)];
  }
  return h;
}

double dot_product_variance(int64_t d, int64_t samples, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> products(static_cast<size_t>(samples));
  for (auto& x : products) {
    double s = 0.0;
    for (int64_t e = 0; e < d; ++e) s += normal(rng) * normal(rng);
    x = s * scale;
  }
  return summarize(products).variance;
}

}  // namespace attn::experiments
