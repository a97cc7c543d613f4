#include "seq2seq/data/batching.h"

#include <algorithm>
#include <numeric>
#include <string_view>
#include <tuple>

#include "attn/error.h"
#include "attn/random.h"

namespace attn::seq2seq {

ExtendedSource extend_source(std::span<const int32_t> source, std::span<const int32_t> copy_map,
                             int64_t target_vocab_size) {
  const auto unk = static_cast<int32_t>(Vocab::unk_id);
  ExtendedSource out;
  out.copy_ids.reserve(source.size());
  std::vector<int32_t> extended_source_ids;  // source id of extended id V + k (sentences are short)
  for (std::size_t j = 0; j < source.size(); ++j) {
    const int32_t id = source[j];
    ATTN_CHECK(id >= 0, "extend_source", "negative source id ", id, " at position ", j);
    const bool mapped = id < static_cast<int64_t>(copy_map.size());
    if (mapped && (id < Vocab::num_special || copy_map[id] != unk)) {
      // A word both vocabularies know, or a special token (a copied <unk> stays <unk>).
      out.copy_ids.push_back(copy_map[id]);
      continue;
    }
    const auto it = std::find(extended_source_ids.begin(), extended_source_ids.end(), id);
    const int64_t k = it - extended_source_ids.begin();
    if (it == extended_source_ids.end()) {
      extended_source_ids.push_back(id);
      out.first_position.push_back(static_cast<int64_t>(j));
    }
    out.copy_ids.push_back(static_cast<int32_t>(target_vocab_size + k));
  }
  out.extra = static_cast<int64_t>(extended_source_ids.size());
  return out;
}

std::vector<int32_t> encode_source_words(const Vocab& source_vocab, const Tokens& source) {
  std::vector<int32_t> ids;
  std::vector<std::string_view> unknown;  // the k-th distinct word the vocabulary lacks
  for (const std::string& t : source) {
    if (source_vocab.contains(t)) {
      ids.push_back(static_cast<int32_t>(source_vocab.id(t)));
      continue;
    }
    const int64_t k = std::find(unknown.begin(), unknown.end(), std::string_view(t)) - unknown.begin();
    if (k == static_cast<int64_t>(unknown.size())) unknown.push_back(t);
    ids.push_back(static_cast<int32_t>(source_vocab.size() + k));
  }
  return ids;
}

Tokens copy_words(const Tokens& source, const ExtendedSource& extended) {
  Tokens words;
  for (int64_t j : extended.first_position) {
    ATTN_CHECK(j < static_cast<int64_t>(source.size()), "copy_words", "extended id at position ", j,
               " of a ", source.size(), "-token source");
    words.push_back(source[j]);
  }
  return words;
}

EncodedPair encode_pair(const Vocab& source_vocab, const Vocab& target_vocab,
                        const Tokens& source, const Tokens& target) {
  EncodedPair pair;
  for (const std::string& t : source) pair.source.push_back(static_cast<int32_t>(source_vocab.id(t)));
  for (const std::string& t : target) pair.target.push_back(static_cast<int32_t>(target_vocab.id(t)));
  // The copy map of the words this sentence uses (Seq2Seq::set_copy_map's, restricted).
  const std::vector<int32_t> words = encode_source_words(source_vocab, source);
  std::vector<int32_t> copy_map(source_vocab.size(), static_cast<int32_t>(Vocab::unk_id));
  for (int64_t id = 0; id < Vocab::num_special; ++id)
    copy_map[id] = static_cast<int32_t>(target_vocab.id(source_vocab.token(id)));
  for (int32_t id : words)
    if (id < source_vocab.size()) copy_map[id] = static_cast<int32_t>(target_vocab.id(source_vocab.token(id)));
  const ExtendedSource extended = extend_source(words, copy_map, target_vocab.size());
  pair.source_copy = extended.copy_ids;
  pair.target_copy = pair.target;
  for (std::size_t t = 0; t < target.size(); ++t) {
    if (pair.target[t] != Vocab::unk_id) continue;
    const auto at = std::find(source.begin(), source.end(), target[t]);
    if (at == source.end()) continue;
    const int32_t id = pair.source_copy[at - source.begin()];
    if (id >= target_vocab.size()) pair.target_copy[t] = id;
  }
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
  // The extended vocabulary goes in only when every pair has one (pairs built from ids alone
  // have none); a pair whose copy ids do not match its tokens is a caller's bug.
  int64_t with_copy = 0;
  for (int64_t i : index) {
    const EncodedPair& p = pairs[i];
    if (p.source_copy.empty() && p.target_copy.empty()) continue;
    ATTN_CHECK(p.source_copy.size() == p.source.size() && p.target_copy.size() == p.target.size(),
               "batch", "pair ", i, " has ", p.source_copy.size(), " source copy ids for ",
               p.source.size(), " tokens and ", p.target_copy.size(), " target copy ids for ",
               p.target.size());
    ++with_copy;
  }
  ATTN_CHECK(with_copy == 0 || with_copy == B, "batch", with_copy, " of ", B,
             " pairs carry an extended vocabulary: all or none must");
  const bool extended = with_copy == B;
  batch.source.assign(B * S, static_cast<int32_t>(Vocab::pad_id));
  batch.target_input.assign(T * B, static_cast<int32_t>(Vocab::pad_id));
  batch.target_output.assign(T * B, static_cast<int32_t>(Vocab::pad_id));
  if (extended) batch.source_copy.assign(B * S, static_cast<int32_t>(Vocab::pad_id));
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
  batch.target_copy = batch.target_output;
  if (extended) {
    for (int64_t b = 0; b < B; ++b) {
      const EncodedPair& p = pairs[index[b]];
      const int64_t s_len = static_cast<int64_t>(p.source.size());
      for (int64_t s = 0; s < s_len; ++s) batch.source_copy[b * S + s] = p.source_copy[s];
      batch.source_copy[b * S + s_len] = static_cast<int32_t>(Vocab::eos_id);
      for (std::size_t t = 0; t < p.target_copy.size(); ++t) batch.target_copy[t * B + b] = p.target_copy[t];
    }
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
  batch.target_copy.clear();
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
