// Scoped single-threaded OpenBLAS (internal header).
//
// OpenBLAS (the pthread build on Debian) starts its own worker threads for every large enough
// GEMM, and they spin for a while afterwards. Inside our OpenMP regions that oversubscribes the
// cores (and can deadlock); right before a fused kernel the spinning workers steal its cores.
// OpenBLAS's thread count is process-wide: the guard restores the caller's setting on exit.
#pragma once

#include <cblas.h>

namespace attn::detail {

class SingleThreadedBlas {
 public:
  explicit SingleThreadedBlas(bool active = true)
      : saved_(active ? openblas_get_num_threads() : 1) {
    if (saved_ != 1) openblas_set_num_threads(1);
  }
  ~SingleThreadedBlas() {
    if (saved_ != 1) openblas_set_num_threads(saved_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int saved_;
};

}  // namespace attn::detail
