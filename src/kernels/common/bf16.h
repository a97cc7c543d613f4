// bf16 <-> float32 / float64 conversions (internal, shared by attn::Tensor and the kernels).
// A bf16 is the upper 16 bits of a float32 (same exponent range, 8-bit significand), stored as
// uint16_t bit patterns.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace attn::kernels {

// Round to nearest, ties to even; NaN stays a (quiet) NaN, +-inf stays +-inf, values beyond the
// largest bf16 round to inf as IEEE rounding prescribes.
inline uint16_t float_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  // Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
  // half is above one half ulp, or equal to it with an odd kept half.
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Exact.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// float64 -> bf16 with ONE rounding (nearest, ties to even). Rounding to float32 first and then
// to bf16 could round twice across a tie; instead the float32 step rounds to odd (truncate, then
// set the last bit when inexact), which keeps the sticky information: with 16 spare bits the
// second rounding is then exact-nearest (Boldo and Melquiond, "round to odd").
inline uint16_t double_to_bf16(double x) {
  if (std::isnan(x)) return float_to_bf16(static_cast<float>(x));
  float f = static_cast<float>(x);
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);  // truncate
  if (static_cast<double>(f) != x) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= 1u;
    std::memcpy(&f, &bits, sizeof f);
  }
  return float_to_bf16(f);
}

inline void float_to_bf16(const float* src, uint16_t* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}
inline void bf16_to_float(const uint16_t* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

}  // namespace attn::kernels
