#include "seq2seq/models/loss.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "attn/activations.h"
#include "attn/error.h"
#include "attn/profile.h"
#include "nn/linear.h"

namespace attn::seq2seq {

CrossEntropyResult cross_entropy(const Tensor& logits, const std::vector<int32_t>& targets,
                                 const CrossEntropyConfig& config) {
  ATTN_PROFILE_SCOPE("loss.cross_entropy");
  constexpr const char* op = "cross_entropy";
  ATTN_CHECK(logits.defined() && logits.dim() >= 2, op, "logits must be [N, V], got ",
             logits.defined() ? logits.shape_str() : "undefined");
  const int64_t V = logits.size(-1);
  const int64_t N = logits.numel() / std::max<int64_t>(V, 1);
  ATTN_CHECK(static_cast<int64_t>(targets.size()) == N, op, "logits ", logits.shape_str(),
             " hold ", N, " rows, got ", targets.size(), " targets");
  ATTN_CHECK(config.label_smoothing >= 0.0 && config.label_smoothing < 1.0, op,
             "label smoothing must be in [0, 1), got ", config.label_smoothing);
  const Tensor x = logits.contiguous();
  CrossEntropyResult r;
  for (int32_t t : targets) {
    if (t == config.ignore_id) continue;
    ATTN_CHECK(0 <= t && t < V, op, "target ", t, " out of range for ", V, " classes");
    ++r.count;
  }
  // Every row of dlogits is written below (ignored rows with zeros): no zero-fill first.
  if (config.compute_grad) r.dlogits = Tensor::empty(logits.shape(), logits.dtype());
  const double eps = config.label_smoothing;
  const double inv_m =
      r.count == 0 ? 0.0 : 1.0 / static_cast<double>(config.normalizer > 0 ? config.normalizer : r.count);
  nn::visit_float(x.dtype(), op, "logits", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    T* dp = config.compute_grad ? r.dlogits.data<T>() : nullptr;
    // Rows are independent: both cores take rows, each row's terms land in its own slot, and
    // the sums over rows run in row order afterwards (the same bits at any thread count).
    std::vector<double> row_loss(static_cast<size_t>(N), 0.0), row_nll(static_cast<size_t>(N), 0.0);
#pragma omp parallel if (N * V >= (1 << 16))
    {
      std::vector<T> e(static_cast<size_t>(V));  // e^(x_v - max), reused for the gradient
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        if (targets[n] == config.ignore_id) {
          if (dp) std::fill(dp + n * V, dp + (n + 1) * V, T(0));
          continue;
        }
        const T* row = xp + n * V;
        T mx = row[0];
        for (int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
        // Softmax numerators vectorised (attn/activations.h); the sums in float64 (V terms of
        // float32 would lose the small ones), four running sums to keep the adder busy.
        exp_shifted_array(row, mx, e.data(), V);
        double sum4[4] = {0, 0, 0, 0}, sum_x4[4] = {0, 0, 0, 0};
        int64_t v = 0;
        for (; v + 4 <= V; v += 4)
          for (int j = 0; j < 4; ++j) {
            sum4[j] += static_cast<double>(e[static_cast<size_t>(v + j)]);
            sum_x4[j] += static_cast<double>(row[v + j]);
          }
        for (; v < V; ++v) {
          sum4[0] += static_cast<double>(e[static_cast<size_t>(v)]);
          sum_x4[0] += static_cast<double>(row[v]);
        }
        const double sum = (sum4[0] + sum4[1]) + (sum4[2] + sum4[3]);
        const double sum_x = (sum_x4[0] + sum_x4[1]) + (sum_x4[2] + sum_x4[3]);
        const double log_z = static_cast<double>(mx) + std::log(sum);
        const double target_logp = static_cast<double>(row[targets[n]]) - log_z;
        // -sum_v q(v) log p(v) = -(1 - eps) log p(y) - eps / V sum_v (x_v - log Z)
        const double mean_logp = sum_x / static_cast<double>(V) - log_z;
        row_loss[static_cast<size_t>(n)] = -(1.0 - eps) * target_logp - eps * mean_logp;
        row_nll[static_cast<size_t>(n)] = -target_logp;
        if (dp) {
          T* drow = dp + n * V;
          // p_v = e^(x_v - log Z) = e_v / sum
          const double scale = inv_m / sum, offset = eps / static_cast<double>(V) * inv_m;
          for (int64_t u = 0; u < V; ++u)
            drow[u] = static_cast<T>(static_cast<double>(e[static_cast<size_t>(u)]) * scale - offset);
          drow[targets[n]] -= static_cast<T>((1.0 - eps) * inv_m);
        }
      }
    }
    double loss = 0.0, nll = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      loss += row_loss[static_cast<size_t>(n)];
      nll += row_nll[static_cast<size_t>(n)];
    }
    r.loss = loss * inv_m;
    r.nll = nll * inv_m;
  });
  return r;
}

