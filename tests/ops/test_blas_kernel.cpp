// attn chooses the OpenBLAS kernel itself (attn/runtime.h): never a generic kernel on a CPU that
// runs AVX2 or AVX-512, whatever OpenBLAS guessed from the CPU's model number, and whether or not
// OPENBLAS_CORETYPE is set.
#include <cblas.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "attn/runtime.h"
#include "blas_kernel.h"

namespace attn {
namespace {

using detail::BlasTier;
using detail::better_blas_kernel;
using detail::blas_tier_of_kernel;

std::string forced_kernel() {
  const char* value = std::getenv("OPENBLAS_CORETYPE");
  return value ? value : "";
}

// sgemm of awkward sizes against a float64 loop, with the deterministic bound
// gamma_k * sum |a_ip b_pj| (Higham, Theorem 3.1 / 3.5), which holds for any summation order.
::testing::AssertionResult sgemm_is_accurate() {
  for (int m : {1, 17, 64, 129}) {
    for (int k : {1, 33, 256}) {
      const int n = 31;
      std::vector<float> a(m * k), b(k * n), c(m * n, -1.0f);
      for (int i = 0; i < m * k; ++i) a[i] = std::sin(0.37 * i);
      for (int i = 0; i < k * n; ++i) b[i] = std::cos(0.11 * i);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k,
                  b.data(), n, 0.0f, c.data(), n);
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double sum = 0, magnitude = 0;
          for (int p = 0; p < k; ++p) {
            const double term = double(a[i * k + p]) * b[p * n + j];
            sum += term;
            magnitude += std::abs(term);
          }
          const double u = std::ldexp(1.0, -24), gamma = k * u / (1 - k * u);
          if (std::abs(c[i * n + j] - sum) > gamma * magnitude)
            return ::testing::AssertionFailure()
                   << "sgemm m=" << m << " n=" << n << " k=" << k << " at (" << i << ", " << j
                   << "): " << c[i * n + j] << " vs " << sum << ", bound " << gamma * magnitude;
        }
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(BlasKernel, TiersOfOpenBlasKernelNames) {
  EXPECT_EQ(blas_tier_of_kernel("SkylakeX"), BlasTier::avx512);
  EXPECT_EQ(blas_tier_of_kernel("cooperlake"), BlasTier::avx512);
  EXPECT_EQ(blas_tier_of_kernel("Haswell"), BlasTier::avx2);
  EXPECT_EQ(blas_tier_of_kernel("Zen"), BlasTier::avx2);
  EXPECT_EQ(blas_tier_of_kernel("Sandybridge"), BlasTier::avx);
  EXPECT_EQ(blas_tier_of_kernel("Prescott"), BlasTier::generic);
  EXPECT_EQ(blas_tier_of_kernel("Core2"), BlasTier::generic);
  EXPECT_EQ(blas_tier_of_kernel("no such kernel"), BlasTier::generic);
}

TEST(BlasKernel, PolicyUpgradesOnlyBelowTheCpu) {
  EXPECT_EQ(better_blas_kernel("Prescott", BlasTier::avx512), "SkylakeX");  // Emerald Rapids
  EXPECT_EQ(better_blas_kernel("Haswell", BlasTier::avx512), "SkylakeX");
  EXPECT_EQ(better_blas_kernel("Zen", BlasTier::avx512), "SkylakeX");
  EXPECT_EQ(better_blas_kernel("Prescott", BlasTier::avx2), "Haswell");
  EXPECT_EQ(better_blas_kernel("Cooperlake", BlasTier::avx512), "");  // already the best tier
  EXPECT_EQ(better_blas_kernel("Zen", BlasTier::avx2), "");
  EXPECT_EQ(better_blas_kernel("Prescott", BlasTier::generic), "");
}

// The check the suite promises: on a CPU with AVX2 or better the kernel in use is not generic,
// and is of the CPU's own tier. A kernel the user named in OPENBLAS_CORETYPE always wins (the
// numeric tests run under every kernel that way, scripts/numeric_matrix.sh); then attn must have
// left OpenBLAS's choice alone.
TEST(BlasKernel, KernelInUseIsNotGenericOnAModernCpu) {
  const RuntimeInfo info = runtime_info();
  const BlasTier cpu = detail::cpu_blas_tier();
  SCOPED_TRACE(runtime_summary());
  EXPECT_EQ(info.blas_kernel, std::string(openblas_get_corename()));
  EXPECT_TRUE(sgemm_is_accurate());
  if (!forced_kernel().empty()) {
    EXPECT_EQ(info.blas_kernel_by, "OPENBLAS_CORETYPE");
    return;
  }
  if (cpu >= BlasTier::avx2) {
    EXPECT_GE(blas_tier_of_kernel(info.blas_kernel), BlasTier::avx2) << info.blas_kernel;
  }
  EXPECT_GE(blas_tier_of_kernel(info.blas_kernel), cpu) << info.blas_kernel;
}

// What happens on a CPU OpenBLAS 0.3.21 does not know: it loads the generic Prescott kernel.
// The policy must move it up to the CPU's tier, and the products must stay right throughout.
TEST(BlasKernel, PolicyReplacesAGenericKernel) {
  const std::string original = openblas_get_corename();
  ASSERT_EQ(detail::switch_blas_kernel("Prescott"), "Prescott");
  EXPECT_TRUE(sgemm_is_accurate());
  detail::reapply_blas_kernel_policy();
  const RuntimeInfo info = runtime_info();
  const BlasTier cpu = detail::cpu_blas_tier();
  EXPECT_GE(blas_tier_of_kernel(info.blas_kernel), cpu) << info.blas_kernel;
  if (cpu >= BlasTier::avx2) {
    EXPECT_EQ(info.blas_kernel_by, "attn (OpenBLAS chose Prescott)");
  }
  EXPECT_TRUE(sgemm_is_accurate());
  EXPECT_EQ(detail::switch_blas_kernel(original), original);  // as the rest of the process had it
}

TEST(BlasKernel, RuntimeSummaryNamesEverything) {
  const std::string s = runtime_summary();
  for (const char* part : {"SIMD target: ", "BLAS: ", "BLAS kernel: ", "chosen by", "OpenMP"})
    EXPECT_NE(s.find(part), std::string::npos) << part << " missing from:\n" << s;
  EXPECT_NE(runtime_info().simd_target, "none");
}

}  // namespace
}  // namespace attn
