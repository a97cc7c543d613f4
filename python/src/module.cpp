// attn._core: the compiled half of the Python package (python/attn/ holds the Python half, which
// turns keyword arguments into the dicts these functions take). Every function converts its
// arguments with the GIL held, then releases it while attn computes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attn/attention.h"
#include "attn/matmul.h"
#include "attn/reference.h"
#include "attn/runtime.h"
#include "bindings.h"
#include "convert.h"
#include "params.h"

namespace attn::python {

namespace {

py::tuple attention_forward(py::handle q, py::handle k, py::handle v, const py::dict& spec,
                            bool reference) {
  KeepAlive keep;
  const ArrayKind kind = kind_of(q);
  const Tensor tq = to_tensor(q, "q", keep).tensor, tk = to_tensor(k, "k", keep).tensor,
               tv = to_tensor(v, "v", keep).tensor;
  const AttentionParams params = to_params(spec, keep);
  AttentionOutput out;
  {
    py::gil_scoped_release release;
    out = reference ? attn::reference::attention(tq, tk, tv, params)
                    : attn::attention(tq, tk, tv, params);
  }
  return from_attention_output(out, kind);
}

py::tuple attention_backward(py::handle q, py::handle k, py::handle v, const py::dict& spec,
                             py::handle out, py::handle lse, py::handle dout, bool reference) {
  KeepAlive keep;
  const ArrayKind kind = kind_of(q);
  const Tensor tq = to_tensor(q, "q", keep).tensor, tk = to_tensor(k, "k", keep).tensor,
               tv = to_tensor(v, "v", keep).tensor;
  const AttentionParams params = to_params(spec, keep);
  AttentionOutput forward;
  forward.out = to_tensor(out, "forward.out", keep).tensor;
  forward.lse = to_tensor(lse, "forward.lse", keep).tensor;
  const Tensor tdout = to_tensor(dout, "dout", keep).tensor;
  AttentionGrads grads;
  {
    py::gil_scoped_release release;
    grads = reference ? attn::reference::attention_backward(tq, tk, tv, params, forward, tdout)
                      : attn::attention_backward(tq, tk, tv, params, forward, tdout);
  }
  return from_attention_grads(grads, params, kind);
}

py::object matmul(py::handle a, py::handle b, bool reference) {
  KeepAlive keep;
  const ArrayKind kind = kind_of(a);
  const Tensor ta = to_tensor(a, "a", keep).tensor, tb = to_tensor(b, "b", keep).tensor;
  Tensor out;
  {
    py::gil_scoped_release release;
    out = reference ? attn::reference::matmul(ta, tb) : attn::matmul(ta, tb);
  }
  return to_python(out, kind);
}

py::tuple matmul_backward(py::handle a, py::handle b, py::handle dout, bool reference) {
  KeepAlive keep;
  const ArrayKind kind = kind_of(a);
  const Tensor ta = to_tensor(a, "a", keep).tensor, tb = to_tensor(b, "b", keep).tensor,
               td = to_tensor(dout, "dout", keep).tensor;
  MatmulGrads grads;
  {
    py::gil_scoped_release release;
    grads = reference ? attn::reference::matmul_backward(ta, tb, td)
                      : attn::matmul_backward(ta, tb, td);
  }
  return py::make_tuple(to_python(grads.da, kind), to_python(grads.db, kind));
}

// How attn sees an array: where its data is, its shape and strides in elements, and whether the
// conversion had to copy. The tests use it to show that inputs are read in place.
py::dict view_info(py::handle x) {
  KeepAlive keep;
  const Converted c = to_tensor(x, "x", keep);
  py::dict d;
  d["data_ptr"] = reinterpret_cast<std::uintptr_t>(c.tensor.raw_data());
  d["shape"] = c.tensor.shape();
  d["strides"] = c.tensor.strides();
  d["dtype"] = dtype_name(c.tensor.dtype());
  d["copied"] = c.copied;
  return d;
}

py::dict runtime_info() {
  const RuntimeInfo info = attn::runtime_info();
  py::dict d;
  d["simd_target"] = info.simd_target;
  d["blas_library"] = info.blas_library;
  d["blas_kernel"] = info.blas_kernel;
  d["blas_kernel_by"] = info.blas_kernel_by;
  d["blas_threads"] = info.blas_threads;
  d["openmp_threads"] = info.openmp_threads;
  d["cores"] = info.cores;
  return d;
}

}  // namespace

}  // namespace attn::python

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  using namespace attn::python;
  m.doc() = "attn's compiled core; use the `attn` package, not this module.";
  // attn::Error -> attn.Error, a ValueError: bad input, with attn's message.
  py::register_exception<attn::Error>(m, "Error", PyExc_ValueError);

  m.def("attention", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("spec"), py::arg("reference") = false);
  m.def("attention_backward", &attention_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("spec"), py::arg("out"), py::arg("lse"), py::arg("dout"),
        py::arg("reference") = false);
  m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("reference") = false);
  m.def("matmul_backward", &matmul_backward, py::arg("a"), py::arg("b"), py::arg("dout"),
        py::arg("reference") = false);
  m.def("alibi_slopes", &attn::alibi_slopes, py::arg("num_heads"));
  m.def("view_info", &view_info, py::arg("x"));
  m.def("runtime_info", &runtime_info);
  m.def("runtime_summary", &attn::runtime_summary);
  bind_multihead(m);
  bind_translator(m);
}
