// attn::Tensor: a small strided n-d array of float32, float64 or bf16.
//
// Element types: float32, float64, bf16 (storage format for attention inputs and K/V caches) and
// bool (for masks).
// A Tensor is either owning (shares a reference-counted, 64-byte aligned buffer) or a view of
// memory the caller owns (Tensor::wrap). Copies of a Tensor share storage, like torch tensors;
// clone() makes a deep copy. Shapes and strides are in elements. A default-constructed Tensor is
// "undefined" (defined() == false) and is how optional arguments are left out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "attn/error.h"

namespace attn {

// b8 holds booleans (one byte, 0 or 1): the element type of boolean masks.
// bf16 holds bfloat16 bit patterns (two bytes: the upper half of a float32, 8-bit significand).
// Conversions to bf16 (to(), set(), fill(), copy_from()) round to nearest, ties to even, once
// (also from float64); NaN stays NaN, values beyond the largest bf16 become +-inf. Conversions
// from bf16 are exact. get() and to_vector() return the exact value as a double.
enum class DType { f32, f64, b8, bf16 };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

// One bf16 element, for typed access (data<BFloat16>()): the raw bit pattern.
struct BFloat16 {
  uint16_t bits = 0;
};

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<bool>() { return DType::b8; }
template <> constexpr DType dtype_of<BFloat16>() { return DType::bf16; }

using Shape = std::vector<int64_t>;

// "[2, 3, 4]"
std::string shape_str(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;

  // Owning constructors. empty() leaves the contents uninitialised.
  static Tensor empty(const Shape& shape, DType dtype = DType::f32);
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32);
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32);
  // Copies `values` (row-major) into a new tensor of `shape`; sizes must agree.
  static Tensor from(const std::vector<float>& values, const Shape& shape);
  static Tensor from(const std::vector<double>& values, const Shape& shape);
  // Non-owning view of caller memory; strides default to row-major contiguous.
  template <class T>
  static Tensor wrap(T* data, const Shape& shape, const Shape& strides = {}) {
    return wrap_bytes(data, dtype_of<T>(), shape, strides);
  }

  bool defined() const { return static_cast<bool>(storage_) || base_ != nullptr; }
  DType dtype() const { return dtype_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  // size(-1) is the last dimension, like torch.
  int64_t size(int64_t d) const;
  int64_t stride(int64_t d) const;
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_str() const { return attn::shape_str(shape_); }

  // Typed access to the first element; throws if T does not match dtype().
  template <class T> T* data();
  template <class T> const T* data() const;
  void* raw_data() const;

  // Element access by full index, for tests and small loops (not for hot paths).
  double get(std::initializer_list<int64_t> index) const;
  void set(std::initializer_list<int64_t> index, double value);
  double get_flat(int64_t linear_index) const;  // row-major position, any strides

  // Copies and conversions (always return contiguous, owning tensors).
  Tensor clone() const;
  Tensor contiguous() const;  // shares storage when already contiguous
  Tensor to(DType dtype) const;  // shares storage when the dtype already matches
  std::vector<double> to_vector() const;  // row-major values as float64
  void copy_from(const Tensor& src);  // same shape; dtype converted
  void fill(double value);

  // Views (share storage).
  Tensor reshape(const Shape& shape) const;  // copies if not contiguous; one dim may be -1
  Tensor transpose(int64_t a, int64_t b) const;
  Tensor select(int64_t d, int64_t index) const;  // drops dimension d
  Tensor slice(int64_t d, int64_t start, int64_t end) const;
  Tensor unsqueeze(int64_t d) const;

 private:
  static Tensor wrap_bytes(void* data, DType dtype, const Shape& shape, const Shape& strides);
  int64_t offset_of(std::initializer_list<int64_t> index) const;

  std::shared_ptr<std::byte[]> storage_;
  std::byte* base_ = nullptr;  // first element (storage_ + offset, or wrapped memory)
  DType dtype_ = DType::f32;
  Shape shape_;
  Shape strides_;
};

// Row-major strides of a contiguous tensor of `shape`.
Shape contiguous_strides(const Shape& shape);
int64_t shape_numel(const Shape& shape);

template <class T>
T* Tensor::data() {
  ATTN_CHECK(dtype_ == dtype_of<T>(), "tensor", "data<", dtype_name(dtype_of<T>()),
             ">() on a ", dtype_name(dtype_), " tensor");
  return reinterpret_cast<T*>(base_);
}
template <class T>
const T* Tensor::data() const {
  ATTN_CHECK(dtype_ == dtype_of<T>(), "tensor", "data<", dtype_name(dtype_of<T>()),
             ">() on a ", dtype_name(dtype_), " tensor");
  return reinterpret_cast<const T*>(base_);
}

}  // namespace attn
