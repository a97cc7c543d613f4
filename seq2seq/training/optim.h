// Optimisers over an nn::ParameterList: Adam (Kingma & Ba 2015) and AdamW (decoupled weight
// decay, Loshchilov & Hutter 2019), gradient clipping by global norm, and learning-rate
// schedules with linear warm-up.
//
// Adam step k (1-based), per element:
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   w -= lr * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
//   AdamW first does w -= lr * wd * w; Adam with weight decay adds wd * w to g instead (L2).
// Moments live in the parameters' dtype. State (m, v, step) round-trips through safetensors so a
// resumed run continues bit for bit.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nn/parameters.h"
#include "seq2seq/training/safetensors.h"

namespace attn::seq2seq {

struct AdamConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;  // true: AdamW
};

class Adam {
 public:
  Adam(const nn::ParameterList& params, const AdamConfig& config);

  // One update of every parameter from its gradient, at learning rate lr.
  void step(const nn::ParameterList& params, double lr);
  int64_t steps() const { return step_; }
  const AdamConfig& config() const { return config_; }

  // Adds "optim.m.<name>", "optim.v.<name>" and "optim.step" to `file`.
  void save(SafetensorsFile& file, const nn::ParameterList& params) const;
  // Restores from a file written by save(); names and shapes must match `params`.
  void load(const SafetensorsFile& file, const nn::ParameterList& params);

 private:
  AdamConfig config_;
  std::vector<Tensor> m_;
  std::vector<Tensor> v_;
  int64_t step_ = 0;
};

// Scales every gradient by max_norm / norm when the global L2 norm exceeds max_norm (Pascanu et
// al. 2013). Returns the norm before clipping. max_norm <= 0 only measures.
double clip_grad_norm(const nn::ParameterList& params, double max_norm);

enum class ScheduleKind { constant, linear, cosine, inverse_sqrt };
const char* schedule_kind_name(ScheduleKind kind);

struct Schedule {
  ScheduleKind kind = ScheduleKind::constant;
  int64_t warmup_steps = 0;   // lr rises linearly from lr / warmup to lr over these steps
  int64_t total_steps = 0;    // linear and cosine decay end here
  double min_ratio = 0.0;     // linear and cosine decay to lr * min_ratio
};

// The learning rate of step `step` (0-based).
double learning_rate(const Schedule& schedule, double base_lr, int64_t step);

}  // namespace attn::seq2seq
