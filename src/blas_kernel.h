// The choice of OpenBLAS kernel (internal; the policy is described in attn/runtime.h).
#pragma once

#include <atomic>
#include <string>

namespace attn::detail {

// Instruction-set tiers, in the order OpenBLAS kernels need them.
enum class BlasTier { generic = 0, avx = 1, avx2 = 2, avx512 = 3 };

// The tier an OpenBLAS kernel name needs ("SkylakeX" -> avx512; unknown names -> generic).
BlasTier blas_tier_of_kernel(const std::string& name);

// The best tier this CPU (and its operating system) supports, from the CPUID flags.
BlasTier cpu_blas_tier();

// The kernel to switch to when OpenBLAS picked `current` on a CPU of tier `cpu`; "" to keep it.
std::string better_blas_kernel(const std::string& current, BlasTier cpu);

// Applies the policy once per process. Thread-safe. It runs when the library loads; every BLAS
// call site of the library also calls ensure_blas_kernel(), which links this file (and so its
// load-time initialiser) into any program using attn's ops, and costs one atomic load after.
void choose_blas_kernel();
extern std::atomic<bool> blas_kernel_chosen;
inline void ensure_blas_kernel() {
  if (!blas_kernel_chosen.load(std::memory_order_acquire)) choose_blas_kernel();
}

// Switches OpenBLAS to `name` now, as if OPENBLAS_CORETYPE had named it when it loaded; returns
// the kernel in use afterwards. For tests: no BLAS call may be running in any thread.
std::string switch_blas_kernel(const std::string& name);

// Re-applies the policy after a test switched the kernel (ignores an OPENBLAS_CORETYPE, which
// the process's own kernel choice was already made with).
void reapply_blas_kernel_policy();

}  // namespace attn::detail
