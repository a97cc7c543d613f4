#include "attn/tensor.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "attn/profile.h"

#include "kernels/common/bf16.h"

namespace attn {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::b8: return "bool";
    case DType::bf16: return "bf16";
  }
  return "?";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::b8: return 1;
    case DType::bf16: return 2;
  }
  return 0;
}

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t step = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    strides[d] = step;
    step *= std::max<int64_t>(shape[d], 1);
  }
  return strides;
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

namespace {

constexpr std::size_t kAlignment = 64;  // one cache line, and an AVX-512 vector

std::shared_ptr<std::byte[]> allocate(std::size_t bytes) {
  ATTN_PROFILE_SCOPE("tensor.allocate");
  profile::count_allocation(bytes);
  bytes = std::max<std::size_t>(bytes, 1);
  bytes = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  auto* p = static_cast<std::byte*>(::operator new[](bytes, std::align_val_t(kAlignment)));
  return std::shared_ptr<std::byte[]>(
      p, [](std::byte* q) {
        ATTN_PROFILE_SCOPE("tensor.free");
        ::operator delete[](q, std::align_val_t(kAlignment));
      });
}

double load(const std::byte* p, DType dtype) {
  switch (dtype) {
    case DType::f32: { float x; std::memcpy(&x, p, 4); return x; }
    case DType::f64: { double x; std::memcpy(&x, p, 8); return x; }
    case DType::b8: return *reinterpret_cast<const uint8_t*>(p) ? 1.0 : 0.0;
    case DType::bf16: { uint16_t h; std::memcpy(&h, p, 2); return kernels::bf16_to_float(h); }
  }
  return 0.0;
}

void store(std::byte* p, DType dtype, double value) {
  switch (dtype) {
    case DType::f32: { float x = static_cast<float>(value); std::memcpy(p, &x, 4); return; }
    case DType::f64: std::memcpy(p, &value, 8); return;
    case DType::b8: *reinterpret_cast<uint8_t*>(p) = value != 0.0; return;
    case DType::bf16: {
      const uint16_t h = kernels::double_to_bf16(value);  // one rounding, even from float64
      std::memcpy(p, &h, 2);
      return;
    }
  }
}

void check_shape(const Shape& shape, const char* op) {
  for (int64_t s : shape)
    ATTN_CHECK(s >= 0, op, "negative size in shape ", shape_str(shape));
}

// Calls fn(element_offset) for every element in row-major order.
template <class Fn>
void for_each_offset(const Shape& shape, const Shape& strides, Fn&& fn) {
  const int64_t n = shape_numel(shape);
  if (n == 0) return;
  const std::size_t nd = shape.size();
  std::vector<int64_t> index(nd, 0);
  int64_t offset = 0;
  for (int64_t count = 0; count < n; ++count) {
    fn(offset);
    for (std::size_t d = nd; d-- > 0;) {
      if (++index[d] < shape[d]) {
        offset += strides[d];
        break;
      }
      offset -= strides[d] * (shape[d] - 1);
      index[d] = 0;
    }
  }
}

}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  check_shape(shape, "tensor");
  Tensor t;
  t.storage_ = allocate(static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype));
  t.base_ = t.storage_.get();
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  ATTN_PROFILE_SCOPE("tensor.zero_fill");
  std::memset(t.base_, 0, static_cast<std::size_t>(t.numel()) * dtype_size(dtype));
  return t;
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype) {
  Tensor t = empty(shape, dtype);
  t.fill(value);
  return t;
}

Tensor Tensor::from(const std::vector<float>& values, const Shape& shape) {
  ATTN_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()), "tensor", values.size(),
             " values do not fill shape ", attn::shape_str(shape));
  Tensor t = empty(shape, DType::f32);
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}

Tensor Tensor::from(const std::vector<double>& values, const Shape& shape) {
  ATTN_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()), "tensor", values.size(),
             " values do not fill shape ", attn::shape_str(shape));
  Tensor t = empty(shape, DType::f64);
  std::copy(values.begin(), values.end(), t.data<double>());
  return t;
}

Tensor Tensor::wrap_bytes(void* data, DType dtype, const Shape& shape, const Shape& strides) {
  check_shape(shape, "tensor");
  ATTN_CHECK(strides.empty() || strides.size() == shape.size(), "tensor", "strides ",
             attn::shape_str(strides), " do not match shape ", attn::shape_str(shape));
  Tensor t;
  t.base_ = static_cast<std::byte*>(data);
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.strides_ = strides.empty() ? contiguous_strides(shape) : strides;
  return t;
}

int64_t Tensor::size(int64_t d) const {
  const int64_t nd = dim();
  if (d < 0) d += nd;
  ATTN_CHECK(d >= 0 && d < nd, "tensor", "dimension ", d, " out of range for shape ", shape_str());
  return shape_[static_cast<std::size_t>(d)];
}

