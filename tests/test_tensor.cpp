// attn::Tensor: construction, views, strides, conversions and its errors.
#include <gtest/gtest.h>

#include <cstdint>

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

}  // namespace
}  // namespace attn
