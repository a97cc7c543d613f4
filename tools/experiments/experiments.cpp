#include "tools/experiments/experiments.h"

#include <CLI/CLI.hpp>
#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <thread>

#include "attn/attention.h"
#include "attn/error.h"
#include "attn/runtime.h"
#include "tools/experiments/conclusions.h"
#include "tools/experiments/context.h"
#include "tools/experiments/statistics.h"
#include "tools/experiments/svg_chart.h"

namespace attn::experiments {

namespace s2s = attn::seq2seq;

// ---------------------------------------------------------------------------------------------
// Context

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double best_seconds(int repeats, const std::function<void()>& f) {
  double best = 1e300;
  for (int r = 0; r < std::max(1, repeats); ++r) {
    const auto start = std::chrono::steady_clock::now();
    f();
    best = std::min(best, seconds_since(start));
  }
  return best;
}

namespace {

double status_kib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(in, line))
    if (line.rfind(prefix, 0) == 0) return std::strtod(line.c_str() + prefix.size(), nullptr);
  return -1.0;
}

std::string clock_text(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

}  // namespace

double peak_extra_bytes(const std::function<void()>& f) {
  // A fixed mmap threshold: large blocks go back to the system when freed, so the resident size
  // before a call is not inflated by blocks a previous call left in the heap.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  mallopt(M_TRIM_THRESHOLD, 256 * 1024);
  malloc_trim(0);
  const double before = status_kib("VmRSS");
  {
    std::ofstream reset("/proc/self/clear_refs");
    if (!reset || !(reset << "5") || !reset.flush()) {
      f();
      return -1.0;
    }
  }
  f();
  const double peak = status_kib("VmHWM");
  if (before < 0 || peak < 0) return -1.0;
  return std::max(0.0, peak - before) * 1024.0;
}

void restore_malloc_thresholds() {
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
}

Context::Context(const Options& options, std::function<void(const std::string&)> sink,
                 std::vector<std::pair<std::string, double>> plan)
    : options_(options), sink_(std::move(sink)), plan_(std::move(plan)),
      start_(std::chrono::steady_clock::now()) {
  for (const auto& p : plan_) total_weight_ += p.second;
}

void Context::begin(const std::string& name) {
  current_ = name;
  current_weight_ = 0.0;
  for (const auto& p : plan_)
    if (p.first == name) current_weight_ = p.second;
  ++index_;
  progress(0.0, "starting");
}

void Context::progress(double fraction, const std::string& what) {
  if (!sink_) return;
  fraction = std::clamp(fraction, 0.0, 1.0);
  const double done = done_weight_ + fraction * current_weight_;
  const double elapsed = seconds_since(start_);
  std::ostringstream line;
  line << "[" << index_ << "/" << plan_.size() << "] " << current_ << ": " << what << " | "
       << static_cast<int>(100.0 * done / std::max(1e-9, total_weight_)) << "% | elapsed "
       << clock_text(elapsed) << " | ETA ";
  if (done > 0.02 * total_weight_) line << clock_text(elapsed * (total_weight_ - done) / done);
  else line << "~" << clock_text(total_weight_ - done);  // the plan's own estimate
  sink_(line.str());
}

void Context::end() {
  done_weight_ += current_weight_;
  current_weight_ = 0.0;
}

Section new_section(std::string id, std::string title, std::string question) {
  Section s;
  s.id = std::move(id), s.title = std::move(title), s.question = std::move(question);
  return s;
}

void finish(Context& ctx, Report& report, Section section) {
  report.sections.push_back(std::move(section));
  ctx.end();
}

const s2s::Corpus& Context::corpus() {
  if (!corpus_) {
    s2s::CorpusConfig c;
    if (quick()) {
      c.train_pairs = 2000, c.valid_pairs = 200, c.test_pairs = 200, c.long_test_pairs = 150;
    } else {
      c.train_pairs = 20000, c.valid_pairs = 500, c.test_pairs = 500, c.long_test_pairs = 300;
    }
    corpus_ = std::make_unique<s2s::Corpus>(s2s::generate_corpus(c));
  }
  return *corpus_;
}

const Context::Trained& Context::train(const std::string& key, const s2s::TrainConfig& config,
                                       double from, double to) {
  if (const auto found = trained_.find(key); found != trained_.end()) return found->second;
  const s2s::Corpus& data = corpus();
  return train_on(key, config, data.train, data.valid, from, to);
}

