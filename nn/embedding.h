// Embedding: a lookup table of token vectors.
//
// Letters: V vocabulary size, C embedding width; ids have any shape S (usually [B, T]).
//
//   ids S (int32)  ->  out [S..., C],   out[s] = weight[ids[s]],   weight [V, C]
//
// The padding id (optional) is the row of <pad>: it is initialised to zero and never receives a
// gradient, so padding positions stay zero vectors through training, as in PyTorch.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attn/tensor.h"
#include "nn/parameters.h"

namespace attn::nn {

// Token ids with their shape (row-major); shape {ids.size()} when left empty.
struct TokenIds {
  std::vector<int32_t> ids;
  Shape shape;
};

struct EmbeddingConfig {
  int64_t num_embeddings = 0;  // V
  int64_t dim = 0;             // C
  std::optional<int32_t> padding_id;
  DType dtype = DType::f32;
};

struct EmbeddingCache {
  TokenIds ids;  // with the shape filled in
};

struct EmbeddingForward {
  Tensor out;
  EmbeddingCache cache;
};

struct Embedding {
  Tensor weight;       // [V, C]
  Tensor weight_grad;  // [V, C]; backward accumulates into it
  std::optional<int32_t> padding_id;

  // PyTorch's nn.Embedding initialisation: N(0, 1), the padding row zero.
  static Embedding create(const EmbeddingConfig& config, uint64_t seed);
  static Embedding from_weight(Tensor weight, std::optional<int32_t> padding_id = std::nullopt);

  int64_t num_embeddings() const { return weight.size(0); }
  int64_t dim() const { return weight.size(1); }

  // Throws "[embedding] token id 12 at position 3 is out of range for 10 embeddings".
  EmbeddingForward forward(const TokenIds& ids) const;
  // dout [S..., C]; adds each row into weight_grad[id] (rows of repeated ids sum). Returns
  // nothing: ids are not differentiable.
  void backward(const EmbeddingCache& cache, const Tensor& dout);

  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad() { weight_grad.fill(0.0); }
};

}  // namespace attn::nn