CopyMixtureResult copy_mixture_loss(const Tensor& logits, const Tensor& copy, const Tensor& gate,
                                    const std::vector<int32_t>& targets,
                                    const CrossEntropyConfig& config) {
  constexpr const char* op = "copy_mixture_loss";
  ATTN_CHECK(logits.defined() && copy.defined() && gate.defined() && logits.dim() >= 2 &&
                 copy.dim() == logits.dim() && logits.dtype() == copy.dtype() &&
                 gate.dtype() == logits.dtype(),
             op, "logits ", logits.defined() ? logits.shape_str() : "undefined", " and copy ",
             copy.defined() ? copy.shape_str() : "undefined",
             " must have the same rank, with a gate of the same dtype");
  const int64_t V = logits.size(-1), Vx = copy.size(-1);
  bool leading_match = Vx >= V;
  for (int64_t d = 0; d + 1 < logits.dim(); ++d) leading_match = leading_match && logits.size(d) == copy.size(d);
  ATTN_CHECK(leading_match, op, "copy ", copy.shape_str(), " must match logits ",
             logits.shape_str(), " but for a last dimension of V + X >= V");
  const int64_t N = logits.numel() / std::max<int64_t>(V, 1);
  ATTN_CHECK(gate.numel() == N && static_cast<int64_t>(targets.size()) == N, op, "logits hold ", N,
             " rows, gate ", gate.shape_str(), ", ", targets.size(), " targets");
  ATTN_CHECK(config.label_smoothing >= 0.0 && config.label_smoothing < 1.0, op,
             "label smoothing must be in [0, 1), got ", config.label_smoothing);
  const std::vector<double> x = logits.to_vector(), c = copy.to_vector(), g = gate.to_vector();
  CopyMixtureResult r;
  for (int32_t t : targets) {
    if (t == config.ignore_id) continue;
    ATTN_CHECK(0 <= t && t < Vx, op, "target ", t, " out of range for ", V, " words and ", Vx - V,
               " extended ids");
    ++r.count;
  }
  std::vector<double> dx(config.compute_grad ? N * V : 0), dc(config.compute_grad ? N * Vx : 0),
      dg(config.compute_grad ? N : 0);
  if (r.count > 0) {
    const double eps = config.label_smoothing;
    const double inv_m = 1.0 / static_cast<double>(config.normalizer > 0 ? config.normalizer : r.count);
    std::vector<double> s(V), rv(Vx);
    for (int64_t n = 0; n < N; ++n) {
      if (targets[n] == config.ignore_id) continue;
      const double* row = x.data() + n * V;
      const double* crow = c.data() + n * Vx;
      double mx = row[0];
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
      double sum = 0.0;
      for (int64_t v = 0; v < V; ++v) sum += (s[v] = std::exp(row[v] - mx));
      for (int64_t v = 0; v < V; ++v) s[v] /= sum;
      double loss = 0.0, gate_sum = 0.0, sr = 0.0;
      for (int64_t v = 0; v < Vx; ++v) {
        const double q = (v == targets[n] ? 1.0 - eps : 0.0) + (v < V ? eps / static_cast<double>(V) : 0.0);
        const double sv = v < V ? s[v] : 0.0;
        rv[v] = 0.0;
        if (q == 0.0) continue;  // 0 log 0 = 0, and no gradient through p
        const double p = g[n] * sv + (1.0 - g[n]) * crow[v];
        loss -= q * std::log(p);
        if (v == targets[n]) r.nll -= std::log(p);
        rv[v] = -q / p * inv_m;
        gate_sum += rv[v] * (sv - crow[v]);
        sr += sv * g[n] * rv[v];
      }
      r.loss += loss;
      if (!config.compute_grad) continue;
      dg[n] = gate_sum;
      for (int64_t v = 0; v < Vx; ++v) dc[n * Vx + v] = (1.0 - g[n]) * rv[v];
      for (int64_t v = 0; v < V; ++v) dx[n * V + v] = s[v] * (g[n] * rv[v] - sr);
    }
    r.loss *= inv_m;
    r.nll *= inv_m;
  }
  if (config.compute_grad) {
    r.dlogits = Tensor::from(dx, logits.shape()).to(logits.dtype());
    r.dcopy = Tensor::from(dc, copy.shape()).to(copy.dtype());
    r.dgate = Tensor::from(dg, gate.shape()).to(gate.dtype());
  }
  return r;
}

}  // namespace attn::seq2seq
