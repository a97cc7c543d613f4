// The Transformer translator (seq2seq/models/transformer_model.h): gradients against finite differences
// (float64, dropout on, every layout), KV-cache step decoding equal to the teacher-forced forward,
// beam search over reordered caches, a tiny training run that learns, and checkpoints that
// resume bit for bit and load as a translator.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <ostream>
#include <string>
#include <unistd.h>
#include <variant>
#include <vector>

#include "seq2seq/data/batching.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/decoding/decode.h"
#include "seq2seq/models/loss.h"
#include "seq2seq/training/train.h"
#include "seq2seq/models/transformer_model.h"
#include "support/decode_checks.h"
#include "support/test_support.h"
#include "support/training_checks.h"

namespace {

using attn::DType;
using attn::Tensor;
using attn::nn::NormPlacement;
using attn::testing::all_close;
using attn::testing::check_gradient;
using attn::testing::small_corpus;
using attn::testing::tolerance_for;
namespace s2s = attn::seq2seq;
namespace fs = std::filesystem;

// Pairs of different lengths (ids >= 4: the special tokens come first), so every batch pads
// both its sources and its targets.
std::vector<s2s::EncodedPair> tiny_pairs() {
  return {{{4, 5, 6}, {6, 4}},
          {{7, 8}, {5, 7, 8}},
          {{9, 5, 4, 6}, {8, 6, 5, 4}}};
}

s2s::ModelConfig tiny_config(DType dtype, NormPlacement norm, s2s::PositionKind positions) {
  s2s::ModelConfig c;
  c.arch = s2s::Architecture::transformer;
  c.source_vocab = 10;
  c.target_vocab = 11;
  c.hidden = 8;
  c.embedding = 8;
  c.heads = 2;
  c.ffn = 12;
  c.encoder_layers = 2;
  c.decoder_layers = 2;
  c.dropout = 0.2;
  c.norm = norm;
  c.positions = positions;
  c.dtype = dtype;
  return c;
}

struct Layout {
  NormPlacement norm;
  s2s::PositionKind positions;
  bool training;  // dropout on: the masks are a pure function of the seed, so still differentiable
};

std::string layout_string(const Layout& layout) {
  return std::string(attn::nn::norm_placement_name(layout.norm)) + "_norm_" +
         s2s::position_kind_name(layout.positions) + (layout.training ? "_dropout" : "");
}
std::string layout_name(const ::testing::TestParamInfo<Layout>& info) {
  return layout_string(info.param);
}
// gtest prints parameters with this (instead of their bytes).
void PrintTo(const Layout& layout, std::ostream* os) { *os << layout_string(layout); }

class TransformerGradients : public ::testing::TestWithParam<Layout> {};

TEST_P(TransformerGradients, MatchFiniteDifferences) {
  const Layout layout = GetParam();
  s2s::TransformerSeq2Seq model =
      s2s::TransformerSeq2Seq::create(tiny_config(DType::f64, layout.norm, layout.positions), 3);
  const auto pairs = tiny_pairs();
  const s2s::Batch batch = s2s::make_batch(pairs, {0, 1, 2});
  const s2s::TransformerRunOptions run{layout.training, 12345};
  s2s::CrossEntropyConfig ce;
  ce.label_smoothing = 0.1;
  model.zero_grad();
  const s2s::TransformerForward f = model.forward(batch, run);
  model.backward(batch, f, s2s::cross_entropy(f.logits, batch.target_output, ce).dlogits);
  auto loss = [&] {
    s2s::CrossEntropyConfig no_grad = ce;
    no_grad.compute_grad = false;
    return s2s::cross_entropy(model.forward(batch, run).logits, batch.target_output, no_grad).loss;
  };
  // h = 1e-5 on an O(1) loss: central differences err by ~h^2 + 1e-16 / h ~ 1e-10. A few
  // elements of every tensor keep the test fast (about 90 tensors).
  const attn::nn::ParameterList params = model.parameters();
  ASSERT_GT(params.size(), 80u);
  for (const attn::nn::Parameter& p : params)
    EXPECT_TRUE(check_gradient(loss, p.value, p.grad, p.name, 3, 1e-5, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, TransformerGradients,
    ::testing::Values(Layout{NormPlacement::pre, s2s::PositionKind::sinusoidal, true},
                      Layout{NormPlacement::post, s2s::PositionKind::sinusoidal, false},
                      Layout{NormPlacement::pre, s2s::PositionKind::rope, false}),
    layout_name);

TEST(TransformerTranslator, ParameterNamesAreStable) {
  const s2s::TransformerSeq2Seq model = s2s::TransformerSeq2Seq::create(
      tiny_config(DType::f32, NormPlacement::pre, s2s::PositionKind::sinusoidal), 1);
  const attn::nn::ParameterList params = model.parameters();
  auto has = [&](const std::string& name) {
    for (const auto& p : params)
      if (p.name == name) return true;
    return false;
  };
  for (const char* name : {"source_embedding.weight", "target_embedding.weight",
                           "encoder.0.self_attn.w_q", "encoder.1.ffn.out.bias", "encoder_norm.weight",
                           "decoder.1.cross_attn.w_k", "decoder.0.norm3.bias", "decoder_norm.bias",
                           "generator.weight", "generator.bias"})
    EXPECT_TRUE(has(name)) << name;
  // Post-norm stacks have no final LayerNorms.
  const s2s::TransformerSeq2Seq post = s2s::TransformerSeq2Seq::create(
      tiny_config(DType::f32, NormPlacement::post, s2s::PositionKind::sinusoidal), 1);
  EXPECT_EQ(post.parameters().size(), params.size() - 4);
}

s2s::ModelConfig small_f32_config(NormPlacement norm, s2s::PositionKind positions) {
  s2s::ModelConfig c = tiny_config(DType::f32, norm, positions);
  c.hidden = c.embedding = 16;
  c.heads = 4;
  c.ffn = 32;
  return c;
}

// Decoding one token at a time against the KV caches gives the teacher-forced forward's logits at
// every valid target position (the forward masks padded targets; the step never sees them).
TEST(TransformerTranslatorDecode, KvCacheStepsEqualTeacherForcedForward) {
  for (auto norm : {NormPlacement::pre, NormPlacement::post})
    for (auto positions : {s2s::PositionKind::sinusoidal, s2s::PositionKind::rope}) {
      const s2s::TransformerSeq2Seq model =
          s2s::TransformerSeq2Seq::create(small_f32_config(norm, positions), 5);
      const auto pairs = tiny_pairs();
      const s2s::Batch batch = s2s::make_batch(pairs, {0, 1, 2});
      const s2s::TransformerForward f = model.forward(batch);
      s2s::TransformerDecoding state = model.start_decoding(model.encode(batch));
      const int64_t B = batch.batch, S = batch.source_steps;
      const std::string what = std::string(attn::nn::norm_placement_name(norm)) + "-norm " +
                               s2s::position_kind_name(positions);
      for (int64_t t = 0; t < batch.target_steps; ++t) {
        std::vector<int32_t> ids(batch.target_input.begin() + t * B,
                                 batch.target_input.begin() + (t + 1) * B);
        const s2s::TransformerStep step = model.step(state, ids, true);
        EXPECT_EQ(state.length(), t + 1);
        for (int64_t b = 0; b < B; ++b) {
          if (t >= batch.target_lengths[b]) continue;
          EXPECT_TRUE(all_close(step.logits.select(0, b), f.logits.select(0, t).select(0, b),
                                tolerance_for(DType::f32, model.config.ffn),
                                what + " step " + std::to_string(t) + " row " + std::to_string(b)));
          // The alignment row is a distribution over the valid source positions.
          double sum = 0.0;
          for (int64_t j = 0; j < S; ++j) {
            const double w = step.weights.get({b, j});
            if (j >= batch.source_lengths[b]) {
              EXPECT_EQ(w, 0.0) << what << " padded source " << j;
            }
            sum += w;
          }
          EXPECT_NEAR(sum, 1.0, 1e-5) << what;
        }
      }
    }
}

TEST(TransformerTranslatorDecode, BeamOfOneIsGreedy) {
  const s2s::TransformerSeq2Seq model = s2s::TransformerSeq2Seq::create(
      small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal), 9);
  s2s::DecodeConfig config;
  config.max_length = 12;
  for (const s2s::Translation& greedy :
       attn::testing::expect_beam_of_one_is_greedy(model, tiny_pairs(), config))
    EXPECT_EQ(greedy.alignment.size(), greedy.tokens.size() + (greedy.finished ? 1 : 0));
}

// Beam search of sentences of different lengths in one batch: each sentence's KV-cache rows
// are gathered with its own hypotheses, and a finished sentence leaves the batch.
TEST(TransformerTranslatorDecode, BatchedBeamSearchEqualsOneSentenceAtATime) {
  const s2s::ModelConfig model_config = small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal);
  const s2s::TransformerSeq2Seq model = s2s::TransformerSeq2Seq::create(model_config, 6);
  s2s::DecodeConfig config;
  config.beam = 3;
  config.nbest = 3;
  config.max_length = 7;
  std::vector<s2s::EncodedPair> pairs = tiny_pairs();
  pairs.push_back({{4, 9, 8, 7, 6, 5}, {4}});
  pairs.push_back({{5}, {4}});
  attn::testing::expect_batched_beam_matches_single(model, pairs, config, model_config.hidden);
}

// A wide beam reorders and repeats the KV-cache rows of its hypotheses every step. If a row
// carried another hypothesis's cache, the log-probability it reports would not be the
// teacher-forced forward's log-probability of the tokens it returns.
TEST(TransformerTranslatorDecode, BeamLogProbMatchesTeacherForcedRescoring) {
  const s2s::TransformerSeq2Seq model = s2s::TransformerSeq2Seq::create(
      small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal), 4);
  s2s::DecodeConfig config;
  config.beam = 4;
  config.length_penalty = 0.0;
  config.max_length = 8;
  int64_t longer_than_one = 0;
  for (const auto& pair : tiny_pairs()) {
    const s2s::Translation t = s2s::beam_decode(model, pair.source, config);
    EXPECT_DOUBLE_EQ(t.score, t.log_prob);
    ASSERT_LE(static_cast<int64_t>(t.tokens.size()), config.max_length);
    longer_than_one += t.tokens.size() > 1;
    // Rescore: targets = the hypothesis (plus <eos> when finished).
    std::vector<s2s::EncodedPair> one = {{pair.source, t.tokens}};
    s2s::Batch batch = s2s::make_batch(one, {0});
    if (!t.finished) {  // an unfinished hypothesis scores no <eos>
      batch.target_steps -= 1;
      batch.target_input.pop_back();
      batch.target_output.pop_back();
      batch.target_lengths[0] -= 1;
    }
    const double expected = attn::testing::teacher_forced_log_prob(
        model.forward(batch).logits, batch.target_output, batch.target_steps);
    // float32 logits of an O(ffn)-term reduction, summed over <= 9 steps.
    const auto tol = tolerance_for(DType::f32, model.config.ffn);
    EXPECT_NEAR(t.log_prob, expected, 9 * (tol.atol + tol.rtol * std::abs(expected)));
  }
  EXPECT_GT(longer_than_one, 0) << "every hypothesis was too short to exercise reordering";
}

