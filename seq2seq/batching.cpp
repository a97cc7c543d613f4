#include "seq2seq/batching.h"

#include <algorithm>
#include <numeric>
#include <tuple>

#include "attn/error.h"
#include "attn/random.h"

namespace attn::seq2seq {

EncodedPair encode_pair(const Vocab& source_vocab, const Vocab& target_vocab,
                        const Tokens& source, const Tokens& target) {
  EncodedPair pair;
  for (const std::string& t : source) pair.source.push_back(static_cast<int32_t>(source_vocab.id(t)));
  for (const std::string& t : target) pair.target.push_back(static_cast<int32_t>(target_vocab.id(t)));
  return pair;
}

Batch make_batch(const std::vector<EncodedPair>& pairs, const std::vector<int64_t>& index) {
  ATTN_CHECK(!index.empty(), "batch", "a batch needs at least one pair");
  Batch batch;
  const int64_t B = static_cast<int64_t>(index.size());
  batch.batch = B;
  batch.pair_index = index;
  for (int64_t i : index) {
    ATTN_CHECK(0 <= i && i < static_cast<int64_t>(pairs.size()), "batch", "pair index ", i,
               " out of range for ", pairs.size(), " pairs");
    batch.source_steps = std::max<int64_t>(batch.source_steps, pairs[i].source.size() + 1);
    batch.target_steps = std::max<int64_t>(batch.target_steps, pairs[i].target.size() + 1);
  }
  const int64_t S = batch.source_steps, T = batch.target_steps;
  batch.source.assign(B * S, static_cast<int32_t>(Vocab::pad_id));
  batch.target_input.assign(T * B, static_cast<int32_t>(Vocab::pad_id));
  batch.target_output.assign(T * B, static_cast<int32_t>(Vocab::pad_id));
  for (int64_t b = 0; b < B; ++b) {
    const EncodedPair& p = pairs[index[b]];
    const int64_t s_len = static_cast<int64_t>(p.source.size());
    const int64_t t_len = static_cast<int64_t>(p.target.size());
    for (int64_t s = 0; s < s_len; ++s) batch.source[b * S + s] = p.source[s];
    batch.source[b * S + s_len] = static_cast<int32_t>(Vocab::eos_id);
    batch.source_lengths.push_back(s_len + 1);
    batch.target_input[0 * B + b] = static_cast<int32_t>(Vocab::bos_id);
    for (int64_t t = 0; t < t_len; ++t) {
      batch.target_input[(t + 1) * B + b] = p.target[t];
      batch.target_output[t * B + b] = p.target[t];
    }
    batch.target_output[t_len * B + b] = static_cast<int32_t>(Vocab::eos_id);
    batch.target_lengths.push_back(t_len + 1);
    batch.target_tokens += t_len + 1;
  }
  return batch;
}

Batch make_source_batch(const std::vector<std::vector<int32_t>>& sources) {
  std::vector<EncodedPair> pairs;
  std::vector<int64_t> index;
  for (const auto& s : sources) {
    index.push_back(static_cast<int64_t>(pairs.size()));
    pairs.push_back({s, {}});
  }
  Batch batch = make_batch(pairs, index);
  batch.target_input.clear();
  batch.target_output.clear();
  batch.target_lengths.clear();
  batch.target_steps = 0;
  batch.target_tokens = 0;
  return batch;
}

std::vector<std::vector<int64_t>> bucket_batches(const std::vector<EncodedPair>& pairs,
                                                 int64_t batch_size, uint64_t seed) {
  ATTN_CHECK(batch_size >= 1, "batch", "batch size must be >= 1, got ", batch_size);
  std::vector<int64_t> order(pairs.size());
  std::iota(order.begin(), order.end(), 0);
  // The hash breaks ties so equal-length pairs do not always batch in file order.
  auto key = [&](int64_t i) {
    return std::make_tuple(pairs[i].source.size(), pairs[i].target.size(),
                           mix64(seed ^ mix64(static_cast<uint64_t>(i))));
  };
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
  std::vector<std::vector<int64_t>> batches;
  for (std::size_t start = 0; start < order.size(); start += batch_size) {
    const std::size_t end = std::min(order.size(), start + static_cast<std::size_t>(batch_size));
    batches.emplace_back(order.begin() + start, order.begin() + end);
  }
  return batches;
}

std::vector<int64_t> epoch_order(int64_t num_batches, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(num_batches);
  std::iota(order.begin(), order.end(), 0);
  uint64_t state = mix64(seed ^ mix64(0x5eed0000ULL + static_cast<uint64_t>(epoch)));
  for (int64_t i = num_batches - 1; i > 0; --i) {
    state = mix64(state + 0x9e3779b97f4a7c15ULL);
    const int64_t j = static_cast<int64_t>(state % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

}  // namespace attn::seq2seq
