#include "seq2seq/training/optim.h"

#include <algorithm>
#include <cmath>

#include "attn/error.h"
#include "attn/profile.h"
#include "nn/linear.h"
#include "seq2seq/models/tensor_ops.h"

namespace attn::seq2seq {

Adam::Adam(const nn::ParameterList& params, const AdamConfig& config) : config_(config) {
  ATTN_CHECK(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1,
             "adam", "betas must be in [0, 1), got ", config.beta1, ", ", config.beta2);
  for (const nn::Parameter& p : params) {
    m_.push_back(Tensor::zeros(p.value.shape(), p.value.dtype()));
    v_.push_back(Tensor::zeros(p.value.shape(), p.value.dtype()));
  }
}

void Adam::step(const nn::ParameterList& params, double lr) {
  ATTN_PROFILE_SCOPE("optimizer.adam");
  ATTN_CHECK(params.size() == m_.size(), "adam", "got ", params.size(),
             " parameters, the optimiser was built for ", m_.size());
  ++step_;
  const double b1 = config_.beta1, b2 = config_.beta2, eps = config_.eps, wd = config_.weight_decay;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(step_));
  const double c2 = 1.0 - std::pow(b2, static_cast<double>(step_));
  for (std::size_t i = 0; i < params.size(); ++i) {
    Tensor w = params[i].value, g = params[i].grad;
    ATTN_CHECK(w.is_contiguous() && g.is_contiguous() && w.shape() == m_[i].shape(), "adam",
               params[i].name, " is ", w.shape_str(), ", its state ", m_[i].shape_str());
    const int64_t n = w.numel();
    nn::visit_float(w.dtype(), "adam", params[i].name.c_str(), [&](auto tag) {
      using T = decltype(tag);
      T* wp = w.data<T>();
      const T* gp = g.data<T>();
      T* mp = m_[i].data<T>();
      T* vp = v_[i].data<T>();
      const T tb1 = T(b1), tb2 = T(b2), tlr = T(lr), tc1 = T(1.0 / c1), tc2 = T(1.0 / c2);
      const T teps = T(eps), twd = T(wd);
      for (int64_t j = 0; j < n; ++j) {
        T grad = gp[j];
        if (config_.decoupled)
          wp[j] -= tlr * twd * wp[j];
        else
          grad += twd * wp[j];
        mp[j] = tb1 * mp[j] + (T(1) - tb1) * grad;
        vp[j] = tb2 * vp[j] + (T(1) - tb2) * grad * grad;
        wp[j] -= tlr * (mp[j] * tc1) / (std::sqrt(vp[j] * tc2) + teps);
      }
    });
  }
}

void Adam::save(SafetensorsFile& file, const nn::ParameterList& params) const {
  for (std::size_t i = 0; i < params.size(); ++i) {
    file.add("optim.m." + params[i].name, m_[i]);
    file.add("optim.v." + params[i].name, v_[i]);
  }
  file.add_i64("optim.step", {step_});
}

void Adam::load(const SafetensorsFile& file, const nn::ParameterList& params) {
  ATTN_CHECK(params.size() == m_.size(), "adam", "got ", params.size(),
             " parameters, the optimiser was built for ", m_.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    for (auto [prefix, state] : {std::pair{"optim.m.", &m_[i]}, std::pair{"optim.v.", &v_[i]}}) {
      const std::string name = prefix + params[i].name;
      ATTN_CHECK(file.contains(name), "adam", "checkpoint has no ", name);
      Tensor t = file.tensor(name);
      ATTN_CHECK(t.shape() == state->shape(), "adam", name, " is ", t.shape_str(),
                 " in the checkpoint, the model needs ", state->shape_str());
      state->copy_from(t);
    }
  }
  ATTN_CHECK(file.contains("optim.step"), "adam", "checkpoint has no optim.step");
  const std::vector<int64_t> s = file.i64("optim.step");
  ATTN_CHECK(s.size() == 1 && s[0] >= 0, "adam", "optim.step must hold one count >= 0");
  step_ = s[0];
}

double clip_grad_norm(const nn::ParameterList& params, double max_norm) {
  ATTN_PROFILE_SCOPE("optimizer.clip_grad_norm");
  double sq = 0.0;
  for (const nn::Parameter& p : params) sq += squared_norm(p.grad);
  const double norm = std::sqrt(sq);
  if (max_norm > 0.0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-12);
    for (const nn::Parameter& p : params) {
      Tensor g = p.grad;
      const int64_t n = g.numel();
      nn::visit_float(g.dtype(), "clip_grad_norm", "gradients", [&](auto tag) {
        using T = decltype(tag);
        T* gp = g.data<T>();
        for (int64_t j = 0; j < n; ++j) gp[j] *= T(scale);
      });
    }
  }
  return norm;
}

const char* schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::constant: return "constant";
    case ScheduleKind::linear: return "linear";
    case ScheduleKind::cosine: return "cosine";
    case ScheduleKind::inverse_sqrt: return "inverse_sqrt";
  }
  return "?";
}

double learning_rate(const Schedule& s, double base_lr, int64_t step) {
  const double k = static_cast<double>(step + 1);
  if (s.warmup_steps > 0 && step < s.warmup_steps)
    return base_lr * k / static_cast<double>(s.warmup_steps);
  const double after = static_cast<double>(step - s.warmup_steps);
  const double span = static_cast<double>(std::max<int64_t>(1, s.total_steps - s.warmup_steps));
  const double progress = std::clamp(after / span, 0.0, 1.0);
  switch (s.kind) {
    case ScheduleKind::constant: return base_lr;
    case ScheduleKind::linear: return base_lr * (1.0 - (1.0 - s.min_ratio) * progress);
    case ScheduleKind::cosine:
      return base_lr * (s.min_ratio + (1.0 - s.min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
    case ScheduleKind::inverse_sqrt:
      // Vaswani et al.: continuous with the warm-up at its end.
      return base_lr * std::sqrt(static_cast<double>(std::max<int64_t>(1, s.warmup_steps)) / k);
  }
  return base_lr;
}

}  // namespace attn::seq2seq
