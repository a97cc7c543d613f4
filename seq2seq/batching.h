// Batches of sentence pairs of similar lengths, padded, in a reproducible order.
//
// Letters: B sentences in a batch, S longest source (tokens, <eos> included), T longest target
// step count (the decoder reads <bos> y_1 .. y_n and predicts y_1 .. y_n <eos>, so T = n + 1).
//
// Bucketing: pairs are sorted by (source length, target length, a seeded hash of the index) and
// cut into consecutive batches of batch_size, so each batch pads little. Every epoch visits the
// batches in a permutation that is a pure function of (seed, epoch) (Fisher-Yates driven by
// SplitMix64), so a run can be resumed from (epoch, batch position) alone.
#pragma once

#include <cstdint>
#include <vector>

#include "seq2seq/vocab.h"

namespace attn::seq2seq {

// One pair as vocabulary ids, without <bos>/<eos>.
struct EncodedPair {
  std::vector<int32_t> source;
  std::vector<int32_t> target;
};

struct Batch {
  int64_t batch = 0;          // B
  int64_t source_steps = 0;   // S
  int64_t target_steps = 0;   // T
  // [B, S] row-major: source ids then <eos>, then <pad>.
  std::vector<int32_t> source;
  std::vector<int64_t> source_lengths;  // size B, <eos> included
  // [T, B] time-major (one decoder step's ids are contiguous): <bos> y_1 .. y_n, then <pad>.
  std::vector<int32_t> target_input;
  // [T, B] time-major: y_1 .. y_n <eos>, then <pad> (ignored by the loss).
  std::vector<int32_t> target_output;
  std::vector<int64_t> target_lengths;  // size B, <eos> included
  int64_t target_tokens = 0;            // non-pad entries of target_output
  std::vector<int64_t> pair_index;      // which input pairs, in batch row order
};

// Encodes tokenised text with the two vocabularies (unknown words map to <unk>).
EncodedPair encode_pair(const Vocab& source_vocab, const Vocab& target_vocab,
                        const Tokens& source, const Tokens& target);

// Pads the pairs `index` into a batch. Throws when `index` is empty.
Batch make_batch(const std::vector<EncodedPair>& pairs, const std::vector<int64_t>& index);

// A batch of sources only (for decoding): target fields stay empty.
Batch make_source_batch(const std::vector<std::vector<int32_t>>& sources);

// Length-bucketed batches: lists of pair indices, each of at most batch_size.
std::vector<std::vector<int64_t>> bucket_batches(const std::vector<EncodedPair>& pairs,
                                                 int64_t batch_size, uint64_t seed);

// The order in which epoch `epoch` visits `num_batches` batches: a permutation of 0..n-1, a pure
// function of (seed, epoch).
std::vector<int64_t> epoch_order(int64_t num_batches, uint64_t seed, int64_t epoch);

}  // namespace attn::seq2seq