int64_t Tensor::stride(int64_t d) const {
  const int64_t nd = dim();
  if (d < 0) d += nd;
  ATTN_CHECK(d >= 0 && d < nd, "tensor", "dimension ", d, " out of range for shape ", shape_str());
  return strides_[static_cast<std::size_t>(d)];
}

int64_t Tensor::numel() const { return shape_numel(shape_); }

bool Tensor::is_contiguous() const {
  if (numel() == 0) return true;  // no element to misplace (torch agrees)
  int64_t expected = 1;
  for (std::size_t d = shape_.size(); d-- > 0;) {
    if (shape_[d] == 1) continue;
    if (strides_[d] != expected) return false;
    expected *= shape_[d];
  }
  return true;
}

void* Tensor::raw_data() const { return base_; }

int64_t Tensor::offset_of(std::initializer_list<int64_t> index) const {
  ATTN_CHECK(static_cast<int64_t>(index.size()) == dim(), "tensor", index.size(),
             " indices for shape ", shape_str());
  int64_t offset = 0;
  std::size_t d = 0;
  for (int64_t i : index) {
    ATTN_CHECK(i >= 0 && i < shape_[d], "tensor", "index ", i, " out of range in dimension ", d,
               " of shape ", shape_str());
    offset += i * strides_[d++];
  }
  return offset;
}

double Tensor::get(std::initializer_list<int64_t> index) const {
  return load(base_ + offset_of(index) * static_cast<int64_t>(dtype_size(dtype_)), dtype_);
}

void Tensor::set(std::initializer_list<int64_t> index, double value) {
  store(base_ + offset_of(index) * static_cast<int64_t>(dtype_size(dtype_)), dtype_, value);
}

double Tensor::get_flat(int64_t linear) const {
  ATTN_CHECK(linear >= 0 && linear < numel(), "tensor", "flat index ", linear,
             " out of range for shape ", shape_str());
  int64_t offset = 0;
  for (std::size_t d = shape_.size(); d-- > 0;) {
    offset += (linear % shape_[d]) * strides_[d];
    linear /= shape_[d];
  }
  return load(base_ + offset * static_cast<int64_t>(dtype_size(dtype_)), dtype_);
}

void Tensor::copy_from(const Tensor& src) {
  ATTN_CHECK(src.shape_ == shape_, "tensor", "copy_from: source shape ", src.shape_str(),
             " differs from destination ", shape_str());
  const int64_t n = numel();
  if (n == 0) return;
  const std::size_t ds = dtype_size(dtype_), ss = dtype_size(src.dtype_);
  if (dtype_ == src.dtype_ && is_contiguous() && src.is_contiguous()) {
    std::memmove(base_, src.base_, static_cast<std::size_t>(n) * ds);
    return;
  }
  if (dtype_ == src.dtype_ && strides_.back() == 1 && src.strides_.back() == 1) {
    // Strided views with contiguous rows (transposed heads, slices): one memcpy per row.
    const int64_t row = shape_.back();
    const Shape outer(shape_.begin(), shape_.end() - 1);
    const Shape dst_outer(strides_.begin(), strides_.end() - 1);
    const Shape src_outer(src.strides_.begin(), src.strides_.end() - 1);
    std::vector<int64_t> dst_offsets, src_offsets;
    for_each_offset(outer, dst_outer, [&](int64_t off) { dst_offsets.push_back(off); });
    for_each_offset(outer, src_outer, [&](int64_t off) { src_offsets.push_back(off); });
    const auto bytes_per_row = static_cast<std::size_t>(row) * ds;
    for (std::size_t r = 0; r < dst_offsets.size(); ++r)
      std::memmove(base_ + dst_offsets[r] * static_cast<int64_t>(ds),
                   src.base_ + src_offsets[r] * static_cast<int64_t>(ss), bytes_per_row);
    return;
  }
  if (is_contiguous() && src.is_contiguous()) {
    // The float32 <-> bf16 conversions of attention inputs: no float64 round trip.
    if (dtype_ == DType::bf16 && src.dtype_ == DType::f32) {
      kernels::float_to_bf16(reinterpret_cast<const float*>(src.base_),
                             reinterpret_cast<uint16_t*>(base_), static_cast<std::size_t>(n));
      return;
    }
    if (dtype_ == DType::f32 && src.dtype_ == DType::bf16) {
      kernels::bf16_to_float(reinterpret_cast<const uint16_t*>(src.base_),
                             reinterpret_cast<float*>(base_), static_cast<std::size_t>(n));
      return;
    }
  }
  // Gather source values in row-major order, then scatter into this tensor.
  std::vector<double> values;
  values.reserve(static_cast<std::size_t>(n));
  for_each_offset(src.shape_, src.strides_, [&](int64_t off) {
    values.push_back(load(src.base_ + off * static_cast<int64_t>(ss), src.dtype_));
  });
  std::size_t k = 0;
  for_each_offset(shape_, strides_, [&](int64_t off) {
    store(base_ + off * static_cast<int64_t>(ds), dtype_, values[k++]);
  });
}

