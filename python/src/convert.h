// Conversion between Python arrays (NumPy arrays, CPU torch tensors) and attn::Tensor.
//
// Inputs are read in place whenever attn::Tensor can describe their memory (any non-negative
// strides that are whole elements); otherwise they are copied once. The Python objects whose
// memory a Tensor views are held in a KeepAlive for the duration of the call. Results go back
// without a copy: the NumPy array (or torch tensor made from it) owns a reference to attn's
// buffer.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "attn/tensor.h"

namespace attn::python {

namespace py = pybind11;

// Which kind of array a call received: results are returned as the same kind.
enum class ArrayKind { numpy, torch };

// The Python objects behind the Tensors of one call (kept referenced until the call returns).
struct KeepAlive {
  std::vector<py::object> objects;
};

// The result of converting one argument.
struct Converted {
  Tensor tensor;        // undefined for None
  ArrayKind kind = ArrayKind::numpy;
  bool copied = false;  // the data had to be copied (layout attn cannot view, or a list)
};

// `name` names the argument in error messages ("[python] q: ..."). None gives an undefined
// Tensor. Accepts NumPy arrays (float32, float64, bool), CPU torch tensors (float32, float64,
// bfloat16, bool) and anything numpy.asarray accepts (copied).
Converted to_tensor(py::handle obj, const char* name, KeepAlive& keep);

// The kind of array `obj` is (torch when it is a torch.Tensor, else numpy).
ArrayKind kind_of(py::handle obj);

// A result as a Python array of `kind`, sharing attn's buffer. Undefined gives None. bf16 results
// become torch.bfloat16 tensors, or float32 NumPy arrays (NumPy has no bfloat16).
py::object to_python(const Tensor& tensor, ArrayKind kind);

// Python sequences of ints/floats (or 1-D arrays) to std::vector; None gives an empty vector.
std::vector<int64_t> to_int_vector(py::handle obj, const char* name);
std::vector<double> to_double_vector(py::handle obj, const char* name);

}  // namespace attn::python
