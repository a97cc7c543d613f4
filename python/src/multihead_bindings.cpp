// Multi-head attention across the Python boundary. A config is a dict with the fields of
// attn::MultiHeadConfig; weights a dict with the fields of attn::MultiHeadWeights (w_q, b_q,
// ..., b_o; biases absent or None without bias).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "attn/multihead.h"
#include "attn/quantized.h"
#include "bindings.h"
#include "convert.h"
#include "params.h"

namespace attn::python {

namespace {

MultiHeadConfig to_config(const py::dict& d) {
  MultiHeadConfig c;
  c.d_model = d["d_model"].cast<int64_t>();
  c.num_heads = d["num_heads"].cast<int64_t>();
  c.num_kv_heads = d["num_kv_heads"].cast<int64_t>();
  c.head_dim = d["head_dim"].cast<int64_t>();
  c.value_head_dim = d["value_head_dim"].cast<int64_t>();
  c.key_input_dim = d["key_input_dim"].cast<int64_t>();
  c.value_input_dim = d["value_input_dim"].cast<int64_t>();
  c.bias = d["bias"].cast<bool>();
  return c;
}

#define ATTN_MULTIHEAD_WEIGHT_FIELDS(X) X(w_q) X(b_q) X(w_k) X(b_k) X(w_v) X(b_v) X(w_o) X(b_o)

MultiHeadWeights to_weights(const py::dict& d, KeepAlive& keep) {
  MultiHeadWeights w;
#define ATTN_READ(name) \
  if (d.contains(#name)) w.name = to_tensor(d[#name], "weights." #name, keep).tensor;
  ATTN_MULTIHEAD_WEIGHT_FIELDS(ATTN_READ)
#undef ATTN_READ
  return w;
}

py::dict from_weights(const MultiHeadWeights& w, ArrayKind kind) {
  py::dict d;
#define ATTN_WRITE(name) d[#name] = to_python(w.name, kind);
  ATTN_MULTIHEAD_WEIGHT_FIELDS(ATTN_WRITE)
#undef ATTN_WRITE
  return d;
}

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float64") return DType::f64;
  if (name == "bfloat16") return DType::bf16;
  throw Error("python", "dtype: '" + name + "' (expected float32, float64 or bfloat16)");
}

ArrayKind parse_kind(const std::string& name) {
  ATTN_CHECK(name == "numpy" || name == "torch", "python", "kind: '", name,
             "' (expected numpy or torch)");
  return name == "torch" ? ArrayKind::torch : ArrayKind::numpy;
}

// (output, (out, lse, weights, mean_weights), q, k, v)
py::tuple from_output(const MultiHeadOutput& o, ArrayKind kind) {
  return py::make_tuple(to_python(o.output, kind), from_attention_output(o.attention, kind),
                        to_python(o.q, kind), to_python(o.k, kind), to_python(o.v, kind));
}

struct Inputs {
  KeepAlive keep;
  ArrayKind kind = ArrayKind::numpy;
  MultiHeadConfig config;
  MultiHeadWeights weights;
  Tensor query, key, value;
  AttentionParams params;
};

void read_inputs(Inputs& in, const py::dict& config, const py::dict& weights, py::handle query,
                 py::handle key, py::handle value, const py::dict& spec) {
  in.kind = kind_of(query);
  in.config = to_config(config);
  in.weights = to_weights(weights, in.keep);
  in.query = to_tensor(query, "query", in.keep).tensor;
  in.key = to_tensor(key, "key", in.keep).tensor;
  in.value = to_tensor(value, "value", in.keep).tensor;
  in.params = to_params(spec, in.keep);
}

py::tuple forward(const py::dict& config, const py::dict& weights, py::handle query,
                  py::handle key, py::handle value, const py::dict& spec, bool reference) {
  Inputs in;
  read_inputs(in, config, weights, query, key, value, spec);
  MultiHeadOutput out;
  {
    py::gil_scoped_release release;
    out = reference ? attn::reference::multihead_attention(in.config, in.weights, in.query,
                                                           in.key, in.value, in.params)
                    : attn::multihead_attention(in.config, in.weights, in.query, in.key,
                                                in.value, in.params);
  }
  return from_output(out, in.kind);
}

// saved = (output, out, lse, q, k, v) from the forward.
py::tuple backward(const py::dict& config, const py::dict& weights, py::handle query,
                   py::handle key, py::handle value, const py::dict& spec, const py::tuple& saved,
                   py::handle doutput, bool reference) {
  Inputs in;
  read_inputs(in, config, weights, query, key, value, spec);
  ATTN_CHECK(saved.size() == 6, "python", "saved: expected (output, out, lse, q, k, v)");
  MultiHeadOutput s;
  s.output = to_tensor(saved[0], "saved.output", in.keep).tensor;
  s.attention.out = to_tensor(saved[1], "saved.attention.out", in.keep).tensor;
  s.attention.lse = to_tensor(saved[2], "saved.attention.lse", in.keep).tensor;
  s.q = to_tensor(saved[3], "saved.q", in.keep).tensor;
  s.k = to_tensor(saved[4], "saved.k", in.keep).tensor;
  s.v = to_tensor(saved[5], "saved.v", in.keep).tensor;
  const Tensor dout = to_tensor(doutput, "doutput", in.keep).tensor;
  MultiHeadGrads g;
  {
    py::gil_scoped_release release;
    g = reference ? attn::reference::multihead_attention_backward(
                        in.config, in.weights, in.query, in.key, in.value, in.params, s, dout)
                  : attn::multihead_attention_backward(in.config, in.weights, in.query, in.key,
                                                       in.value, in.params, s, dout);
  }
  return py::make_tuple(to_python(g.dquery, in.kind), to_python(g.dkey, in.kind),
                        to_python(g.dvalue, in.kind), from_weights(g.dweights, in.kind),
                        from_attention_grads(g.attention, in.params, in.kind));
}

// A KV cache with the config it was made for.
struct PyKVCache {
  MultiHeadConfig config;
  KVCache cache;
};

py::tuple step(const py::dict& config, const py::dict& weights, PyKVCache& cache,
               py::handle query, py::handle key, py::handle value, const py::dict& spec) {
  Inputs in;
  read_inputs(in, config, weights, query, key, value, spec);
  MultiHeadOutput out;
  {
    py::gil_scoped_release release;
    out = attn::multihead_attention_step(in.config, in.weights, cache.cache, in.query, in.key,
                                         in.value, in.params);
  }
  return from_output(out, in.kind);
}

}  // namespace

void bind_multihead(py::module_& m) {
  m.def("multihead_attention", &forward, py::arg("config"), py::arg("weights"), py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("spec"), py::arg("reference") = false);
  m.def("multihead_attention_backward", &backward, py::arg("config"), py::arg("weights"),
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("spec"), py::arg("saved"),
        py::arg("doutput"), py::arg("reference") = false);
  m.def(
      "multihead_weights_init",
      [](const py::dict& config, const std::string& dtype, uint64_t seed, const std::string& kind) {
        MultiHeadWeights w;
        const MultiHeadConfig c = to_config(config);
        {
          py::gil_scoped_release release;
          w = MultiHeadWeights::init(c, parse_dtype(dtype), seed);
        }
        return from_weights(w, parse_kind(kind));
      },
      py::arg("config"), py::arg("dtype"), py::arg("seed"), py::arg("kind"));
  py::class_<PyKVCache>(m, "KVCache")
      .def(py::init([](const py::dict& config, int64_t batch, int64_t capacity,
                       const std::string& dtype) {
             PyKVCache c;
             c.config = to_config(config);
             // "int8": 8-bit storage (a float32 scale per block of 32 channels) for float32
             // queries.
             KVCacheOptions options{batch, capacity, DType::f32, dtype == "int8"};
             if (!options.int8) options.dtype = parse_dtype(dtype);
             c.cache = KVCache::create(c.config, options);
             return c;
           }),
           py::arg("config"), py::arg("batch"), py::arg("capacity"), py::arg("dtype"))
      .def_property_readonly("length", [](const PyKVCache& c) { return c.cache.length; })
      .def_property_readonly("capacity", [](const PyKVCache& c) { return c.cache.capacity(); })
      .def(
          "keys",
          [](const PyKVCache& c, const std::string& kind) {
            // An 8-bit cache's keys come back dequantised (a copy), as NumPy has no int8 blocks.
            return to_python(c.cache.is_int8() ? dequantize(c.cache.int8_keys()) : c.cache.keys(),
                             parse_kind(kind));
          },
          py::arg("kind"))
      .def(
          "values",
          [](const PyKVCache& c, const std::string& kind) {
            return to_python(c.cache.is_int8() ? dequantize(c.cache.int8_values()) : c.cache.values(),
                             parse_kind(kind));
          },
          py::arg("kind"))
      .def("append",
           [](PyKVCache& c, py::handle k, py::handle v) {
             KeepAlive keep;
             const Tensor tk = to_tensor(k, "new_k", keep).tensor;
             const Tensor tv = to_tensor(v, "new_v", keep).tensor;
             py::gil_scoped_release release;
             c.cache.append(tk, tv);
           })
      .def("clear", [](PyKVCache& c) { c.cache.clear(); });
  m.def("multihead_attention_step", &step, py::arg("config"), py::arg("weights"),
        py::arg("cache"), py::arg("query_step"), py::arg("key_step"), py::arg("value_step"),
        py::arg("spec"));
}

}  // namespace attn::python
