// The parts of attn._core defined outside module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace attn::python {

// multihead_attention, its backward, the weight initialiser, KVCache and the decoder step.
void bind_multihead(pybind11::module_& m);
// Translator: load a model trained by `attn train`, translate, alignments; thread count.
void bind_translator(pybind11::module_& m);

}  // namespace attn::python
