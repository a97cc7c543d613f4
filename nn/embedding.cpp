#include "nn/embedding.h"

#include <cstring>

#include "attn/profile.h"
#include "nn/linear.h"

namespace attn::nn {

namespace {
constexpr const char* kOp = "embedding";

// Validates ids against the table and fills in the default shape.
TokenIds checked_ids(const TokenIds& in, int64_t vocab) {
  TokenIds ids = in;
  if (ids.shape.empty()) ids.shape = {static_cast<int64_t>(ids.ids.size())};
  for (int64_t d : ids.shape)
    ATTN_CHECK(d >= 0, kOp, "ids shape ", shape_str(ids.shape), " has a negative size");
  ATTN_CHECK(shape_numel(ids.shape) == static_cast<int64_t>(ids.ids.size()), kOp, "ids shape ",
             shape_str(ids.shape), " holds ", shape_numel(ids.shape), " ids, got ", ids.ids.size());
  for (std::size_t i = 0; i < ids.ids.size(); ++i)
    ATTN_CHECK(ids.ids[i] >= 0 && ids.ids[i] < vocab, kOp, "token id ", ids.ids[i], " at position ",
               i, " is out of range for ", vocab, " embeddings");
  return ids;
}
}  // namespace

Embedding Embedding::create(const EmbeddingConfig& config, uint64_t seed) {
  ATTN_CHECK(config.num_embeddings >= 0 && config.dim >= 0, kOp,
             "sizes must be >= 0, got num_embeddings ", config.num_embeddings, ", dim ",
             config.dim);
  Tensor weight = Tensor::empty({config.num_embeddings, config.dim}, config.dtype);
  init_normal(weight, 0.0, 1.0, seed, 0);
  if (config.padding_id) {
    ATTN_CHECK(*config.padding_id >= 0 && *config.padding_id < config.num_embeddings, kOp,
               "padding id ", *config.padding_id, " is out of range for ", config.num_embeddings,
               " embeddings");
    weight.select(0, *config.padding_id).fill(0.0);
  }
  return from_weight(weight, config.padding_id);
}

Embedding Embedding::from_weight(Tensor weight, std::optional<int32_t> padding_id) {
  ATTN_CHECK(weight.defined() && weight.dim() == 2, kOp, "weight must be [V, C], got ",
             weight.defined() ? weight.shape_str() : "undefined");
  visit_float(weight.dtype(), kOp, "weight", [](auto) {});
  if (padding_id)
    ATTN_CHECK(*padding_id >= 0 && *padding_id < weight.size(0), kOp, "padding id ", *padding_id,
               " is out of range for ", weight.size(0), " embeddings");
  Embedding e;
  e.weight = weight.contiguous();
  e.weight_grad = zeros_like(e.weight);
  e.padding_id = padding_id;
  return e;
}

EmbeddingForward Embedding::forward(const TokenIds& in) const {
  ATTN_PROFILE_SCOPE("embedding.gather");
  ATTN_CHECK(weight.defined() && weight.dim() == 2 && weight.is_contiguous(), kOp,
             "weight must be a contiguous [V, C] tensor, got ",
             weight.defined() ? weight.shape_str() : "undefined");
  TokenIds ids = checked_ids(in, num_embeddings());
  const int64_t c = dim();
  Shape out_shape = ids.shape;
  out_shape.push_back(c);
  Tensor out = Tensor::empty(out_shape, weight.dtype());
  const std::size_t row_bytes = static_cast<std::size_t>(c) * dtype_size(weight.dtype());
  const auto* table = static_cast<const std::byte*>(weight.raw_data());
  auto* dst = static_cast<std::byte*>(out.raw_data());
  for (std::size_t i = 0; i < ids.ids.size(); ++i)
    if (row_bytes) std::memcpy(dst + i * row_bytes, table + ids.ids[i] * row_bytes, row_bytes);
  return {out, {std::move(ids)}};
}

void Embedding::backward(const EmbeddingCache& cache, const Tensor& dout) {
  ATTN_PROFILE_SCOPE("embedding.scatter_add");
  const TokenIds ids = checked_ids(cache.ids, num_embeddings());
  Shape out_shape = ids.shape;
  out_shape.push_back(dim());
  ATTN_CHECK(dout.defined() && dout.shape() == out_shape, kOp, "dout is ",
             dout.defined() ? dout.shape_str() : "undefined", ", output was ",
             shape_str(out_shape));
  ATTN_CHECK(dout.dtype() == weight.dtype(), kOp, "dout is ", dtype_name(dout.dtype()),
             ", weight is ", dtype_name(weight.dtype()));
  ATTN_CHECK(weight_grad.defined() && weight_grad.shape() == weight.shape() &&
                 weight_grad.dtype() == weight.dtype() && weight_grad.is_contiguous(),
             kOp, "weight_grad must be a contiguous tensor shaped like the weight ",
             weight.shape_str());
  const Tensor dc = dout.contiguous();
  visit_float(dc.dtype(), kOp, "dout", [&](auto tag) {
    using T = decltype(tag);
    const int64_t c = dim();
    const T* pd = dc.data<T>();
    T* g = weight_grad.data<T>();
    for (std::size_t i = 0; i < ids.ids.size(); ++i) {
      const int32_t id = ids.ids[i];
      if (padding_id && id == *padding_id) continue;  // <pad> stays a zero vector
      for (int64_t j = 0; j < c; ++j) g[id * c + j] += pd[static_cast<int64_t>(i) * c + j];
    }
  });
}

void Embedding::parameters(const std::string& prefix, ParameterList& list) const {
  add_parameter(list, prefix, "weight", weight, weight_grad);
}

}  // namespace attn::nn
