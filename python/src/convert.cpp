#include "convert.h"

#include <cstring>

namespace attn::python {

namespace {

// torch.Tensor when torch has been imported (attn never imports it for NumPy users).
bool is_torch_tensor(py::handle obj) {
  PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");
  if (torch == nullptr) return false;
  py::object tensor_type = py::reinterpret_borrow<py::object>(torch).attr("Tensor");
  return py::isinstance(obj, tensor_type);
}

std::string repr_of(py::handle obj) { return py::str(obj).cast<std::string>(); }

// A NumPy view of a torch tensor's memory (no copy); `bf16` is set for bfloat16 tensors, whose
// bits are viewed as int16 because NumPy has no bfloat16.
py::array numpy_view_of_torch(py::handle tensor, const char* name, bool& bf16) {
  py::object t = tensor.attr("detach")();
  const std::string device = repr_of(t.attr("device").attr("type"));
  ATTN_CHECK(device == "cpu", "python", name, ": a torch tensor on device '", device,
             "'; attn computes on the CPU (call .cpu() first)");
  py::module_ torch = py::module_::import("torch");
  py::object dtype = t.attr("dtype");
  bf16 = dtype.is(torch.attr("bfloat16"));
  if (bf16) return t.attr("view")(torch.attr("int16")).attr("numpy")();
  ATTN_CHECK(dtype.is(torch.attr("float32")) || dtype.is(torch.attr("float64")) ||
                 dtype.is(torch.attr("bool")),
             "python", name, ": torch dtype ", repr_of(dtype),
             " is not supported (float32, float64, bfloat16; bool for masks)");
  return t.attr("numpy")();
}

DType dtype_of_array(const py::array& arr, bool bf16, const char* name) {
  const char kind = arr.dtype().kind();
  const auto size = arr.itemsize();
  if (bf16) return DType::bf16;
  if (kind == 'f' && size == 4) return DType::f32;
  if (kind == 'f' && size == 8) return DType::f64;
  if (kind == 'b') return DType::b8;
  throw Error("python", detail::concat(name, ": NumPy dtype ", repr_of(arr.dtype()),
                                        " is not supported (float32, float64; bool for masks)"));
}

}  // namespace

ArrayKind kind_of(py::handle obj) {
  return is_torch_tensor(obj) ? ArrayKind::torch : ArrayKind::numpy;
}

Converted to_tensor(py::handle obj, const char* name, KeepAlive& keep) {
  Converted result;
  if (obj.is_none()) return result;
  bool bf16 = false;
  py::array arr;
  if (is_torch_tensor(obj)) {
    result.kind = ArrayKind::torch;
    arr = numpy_view_of_torch(obj, name, bf16);
  } else if (py::isinstance<py::array>(obj)) {
    arr = py::reinterpret_borrow<py::array>(obj);
  } else {
    // Lists, scalars, other array-likes: NumPy picks the type (Python floats become float64).
    arr = py::module_::import("numpy").attr("asarray")(obj);
    result.copied = true;
    if (arr.dtype().kind() == 'i' || arr.dtype().kind() == 'u')
      arr = arr.attr("astype")(py::module_::import("numpy").attr("float64"));
  }
  const DType dtype = dtype_of_array(arr, bf16, name);
  const auto itemsize = static_cast<int64_t>(arr.itemsize());
  bool viewable = true;
  for (py::ssize_t d = 0; d < arr.ndim(); ++d)
    if (arr.shape(d) > 1 && (arr.strides(d) < 0 || arr.strides(d) % itemsize != 0)) viewable = false;
  if (!viewable) {
    arr = py::module_::import("numpy").attr("ascontiguousarray")(arr);
    result.copied = true;
  }
  Shape shape(arr.ndim()), strides(arr.ndim());
  for (py::ssize_t d = 0; d < arr.ndim(); ++d) {
    shape[d] = arr.shape(d);
    // A dimension of size <= 1 is never stepped over; its stride may be anything NumPy chose.
    strides[d] = arr.shape(d) > 1 ? arr.strides(d) / itemsize : 1;
  }
  void* data = const_cast<void*>(arr.data());
  switch (dtype) {
    case DType::f32: result.tensor = Tensor::wrap(static_cast<float*>(data), shape, strides); break;
    case DType::f64: result.tensor = Tensor::wrap(static_cast<double*>(data), shape, strides); break;
    case DType::b8: result.tensor = Tensor::wrap(static_cast<bool*>(data), shape, strides); break;
    case DType::bf16:
      result.tensor = Tensor::wrap(static_cast<BFloat16*>(data), shape, strides);
      break;
  }
  keep.objects.push_back(std::move(arr));
  return result;
}

py::object to_python(const Tensor& tensor, ArrayKind kind) {
  if (!tensor.defined()) return py::none();
  const bool bf16 = tensor.dtype() == DType::bf16;
  // NumPy has no bfloat16: NumPy callers get float32 (exact), torch callers the bits as bf16.
  Tensor t = (bf16 && kind == ArrayKind::numpy) ? tensor.to(DType::f32) : tensor;
  py::dtype dtype = py::dtype::of<float>();
  switch (t.dtype()) {
    case DType::f32: dtype = py::dtype::of<float>(); break;
    case DType::f64: dtype = py::dtype::of<double>(); break;
    case DType::b8: dtype = py::dtype::of<bool>(); break;
    case DType::bf16: dtype = py::dtype::of<int16_t>(); break;
  }
  const auto itemsize = static_cast<py::ssize_t>(dtype_size(t.dtype()));
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end()), strides;
  for (int64_t s : t.strides()) strides.push_back(static_cast<py::ssize_t>(s) * itemsize);
  // The array owns a reference to attn's buffer through a heap copy of the Tensor handle.
  auto* owner = new Tensor(t);
  py::capsule base(owner, [](void* p) { delete static_cast<Tensor*>(p); });
  py::array arr(dtype, shape, strides, t.numel() > 0 ? t.raw_data() : nullptr, base);
  if (kind == ArrayKind::numpy) return arr;
  py::module_ torch = py::module_::import("torch");
  py::object result = torch.attr("from_numpy")(arr);
  if (t.dtype() == DType::bf16) result = result.attr("view")(torch.attr("bfloat16"));
  return result;
}

