// The vectorised float32 activations (src/kernels/activations/activations.h) against float64 std::tanh and
// the float64 logistic function, on every SIMD target this machine supports: a dense sweep of
// ordinary inputs, the ranges where the functions saturate or underflow, and the special values
// (signed zeros, subnormals, +-inf, NaN); lengths that end inside a vector; in-place use.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "attn/activations.h"
#include "attn/error.h"
#include "kernels/activations/activations.h"
#include "support/simd_targets.h"

namespace {

using attn::kernels::activations_target_name;

// The error allowed, in float32 ulps of the float64 reference: Highway's Tanh and Exp are
// within about 1-2 ulps, and the division (and the 1 + e of the sigmoid) add a rounding each.
// Measured worst on the 2-core Xeon of BENCHMARKS.md, every target: 2.25 ulps for both (the
// tests print theirs).
constexpr double kMaxUlps = 4.0;

double sigmoid_reference(double x) {
  return x >= 0.0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x));
}

// Size of one float32 ulp at the magnitude of r (the spacing of floats around r; subnormal
// spacing below the smallest normal).
double ulp_at(double r) {
  const float f = static_cast<float>(std::fabs(r));
  const float next = std::nextafter(f, std::numeric_limits<float>::infinity());
  return static_cast<double>(next) - static_cast<double>(f);
}

std::vector<float> test_inputs() {
  std::vector<float> x;
  for (int i = -40000; i <= 40000; ++i) x.push_back(static_cast<float>(i) * 1e-3f);  // [-40, 40]
  for (float v = 1e-30f; v < 1e4f; v *= 1.37f) x.insert(x.end(), {v, -v});
  const float inf = std::numeric_limits<float>::infinity();
  x.insert(x.end(), {0.0f, -0.0f, std::numeric_limits<float>::denorm_min(),
                     -std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                     87.9f, 88.8f, 89.0f, -87.9f, -88.8f, -89.0f, 103.0f, -103.0f, 104.5f,
                     -104.5f, 200.0f, -200.0f, 1e30f, -1e30f, std::numeric_limits<float>::max(),
                     -std::numeric_limits<float>::max(), inf, -inf});
  return x;
}

struct Worst {
  double ulps = 0.0;
  float at = 0.0f;
  double got = 0.0, want = 0.0;
  std::string str() const {
    std::ostringstream os;
    os.precision(9);
    os << ulps << " ulps at x = " << at << " (got " << got << ", want " << want << ")";
    return os.str();
  }
};

template <class Kernel, class Reference>
Worst worst_error(Kernel kernel, Reference reference, const std::vector<float>& x) {
  std::vector<float> y(x.size());
  kernel(x.data(), y.data(), static_cast<int64_t>(x.size()));
  Worst worst;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = reference(static_cast<double>(x[i]));
    // Below the smallest normal float32 (sigmoid of x < -87) results may flush to zero, as
    // they would under the flush-to-zero mode the kernels run in: not counted as an error.
    const double tiny = std::numeric_limits<float>::min();
    if (std::fabs(want) < tiny && std::fabs(static_cast<double>(y[i])) < tiny) continue;
    const double ulps = std::fabs(static_cast<double>(y[i]) - want) / ulp_at(want);
    if (!(ulps <= worst.ulps)) worst = {ulps, x[i], y[i], want};
  }
  return worst;
}

class ActivationsTest : public attn::testing::EveryTargetTest<activations_target_name> {};

TEST_P(ActivationsTest, TanhWithinFewUlpsOfFloat64) {
  const Worst w =
      worst_error(attn::kernels::tanh_f32, [](double x) { return std::tanh(x); }, test_inputs());
  std::printf("[ %s ] tanh worst: %s\n", GetParam().name.c_str(), w.str().c_str());
  EXPECT_LE(w.ulps, kMaxUlps) << target_label() << ": tanh worst " << w.str();
}

TEST_P(ActivationsTest, SigmoidWithinFewUlpsOfFloat64) {
  const Worst w = worst_error(attn::kernels::sigmoid_f32, sigmoid_reference, test_inputs());
  std::printf("[ %s ] sigmoid worst: %s\n", GetParam().name.c_str(), w.str().c_str());
  EXPECT_LE(w.ulps, kMaxUlps) << target_label() << ": sigmoid worst " << w.str();
}

