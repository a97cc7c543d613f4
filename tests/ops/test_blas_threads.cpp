// SingleThreadedBlas (src/blas_threads.h): OpenBLAS's thread count is process-wide, so guards in
// different application threads must keep it at 1 until the last of them ends, then restore it.
#include <cblas.h>
#include <gtest/gtest.h>

#include <barrier>
#include <thread>

#include "blas_threads.h"

namespace {

using attn::detail::SingleThreadedBlas;

// Sets OpenBLAS to `threads` for the test and back to the previous setting afterwards.
class BlasThreadCount {
 public:
  explicit BlasThreadCount(int threads) : saved_(openblas_get_num_threads()) {
    openblas_set_num_threads(threads);
  }
  ~BlasThreadCount() { openblas_set_num_threads(saved_); }

 private:
  int saved_;
};

TEST(SingleThreadedBlas, SetsOneAndRestores) {
  const BlasThreadCount two(2);
  if (openblas_get_num_threads() != 2) GTEST_SKIP() << "this OpenBLAS build is single-threaded";
  {
    const SingleThreadedBlas guard;
    EXPECT_EQ(openblas_get_num_threads(), 1);
    {
      const SingleThreadedBlas nested;
      EXPECT_EQ(openblas_get_num_threads(), 1);
    }
    EXPECT_EQ(openblas_get_num_threads(), 1) << "an inner guard restored too early";
  }
  EXPECT_EQ(openblas_get_num_threads(), 2);
}

TEST(SingleThreadedBlas, InactiveGuardChangesNothing) {
  const BlasThreadCount two(2);
  if (openblas_get_num_threads() != 2) GTEST_SKIP() << "this OpenBLAS build is single-threaded";
  const SingleThreadedBlas inactive(false);
  EXPECT_EQ(openblas_get_num_threads(), 2);
}

// Guard A (thread 1) starts, guard B (thread 2) starts, A ends while B is alive: B's region must
// still see 1 thread; only when B ends is the setting restored.
TEST(SingleThreadedBlas, OverlappingGuardsInTwoThreads) {
  const BlasThreadCount two(2);
  if (openblas_get_num_threads() != 2) GTEST_SKIP() << "this OpenBLAS build is single-threaded";
  std::barrier sync(2);
  int seen_by_b_after_a_ended = 0;
  std::thread a([&] {
    {
      const SingleThreadedBlas guard;
      sync.arrive_and_wait();  // 1: both guards alive
    }
    sync.arrive_and_wait();  // 2: A's guard has ended
  });
  std::thread b([&] {
    const SingleThreadedBlas guard;
    sync.arrive_and_wait();  // 1
    sync.arrive_and_wait();  // 2
    seen_by_b_after_a_ended = openblas_get_num_threads();
  });
  a.join();
  b.join();
  EXPECT_EQ(seen_by_b_after_a_ended, 1) << "guard A restored 2 threads under guard B";
  EXPECT_EQ(openblas_get_num_threads(), 2);
}

}  // namespace
