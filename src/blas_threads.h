// Scoped single-threaded OpenBLAS (internal header).
//
// OpenBLAS (the pthread build on Debian) starts its own worker threads for every large enough
// GEMM, and they spin for a while afterwards. Inside our OpenMP regions that oversubscribes the
// cores (and can deadlock); right before a fused kernel the spinning workers steal its cores.
//
// OpenBLAS's thread count is process-wide, so the guards of all threads share one count: the
// first active guard saves the caller's setting and sets 1, the last one to leave restores it.
// A per-guard save/restore would let a guard that ends early in one application thread restore
// the multi-threaded setting under another thread's still-running parallel region.
#pragma once

#include <cblas.h>

#include <mutex>

namespace attn::detail {

class SingleThreadedBlas {
 public:
  explicit SingleThreadedBlas(bool active = true) : active_(active) {
    if (!active_) return;
    const std::lock_guard<std::mutex> lock(state().mutex);
    if (state().guards++ == 0) {
      state().saved = openblas_get_num_threads();
      if (state().saved != 1) openblas_set_num_threads(1);
    }
  }
  ~SingleThreadedBlas() {
    if (!active_) return;
    const std::lock_guard<std::mutex> lock(state().mutex);
    if (--state().guards == 0 && state().saved != 1) openblas_set_num_threads(state().saved);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  struct State {
    std::mutex mutex;
    int guards = 0;  // live active guards, all threads
    int saved = 1;   // the setting to restore when the last one ends
  };
  static State& state() {
    static State s;
    return s;
  }
  bool active_;
};

}  // namespace attn::detail