std::vector<int64_t> to_int_vector(py::handle obj, const char* name) {
  std::vector<int64_t> out;
  if (obj.is_none()) return out;
  py::object seq = py::reinterpret_borrow<py::object>(obj);
  if (is_torch_tensor(obj)) seq = obj.attr("tolist")();
  else if (py::isinstance<py::array>(obj)) seq = obj.attr("tolist")();
  ATTN_CHECK(py::isinstance<py::sequence>(seq) && !py::isinstance<py::str>(seq), "python", name,
             ": expected a sequence of integers, got ", repr_of(py::type::of(obj)));
  for (py::handle item : seq) {
    ATTN_CHECK(py::isinstance<py::int_>(item), "python", name, ": expected integers, got ",
               repr_of(item));
    out.push_back(item.cast<int64_t>());
  }
  return out;
}

std::vector<double> to_double_vector(py::handle obj, const char* name) {
  std::vector<double> out;
  if (obj.is_none()) return out;
  py::object seq = py::reinterpret_borrow<py::object>(obj);
  if (is_torch_tensor(obj) || py::isinstance<py::array>(obj)) seq = obj.attr("tolist")();
  ATTN_CHECK(py::isinstance<py::sequence>(seq) && !py::isinstance<py::str>(seq), "python", name,
             ": expected a sequence of numbers, got ", repr_of(py::type::of(obj)));
  for (py::handle item : seq) {
    ATTN_CHECK(py::isinstance<py::int_>(item) || py::isinstance<py::float_>(item), "python", name,
               ": expected numbers, got ", repr_of(item));
    out.push_back(item.cast<double>());
  }
  return out;
}

}  // namespace attn::python
