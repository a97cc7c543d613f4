// Batches of sentence pairs of similar lengths, padded, in a reproducible order.
//
// Letters: B sentences in a batch, S longest source (tokens, <eos> included), T longest target
// step count (the decoder reads <bos> y_1 .. y_n and predicts y_1 .. y_n <eos>, so T = n + 1).
//
// Bucketing: pairs are sorted by (source length, target length, a seeded hash of the index) and
// cut into consecutive batches of batch_size, so each batch pads little. Every epoch visits the
// batches in a permutation that is a pure function of (seed, epoch) (Fisher-Yates driven by
// SplitMix64), so a run can be resumed from (epoch, batch position) alone.
//
// Extended vocabulary for copying (the pointer-generator of See et al. 2017, section 2.2), one
// per sentence: with a target vocabulary of V words, the distinct source words the target
// vocabulary lacks get the temporary target ids V, V + 1, ... in order of first occurrence in
// that sentence. A source token's "copy id" is then its target id when both vocabularies know
// the word, else its extended id; the copy distribution of a copying model covers V + X ids
// (X: the most extended ids of any sentence in the batch; a sentence with fewer leaves the rest
// at probability 0). Where a gold target word is missing from the target vocabulary but occurs
// in the source, the copy target (Batch::target_copy) is its extended id instead of <unk>, so
// the loss teaches the model to copy it. When decoding, extended ids map back to the source
// words (copy_words) and are fed to the decoder as <unk>.
// A source word absent from the source vocabulary reaches a model as <unk> in Batch::source;
// for decoding it may instead be given the id source_vocab.size() + k (encode_source_words),
// which keeps different unknown words apart so that each gets its own extended id.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

// One pair as vocabulary ids, without <bos>/<eos>.
struct EncodedPair {
  std::vector<int32_t> source;
  std::vector<int32_t> target;
  // The extended vocabulary (above); empty in pairs built from ids alone, for which a copying
  // model derives copy ids from the source ids (Seq2Seq::copy_map) and copy targets are `target`.
  std::vector<int32_t> source_copy;  // copy id of each source token
  std::vector<int32_t> target_copy;  // `target` with copyable unknown words as extended ids
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
  // Extended vocabulary (above), when every pair carries one; else empty.
  // [B, S] like `source`: copy ids of the tokens, <eos>, then <pad>.
  std::vector<int32_t> source_copy;
  // [T, B] like target_output, with the extended ids of copyable unknown words; equal to
  // target_output when the pairs carry no extended vocabulary. A copying model's loss target.
  std::vector<int32_t> target_copy;
};

// The copy ids of one source sentence and the extended ids it introduces.
struct ExtendedSource {
  std::vector<int32_t> copy_ids;       // one per source token
  int64_t extra = 0;                   // X: extended ids V .. V + X - 1
  std::vector<int64_t> first_position; // size X: where extended id V + k first occurs
};

// The extended vocabulary of a source sentence given as ids: `copy_map[id]` is the target id of
// source id `id` (<unk> when the target vocabulary lacks the word). Ids outside copy_map (the
// encode_source_words ids of unknown words) and ids whose copy_map entry is <unk> get extended
// ids, one per distinct source id; the special tokens (<unk> included) keep their copy_map entry.
ExtendedSource extend_source(std::span<const int32_t> source, std::span<const int32_t> copy_map,
                             int64_t target_vocab_size);

// Source ids for a copying model's decoder: like source_vocab.encode, except that the k-th
// distinct word missing from the source vocabulary gets source_vocab.size() + k.
std::vector<int32_t> encode_source_words(const Vocab& source_vocab, const Tokens& source);

// The words behind a sentence's extended ids: copy_words(tokens, extend_source(...))[k] is the
// source word of extended id V + k.
Tokens copy_words(const Tokens& source, const ExtendedSource& extended);

// Encodes tokenised text with the two vocabularies (unknown words map to <unk>) and fills the
// extended vocabulary: source_copy from extend_source over encode_source_words, target_copy from
// the first source occurrence of each target word the target vocabulary lacks.
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
