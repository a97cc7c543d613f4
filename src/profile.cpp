#include "attn/profile.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <tuple>
#include <unordered_map>

namespace attn::profile {
namespace detail {
std::atomic<bool> g_enabled{false};
}  // namespace detail

namespace {

using Clock = std::chrono::steady_clock;

struct Key {
  const char* phase;
  int64_t m, n, k;
  bool operator==(const Key& o) const {
    return phase == o.phase && m == o.m && n == o.n && k == o.k;
  }
};

struct KeyHash {
  std::size_t operator()(const Key& key) const {
    std::size_t h = std::hash<const void*>()(key.phase);
    for (int64_t x : {key.m, key.n, key.k}) h = h * 1000003u ^ std::hash<int64_t>()(x);
    return h;
  }
};

struct Stat {
  int64_t calls = 0;
  int64_t self_ns = 0;
  int64_t total_ns = 0;
};

struct Frame {
  Key key;
  Clock::time_point start;
  int64_t child_ns = 0;
};

struct State {
  std::unordered_map<Key, Stat, KeyHash> stats;
  std::vector<Frame> stack;
  int64_t allocations = 0;
  int64_t bytes = 0;
};

// Touched by the owner thread only (the one that called enable()).
State& state() {
  static State s;
  return s;
}

thread_local bool t_owner = false;

}  // namespace

namespace detail {

int64_t begin(const char* phase, int64_t m, int64_t n, int64_t k) {
  if (!t_owner) return -1;
  State& s = state();
  s.stack.push_back({{phase, m, n, k}, Clock::now(), 0});
  return static_cast<int64_t>(s.stack.size()) - 1;
}

void end(int64_t token) {
  State& s = state();
  // A disable()/reset() between begin and end leaves nothing to close.
  if (static_cast<int64_t>(s.stack.size()) != token + 1) return;
  const Frame f = s.stack.back();
  s.stack.pop_back();
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - f.start).count();
  Stat& st = s.stats[f.key];
  ++st.calls;
  st.total_ns += ns;
  st.self_ns += ns - f.child_ns;
  if (!s.stack.empty()) s.stack.back().child_ns += ns;
}

void count_bytes(std::size_t bytes) {
  if (!t_owner) return;
  ++state().allocations;
  state().bytes += static_cast<int64_t>(bytes);
}

}  // namespace detail

void enable() {
  t_owner = true;
  reset();
  detail::g_enabled.store(true, std::memory_order_relaxed);
}

void disable() {
  detail::g_enabled.store(false, std::memory_order_relaxed);
  t_owner = false;
}

bool enable_from_environment() {
  const char* v = std::getenv("ATTN_PROFILE");
  if (v && *v && std::string(v) != "0") enable();
  return enabled();
}

void reset() {
  State& s = state();
  s.stats.clear();
  s.stack.clear();
  s.allocations = 0;
  s.bytes = 0;
}

std::vector<PhaseStats> snapshot() {
  // The same name from two translation units may be two pointers: merge by text.
  std::map<std::tuple<std::string, int64_t, int64_t, int64_t>, PhaseStats> merged;
  for (const auto& [key, st] : state().stats) {
    // Token-count dimensions change with every batch: above 512 they are shown (and merged) by
    // their power-of-two bucket, "<=2048" holding 1025..2048.
    auto bucket = [](int64_t x) {
      if (x <= 512) return x;
      int64_t b = 1024;
      while (b < x) b *= 2;
      return -b;
    };
    auto dim = [](int64_t x) { return x < 0 ? "<=" + std::to_string(-x) : std::to_string(x); };
    const int64_t m = bucket(key.m), n = bucket(key.n), k = bucket(key.k);
    std::string name = key.phase;
    if (key.m || key.n || key.k) name += " " + dim(m) + " x " + dim(n) + " x " + dim(k);
    PhaseStats& p = merged[{key.phase, m, n, k}];
    p.phase = name;
    p.calls += st.calls;
    p.self_s += static_cast<double>(st.self_ns) * 1e-9;
    p.total_s += static_cast<double>(st.total_ns) * 1e-9;
  }
  std::vector<PhaseStats> out;
  for (auto& [key, p] : merged) out.push_back(std::move(p));
  std::stable_sort(out.begin(), out.end(),
                   [](const PhaseStats& a, const PhaseStats& b) { return a.self_s > b.self_s; });
  return out;
}

int64_t allocations() { return state().allocations; }
int64_t allocated_bytes() { return state().bytes; }

std::string table(int64_t steps) {
  const double per = 1.0 / static_cast<double>(std::max<int64_t>(1, steps));
  const std::vector<PhaseStats> phases = snapshot();
  double recorded = 0.0, gemm = 0.0;
  int64_t gemm_calls = 0;
  for (const PhaseStats& p : phases) {
    recorded += p.self_s;
    if (p.phase.rfind("gemm", 0) == 0) {
      gemm += p.self_s;
      gemm_calls += p.calls;
    }
  }
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-44s %10s %10s %7s %10s\n", "phase (self time; gemm m x n x k)", "calls/step",
                "ms/step", "share", "incl ms");
  out += line;
  auto row = [&](const std::string& name, double calls, double self_s, double total_s) {
    std::snprintf(line, sizeof line, "%-44s %10.1f %10.3f %6.1f%% %10.3f\n", name.c_str(),
                  calls * per, self_s * per * 1e3, recorded > 0 ? 100.0 * self_s / recorded : 0.0,
                  total_s * per * 1e3);
    out += line;
  };
  for (const PhaseStats& p : phases) row(p.phase, static_cast<double>(p.calls), p.self_s, p.total_s);
  row("gemm (all shapes)", static_cast<double>(gemm_calls), gemm, gemm);
  std::snprintf(line, sizeof line, "%-44s %10s %10.3f\n", "recorded", "", recorded * per * 1e3);
  out += line;
  std::snprintf(line, sizeof line, "tensor allocations: %.0f per step, %.2f MiB per step\n",
                static_cast<double>(allocations()) * per,
                static_cast<double>(allocated_bytes()) * per / (1024.0 * 1024.0));
  out += line;
  return out;
}

}  // namespace attn::profile
