// Experiment 1: what each scoring function costs. Forward and backward wall time and the peak
// resident memory a call adds, against sequence length and width, on attn's kernels ("fused":
// attn::attention, which never stores the [Tq, Tk] scores for these shapes) and, where a
// textbook implementation exists, "materialised": the scores stored as a tensor (matmul, a row
// softmax, matmul; for additive the [Tq, Tk, A] tanh tensor as Keras builds it), in this file.
#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <thread>

#include "attn/activations.h"
#include "attn/attention.h"
#include "attn/matmul.h"
#include "tools/experiments/conclusions.h"
#include "tools/experiments/context.h"
#include "tools/experiments/statistics.h"
#include "tools/experiments/svg_chart.h"

namespace attn::experiments {
namespace {

Tensor normal(const Shape& shape, std::mt19937& rng, double stddev) {
  Tensor t = Tensor::empty(shape, DType::f32);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(stddev));
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

// Runs f(begin, end) over [0, n) split across the cores.
template <typename F>
void parallel_for(int64_t n, F&& f) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), n));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back([&, t] { f(n * t / threads, n * (t + 1) / threads); });
  f(0, n / threads);
  for (auto& th : pool) th.join();
}

struct Problem {
  int64_t B = 1, H = 4, N = 256, d = 64;
  Tensor q, k, v, dout;
};

// Every scoring function of the experiment, built for width d and N keys.
struct NamedScore {
  std::string name;
  Score score;
};

std::vector<NamedScore> make_scores(int64_t d, int64_t N, std::mt19937& rng) {
  const double w = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t A = d, r = std::max<int64_t>(4, d / 4);
  std::vector<NamedScore> s;
  s.push_back({"dot", DotScore{}});
  s.push_back({"scaled_dot", ScaledDotScore{}});
  s.push_back({"general", GeneralScore{normal({d, d}, rng, w), Tensor(), Tensor()}});
  s.push_back({"general_lowrank", GeneralScore{Tensor(), normal({r, d}, rng, w), normal({r, d}, rng, w)}});
  s.push_back({"additive", AdditiveScore{normal({A, d}, rng, w), normal({A, d}, rng, w),
                                         normal({A}, rng, 0.1), normal({A}, rng, w)}});
  s.push_back({"concat", ConcatScore{normal({A, 2 * d}, rng, w), normal({A}, rng, w)}});
  s.push_back({"cosine", CosineScore{Tensor::full({1}, 5.0), 1e-8}});
  s.push_back({"location", LocationScore{normal({N, d}, rng, w)}});
  s.push_back({"trilinear", TrilinearScore{normal({3 * d}, rng, w)}});
  return s;
}

// ---- materialised implementations ------------------------------------------------------------

void softmax_rows(Tensor& s) {
  const int64_t n = s.shape().back(), rows = s.numel() / n;
  float* p = s.data<float>();
  parallel_for(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = p + r * n;
      const float top = *std::max_element(row, row + n);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += row[j] = std::exp(row[j] - top);
      for (int64_t j = 0; j < n; ++j) row[j] /= sum;
    }
  });
}

// dS = P o (dP - rowsum(dP o P)), in place in dP.
void softmax_backward_rows(const Tensor& p, Tensor& dp) {
  const int64_t n = p.shape().back(), rows = p.numel() / n;
  const float* pp = p.data<float>();
  float* g = dp.data<float>();
  parallel_for(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double dot = 0.0;
      for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(g[r * n + j]) * pp[r * n + j];
      for (int64_t j = 0; j < n; ++j) g[r * n + j] = pp[r * n + j] * (g[r * n + j] - static_cast<float>(dot));
    }
  });
}

void scale_in_place(Tensor& t, float s) {
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] *= s;
}

Tensor t2(const Tensor& x) { return x.transpose(-2, -1); }

struct Materialised {
  Tensor qw;  // q W (general)
  Tensor p;   // the weights [B, H, N, N]
  Tensor e;   // additive: tanh(W_q q_i + W_k k_j + b), [B, H, N, N, A]
  Tensor qp, kp;
  Tensor out;
};

// Dot-product family: s = scale (q W) k^T.
Materialised dot_forward(const Problem& pr, const Tensor* w, float scale) {
  Materialised m;
  m.qw = w ? matmul(pr.q, *w) : pr.q;
  m.p = matmul(m.qw, t2(pr.k));
  if (scale != 1.0f) scale_in_place(m.p, scale);
  softmax_rows(m.p);
  m.out = matmul(m.p, pr.v);
  return m;
}

