// attn::Tensor: construction, views, strides, conversions and its errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attn/tensor.h"

namespace attn {
namespace {

TEST(Tensor, ZerosFullAndFrom) {
  Tensor z = Tensor::zeros({2, 3});
  EXPECT_EQ(z.numel(), 6);
  EXPECT_EQ(z.dtype(), DType::f32);
  for (double x : z.to_vector()) EXPECT_EQ(x, 0.0);
  Tensor f = Tensor::full({4}, 2.5, DType::f64);
  for (double x : f.to_vector()) EXPECT_EQ(x, 2.5);
  Tensor t = Tensor::from(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(t.get({1, 2}), 6.0);
  EXPECT_EQ(t.strides(), (Shape{3, 1}));
  EXPECT_THROW(Tensor::from(std::vector<float>{1, 2}, {3}), Error);
}

TEST(Tensor, StorageIsAlignedAndShared) {
  Tensor t = Tensor::empty({17}, DType::f32);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.raw_data()) % 64, 0u);
  Tensor alias = t;
  alias.set({3}, 7.0);
  EXPECT_EQ(t.get({3}), 7.0);
  Tensor copy = t.clone();
  copy.set({3}, 1.0);
  EXPECT_EQ(t.get({3}), 7.0);
}

TEST(Tensor, TransposeSliceSelectUnsqueeze) {
  Tensor t = Tensor::from(std::vector<float>{0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor tt = t.transpose(0, 1);
  EXPECT_EQ(tt.shape(), (Shape{3, 2}));
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.get({2, 1}), 5.0);
  EXPECT_EQ(tt.contiguous().to_vector(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  Tensor s = t.slice(1, 1, 3);
  EXPECT_EQ(s.to_vector(), (std::vector<double>{1, 2, 4, 5}));
  Tensor row = t.select(0, 1);
  EXPECT_EQ(row.to_vector(), (std::vector<double>{3, 4, 5}));
  Tensor u = t.unsqueeze(0);
  EXPECT_EQ(u.shape(), (Shape{1, 2, 3}));
  EXPECT_EQ(t.unsqueeze(-1).shape(), (Shape{2, 3, 1}));
}

TEST(Tensor, ReshapeInfersAndCopiesNonContiguous) {
  Tensor t = Tensor::from(std::vector<float>{0, 1, 2, 3, 4, 5}, {2, 3});
  EXPECT_EQ(t.reshape({3, -1}).shape(), (Shape{3, 2}));
  Tensor r = t.transpose(0, 1).reshape({6});
  EXPECT_EQ(r.to_vector(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  EXPECT_THROW(t.reshape({4, 2}), Error);
  EXPECT_THROW(t.reshape({-1, -1}), Error);
}

TEST(Tensor, ConversionsRoundTrip) {
  Tensor t = Tensor::from(std::vector<double>{0.5, -1.25, 3.0}, {3});
  Tensor f = t.to(DType::f32);
  EXPECT_EQ(f.dtype(), DType::f32);
  EXPECT_EQ(f.to(DType::f64).to_vector(), t.to_vector());
  Tensor b = t.to(DType::b8);
  EXPECT_EQ(b.to_vector(), (std::vector<double>{1, 1, 1}));
  EXPECT_THROW(f.data<double>(), Error);
}

TEST(Tensor, WrapsCallerMemoryWithStrides) {
  float buffer[6] = {0, 1, 2, 3, 4, 5};
  Tensor column = Tensor::wrap(buffer, {3}, {2});
  EXPECT_EQ(column.to_vector(), (std::vector<double>{0, 2, 4}));
  column.set({1}, 9.0);
  EXPECT_EQ(buffer[2], 9.0f);
}

TEST(Tensor, ZeroSizedDimensions) {
  Tensor t = Tensor::zeros({2, 0, 3});
  EXPECT_EQ(t.numel(), 0);
  EXPECT_TRUE(t.to_vector().empty());
  EXPECT_EQ(t.clone().shape(), (Shape{2, 0, 3}));
}

TEST(Tensor, IndexErrorsNameTheShape) {
  Tensor t = Tensor::zeros({2, 3});
  try {
    t.get({2, 0});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[2, 3]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(t.size(2), Error);
  EXPECT_THROW(Tensor::zeros({-1}), Error);
}

// bf16: round to nearest even on the way in (once, even from float64), exact on the way out.
TEST(Tensor, Bf16RoundsToNearestEvenAndWidensExactly) {
  EXPECT_STREQ(dtype_name(DType::bf16), "bf16");
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
  const double inf = std::numeric_limits<double>::infinity();
  const double ulp = std::ldexp(1.0, -7);  // bf16 spacing in [1, 2)
  struct Case {
    double in, out;
  };
  const std::vector<Case> cases = {
      {1.0, 1.0},
      {1.0 + ulp / 2, 1.0},                        // tie, even neighbour below
      {1.0 + 3 * ulp / 2, 1.0 + 2 * ulp},          // tie, even neighbour above
      {1.0 + ulp / 2 + std::ldexp(1.0, -20), 1.0 + ulp},  // just above the tie
      {1.0 + ulp / 2 + std::ldexp(1.0, -40), 1.0 + ulp},  // float64 only: no double rounding
      {-(1.0 + 3 * ulp / 2), -(1.0 + 2 * ulp)},
      {0.1, 0.10009765625},
      {-0.0, -0.0},
      {3.4e38, inf},  // beyond the largest bf16 (3.3895e38) by more than half an ulp
      {inf, inf},
      {-inf, -inf},
  };
  std::vector<double> in;
  for (const Case& c : cases) in.push_back(c.in);
  const Tensor from64 = Tensor::from(in, {static_cast<int64_t>(in.size())}).to(DType::bf16);
  EXPECT_EQ(from64.dtype(), DType::bf16);
  for (std::size_t i = 0; i < cases.size(); ++i)
    EXPECT_EQ(from64.get_flat(static_cast<int64_t>(i)), cases[i].out) << "input " << cases[i].in;
  // From float32 (every case but the 2^-40 one is a float32 value).
  const Tensor from32 = Tensor::from(std::vector<float>{1.0f + 0.00390625f, 0.1f}, {2}).to(DType::bf16);
  EXPECT_EQ(from32.to_vector(), (std::vector<double>{1.0, 0.10009765625}));
  // NaN stays NaN; bit patterns are the top half of the float32.
  Tensor t = Tensor::zeros({3}, DType::bf16);
  t.set({0}, std::nan(""));
  t.set({1}, 1.0);
  t.set({2}, -2.0);
  EXPECT_TRUE(std::isnan(t.get({0})));
  EXPECT_EQ(t.data<BFloat16>()[1].bits, 0x3F80);
  EXPECT_EQ(t.data<BFloat16>()[2].bits, 0xC000);
  EXPECT_THROW(t.data<float>(), Error);
  // Widening is exact: every bf16 value survives float32 and float64 round trips.
  Tensor all = Tensor::empty({1 << 16}, DType::bf16);
  for (int i = 0; i < (1 << 16); ++i) all.data<BFloat16>()[i].bits = static_cast<uint16_t>(i);
  const Tensor back32 = all.to(DType::f32).to(DType::bf16);
  const Tensor back64 = all.to(DType::f64).to(DType::bf16);
  for (int i = 0; i < (1 << 16); ++i) {
    const double x = all.get_flat(i);
    if (std::isnan(x)) continue;
    ASSERT_EQ(back32.data<BFloat16>()[i].bits, i);
    ASSERT_EQ(back64.data<BFloat16>()[i].bits, i);
    ASSERT_EQ(static_cast<double>(all.to(DType::f32).data<float>()[i]), x);
  }
}

TEST(Tensor, Bf16ViewsAndCopies) {
  Tensor t = Tensor::from(std::vector<float>{0, 1, 2, 3, 4, 5}, {2, 3}).to(DType::bf16);
  EXPECT_EQ(t.transpose(0, 1).contiguous().to_vector(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  EXPECT_EQ(t.slice(1, 1, 3).to(DType::f64).to_vector(), (std::vector<double>{1, 2, 4, 5}));
  Tensor f = Tensor::full({2}, 1.5, DType::bf16);
  EXPECT_EQ(f.to_vector(), (std::vector<double>{1.5, 1.5}));
  Tensor dst = Tensor::zeros({3, 2}, DType::bf16);
  dst.copy_from(t.transpose(0, 1));  // strided, same dtype
  EXPECT_EQ(dst.to_vector(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(Tensor::empty({33}, DType::bf16).raw_data()) % 64, 0u);
}

}  // namespace
}  // namespace attn
