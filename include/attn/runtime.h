// What attn runs on in this process: the SIMD target its kernels dispatch to, the BLAS library
// and kernel behind its matrix products, the bf16 attention kernel chosen for this CPU, and the
// thread counts. `attn --version` prints it.
//
// The BLAS kernel is chosen by attn, not left to an environment variable. OpenBLAS picks its
// kernel from the CPU's model number when it loads, and the 0.3.21 that Debian 12 ships does not
// know newer CPUs (on an Emerald Rapids Xeon it falls back to the generic Prescott kernel, 3-4x
// slower). When attn loads it compares that pick with the CPU's instruction-set flags and, where
// OpenBLAS chose a kernel below what the CPU runs, switches it to the best one the flags allow
// (SkylakeX with AVX-512, Haswell with AVX2 + FMA). An OPENBLAS_CORETYPE set by the user always
// wins: attn then leaves the kernel as OpenBLAS chose it.
#pragma once

#include <string>

namespace attn {

struct RuntimeInfo {
  std::string simd_target;    // Highway target the fused kernels dispatch to, e.g. "AVX3"
  std::string blas_library;   // e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64"
  std::string blas_kernel;    // the kernel in use, e.g. "SkylakeX"
  std::string blas_kernel_by; // who chose it: "OpenBLAS", "attn (OpenBLAS chose Prescott)",
                              // or "OPENBLAS_CORETYPE"
  std::string bf16_kernel;    // how attention() runs all-bf16 inputs of many queries: "dot"
                              // (the AVX512_BF16 vdpbf16ps kernel) or "widen" (to float32, then
                              // the float32 kernels)
  std::string bf16_kernel_by; // why: "ATTN_BF16_KERNEL", "measured: dot kernel 0.60x the time
                              // of widening" (a short timing of both on first use, kept for the
                              // process), or why the kernel cannot run ("CPU without AVX512_BF16")
  int blas_threads = 1;       // OpenBLAS's thread count
  int openmp_threads = 1;     // omp_get_max_threads(): the fused kernels' threads
  int cores = 1;              // processors this process may run on
};

// A snapshot of the above (the BLAS kernel choice has already happened when attn was loaded;
// the bf16 kernel choice is measured here if no bf16 call has made it yet: a few milliseconds).
RuntimeInfo runtime_info();

// The same, as the lines `attn --version` prints.
std::string runtime_summary();

}  // namespace attn
