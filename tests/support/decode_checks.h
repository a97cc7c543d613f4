// Checks shared by the decoding tests of both translator architectures (test_seq2seq_model,
// test_transformer_translator): beam search of width 1 against greedy search, and the
// teacher-forced log-probability a beam hypothesis must report. Header-only.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attn/tensor.h"
#include "seq2seq/data/batching.h"
#include "seq2seq/decoding/decode.h"
#include "support/test_support.h"

namespace attn::testing {

// Beam search of width 1 is greedy search exactly (decode.h breaks ties so): the same tokens,
// end, log-probability and alignment for the source of every pair. `config` sets the rest of
// the search (max_length). Returns the greedy translations, for further checks. Model: Seq2Seq
// or TransformerSeq2Seq.
template <class Model>
std::vector<seq2seq::Translation> expect_beam_of_one_is_greedy(
    const Model& model, const std::vector<seq2seq::EncodedPair>& pairs,
    seq2seq::DecodeConfig config) {
  config.beam = 1;
  std::vector<seq2seq::Translation> greedy_translations;
  for (const auto& pair : pairs) {
    const seq2seq::Translation greedy = seq2seq::greedy_decode(model, {pair.source}, config)[0];
    const seq2seq::Translation beam = seq2seq::beam_decode(model, pair.source, config);
    EXPECT_EQ(greedy.tokens, beam.tokens);
    EXPECT_EQ(greedy.finished, beam.finished);
    EXPECT_DOUBLE_EQ(greedy.log_prob, beam.log_prob);
    EXPECT_EQ(greedy.alignment, beam.alignment);
    greedy_translations.push_back(greedy);
  }
  return greedy_translations;
}

// Batched beam search gives each sentence the search it gets alone: the same tokens, end and
// n-best tokens, and log-probabilities and alignments equal within float32 rounding (the batch
// changes only how the GEMMs block their rows). `width` is the model's hidden width (the length
// of the reductions behind each logit).
template <class Model>
void expect_batched_beam_matches_single(const Model& model,
                                        const std::vector<seq2seq::EncodedPair>& pairs,
                                        const seq2seq::DecodeConfig& config, int64_t width) {
  std::vector<std::vector<int32_t>> sources;
  for (const auto& pair : pairs) sources.push_back(pair.source);
  const std::vector<seq2seq::Translation> batched = seq2seq::beam_decode(model, sources, config);
  ASSERT_EQ(batched.size(), sources.size());
  const Tolerance tol = tolerance_for(DType::f32, width);
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const seq2seq::Translation alone = seq2seq::beam_decode(model, sources[i], config);
    const seq2seq::Translation& b = batched[i];
    EXPECT_EQ(b.tokens, alone.tokens) << "sentence " << i;
    EXPECT_EQ(b.finished, alone.finished) << "sentence " << i;
    const double steps = static_cast<double>(alone.tokens.size() + 1);
    EXPECT_NEAR(b.log_prob, alone.log_prob, steps * (tol.atol + tol.rtol * std::abs(alone.log_prob)))
        << "sentence " << i;
    ASSERT_EQ(b.nbest.size(), alone.nbest.size()) << "sentence " << i;
    for (std::size_t n = 0; n < b.nbest.size(); ++n)
      EXPECT_EQ(b.nbest[n].tokens, alone.nbest[n].tokens) << "sentence " << i << ", n-best " << n;
    ASSERT_EQ(b.alignment.size(), alone.alignment.size()) << "sentence " << i;
    for (std::size_t t = 0; t < b.alignment.size(); ++t) {
      ASSERT_EQ(b.alignment[t].size(), alone.alignment[t].size()) << "sentence " << i << ", step " << t;
      for (std::size_t j = 0; j < b.alignment[t].size(); ++j)
        EXPECT_NEAR(b.alignment[t][j], alone.alignment[t][j], tol.atol + tol.rtol)
            << "sentence " << i << ", step " << t << ", source position " << j;
    }
  }
}

// Teacher-forced log-probability of batch row 0's targets over the first `steps` steps:
// sum_t log softmax(logits[t, 0])[targets[t]], in float64 with the max shifted out.
// logits: [T, B, V]; targets: the batch's target_output ([T, B] row-major, so t for B = 1).
inline double teacher_forced_log_prob(const Tensor& logits, const std::vector<int32_t>& targets,
                                      int64_t steps) {
  const int64_t V = logits.size(2);
  double log_prob = 0.0;
  for (int64_t t = 0; t < steps; ++t) {
    double mx = -INFINITY, sum = 0.0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits.get({t, 0, v}));
    for (int64_t v = 0; v < V; ++v) sum += std::exp(logits.get({t, 0, v}) - mx);
    log_prob += logits.get({t, 0, targets[static_cast<std::size_t>(t)]}) - mx - std::log(sum);
  }
  return log_prob;
}

}  // namespace attn::testing
