// Fused attention forward for bf16 inputs (internal): Q, K, V stored as bf16, products on the
// CPU's bf16 dot-product instruction (AVX512_BF16 vdpbf16ps: two bf16 products summed into one
// float32 lane, exactly, then added with one float32 rounding), softmax and every accumulation
// in float32, output float32.
//
// Letters as in attn/attention.h (and flash_attention.h): B, Hq, Hkv (G = Hq / Hkv), Tq, Tk,
// D = Dq = Dk, Dv.
//
//   q [B, Hq, Tq, D]   k [B, Hkv, Tk, D]   v [B, Hkv, Tk, Dv]   (contiguous bf16 bit patterns)
//   -> out [B, Hq, Tq, Dv] float32, lse [B, Hq, Tq] float32 (natural log; -inf and out = 0 for
//      fully masked rows)
//
// Masks: key and query lengths, causal (both alignments) and windows, exactly as RowInterval
// (simd_common-inl.h) defines them. Scores are scale * q.k in float32. Key indices are compared
// in int32 lanes: Tk < 2^31.
//
// Numerics: S = Q K^T is exact products of the bf16 inputs summed in float32; the probabilities
// P = exp(S - running max) are rounded to bf16 (the instruction's input type) before O += P V,
// and out's softmax denominator sums those rounded P, so its weights still sum to one (lse sums
// the float32 P instead: float32-accurate, as the backward's P = exp(s - lse) needs).
// The extra error over a float32 kernel on the same inputs is therefore the rounding of P
// (relative 2^-9 per weight), which tests bound against a plain loop that rounds P the same way.
//
// Only compiled for x86 AVX-512 BF16 (a function-level target attribute; Highway 1.0.3 has no
// bf16 dot product op) and only used when the CPU has it and ATTN_SIMD_TARGET (or a test's
// ScopedSimdTarget) allows AVX3; otherwise the front-end widens the inputs to float32 (exact)
// and runs the float32 kernels.
#pragma once

#include <cstdint>
#include <string>

#include "attention_validate.h"
#include "attn/attention.h"
#include "kernels/common/kernel_problem.h"

namespace attn::kernels {

struct FlashBf16Args : ProblemSizes, IntervalMasks {
  const uint16_t* q = nullptr;  // bf16 bit patterns
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  float* out = nullptr;
  float* lse = nullptr;  // may be nullptr

  int64_t head_dim = 0, value_dim = 0;
  float scale = 1.0f;
};

// True when the bf16 kernel can run now: the CPU has AVX512F and AVX512_BF16, and the SIMD
// target cap (ATTN_SIMD_TARGET, ScopedSimdTarget) still allows an AVX3 target.
bool flash_attention_bf16_available();

// Whether attention() should use this kernel for bf16 inputs, decided per CPU. On the Xeon
// (Emerald Rapids) this was built on, vdpbf16ps retires about one every two cycles against two
// float32 FMAs per cycle, so the kernel runs at half the speed of widening the inputs (exactly)
// and running the float32 kernel; on an AMD Zen 4 it takes 0.6-0.8x the time of widening
// (BENCHMARKS.md). So the default is measured: the first time it is asked (a bf16 call, or
// runtime_info()) on a CPU that can run the kernel, both ways run on one thread over a small
// problem (one head, 512 x 512, D = 64; about 10 ms) and the kernel is chosen when it takes
// under kBf16DotThreshold of the widening time; the answer is kept for the process. The two
// CPUs measured sit well away from the threshold (Zen 4: 0.72-0.77 at this size on a loaded
// machine; the Xeon ~2), so noise does not flip it.
// ATTN_BF16_KERNEL=dot or =widen overrides the measurement (read at every call; anything else
// is an error naming the variable). Without AVX512_BF16, or under a SIMD cap below AVX3:
// widen (not measured, not cached).
constexpr double kBf16DotThreshold = 0.9;
struct Bf16KernelChoice {
  bool dot = false;         // take the vdpbf16ps kernel
  double time_ratio = 0.0;  // measured dot time / widening time (0 when not measured)
  std::string by;           // "ATTN_BF16_KERNEL", "measured: ...", or why the kernel cannot run
};
Bf16KernelChoice bf16_kernel_choice();

// bf16_kernel_choice().dot.
bool bf16_dot_kernel_requested();

// True when attention() should take this kernel: bf16_dot_kernel_requested(), the kernel can run
// now, and it computes what attention() specifies for these params (converted to float32):
// DotScore or ScaledDotScore (no head_scores), no bias, no `allowed` mask, no ALiBi, no dropout,
// no return_weights, no local attention.
bool flash_attention_bf16_supported(const AttentionParams& params);

// The raw entry (threads: OpenMP over batch x query head x block of query rows, dynamic
// schedule; bitwise identical results for any thread count). Requires
// flash_attention_bf16_available().
void flash_attention_bf16_forward(const FlashBf16Args& args);

// Runs the kernel on validated, contiguous bf16 tensors with float32 params; returns float32
// out and lse.
AttentionOutput flash_attention_bf16(const detail::AttentionDims& dims, const Tensor& q,
                                     const Tensor& k, const Tensor& v,
                                     const AttentionParams& params);

}  // namespace attn::kernels