void dot_backward(const Problem& pr, const Materialised& m, const Tensor* w, float scale) {
  Tensor dv = matmul(t2(m.p), pr.dout);
  Tensor ds = matmul(pr.dout, t2(pr.v));
  softmax_backward_rows(m.p, ds);
  if (scale != 1.0f) scale_in_place(ds, scale);
  Tensor dqw = matmul(ds, pr.k);
  Tensor dk = matmul(t2(ds), m.qw);
  if (w) {
    Tensor dq = matmul(dqw, t2(*w));
    Tensor dw = matmul(t2(pr.q.reshape({-1, pr.d})), dqw.reshape({-1, pr.d}));
  }
}

Materialised additive_forward(const Problem& pr, const AdditiveScore& a) {
  Materialised m;
  const int64_t A = a.v.numel(), N = pr.N, BH = pr.B * pr.H;
  m.qp = matmul(pr.q, t2(a.w_query));
  m.kp = matmul(pr.k, t2(a.w_key));
  m.e = Tensor::empty({pr.B, pr.H, N, N, A});
  m.p = Tensor::empty({pr.B, pr.H, N, N});
  const float* qp = m.qp.data<float>();
  const float* kp = m.kp.data<float>();
  const float* b = a.bias.data<float>();
  const float* v = a.v.data<float>();
  float* e = m.e.data<float>();
  float* s = m.p.data<float>();
  parallel_for(BH * N, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / N;
      const float* qi = qp + r * A;
      for (int64_t j = 0; j < N; ++j) {
        float* row = e + (r * N + j) * A;
        const float* kj = kp + (bh * N + j) * A;
        for (int64_t x = 0; x < A; ++x) row[x] = qi[x] + kj[x] + b[x];
        tanh_array(row, row, A);
        float sum = 0.0f;
        for (int64_t x = 0; x < A; ++x) sum += row[x] * v[x];
        s[r * N + j] = sum;
      }
    }
  });
  softmax_rows(m.p);
  m.out = matmul(m.p, pr.v);
  return m;
}

void additive_backward(const Problem& pr, const Materialised& m, const AdditiveScore& a) {
  const int64_t A = a.v.numel(), N = pr.N, BH = pr.B * pr.H;
  Tensor dv = matmul(t2(m.p), pr.dout);
  Tensor ds = matmul(pr.dout, t2(pr.v));
  softmax_backward_rows(m.p, ds);
  Tensor dqp = Tensor::zeros({pr.B, pr.H, N, A}), dkp = Tensor::zeros({pr.B, pr.H, N, A});
  const float* e = m.e.data<float>();
  const float* g = ds.data<float>();
  const float* v = a.v.data<float>();
  float* dq = dqp.data<float>();
  float* dk = dkp.data<float>();
  // Rows split by (b, h): each thread owns whole heads, so dk needs no locking.
  parallel_for(BH, [&](int64_t h0, int64_t h1) {
    std::vector<float> dvec(static_cast<size_t>(A));
    for (int64_t bh = h0; bh < h1; ++bh)
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) {
          const float gs = g[(bh * N + i) * N + j];
          const float* row = e + ((bh * N + i) * N + j) * A;
          float* dqi = dq + (bh * N + i) * A;
          float* dkj = dk + (bh * N + j) * A;
          for (int64_t x = 0; x < A; ++x) {
            const float de = gs * v[x] * (1.0f - row[x] * row[x]);
            dqi[x] += de;
            dkj[x] += de;
          }
        }
  });
  Tensor dq_in = matmul(dqp, a.w_query);
  Tensor dk_in = matmul(dkp, a.w_key);
  Tensor dwq = matmul(t2(dqp.reshape({-1, A})), pr.q.reshape({-1, pr.d}));
  Tensor dwk = matmul(t2(dkp.reshape({-1, A})), pr.k.reshape({-1, pr.d}));
}

struct Measure {
  double fwd_s = NAN, bwd_s = NAN, fwd_bytes = NAN, bwd_bytes = NAN;
};

