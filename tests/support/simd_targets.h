// Test helpers shared by the fused-kernel tests: run a test once per Highway SIMD target this
// machine supports (the target pinned with ScopedSimdTarget and named in the test name, so a
// failure says which target), and the interval-mask fields every kernel test case carries.
// Header-only, so it needs nothing beyond attn_test_support's include directories.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <ostream>
#include <string>

#include "attn/attention.h"
#include "attn/tensor.h"
#include "kernels/common/simd_target.h"

namespace attn::kernels {
// Names the parameter in test listings; without it gtest prints SimdTarget's raw bytes,
// including std::string's uninitialised inline buffer (valgrind flags that read).
inline void PrintTo(const SimdTarget& target, std::ostream* os) { *os << target.name; }
}  // namespace attn::kernels

namespace attn::testing {

// A kernel's "which target do you dispatch to now" function, e.g. flash_attention_target_name.
using TargetNameFn = const char* (*)();

// Fixture of a test parameterised over SIMD targets: pins GetParam() for the test's lifetime and
// checks that the kernel's dispatch really switched (a silent fallback would test the same
// target N times). Instantiate with ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(Fixture).
template <TargetNameFn kDispatchedTarget>
class EveryTargetTest : public ::testing::TestWithParam<kernels::SimdTarget> {
 protected:
  void SetUp() override {
    forced_ = std::make_unique<kernels::ScopedSimdTarget>(GetParam().bits);
    ASSERT_EQ(std::string(kDispatchedTarget()), GetParam().name)
        << "dispatch did not switch to the forced target";
  }
  void TearDown() override { forced_.reset(); }

  // "target AVX2": the prefix of a SCOPED_TRACE.
  std::string target_label() const { return "target " + GetParam().name; }

 private:
  std::unique_ptr<kernels::ScopedSimdTarget> forced_;
};

inline std::string simd_target_test_name(
    const ::testing::TestParamInfo<kernels::SimdTarget>& info) {
  return info.param.name;
}

#define ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(Fixture)                                   \
  INSTANTIATE_TEST_SUITE_P(EveryTarget, Fixture,                                         \
                           ::testing::ValuesIn(::attn::kernels::available_simd_targets()), \
                           ::attn::testing::simd_target_test_name)

// The loop form, for tests that compute an expensive oracle once and then compare every target
// against it: runs `body` with each target pinned, under a trace naming it.
inline void for_each_simd_target(TargetNameFn dispatched_target,
                                 const std::function<void(const kernels::SimdTarget&)>& body) {
  for (const kernels::SimdTarget& target : kernels::available_simd_targets()) {
    kernels::ScopedSimdTarget forced(target.bits);
    ASSERT_EQ(std::string(dispatched_target()), target.name)
        << "dispatch did not switch to the forced target";
    SCOPED_TRACE("target " + target.name);
    body(target);
  }
}

// ---------------------------------------------------------------------------------------------
// Interval masks of a test case. Case: any struct with the fields key_lengths, query_lengths
// (std::vector<int64_t>), causal, bottom_right (bool), left, right (int64_t window sizes,
// Window::unbounded for none).

// " causal(top_left) window(3,-1) key_lengths": the masks of a case for a trace line.
template <class Case>
std::string interval_masks_str(const Case& c) {
  constexpr int64_t kUnbounded = Window::unbounded;
  std::string s;
  if (c.causal) s += c.bottom_right ? " causal(bottom_right)" : " causal(top_left)";
  if (c.left != kUnbounded || c.right != kUnbounded)
    s += " window(" + std::to_string(c.left == kUnbounded ? -1 : c.left) + "," +
         std::to_string(c.right == kUnbounded ? -1 : c.right) + ")";
  if (!c.key_lengths.empty()) s += " key_lengths";
  if (!c.query_lengths.empty()) s += " query_lengths";
  return s;
}

// Copies the case's interval masks into an attention Mask.
template <class Case>
void set_interval_masks(const Case& c, Mask& m) {
  m.key_lengths = c.key_lengths;
  m.query_lengths = c.query_lengths;
  m.causal = c.causal;
  m.alignment = c.bottom_right ? Alignment::bottom_right : Alignment::top_left;
  if (c.left != Window::unbounded || c.right != Window::unbounded)
    m.window = Window{c.left, c.right};
}

// Copies the case's sizes (B, Hq, Hkv, Tq, Tk, D, dv()) and interval masks into a dot-product
// kernel's argument struct (kernels/common/kernel_problem.h fields plus head_dim and value_dim).
template <class Case, class Args>
void set_kernel_problem(const Case& c, Args& a) {
  a.batch = c.B, a.q_heads = c.Hq, a.kv_heads = c.Hkv, a.q_len = c.Tq, a.k_len = c.Tk;
  a.head_dim = c.D, a.value_dim = c.dv();
  a.key_lengths = c.key_lengths.empty() ? nullptr : c.key_lengths.data();
  a.query_lengths = c.query_lengths.empty() ? nullptr : c.query_lengths.data();
  a.causal = c.causal, a.bottom_right = c.bottom_right;
  a.window_left = c.left, a.window_right = c.right;
}

// Largest finite |x| of a tensor (0 for an empty one): the magnitude error bounds scale with.
inline double max_abs_finite(const Tensor& t) {
  const Tensor d = t.to(DType::f64).contiguous();
  double m = 0.0;
  for (int64_t x = 0; x < d.numel(); ++x)
    if (std::isfinite(d.data<double>()[x])) m = std::max(m, std::abs(d.data<double>()[x]));
  return m;
}

}  // namespace attn::testing
