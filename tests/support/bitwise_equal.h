// Bit-for-bit comparison of two tensors, for the tests that promise identical results (two
// routes to the same kernel, repeated runs, other thread counts), where all_close with any
// tolerance would hide a difference. Header-only.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "attn/tensor.h"

namespace attn::testing {

// Passes when both tensors have the same dtype and shape and the same bytes (row-major), or
// are both undefined.
inline ::testing::AssertionResult bitwise_equal(const Tensor& a, const Tensor& b,
                                                const std::string& what) {
  if (a.defined() != b.defined())
    return ::testing::AssertionFailure() << what << ": one tensor is undefined";
  if (!a.defined()) return ::testing::AssertionSuccess();
  if (a.dtype() != b.dtype() || a.shape() != b.shape())
    return ::testing::AssertionFailure() << what << ": " << dtype_name(a.dtype()) << " "
                                         << shape_str(a.shape()) << " vs " << dtype_name(b.dtype())
                                         << " " << shape_str(b.shape());
  const Tensor x = a.contiguous(), y = b.contiguous();
  const std::size_t bytes = static_cast<std::size_t>(x.numel()) * dtype_size(x.dtype());
  if (bytes != 0 && std::memcmp(x.raw_data(), y.raw_data(), bytes) != 0)
    return ::testing::AssertionFailure() << what << ": the bytes differ";
  return ::testing::AssertionSuccess();
}

}  // namespace attn::testing