TEST(TransformerTranslator, ConfigErrorsNameTheProblem) {
  s2s::ModelConfig c = small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal);
  c.heads = 3;
  attn::testing::expect_error([&] { s2s::TransformerSeq2Seq::create(c, 1); },
                              {"[seq2seq]", "heads (3)", "hidden"});
  c = small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal);
  c.embedding = 12;
  attn::testing::expect_error([&] { s2s::TransformerSeq2Seq::create(c, 1); },
                              {"embedding (12) must equal hidden (16)"});
  c = small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal);
  c.copy = true;
  attn::testing::expect_error([&] { s2s::TransformerSeq2Seq::create(c, 1); }, "copy");
  c = small_f32_config(NormPlacement::pre, s2s::PositionKind::sinusoidal);
  c.arch = s2s::Architecture::rnn;
  attn::testing::expect_error([&] { s2s::TransformerSeq2Seq::create(c, 1); },
                              {"[transformer_seq2seq]", "rnn"});
}

// ---------------------------------------------------------------------------------------------
// Whole runs through the Trainer.

fs::path temp_dir(const std::string& name) {
  return attn::testing::scratch_dir("transformer_" + name);
}

s2s::TrainConfig transformer_train_config(int64_t d_model, int64_t batch, int64_t epochs) {
  s2s::TrainConfig c;
  c.model.arch = s2s::Architecture::transformer;
  c.model.hidden = c.model.embedding = d_model;
  c.model.heads = 4;
  c.model.ffn = 2 * d_model;
  c.model.encoder_layers = 1;
  c.model.decoder_layers = 1;
  c.model.dropout = 0.1;
  c.batch_size = batch;
  c.epochs = epochs;
  c.lr = 3e-3;
  c.schedule.warmup_steps = 20;
  return c;
}