const Context::Trained& Context::train_on(const std::string& key, const s2s::TrainConfig& config,
                                          const std::vector<s2s::SentencePair>& train,
                                          const std::vector<s2s::SentencePair>& valid, double from,
                                          double to) {
  const auto found = trained_.find(key);
  if (found != trained_.end()) return found->second;
  s2s::Trainer trainer(config, train, valid);
  s2s::RunControl control;
  control.progress_every = 10;
  s2s::TrainCallbacks callbacks;
  callbacks.on_progress = [&](const s2s::Progress& p) {
    progress(from + (to - from) * static_cast<double>(p.step) / std::max<int64_t>(1, p.total_steps),
             "training " + key + " step " + std::to_string(p.step) + "/" +
                 std::to_string(p.total_steps));
  };
  const auto start = std::chrono::steady_clock::now();
  trainer.run(control, callbacks);
  Trained t;
  t.train_seconds = seconds_since(start);
  t.translator = trainer.translator();
  for (const auto& p : t.translator.parameters()) t.parameters += p.value.numel();
  t.steps = trainer.step();
  t.losses = trainer.losses();
  return trained_.emplace(key, std::move(t)).first->second;
}

// ---------------------------------------------------------------------------------------------
// Translator setups

s2s::TrainConfig base_rnn_config(const Context& ctx) {
  s2s::TrainConfig c;
  c.model.embedding = ctx.quick() ? 32 : 64;
  c.model.hidden = ctx.quick() ? 64 : 128;
  c.batch_size = ctx.quick() ? 16 : 64;
  c.epochs = ctx.quick() ? 3 : 4;
  c.lr = ctx.quick() ? 1e-2 : 5e-3;
  c.schedule.warmup_steps = ctx.quick() ? 10 : 100;
  c.model.max_source_steps = 64;
  return c;
}

s2s::TrainConfig base_transformer_config(const Context& ctx, int64_t heads) {
  s2s::TrainConfig c;
  c.model.arch = s2s::Architecture::transformer;
  c.model.hidden = c.model.embedding = ctx.quick() ? 64 : 128;
  c.model.heads = heads;
  c.model.encoder_layers = c.model.decoder_layers = ctx.quick() ? 1 : 2;
  c.model.ffn = 2 * c.model.hidden;
  c.model.dropout = ctx.quick() ? 0.0 : 0.1;
  c.batch_size = ctx.quick() ? 16 : 64;
  c.epochs = ctx.quick() ? 3 : 4;
  c.lr = ctx.quick() ? 3e-3 : 2e-3;
  c.schedule.warmup_steps = ctx.quick() ? 20 : 200;
  return c;
}

std::string preset_key(s2s::AttentionPreset preset, uint64_t seed) {
  return std::string(s2s::attention_preset_name(preset)) + " seed " + std::to_string(seed);
}