TEST_P(ActivationsTest, ExpShiftedWithinFewUlpsOfFloat64) {
  // The softmax numerators of a loss row: x - shift <= 0, down to where e^x underflows.
  std::vector<float> x;
  for (int i = -87000; i <= 0; i += 7) x.push_back(static_cast<float>(i) * 1e-3f);
  for (const float shift : {0.0f, 2.5f, -13.0f}) {
    const Worst w = worst_error(
        [shift](const float* in, float* out, int64_t n) {
          std::vector<float> shifted(in, in + n);
          for (float& v : shifted) v += shift;  // the kernel subtracts shift back
          attn::kernels::exp_shifted_f32(shifted.data(), shift, out, n);
        },
        [shift](double v) {
          // The reference exponentiates the float32 difference the kernel computes.
          const float d = static_cast<float>(v + shift) - shift;
          return std::exp(static_cast<double>(d));
        },
        x);
    std::printf("[ %s ] exp shift %g worst: %s\n", GetParam().name.c_str(), shift, w.str().c_str());
    EXPECT_LE(w.ulps, kMaxUlps) << target_label() << ": exp shift " << shift << " worst " << w.str();
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float in[3] = {-std::numeric_limits<float>::infinity(), nan, 1.0f};
  float out[3];
  attn::kernels::exp_shifted_f32(in, 1.0f, out, 3);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_TRUE(std::isnan(out[1]));
  EXPECT_EQ(out[2], 1.0f);
}

TEST_P(ActivationsTest, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {inf, -inf, nan, 0.0f, -0.0f, -1e30f, 1e30f};
  std::vector<float> t(x.size()), s(x.size());
  attn::kernels::tanh_f32(x.data(), t.data(), static_cast<int64_t>(x.size()));
  attn::kernels::sigmoid_f32(x.data(), s.data(), static_cast<int64_t>(x.size()));
  EXPECT_EQ(t[0], 1.0f);
  EXPECT_EQ(t[1], -1.0f);
  EXPECT_TRUE(std::isnan(t[2]));
  EXPECT_EQ(t[3], 0.0f);
  EXPECT_TRUE(t[4] == 0.0f && std::signbit(t[4])) << "tanh(-0) = -0";
  EXPECT_EQ(t[5], -1.0f);
  EXPECT_EQ(t[6], 1.0f);
  EXPECT_EQ(s[0], 1.0f);
  EXPECT_EQ(s[1], 0.0f);
  EXPECT_TRUE(std::isnan(s[2]));
  EXPECT_EQ(s[3], 0.5f);
  EXPECT_EQ(s[4], 0.5f);
  EXPECT_EQ(s[5], 0.0f);
  EXPECT_EQ(s[6], 1.0f);
}

// Every length, including 0 and lengths ending inside a vector, gives each element the value it
// gets in a long array (the tail goes through the same vector math), in place or not, and
// writes nothing past n.
TEST_P(ActivationsTest, LengthsTailsAndInPlace) {
  std::vector<float> x(70);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.37f * static_cast<float>(i) - 11.0f;
  std::vector<float> full_t(x.size()), full_s(x.size());
  attn::kernels::tanh_f32(x.data(), full_t.data(), static_cast<int64_t>(x.size()));
  attn::kernels::sigmoid_f32(x.data(), full_s.data(), static_cast<int64_t>(x.size()));
  for (int64_t n : {0, 1, 7, 15, 16, 17, 31, 33, 64, 65}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    for (size_t start : {size_t{0}, size_t{1}, size_t{3}}) {  // also misaligned starts
      std::vector<float> t(x.size() + 1, -7.0f), s = t;
      attn::kernels::tanh_f32(x.data() + start, t.data(), n);
      attn::kernels::sigmoid_f32(x.data() + start, s.data(), n);
      std::vector<float> in_place(x.begin() + static_cast<int64_t>(start), x.end());
      attn::kernels::tanh_f32(in_place.data(), in_place.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(t[static_cast<size_t>(i)], full_t[start + static_cast<size_t>(i)]) << i;
        ASSERT_EQ(s[static_cast<size_t>(i)], full_s[start + static_cast<size_t>(i)]) << i;
        ASSERT_EQ(in_place[static_cast<size_t>(i)], full_t[start + static_cast<size_t>(i)]) << i;
      }
      ASSERT_EQ(t[static_cast<size_t>(n)], -7.0f) << "tanh wrote past n";
      ASSERT_EQ(s[static_cast<size_t>(n)], -7.0f) << "sigmoid wrote past n";
    }
  }
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(ActivationsTest);

// The public front-end: float32 is the kernel, float64 the plain std:: loop, and bad arguments
// are refused with the op's name.
TEST(ActivationsFrontEnd, DispatchesByTypeAndChecksArguments) {
  const std::vector<float> xf = {-3.0f, -0.5f, 0.0f, 0.25f, 2.0f};
  std::vector<float> yf(xf.size()), kf(xf.size());
  attn::tanh_array(xf.data(), yf.data(), static_cast<int64_t>(xf.size()));
  attn::kernels::tanh_f32(xf.data(), kf.data(), static_cast<int64_t>(xf.size()));
  EXPECT_EQ(yf, kf);
  attn::sigmoid_array(xf.data(), yf.data(), static_cast<int64_t>(xf.size()));
  attn::kernels::sigmoid_f32(xf.data(), kf.data(), static_cast<int64_t>(xf.size()));
  EXPECT_EQ(yf, kf);

  const std::vector<double> xd = {-3.0, -0.5, 0.0, 0.25, 2.0};
  std::vector<double> yd(xd.size());
  attn::tanh_array(xd.data(), yd.data(), static_cast<int64_t>(xd.size()));
  for (size_t i = 0; i < xd.size(); ++i) EXPECT_EQ(yd[i], std::tanh(xd[i]));
  attn::sigmoid_array(xd.data(), yd.data(), static_cast<int64_t>(xd.size()));
  for (size_t i = 0; i < xd.size(); ++i) EXPECT_EQ(yd[i], 1.0 / (1.0 + std::exp(-xd[i])));

  attn::tanh_array(static_cast<const float*>(nullptr), nullptr, 0);  // empty: nothing to touch
  const auto expect_error = [](auto call, const std::string& text) {
    try {
      call();
      ADD_FAILURE() << "no error, expected: " << text;
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  expect_error([&] { attn::tanh_array(xf.data(), yf.data(), -1); }, "[tanh_array] length is -1");
  expect_error([&] { attn::sigmoid_array(xd.data(), static_cast<double*>(nullptr), 3); },
               "[sigmoid_array] null array");
}

}  // namespace