// Times and measures one implementation: `forward` returns a state `backward` consumes.
template <typename State>
Measure measure(int repeats, const std::function<State()>& forward,
                const std::function<void(const State&)>& backward) {
  Measure m;
  State state = forward();  // warm-up, and the state for the backward timings
  m.fwd_s = best_seconds(repeats, [&] { state = forward(); });
  m.bwd_s = best_seconds(repeats, [&] { backward(state); });
  state = State();
  m.fwd_bytes = peak_extra_bytes([&] { state = forward(); });
  m.bwd_bytes = peak_extra_bytes([&] { backward(state); });
  return m;
}

Measure measure_fused(const Problem& pr, const Score& score, int repeats) {
  AttentionParams params;
  params.score = score;
  return measure<AttentionOutput>(
      repeats, [&] { return attention(pr.q, pr.k, pr.v, params); },
      [&](const AttentionOutput& f) { (void)attention_backward(pr.q, pr.k, pr.v, params, f, pr.dout); });
}

// Materialised version of `s`, when this file has one.
bool has_materialised(const std::string& name) {
  return name == "dot" || name == "scaled_dot" || name == "general" || name == "additive";
}

Measure measure_materialised(const Problem& pr, const NamedScore& s, int repeats) {
  if (s.name == "additive") {
    const auto& a = std::get<AdditiveScore>(s.score);
    return measure<Materialised>(repeats, [&] { return additive_forward(pr, a); },
                                 [&](const Materialised& m) { additive_backward(pr, m, a); });
  }
  const Tensor* w = s.name == "general" ? &std::get<GeneralScore>(s.score).weight : nullptr;
  const float scale = s.name == "scaled_dot" ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(pr.d))) : 1.0f;
  return measure<Materialised>(repeats, [&] { return dot_forward(pr, w, scale); },
                               [&](const Materialised& m) { dot_backward(pr, m, w, scale); });
}

struct Point {
  std::string score, impl;  // impl: "fused" / "materialised"
  int64_t N, d;
  Measure m;
};

}  // namespace