s2s::TrainConfig preset_config(const Context& ctx, s2s::AttentionPreset preset, uint64_t seed) {
  s2s::TrainConfig c = base_rnn_config(ctx);
  s2s::apply_attention_preset(c.model, preset);
  c.seed = seed;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Experiment 2: why scale

namespace {

Tensor normal_tensor(const Shape& shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::f32);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

std::string cell(double v) { return num(v, 6); }

}  // namespace

void scale_experiment(Context& ctx, Report& report) {
  ctx.begin("scale");
  const int64_t H = 4, T = ctx.quick() ? 64 : 256;
  std::vector<int64_t> widths;
  for (int64_t d = 16; d <= 1024; d *= ctx.quick() ? 4 : 2) widths.push_back(d);
  Section sec = new_section("scale", "2. Why scale dot products by 1/sqrt(d)?",
                            "Vaswani et al. (2017): for unit-variance q and k, q.k has variance d, which "
                 "pushes the softmax into regions with extremely small gradients. Measured here.");
  Table table{"scale_statistics",
              {"d", "score", "variance_qk", "expected_variance", "mean_largest_weight",
               "mean_entropy_nats", "uniform_entropy_nats", "median_jacobian_norm",
               "rows_jacobian_below_1e-3"}, {}};
  struct Row { double var, largest, entropy, jac, dead; };
  std::map<std::pair<int64_t, bool>, Row> rows;
  for (size_t wi = 0; wi < widths.size(); ++wi) {
    const int64_t d = widths[wi];
    ctx.progress(static_cast<double>(wi) / static_cast<double>(widths.size()),
                 "d=" + std::to_string(d));
    std::mt19937 rng(static_cast<uint32_t>(d));
    const Tensor q = normal_tensor({1, H, T, d}, rng), k = normal_tensor({1, H, T, d}, rng);
    const Tensor v = normal_tensor({1, H, T, d}, rng);
    // q.k over every (query, key) pair of every head, in double.
    std::vector<double> products;
    products.reserve(static_cast<size_t>(H * T * T));
    const float* qp = q.data<float>();
    const float* kp = k.data<float>();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          double s = 0.0;
          for (int64_t e = 0; e < d; ++e)
            s += static_cast<double>(qp[(h * T + i) * d + e]) * kp[(h * T + j) * d + e];
          products.push_back(s);
        }
    const double raw_variance = summarize(products).variance;
    for (const bool scaled : {false, true}) {
      AttentionParams params;
      params.score = scaled ? Score{ScaledDotScore{}} : Score{DotScore{}};
      params.return_weights = true;
      const AttentionOutput out = attention(q, k, v, params);
      const float* w = out.weights.data<float>();
      std::vector<double> largest, entropy, jac;
      std::vector<double> row(static_cast<size_t>(T));
      for (int64_t r = 0; r < H * T; ++r) {
        for (int64_t j = 0; j < T; ++j) row[static_cast<size_t>(j)] = w[r * T + j];
        const RowStats s = row_stats(row);
        largest.push_back(s.largest);
        entropy.push_back(s.entropy);
        jac.push_back(s.jacobian_norm);
      }
      double dead = 0.0;
      for (const double x : jac) dead += x < 1e-3 ? 1.0 : 0.0;
      const Row r{scaled ? raw_variance / static_cast<double>(d) : raw_variance,
                  summarize(largest).mean, summarize(entropy).mean, median(jac),
                  dead / static_cast<double>(jac.size())};
      rows[{d, scaled}] = r;
      table.add({std::to_string(d), scaled ? "scaled" : "unscaled", cell(r.var),
                 scaled ? "1" : std::to_string(d), cell(r.largest), cell(r.entropy),
                 cell(std::log(static_cast<double>(T))), cell(r.jac), cell(r.dead)});
    }
  }
  auto series = [&](bool scaled, double Row::*field) {
    Series s;
    s.name = scaled ? "scaled by 1/sqrt(d)" : "unscaled";
    s.colour = scaled ? 0 : 1;
    for (const int64_t d : widths) {
      s.x.push_back(static_cast<double>(d));
      s.y.push_back(rows[{d, scaled}].*field);
    }
    return s;
  };
  Series expected{"expected: d", {}, {}, {}, true, 2};
  for (const int64_t d : widths) expected.x.push_back(static_cast<double>(d)), expected.y.push_back(static_cast<double>(d));
  Series uniform{"uniform row: log " + std::to_string(T), {}, {}, {}, true, 2};
  for (const int64_t d : widths)
    uniform.x.push_back(static_cast<double>(d)), uniform.y.push_back(std::log(static_cast<double>(T)));
  sec.charts.push_back(render(LineChart{"Variance of the score q.k", "width d (log scale)",
                                        "variance of the score (log scale)", true, true,
                                        {series(false, &Row::var), series(true, &Row::var), expected}}));
  sec.charts.push_back(render(LineChart{"Softmax entropy per row", "width d (log scale)",
                                        "mean entropy (nats)", true, false,
                                        {series(false, &Row::entropy), series(true, &Row::entropy), uniform}}));
  sec.charts.push_back(render(LineChart{"Largest weight per row", "width d (log scale)",
                                        "mean largest weight (0..1)", true, false,
                                        {series(false, &Row::largest), series(true, &Row::largest)}}));
  sec.charts.push_back(render(LineChart{"Gradient through the softmax", "width d (log scale)",
                                        "median Jacobian norm ||diag(p) - pp^T|| (log scale)", true, true,
                                        {series(false, &Row::jac), series(true, &Row::jac)}}));
  const int64_t d0 = widths.front(), d1 = widths.back();
  const Row u0 = rows[{d0, false}], u1 = rows[{d1, false}], s0 = rows[{d0, true}], s1 = rows[{d1, true}];
  sec.conclusions.push_back("Unscaled, the variance of q.k was " + num(u0.var) + " at d=" +
                            std::to_string(d0) + " and " + num(u1.var) + " at d=" + std::to_string(d1) +
                            " (theory: d); scaled it was " + num(s0.var) + " and " + num(s1.var) +
                            " (theory: 1).");
  sec.conclusions.push_back("At d=" + std::to_string(d1) + " the unscaled softmax put on average " +
                            num(u1.largest, 2) + " of a row's weight on one key (entropy " +
                            num(u1.entropy, 2) + " nats); scaled: " + num(s1.largest, 2) + " (entropy " +
                            num(s1.entropy, 2) + " nats, uniform would be " +
                            num(std::log(static_cast<double>(T)), 3) + ").");
  const double drop = u1.jac > 0 ? u0.jac / u1.jac : INFINITY;
  sec.conclusions.push_back("The median norm of the softmax Jacobian, through which every gradient "
                            "reaches the scores, went from " + num(u0.jac, 2) + " at d=" +
                            std::to_string(d0) + " to " + num(u1.jac, 2) + " at d=" + std::to_string(d1) +
                            " unscaled (" + num(drop, 2) + "x smaller; " + num(100 * u1.dead, 2) +
                            "% of rows below 1e-3), while scaled it stayed between " +
                            num(std::min(s0.jac, s1.jac), 2) + " and " + num(std::max(s0.jac, s1.jac), 2) + ".");
  sec.conclusions.push_back(versus_claim(u1.jac < 0.5 * s1.jac && std::fabs(s1.var - 1.0) < 0.25,
                                         "unscaled dot products saturate the softmax at large d and "
                                         "shrink its gradient, and that 1/sqrt(d) restores unit-variance scores"));
  sec.notes.push_back("q, k, v with independent N(0, 1) entries, " + std::to_string(H) + " heads of " +
                      std::to_string(T) + " queries and keys, fixed seeds; statistics over every row.");
  sec.tables.push_back(std::move(table));

  if (!ctx.quick()) {
    // Training curves: Luong dot vs scaled dot at a large width.
    Table curves{"scale_training_curves", {"score", "step", "loss"}, {}};
    LineChart chart{"Training loss at hidden width 512, dot vs scaled dot", "step",
                    "training loss (label-smoothed cross-entropy, nats)", false, false, {}};
    double final_loss[2] = {0, 0};
    for (const bool scaled : {false, true}) {
      s2s::TrainConfig c = base_rnn_config(ctx);
      s2s::apply_attention_preset(c.model, scaled ? s2s::AttentionPreset::scaled_dot
                                                  : s2s::AttentionPreset::luong_dot);
      c.model.hidden = 512;
      c.model.embedding = 128;
      c.epochs = 1;
      const auto& t = ctx.train(std::string(scaled ? "scaled-dot" : "luong-dot") + " hidden 512", c,
                                scaled ? 0.6 : 0.2, scaled ? 1.0 : 0.6);
      Series s;
      s.name = scaled ? "scaled dot" : "dot (unscaled)";
      s.colour = scaled ? 0 : 1;
      const size_t window = 20;
      for (size_t i = window; i <= t.losses.size(); i += window) {
        double m = 0;
        for (size_t j = i - window; j < i; ++j) m += t.losses[j];
        s.x.push_back(static_cast<double>(i));
        s.y.push_back(m / window);
        curves.add({s.name, std::to_string(i), cell(m / window)});
      }
      if (!s.y.empty()) final_loss[scaled] = s.y.back();
      chart.series.push_back(std::move(s));
    }
    sec.charts.push_back(render(chart));
    sec.conclusions.push_back("Training the recurrent translator at hidden width 512 for one epoch, "
                              "the final training loss (mean of the last 20 steps) was " +
                              num(final_loss[1], 3) + " scaled and " + num(final_loss[0], 3) +
                              " unscaled. " +
                              versus_claim(final_loss[1] < final_loss[0],
                                           "scaling helps training at large widths") +
                              " (The GRU states are bounded by tanh, so its queries are not "
                              "unit-variance vectors.)");
    sec.tables.push_back(std::move(curves));
  }
  finish(ctx, report, std::move(sec));
}

