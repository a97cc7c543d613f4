// The translator from Python: a model trained by `attn train`, its translations and alignments.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "attn/runtime.h"
#include "bindings.h"
#include "convert.h"
#include "seq2seq/decoding/heatmap.h"
#include "seq2seq/training/train.h"
#include "seq2seq/data/vocab.h"

namespace attn::python {

namespace {

namespace s2s = attn::seq2seq;

// Model output as a Python str: an undertrained subword model can emit byte pieces that do not
// form valid UTF-8; those bytes become U+FFFD (as bytes.decode("utf-8", "replace") does) rather
// than raising in the middle of a batch.
py::str text(const std::string& s) {
  PyObject* u = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (u == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(u);
}

py::list texts(const s2s::Tokens& tokens) {
  py::list out;
  for (const std::string& t : tokens) out.append(text(t));
  return out;
}

// One translation as a dict: text, tokens, source_tokens (with <eos>), target_tokens (the
// alignment's rows: the output tokens, then <eos> when it was emitted), alignment
// [rows, len(source_tokens)] float64 (None for a model without attention), log_prob, score,
// finished.
py::dict to_dict(const s2s::Translator& translator, const s2s::Translation& t,
                 s2s::Tokens source) {
  py::dict d;
  s2s::Tokens target = translator.target_tokens(t);
  d["text"] = text(translator.target_text(t));  // cased and detokenised with a subword model
  d["tokens"] = texts(target);
  source.push_back("<eos>");
  if (t.finished) target.push_back("<eos>");
  d["source_tokens"] = texts(source);
  d["target_tokens"] = texts(target);
  d["log_prob"] = t.log_prob;
  d["score"] = t.score;
  d["finished"] = t.finished;
  if (t.alignment.empty()) {
    d["alignment"] = py::none();
  } else {
    const auto rows = static_cast<int64_t>(t.alignment.size());
    const auto cols = static_cast<int64_t>(t.alignment.front().size());
    Tensor a = Tensor::empty({rows, cols}, DType::f64);
    double* p = a.data<double>();
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) p[i * cols + j] = t.alignment[i][j];
    d["alignment"] = to_python(a, ArrayKind::numpy);
  }
  return d;
}

// Translates the non-blank sentences; a blank one gives None (the Python side makes it an empty
// translation). Input longer than the model's training --max-source is refused, naming it.
py::list translate(const s2s::Translator& translator, const std::vector<std::string>& sentences,
                   int64_t beam, double length_penalty, int64_t max_length) {
  std::vector<std::string> todo;
  std::vector<std::size_t> index;
  const int64_t limit = translator.max_source_tokens();
  for (std::size_t i = 0; i < sentences.size(); ++i) {
    if (sentences[i].find_first_not_of(" \t\r\n") == std::string::npos) continue;
    const auto tokens = static_cast<int64_t>(translator.source_tokens(sentences[i]).size());
    ATTN_CHECK(tokens <= limit, "translate", "sentence ", i, " has ", tokens,
               " tokens; the model takes at most ", limit,
               " (its training --max-source, <eos> excluded); split it");
    todo.push_back(sentences[i]);
    index.push_back(i);
  }
  s2s::DecodeConfig config;
  config.beam = beam;
  config.length_penalty = length_penalty;
  config.max_length = max_length;
  std::vector<s2s::Translation> out;
  std::vector<s2s::Tokens> sources;
  if (!todo.empty()) {
    py::gil_scoped_release release;
    out = translator.translate(todo, config, &sources);
  }
  py::list result;
  for (std::size_t i = 0; i < sentences.size(); ++i) result.append(py::none());
  for (std::size_t n = 0; n < out.size(); ++n)
    result[index[n]] = to_dict(translator, out[n], sources[n]);
  return result;
}

}  // namespace

void bind_translator(py::module_& m) {
  py::class_<s2s::Translator>(m, "Translator")
      .def_static(
          "load",
          [](const std::string& path) {
            py::gil_scoped_release release;
            return s2s::Translator::load(path);
          },
          py::arg("path"))
      .def("translate", &translate, py::arg("sentences"), py::arg("beam"),
           py::arg("length_penalty"), py::arg("max_length"))
      .def_property_readonly("max_source_tokens", &s2s::Translator::max_source_tokens)
      .def("source_tokens", &s2s::Translator::source_tokens, py::arg("sentence"))
      .def_property_readonly("source_vocab_size",
                             [](const s2s::Translator& t) { return t.source_vocab.size(); })
      .def_property_readonly("target_vocab_size",
                             [](const s2s::Translator& t) { return t.target_vocab.size(); });
  m.def("terminal_heatmap", &s2s::terminal_heatmap, py::arg("source"), py::arg("target"),
        py::arg("weights"));
  m.def("set_num_threads", &s2s::set_thread_count, py::arg("threads"));
}

}  // namespace attn::python
