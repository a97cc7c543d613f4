#include "seq2seq/training/checkpoint_average.h"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "attn/error.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "average";
namespace fs = std::filesystem;

bool is_model_tensor(const std::string& name) { return name.rfind("model.", 0) == 0; }

// The metadata that says which model a checkpoint holds: its architecture and vocabularies.
// Training settings (learning rate, epochs) may differ between the files averaged.
bool identifies_model(const std::string& key) {
  return key == "format" || key == "version" || key.rfind("config.", 0) == 0 ||
         key == "source_vocab" || key == "target_vocab" || key == "source_subword" ||
         key == "target_subword";
}

std::string shape_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void check_same_model(const SafetensorsFile& file, const std::string& path,
                      const SafetensorsFile& last, const std::string& last_path) {
  auto model_keys = [](const SafetensorsFile& f) {
    std::map<std::string, std::string> keys;
    for (const auto& [k, v] : f.metadata)
      if (identifies_model(k)) keys.emplace(k, v);
    return keys;
  };
  const auto mine = model_keys(file), theirs = model_keys(last);
  for (const auto& [k, v] : theirs) {
    const auto it = mine.find(k);
    ATTN_CHECK(it != mine.end(), kOp, path, ": metadata has no \"", k, "\" but ", last_path,
               " has: not checkpoints of one model");
    ATTN_CHECK(it->second == v, kOp, path, ": metadata \"", k, "\" differs from ", last_path,
               k.find("vocab") != std::string::npos || k.find("subword") != std::string::npos
                   ? ""
                   : " (\"" + it->second + "\" against \"" + v + "\")",
               ": not checkpoints of one model");
  }
  for (const auto& [k, v] : mine)
    ATTN_CHECK(theirs.count(k), kOp, path, ": metadata \"", k, "\" is not in ", last_path,
               ": not checkpoints of one model");
  for (const std::string& name : last.names()) {
    if (!is_model_tensor(name)) continue;
    ATTN_CHECK(file.contains(name), kOp, path, ": no tensor ", name, " (", last_path, " has one)");
    const SafetensorsEntry& a = file.entry(name);
    const SafetensorsEntry& b = last.entry(name);
    ATTN_CHECK(a.shape == b.shape && a.dtype == b.dtype, kOp, path, ": ", name, " is ",
               st_dtype_name(a.dtype), " ", shape_string(a.shape), ", ", last_path, " has ",
               st_dtype_name(b.dtype), " ", shape_string(b.shape));
  }
  for (const std::string& name : file.names())
    ATTN_CHECK(!is_model_tensor(name) || last.contains(name), kOp, path, ": tensor ", name,
               " is not in ", last_path);
}

}  // namespace

SafetensorsFile average_checkpoints(const std::vector<std::string>& paths) {
  ATTN_CHECK(!paths.empty(), kOp, "no checkpoints to average");
  SafetensorsFile last = SafetensorsFile::load(paths.back());
  for (const std::string& name : last.names())
    if (is_model_tensor(name)) {
      const StDType dtype = last.entry(name).dtype;
      ATTN_CHECK(dtype == StDType::F32 || dtype == StDType::F64, kOp, paths.back(), ": ", name,
                 " is ", st_dtype_name(dtype), "; only F32 and F64 weights can be averaged");
    }
  std::map<std::string, std::vector<double>> sums;
  for (const std::string& name : last.names())
    if (is_model_tensor(name)) sums[name].assign(shape_numel(last.entry(name).shape), 0.0);
  // One file in memory at a time besides the last: a large model's checkpoints need not fit
  // together.
  for (std::size_t f = 0; f < paths.size(); ++f) {
    const bool is_last = f + 1 == paths.size();
    SafetensorsFile loaded = is_last ? SafetensorsFile{} : SafetensorsFile::load(paths[f]);
    const SafetensorsFile& file = is_last ? last : loaded;
    if (!is_last) check_same_model(file, paths[f], last, paths.back());
    for (auto& [name, sum] : sums) {
      const Tensor t = file.tensor(name).to(DType::f64);
      const double* p = t.data<double>();
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += p[i];
    }
  }
  SafetensorsFile out;
  out.metadata = last.metadata;
  nlohmann::json sources = nlohmann::json::array();
  for (const std::string& p : paths) sources.push_back(fs::path(p).filename().string());
  out.metadata["averaged_from"] = sources.dump();
  const double n = static_cast<double>(paths.size());
  for (const std::string& name : last.names()) {
    const SafetensorsEntry& e = last.entry(name);
    if (!is_model_tensor(name)) {
      out.add_raw(name, e.dtype, e.shape, e.data);
      continue;
    }
    std::vector<double>& sum = sums[name];
    for (double& v : sum) v /= n;
    const Tensor mean = Tensor::from(sum, e.shape);
    out.add(name, e.dtype == StDType::F32 ? mean.to(DType::f32) : mean);
  }
  return out;
}

std::vector<NumberedCheckpoint> numbered_checkpoints(const std::string& dir) {
  std::vector<NumberedCheckpoint> found;
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const std::string prefix = "checkpoint-", suffix = ".safetensors";
    if (name.size() <= prefix.size() + suffix.size() || name.rfind(prefix, 0) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const char* begin = name.data() + prefix.size();
    const char* end = name.data() + name.size() - suffix.size();
    int64_t step = 0;
    const auto [ptr, err] = std::from_chars(begin, end, step);
    if (err != std::errc{} || ptr != end || step < 0) continue;
    found.push_back({step, entry.path().string()});
  }
  std::sort(found.begin(), found.end(),
            [](const NumberedCheckpoint& a, const NumberedCheckpoint& b) { return a.step < b.step; });
  return found;
}

std::string keep_numbered_checkpoint(const std::string& checkpoint_path, int64_t step, int64_t keep) {
  ATTN_CHECK(keep >= 1, kOp, "keep must be >= 1, got ", keep);
  const fs::path dir = fs::path(checkpoint_path).parent_path();
  const std::string numbered =
      (dir / ("checkpoint-" + std::to_string(step) + ".safetensors")).string();
  write_file_atomically(numbered, read_file_bytes(checkpoint_path, kOp), "checkpoint");
  std::vector<NumberedCheckpoint> all = numbered_checkpoints(dir.empty() ? "." : dir.string());
  for (std::size_t i = 0; i + static_cast<std::size_t>(keep) < all.size(); ++i) {
    std::error_code ec;
    fs::remove(all[i].path, ec);  // best effort: a file left behind is only disk space
  }
  return numbered;
}

}  // namespace attn::seq2seq
