// A phase profiler for training steps: scoped timers compiled into the library, off unless
// enabled (ATTN_PROFILE=1 in the environment, or profile::enable()). Off, a scope costs one
// relaxed atomic load; on, it reads the steady clock twice and adds to a table keyed by phase
// name and, for GEMMs, the shape (m, n, k).
//
// Scopes nest: each phase is charged its SELF time (its time minus that of the scopes inside it),
// so a table's rows add up to the time spent inside the outermost scopes. Only the thread that
// enabled the profiler records (the training loop; scopes reached from OpenMP or OpenBLAS worker
// threads are not counted), so the time an op spends waiting for its workers is charged to it.
//
//   ATTN_PROFILE_SCOPE("layer_norm.forward");
//   ATTN_PROFILE_GEMM(profile::gemm_phase(false, true), m, n, k);   // "gemm NT 4096x128x256"
//
// profile::table(steps) prints the phases, by self time, with their share and time per step.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace attn::profile {

namespace detail {
extern std::atomic<bool> g_enabled;
// Called only when enabled: pushes / pops a frame of this thread (a no-op off the owner thread).
int64_t begin(const char* phase, int64_t m, int64_t n, int64_t k);
void end(int64_t token);
void count_bytes(std::size_t bytes);
}  // namespace detail

inline bool enabled() { return detail::g_enabled.load(std::memory_order_relaxed); }

// Starts recording on the calling thread (the only one that records) and clears the table.
void enable();
void disable();
// Reads ATTN_PROFILE (anything but empty or "0" turns it on); returns whether it is on.
bool enable_from_environment();
void reset();

struct PhaseStats {
  std::string phase;          // name, plus " MxNxK" for a GEMM
  int64_t calls = 0;
  double self_s = 0.0;        // time in this phase minus its nested phases
  double total_s = 0.0;       // time in this phase including nested phases
};

// Every phase recorded since enable()/reset(), largest self time first.
std::vector<PhaseStats> snapshot();
// Tensor allocations recorded (count and bytes).
int64_t allocations();
int64_t allocated_bytes();

// A text table: phase, calls per step, ms per step, share of the recorded time; GEMM rows are
// listed by shape and summed in a "gemm (all shapes)" line. `steps` divides the totals.
std::string table(int64_t steps);

class Scope {
 public:
  explicit Scope(const char* phase) : token_(enabled() ? detail::begin(phase, 0, 0, 0) : -1) {}
  Scope(const char* phase, int64_t m, int64_t n, int64_t k)
      : token_(enabled() ? detail::begin(phase, m, n, k) : -1) {}
  ~Scope() {
    if (token_ >= 0) detail::end(token_);
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  int64_t token_;
};

// Stops recording for its lifetime (e.g. evaluation between training steps), then resumes if
// the profiler was on.
class Paused {
 public:
  Paused() : was_enabled_(enabled()) { detail::g_enabled.store(false, std::memory_order_relaxed); }
  ~Paused() {
    if (was_enabled_) detail::g_enabled.store(true, std::memory_order_relaxed);
  }
  Paused(const Paused&) = delete;
  Paused& operator=(const Paused&) = delete;

 private:
  bool was_enabled_;
};

// The phase name of a GEMM by its transposes: "gemm NT" is C = A B^T (row-major, as in cblas).
inline const char* gemm_phase(bool transpose_a, bool transpose_b) {
  static constexpr const char* kNames[4] = {"gemm NN", "gemm NT", "gemm TN", "gemm TT"};
  return kNames[(transpose_a ? 2 : 0) + (transpose_b ? 1 : 0)];
}

inline void count_allocation(std::size_t bytes) {
  if (enabled()) detail::count_bytes(bytes);
}

}  // namespace attn::profile

#define ATTN_PROFILE_CONCAT2(a, b) a##b
#define ATTN_PROFILE_CONCAT(a, b) ATTN_PROFILE_CONCAT2(a, b)
#define ATTN_PROFILE_SCOPE(phase) \
  ::attn::profile::Scope ATTN_PROFILE_CONCAT(attn_profile_scope_, __LINE__)(phase)
#define ATTN_PROFILE_GEMM(phase, m, n, k) \
  ::attn::profile::Scope ATTN_PROFILE_CONCAT(attn_profile_scope_, __LINE__)(phase, m, n, k)