void Tensor::fill(double value) {
  const std::size_t ds = dtype_size(dtype_);
  for_each_offset(shape_, strides_,
                  [&](int64_t off) { store(base_ + off * static_cast<int64_t>(ds), dtype_, value); });
}

std::vector<double> Tensor::to_vector() const {
  std::vector<double> values;
  values.reserve(static_cast<std::size_t>(numel()));
  const std::size_t ds = dtype_size(dtype_);
  for_each_offset(shape_, strides_, [&](int64_t off) {
    values.push_back(load(base_ + off * static_cast<int64_t>(ds), dtype_));
  });
  return values;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  Tensor t = empty(shape_, dtype);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::reshape(const Shape& shape) const {
  Shape target = shape;
  int64_t known = 1, infer = -1;
  for (std::size_t d = 0; d < target.size(); ++d) {
    if (target[d] == -1) {
      ATTN_CHECK(infer < 0, "reshape", "more than one -1 in ", attn::shape_str(shape));
      infer = static_cast<int64_t>(d);
    } else {
      ATTN_CHECK(target[d] >= 0, "reshape", "negative size in ", attn::shape_str(shape));
      known *= target[d];
    }
  }
  if (infer >= 0) {
    ATTN_CHECK(known > 0 && numel() % known == 0, "reshape", "cannot reshape ", shape_str(), " to ",
               attn::shape_str(shape));
    target[static_cast<std::size_t>(infer)] = numel() / known;
  }
  ATTN_CHECK(shape_numel(target) == numel(), "reshape", "cannot reshape ", shape_str(), " (",
             numel(), " elements) to ", attn::shape_str(shape));
  Tensor t = contiguous();
  t.shape_ = target;
  t.strides_ = contiguous_strides(target);
  return t;
}

Tensor Tensor::transpose(int64_t a, int64_t b) const {
  const int64_t nd = dim();
  if (a < 0) a += nd;
  if (b < 0) b += nd;
  ATTN_CHECK(a >= 0 && a < nd && b >= 0 && b < nd, "transpose", "dimensions ", a, ", ", b,
             " out of range for shape ", shape_str());
  Tensor t = *this;
  std::swap(t.shape_[static_cast<std::size_t>(a)], t.shape_[static_cast<std::size_t>(b)]);
  std::swap(t.strides_[static_cast<std::size_t>(a)], t.strides_[static_cast<std::size_t>(b)]);
  return t;
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  const int64_t nd = dim();
  if (d < 0) d += nd;
  ATTN_CHECK(d >= 0 && d < nd, "select", "dimension ", d, " out of range for shape ", shape_str());
  const auto ud = static_cast<std::size_t>(d);
  ATTN_CHECK(index >= 0 && index < shape_[ud], "select", "index ", index,
             " out of range in dimension ", d, " of shape ", shape_str());
  Tensor t = *this;
  t.base_ += index * strides_[ud] * static_cast<int64_t>(dtype_size(dtype_));
  t.shape_.erase(t.shape_.begin() + d);
  t.strides_.erase(t.strides_.begin() + d);
  return t;
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end) const {
  const int64_t nd = dim();
  if (d < 0) d += nd;
  ATTN_CHECK(d >= 0 && d < nd, "slice", "dimension ", d, " out of range for shape ", shape_str());
  const auto ud = static_cast<std::size_t>(d);
  ATTN_CHECK(0 <= start && start <= end && end <= shape_[ud], "slice", "range [", start, ", ", end,
             ") out of bounds in dimension ", d, " of shape ", shape_str());
  Tensor t = *this;
  t.base_ += start * strides_[ud] * static_cast<int64_t>(dtype_size(dtype_));
  t.shape_[ud] = end - start;
  return t;
}

Tensor Tensor::unsqueeze(int64_t d) const {
  const int64_t nd = dim();
  if (d < 0) d += nd + 1;
  ATTN_CHECK(d >= 0 && d <= nd, "unsqueeze", "dimension ", d, " out of range for shape ",
             shape_str());
  Tensor t = *this;
  const int64_t stride = d < nd ? strides_[static_cast<std::size_t>(d)] * shape_[static_cast<std::size_t>(d)] : 1;
  t.shape_.insert(t.shape_.begin() + d, 1);
  t.strides_.insert(t.strides_.begin() + d, stride);
  return t;
}

}  // namespace attn
