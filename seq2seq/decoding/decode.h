// Decoding: greedy search and beam search with length normalisation, returning the tokens and
// the alignment (the attention weights of every output step over the source).
//
// Beam search (Sutskever et al. 2014; Wu et al. 2016 for the length penalty): keeps the K best
// partial translations by summed log-probability; a hypothesis that emits <eos> is finished and
// ranked by score / length^alpha (length counts <eos>; alpha = 0 ranks by raw log-probability).
// The search stops when K hypotheses are finished or max_length steps have been taken. Ties are
// broken by the lower beam index, then the lower token id, so beam 1 is exactly greedy search.
// Several sentences search together in one batch: every step is one model call over the live
// hypotheses of all of them, and a finished sentence leaves the batch.
//
// Both architectures decode through the same search: the recurrent Seq2Seq carries its state
// from step to step, the Transformer keeps each decoder layer's KV cache and feeds one token
// per step; beam search reorders (and duplicates) either state's rows as hypotheses are chosen.
#pragma once

#include <cstdint>
#include <vector>

#include "seq2seq/data/batching.h"
#include "seq2seq/models/model.h"
#include "seq2seq/models/transformer_model.h"

namespace attn::seq2seq {

struct DecodeConfig {
  int64_t beam = 1;              // 1: greedy
  double length_penalty = 1.0;   // alpha
  int64_t max_length = 0;        // output tokens, <eos> included; 0: 2 x source length + 10
  bool alignment = true;         // fill Translation::alignment
  int64_t nbest = 1;             // > 1 (beam search only, at most beam): fill Translation::nbest
};

struct Translation {
  std::vector<int32_t> tokens;  // without <eos>
  double log_prob = 0.0;        // sum of log p over tokens and <eos>
  double score = 0.0;           // log_prob / length^alpha
  bool finished = false;        // emitted <eos> within max_length
  // alignment[i][j]: weight of output step i (tokens then <eos>) on source position j (source
  // tokens then <eos>). Empty for the no-attention baseline.
  std::vector<std::vector<double>> alignment;
  // A copying model's tokens may be extended ids V + k (batching.h): copied_words[k] is the
  // source word behind V + k (filled by Translator::translate).
  Tokens copied_words;
  // With DecodeConfig::nbest > 1: the nbest best-scoring hypotheses the beam finished (or, when
  // fewer finished, the unfinished ones), best first; nbest[0] is this translation. Each has
  // its own tokens, scores and alignment, and an empty nbest.
  std::vector<Translation> nbest;
};

// A hypothesis's rank: log_prob / length^alpha (length counts <eos> when it finished);
// alpha = 0 is the log-probability itself.
double length_normalised_score(double log_prob, int64_t length, double alpha);

// Sources are id sequences without <eos> (make_source_batch appends it).
std::vector<Translation> greedy_decode(const Seq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config = {});
// Beam search of several sentences in one batch (each sentence's result is the one it gets
// alone: the batch only shares the model calls), and of one.
std::vector<Translation> beam_decode(const Seq2Seq& model,
                                     const std::vector<std::vector<int32_t>>& sources,
                                     const DecodeConfig& config);
Translation beam_decode(const Seq2Seq& model, const std::vector<int32_t>& source,
                        const DecodeConfig& config);
// Batched greedy search for beam 1, else batched beam search.
std::vector<Translation> translate_ids(const Seq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config = {});

// The same searches for the Transformer; the alignment is the last decoder layer's
// cross-attention averaged over heads.
std::vector<Translation> greedy_decode(const TransformerSeq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config = {});
std::vector<Translation> beam_decode(const TransformerSeq2Seq& model,
                                     const std::vector<std::vector<int32_t>>& sources,
                                     const DecodeConfig& config);
Translation beam_decode(const TransformerSeq2Seq& model, const std::vector<int32_t>& source,
                        const DecodeConfig& config);
std::vector<Translation> translate_ids(const TransformerSeq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config = {});

}  // namespace attn::seq2seq