// ---------------------------------------------------------------------------------------------
// Driver

const std::vector<std::string>& experiment_names() {
  static const std::vector<std::string> names = {"cost", "scale", "length", "luong", "heads", "alignments", "copying"};
  return names;
}

std::vector<std::string> parse_only(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  std::string name;
  while (std::getline(in, name, ',')) {
    if (name.empty()) continue;
    const auto& all = experiment_names();
    if (std::find(all.begin(), all.end(), name) == all.end()) {
      std::string valid;
      for (const auto& n : all) valid += (valid.empty() ? "" : ", ") + n;
      throw Error("experiments", "unknown experiment '" + name + "' in --only (valid: " + valid + ")");
    }
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
  if (out.empty()) throw Error("experiments", "--only needs at least one experiment name");
  return out;
}

Report run(const Options& options, const std::function<void(const std::string&)>& progress) {
  // Expected seconds per experiment on 2 cores (for the ETA before anything was measured).
  const std::map<std::string, std::pair<double, double>> expected = {
      {"cost", {12, 300}}, {"scale", {1, 300}}, {"length", {10, 120}},
      {"luong", {70, 1000}}, {"heads", {60, 700}}, {"alignments", {4, 30}}, {"copying", {25, 240}}};
  std::vector<std::pair<std::string, double>> plan;
  for (const auto& name : experiment_names())
    if (options.only.empty() || std::find(options.only.begin(), options.only.end(), name) != options.only.end())
      plan.emplace_back(name, options.quick ? expected.at(name).first : expected.at(name).second);
  Context ctx(options, progress, plan);
  Report report;
  report.title = std::string("Attention, measured: attn experiments") + (options.quick ? " --quick" : "");
  const std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M", std::localtime(&now));
  const RuntimeInfo info = runtime_info();
  report.preamble.push_back(std::string("Run ") + date + " on " + std::to_string(info.cores) +
                            " cores (" + info.simd_target + " kernels, " + info.blas_library + ", " +
                            std::to_string(info.openmp_threads) + " OpenMP threads). Every sentence "
                            "of conclusion below was generated from this run's numbers; the raw "
                            "numbers are in the CSV files and results.json beside this page.");
  report.preamble.push_back("Timings are wall-clock times on this machine and can be noisy on a "
                            "shared or busy machine: compare numbers from the same run only.");
  if (options.quick)
    report.preamble.push_back("Quick mode: small sizes, tiny translators trained for a few hundred "
                              "steps and one seed (two for the heads). Its numbers are indicative only; run without "
                              "--quick for the full measurements.");
  const auto selected = [&](const std::string& n) {
    for (const auto& p : plan) if (p.first == n) return true;
    return false;
  };
  const auto t0 = std::chrono::steady_clock::now();
  if (selected("cost")) cost_experiment(ctx, report);
  if (selected("scale")) scale_experiment(ctx, report);
  if (selected("length")) length_experiment(ctx, report);
  if (selected("luong")) luong_experiment(ctx, report);
  if (selected("heads")) heads_experiment(ctx, report);
  if (selected("alignments")) alignments_experiment(ctx, report);
  if (selected("copying")) copying_experiment(ctx, report);
  report.preamble.push_back("The experiments took " + num(seconds_since(t0), 3) + " s in all.");
  return report;
}

int main_experiments(const std::vector<std::string>& args) {
  CLI::App app{"Answers the questions people ask about attention by measurement, as a report "
               "with charts (DIR/report.html) and the raw numbers (CSV, JSON).",
               "attn experiments"};
  Options options;
  std::string only;
  app.add_flag("--quick", options.quick, "small sizes and tiny models: under 3 minutes on 2 cores");
  app.add_option("--out", options.out, "output directory (created)")->capture_default_str();
  app.add_option("--only", only, "comma-separated experiments: cost, scale, length, luong, heads, alignments, copying");
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend());
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::ParseError& e) {
    std::cerr << "attn experiments: error: " << e.what() << "\n";
    return 2;
  }
  try {
    if (!only.empty()) options.only = parse_only(only);
    check_writable_directory(options.out);
  } catch (const std::exception& e) {
    std::cerr << "attn experiments: error: " << e.what() << "\n";
    return 2;
  }
  try {
    size_t last_width = 0;
    const Report report = run(options, [&](const std::string& line) {
      std::string padded = line;
      if (padded.size() < last_width) padded.append(last_width - padded.size(), ' ');
      last_width = line.size();
      std::cerr << "\r" << padded << std::flush;
    });
    std::cerr << "\n";
    write_report(report, options.out);
    std::cout << "wrote " << options.out << "/report.html (and results.json and CSV files)\n";
    for (const Section& s : report.sections) {
      std::cout << "\n" << s.title << "\n";
      for (const auto& c : s.conclusions) std::cout << "  - " << c << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "\nattn experiments: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace attn::experiments