// A seeded tiny run: the label-smoothed loss must fall below 2.5 within 3 epochs of 1500 pairs
// (282 steps of a 1 + 1 layer, d_model 32 model, about 1.5 s of CPU time; it reaches about 1.7).
TEST(TransformerTraining, TinyRunLearns) {
  s2s::TrainConfig config = transformer_train_config(32, 16, 3);
  config.lr = 1e-2;
  config.model.dropout = 0.0;  // the resume test below covers dropout
  attn::testing::expect_run_learns(config, small_corpus(1500), "tiny transformer run");
}

// Dropout is on, so the per-step seeds are part of what must resume exactly.
TEST(TransformerTraining, ResumeContinuesBitForBit) {
  const s2s::TrainConfig config = transformer_train_config(16, 16, 2);
  attn::testing::expect_resume_bit_for_bit(
      config, small_corpus(300), 13, [&](const s2s::Trainer& resumed) {
        EXPECT_EQ(resumed.config().model.arch, s2s::Architecture::transformer);
        EXPECT_EQ(resumed.config().model.dropout, config.model.dropout);
      });
}

TEST(TransformerTraining, CheckpointLoadsAsATranslator) {
  const s2s::Corpus corpus = small_corpus(300);
  const fs::path dir = temp_dir("translator");
  s2s::TrainConfig config = transformer_train_config(16, 32, 1);
  config.model.norm = NormPlacement::post;
  config.model.positions = s2s::PositionKind::rope;
  config.model.decoder_layers = 2;
  s2s::Trainer t(config, corpus.train, corpus.valid);
  ASSERT_TRUE(attn::testing::run_into(t, dir));
  const s2s::Translator loaded = s2s::Translator::load(dir.string());
  ASSERT_TRUE(std::holds_alternative<s2s::TransformerSeq2Seq>(loaded.model));
  EXPECT_EQ(loaded.config().norm, NormPlacement::post);
  EXPECT_EQ(loaded.config().positions, s2s::PositionKind::rope);
  EXPECT_EQ(loaded.config().decoder_layers, 2);
  const std::vector<std::string> sentences = {corpus.test[0].source, corpus.test[1].source};
  for (int64_t beam : {1, 3}) {
    s2s::DecodeConfig decode;
    decode.beam = beam;
    const auto [x, y] =
        attn::testing::expect_same_translations(t.translator(), loaded, sentences, decode);
    ASSERT_EQ(x.size(), y.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      EXPECT_EQ(x[i].alignment, y[i].alignment);
      EXPECT_FALSE(x[i].alignment.empty());
    }
  }
  fs::remove_all(dir);
}

}  // namespace