void cost_experiment(Context& ctx, Report& report) {
  ctx.begin("cost");
  const bool quick = ctx.quick();
  const int64_t H = 4, fixed_d = 64, fixed_n = quick ? 256 : 512;
  const std::vector<int64_t> lengths = quick ? std::vector<int64_t>{64, 128, 256, 512}
                                             : std::vector<int64_t>{128, 256, 512, 1024, 2048};
  const std::vector<int64_t> widths = quick ? std::vector<int64_t>{16, 64, 256}
                                            : std::vector<int64_t>{16, 32, 64, 128, 256, 512};
  const int repeats = quick ? 2 : 3;
  // The materialised additive tensor [B, H, N, N, A] is kept under this many floats.
  const double max_additive_elements = quick ? 16e6 : 64e6;
  std::vector<Point> points;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (N, d)
  for (const int64_t n : lengths) shapes.emplace_back(n, fixed_d);
  for (const int64_t d : widths)
    if (d != fixed_d) shapes.emplace_back(fixed_n, d);
  double work_total = 0.0, work_done = 0.0;
  for (const auto& [n, d] : shapes) work_total += static_cast<double>(n * n * d);
  for (const auto& [n, d] : shapes) {
    std::mt19937 rng(static_cast<uint32_t>(n * 7919 + d));
    Problem pr;
    pr.H = H, pr.N = n, pr.d = d;
    pr.q = normal({1, H, n, d}, rng, 1.0), pr.k = normal({1, H, n, d}, rng, 1.0);
    pr.v = normal({1, H, n, d}, rng, 1.0), pr.dout = normal({1, H, n, d}, rng, 1.0);
    const std::vector<NamedScore> scores = make_scores(d, n, rng);
    for (size_t si = 0; si < scores.size(); ++si) {
      const NamedScore& s = scores[si];
      ctx.progress((work_done + static_cast<double>(n * n * d) * static_cast<double>(si) /
                                    static_cast<double>(scores.size())) / work_total,
                   s.name + " N=" + std::to_string(n) + " d=" + std::to_string(d));
      points.push_back({s.name, "fused", n, d, measure_fused(pr, s.score, repeats)});
      if (has_materialised(s.name) &&
          (s.name != "additive" || static_cast<double>(H * n * n * d) <= max_additive_elements))
        points.push_back({s.name, "materialised", n, d, measure_materialised(pr, s, repeats)});
    }
    work_done += static_cast<double>(n * n * d);
  }

  Section sec = new_section("cost", "1. What does each scoring function cost?",
                            "The usual claim: dot-product attention is much faster and more space-efficient "
                 "than additive attention, because it is a matrix multiplication.");
  Table table{"cost", {"score", "implementation", "N", "d", "forward_ms", "backward_ms",
                       "forward_peak_MiB", "backward_peak_MiB"}, {}};
  for (const Point& p : points)
    table.add({p.score, p.impl, std::to_string(p.N), std::to_string(p.d), num(p.m.fwd_s * 1e3, 5),
               num(p.m.bwd_s * 1e3, 5), num(p.m.fwd_bytes / 1048576.0, 5), num(p.m.bwd_bytes / 1048576.0, 5)});

  const std::vector<std::string> names = {"dot", "scaled_dot", "general", "general_lowrank", "additive",
                                          "concat", "cosine", "location", "trilinear"};
  auto chart = [&](bool over_n, double Measure::*field, double unit, const std::string& title,
                   const std::string& y_label) {
    LineChart c;
    c.title = title;
    c.x_label = over_n ? "sequence length N = Tq = Tk (tokens, log scale), d = " + std::to_string(fixed_d)
                       : "width d (log scale), N = " + std::to_string(fixed_n);
    c.y_label = y_label;
    c.log_x = c.log_y = true;
    for (const std::string impl : {"fused", "materialised"})
      for (size_t i = 0; i < names.size(); ++i) {
        Series s;
        s.name = names[i] + (impl == "fused" ? "" : " (materialised)");
        s.colour = static_cast<int>(i);
        s.dashed = impl == "materialised";
        for (const Point& p : points) {
          if (p.score != names[i] || p.impl != impl) continue;
          if (over_n ? p.d != fixed_d : p.N != fixed_n) continue;
          const double y = p.m.*field * unit;
          if (!(y > 0)) continue;
          s.x.push_back(static_cast<double>(over_n ? p.N : p.d));
          s.y.push_back(y);
        }
        if (!s.x.empty()) c.series.push_back(std::move(s));
      }
    return render(c);
  };
  sec.charts.push_back(chart(true, &Measure::fwd_s, 1e3, "Forward time against length", "forward time (ms, log scale)"));
  sec.charts.push_back(chart(true, &Measure::bwd_s, 1e3, "Backward time against length", "backward time (ms, log scale)"));
  sec.charts.push_back(chart(true, &Measure::fwd_bytes, 1.0 / 1048576, "Forward peak memory against length",
                             "peak memory added (MiB, log scale)"));
  sec.charts.push_back(chart(false, &Measure::fwd_s, 1e3, "Forward time against width", "forward time (ms, log scale)"));
  sec.charts.push_back(chart(false, &Measure::bwd_s, 1e3, "Backward time against width", "backward time (ms, log scale)"));
  sec.charts.push_back(chart(false, &Measure::bwd_bytes, 1.0 / 1048576, "Backward peak memory against width",
                             "peak memory added (MiB, log scale)"));

  // Conclusions, from the points at d = 64 and the longest N where both exist.
  auto find = [&](const std::string& score, const std::string& impl, int64_t n, int64_t d) -> const Measure* {
    for (const Point& p : points)
      if (p.score == score && p.impl == impl && p.N == n && p.d == d) return &p.m;
    return nullptr;
  };
  const int64_t n_max = lengths.back();
  const std::string at = "at N=" + std::to_string(n_max) + ", d=" + std::to_string(fixed_d);
  const Measure* dot = find("dot", "fused", n_max, fixed_d);
  const Measure* add = find("additive", "fused", n_max, fixed_d);
  if (dot && add) {
    sec.conclusions.push_back(compare_times("additive", add->fwd_s, "dot", dot->fwd_s, at + " (forward, fused kernels)") +
                              "; backward: " + compare_times("additive", add->bwd_s, "dot", dot->bwd_s, "") + ".");
    const double mem_ratio = add->fwd_bytes / std::max(1.0, dot->fwd_bytes);
    sec.conclusions.push_back("Peak memory of the fused forward " + at + ": additive " +
                              num(add->fwd_bytes / 1048576.0, 3) + " MiB, dot " +
                              num(dot->fwd_bytes / 1048576.0, 3) + " MiB (" + num(mem_ratio, 2) + "x).");
    sec.conclusions.push_back(versus_claim(add->fwd_s > 1.5 * dot->fwd_s,
                                           "dot-product attention is much faster than additive attention"));
    sec.conclusions.push_back(versus_claim(mem_ratio > 1.5,
                                           "dot-product attention is more space-efficient than additive attention") +
                              (mem_ratio > 1.5 ? "" : " On fused kernels neither stores the scores, so "
                                                      "both use memory linear in N; the claim holds "
                                                      "only against a materialised additive score."));
  }
  // Slowest and fastest fused score at the reference point.
  std::vector<std::pair<double, std::string>> ranking;
  for (const auto& name : names)
    if (const Measure* m = find(name, "fused", n_max, fixed_d)) ranking.emplace_back(m->fwd_s, name);
  std::sort(ranking.begin(), ranking.end());
  if (ranking.size() >= 2) {
    std::string order;
    for (const auto& r : ranking) order += (order.empty() ? "" : ", ") + r.second + " " + num(r.first * 1e3, 3) + " ms";
    sec.conclusions.push_back("Fused forward times " + at + ", fastest first: " + order + ".");
  }
  // Materialised against fused, memory and time.
  const int64_t n_mat = [&] {
    int64_t best = 0;
    for (const Point& p : points)
      if (p.score == "additive" && p.impl == "materialised" && p.d == fixed_d) best = std::max(best, p.N);
    return best;
  }();
  for (const std::string name : {"dot", "additive"}) {
    const int64_t n = name == "dot" ? n_max : n_mat;
    const Measure* f = find(name, "fused", n, fixed_d);
    const Measure* m = find(name, "materialised", n, fixed_d);
    if (!f || !m) continue;
    sec.conclusions.push_back("Materialising the " + name + " scores at N=" + std::to_string(n) +
                              ", d=" + std::to_string(fixed_d) + ": forward " +
                              compare_times("materialised", m->fwd_s, "fused", f->fwd_s, "") + ", peak memory " +
                              num(m->fwd_bytes / 1048576.0, 3) + " MiB against " +
                              num(f->fwd_bytes / 1048576.0, 3) + " MiB.");
  }
  // Growth with N: slope of log time against log N between the two longest lengths (fused dot).
  if (lengths.size() >= 2) {
    const int64_t na = lengths[lengths.size() - 2], nb = lengths.back();
    const Measure* a = find("dot", "fused", na, fixed_d);
    const Measure* b = find("dot", "fused", nb, fixed_d);
    const Measure* am = find("dot", "materialised", na, fixed_d);
    const Measure* bm = find("dot", "materialised", nb, fixed_d);
    if (a && b && am && bm) {
      const double lr = std::log(static_cast<double>(nb) / static_cast<double>(na));
      sec.conclusions.push_back("From N=" + std::to_string(na) + " to " + std::to_string(nb) +
                                " the fused dot forward time grew as N^" + num(std::log(b->fwd_s / a->fwd_s) / lr, 2) +
                                " (quadratic: N^2) and its peak memory as N^" +
                                num(std::log(std::max(1.0, b->fwd_bytes) / std::max(1.0, a->fwd_bytes)) / lr, 2) +
                                "; materialised, memory grew as N^" +
                                num(std::log(std::max(1.0, bm->fwd_bytes) / std::max(1.0, am->fwd_bytes)) / lr, 2) + ".");
    }
  }
  sec.notes.push_back("B=1, H=" + std::to_string(H) + " heads, float32, additive/concat hidden width A=d, "
                      "low-rank general rank max(4, d/4), best of " + std::to_string(repeats) +
                      " calls after a warm-up. Peak memory: the rise of the process's peak resident "
                      "size (VmHWM, reset through /proc/self/clear_refs) over its size before the call, "
                      "so it counts the outputs, the saved state and every temporary. Materialised: "
                      "scores stored as a tensor (attn::matmul, a row softmax, attn::matmul; additive "
                      "stores tanh(W_q q_i + W_k k_j + b) as [H, N, N, A], skipped above " +
                      num(max_additive_elements, 2) + " floats); dashed lines.");
  sec.tables.push_back(std::move(table));
  restore_malloc_thresholds();
  finish(ctx, report, std::move(sec));
}

}  // namespace attn::experiments
