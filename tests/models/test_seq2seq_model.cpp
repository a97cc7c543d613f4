// Encoder-decoder models: gradients against finite differences (float64) for every decoder and
// scoring function, stacked decoders and dropout, decode-step equivalence with the teacher-forced
// forward, beam 1 == greedy, alignments.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "seq2seq/data/batching.h"
#include "seq2seq/decoding/decode.h"
#include "seq2seq/decoding/heatmap.h"
#include "seq2seq/models/loss.h"
#include "seq2seq/models/model.h"
#include "support/decode_checks.h"
#include "support/test_support.h"

namespace {

using attn::DType;
using attn::LocalKind;
using attn::Tensor;
using attn::nn::RnnKind;
using attn::testing::all_close;
using attn::testing::check_gradient;
using attn::testing::tolerance_for;
namespace s2s = attn::seq2seq;

// Pairs of different lengths (ids >= 4: the special tokens come first).
std::vector<s2s::EncodedPair> tiny_pairs(int32_t source_vocab, int32_t target_vocab) {
  auto src = [&](std::vector<int32_t> v) {
    for (auto& x : v) x = 4 + x % (source_vocab - 4);
    return v;
  };
  auto tgt = [&](std::vector<int32_t> v) {
    for (auto& x : v) x = 4 + x % (target_vocab - 4);
    return v;
  };
  return {{src({0, 1, 2}), tgt({2, 0})},
          {src({3, 4}), tgt({1, 3, 4})},
          {src({5, 1, 0, 2}), tgt({4, 2, 1, 0})}};
}

struct Case {
  RnnKind rnn;
  s2s::DecoderKind decoder;
  s2s::ScoreKind score;
  LocalKind local;
  bool bidirectional;
  bool copy = false;
  int64_t decoder_layers = 1;
  int64_t encoder_layers = 1;
  double dropout = 0.0;  // > 0: the forward runs in training mode with a fixed seed
};

std::string case_name(const Case& c) {
  std::string name = std::string(attn::nn::rnn_kind_name(c.rnn)) + "_" +
                     s2s::decoder_kind_name(c.decoder) + "_" + s2s::score_kind_name(c.score);
  if (c.local == LocalKind::monotonic) name += "_local_m";
  if (c.local == LocalKind::predictive) name += "_local_p";
  if (!c.bidirectional) name += "_unidirectional";
  if (c.copy) name += "_copy";
  if (c.encoder_layers != 1 || c.decoder_layers != 1)
    name += "_" + std::to_string(c.encoder_layers) + "x" + std::to_string(c.decoder_layers) + "_layers";
  if (c.dropout > 0) name += "_dropout";
  return name;
}

s2s::ModelConfig tiny_config(const Case& c, DType dtype) {
  s2s::ModelConfig config;
  config.rnn = c.rnn;
  config.decoder = c.decoder;
  config.score = c.score;
  config.local = c.local;
  config.local_half_width = 1;
  config.source_vocab = 10;
  config.target_vocab = 11;
  config.embedding = 3;
  config.hidden = 4;
  config.bidirectional = c.bidirectional;
  config.max_source_steps = 8;
  config.dtype = dtype;
  config.copy = c.copy;
  config.decoder_layers = c.decoder_layers;
  config.encoder_layers = c.encoder_layers;
  config.dropout = c.dropout;
  return config;
}

class ModelGradients : public ::testing::TestWithParam<Case> {};

TEST_P(ModelGradients, MatchFiniteDifferences) {
  const Case c = GetParam();
  s2s::Seq2Seq model = s2s::Seq2Seq::create(tiny_config(c, DType::f64), 11);
  // Source ids 4..9 map onto target ids, some to <unk> (1), so copying has something to do.
  for (std::size_t i = 4; i < model.copy_map.size(); ++i) model.copy_map[i] = i % 3 == 0 ? 1 : int32_t(i + 1);
  const auto pairs = tiny_pairs(10, 11);
  const s2s::Batch batch = s2s::make_batch(pairs, {0, 1, 2});
  s2s::CrossEntropyConfig ce;
  ce.label_smoothing = 0.1;
  // With dropout the masks are a pure function of the seed, so the loss stays a differentiable
  // function of the weights and finite differences see the same masks as the backward.
  const s2s::Seq2SeqRunOptions run{c.dropout > 0, 42};
  model.zero_grad();
  const s2s::ForwardResult f = model.forward(batch, run);
  if (c.copy) {
    const auto r = s2s::copy_mixture_loss(f.logits, f.copy, f.gate, batch.target_output, ce);
    model.backward(batch, f, r.dlogits, r.dcopy, r.dgate);
  } else {
    const auto r = s2s::cross_entropy(f.logits, batch.target_output, ce);
    model.backward(batch, f, r.dlogits);
  }
  auto loss = [&] {
    s2s::CrossEntropyConfig no_grad = ce;
    no_grad.compute_grad = false;
    const s2s::ForwardResult g = model.forward(batch, run);
    if (c.copy) return s2s::copy_mixture_loss(g.logits, g.copy, g.gate, batch.target_output, no_grad).loss;
    return s2s::cross_entropy(g.logits, batch.target_output, no_grad).loss;
  };
  // h = 1e-5: the loss is O(1), so central differences err by ~h^2 + 1e-16 / h ~ 1e-10.
  for (const attn::nn::Parameter& p : model.parameters())
    EXPECT_TRUE(check_gradient(loss, p.value, p.grad, p.name, 6, 1e-5, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(
    Decoders, ModelGradients,
    ::testing::Values(
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::dot, LocalKind::none, false},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::concat, LocalKind::none, true},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::location, LocalKind::none, true},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::cosine, LocalKind::none, true},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::monotonic, true},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::predictive, true},
        Case{RnnKind::gru, s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, LocalKind::none, true},
        Case{RnnKind::lstm, s2s::DecoderKind::bahdanau, s2s::ScoreKind::scaled_dot, LocalKind::none, true},
        Case{RnnKind::lstm, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true, true},
        Case{RnnKind::lstm, s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, LocalKind::none, true, true},
        Case{RnnKind::gru, s2s::DecoderKind::none, s2s::ScoreKind::dot, LocalKind::none, true},
        Case{RnnKind::lstm, s2s::DecoderKind::none, s2s::ScoreKind::dot, LocalKind::none, false},
        // Stacked decoders: as many encoder layers (layer-wise initial states) or fewer (the
        // top encoder state for every layer); with and without dropout (0.3 at these sizes
        // drops a few units of every site).
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true, false, 2, 2},
        Case{RnnKind::lstm, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true, false, 2, 1},
        Case{RnnKind::gru, s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, LocalKind::none, true, false, 2, 1},
        Case{RnnKind::lstm, s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, LocalKind::none, false, false, 2, 2},
        Case{RnnKind::gru, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true, false, 2, 2, 0.3},
        Case{RnnKind::lstm, s2s::DecoderKind::luong, s2s::ScoreKind::general, LocalKind::none, true, true, 2, 1, 0.3},
        Case{RnnKind::gru, s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, LocalKind::none, true, true, 3, 2, 0.3},
        Case{RnnKind::lstm, s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, LocalKind::none, true, false, 2, 2, 0.3},
        Case{RnnKind::lstm, s2s::DecoderKind::none, s2s::ScoreKind::dot, LocalKind::none, true, false, 2, 2, 0.3}),
    [](const ::testing::TestParamInfo<Case>& info) { return case_name(info.param); });

s2s::ModelConfig small_f32_config(s2s::DecoderKind decoder, s2s::ScoreKind score) {
  s2s::ModelConfig config;
  config.decoder = decoder;
  config.score = score;
  config.source_vocab = 10;
  config.target_vocab = 11;
  config.embedding = 8;
  config.hidden = 16;
  config.max_source_steps = 8;
  return config;
}

// Running the decoder one step at a time (as decoding does) gives the teacher-forced forward's
// logits: the two paths share the step, and differ only in how the output GEMM is batched. With
// 2 decoder layers too (GRU and LSTM, with 1 and 2 encoder layers), and dropout set in the
// configuration does not reach the forward unless it trains.
TEST(Seq2SeqDecode, StepByStepEqualsTeacherForcedForward) {
  struct Stack {
    RnnKind rnn;
    int64_t encoder_layers, decoder_layers;
  };
  for (const Stack stack : {Stack{RnnKind::gru, 1, 1}, Stack{RnnKind::gru, 2, 2}, Stack{RnnKind::lstm, 1, 2}})
  for (auto decoder : {s2s::DecoderKind::luong, s2s::DecoderKind::bahdanau, s2s::DecoderKind::none}) {
    s2s::ModelConfig config = small_f32_config(
        decoder, decoder == s2s::DecoderKind::bahdanau ? s2s::ScoreKind::additive : s2s::ScoreKind::general);
    config.rnn = stack.rnn;
    config.encoder_layers = stack.encoder_layers;
    config.decoder_layers = stack.decoder_layers;
    config.dropout = 0.5;
    const s2s::Seq2Seq model = s2s::Seq2Seq::create(config, 5);
    const std::string label = std::string(s2s::decoder_kind_name(decoder)) + " " +
                              attn::nn::rnn_kind_name(stack.rnn) + " " +
                              std::to_string(stack.encoder_layers) + "x" +
                              std::to_string(stack.decoder_layers);
    const auto pairs = tiny_pairs(10, 11);
    const s2s::Batch batch = s2s::make_batch(pairs, {0, 1, 2});
    const s2s::ForwardResult f = model.forward(batch);
    const s2s::EncodedSource src = model.encode(batch);
    s2s::DecoderState state = src.initial;
    ASSERT_EQ(static_cast<int64_t>(state.h.size()), stack.decoder_layers) << label;
    const int64_t B = batch.batch, T = batch.target_steps;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> ids(batch.target_input.begin() + t * B, batch.target_input.begin() + (t + 1) * B);
      s2s::StepResult r = model.step(src, state, ids, t, false);
      EXPECT_TRUE(all_close(model.logits(r.output), f.logits.select(0, t),
                            tolerance_for(DType::f32, model.config.hidden),
                            label + " step " + std::to_string(t)));
      state = r.state;
    }
  }
}

// Training-mode dropout changes the forward (and only then); the masks are a pure function of
// the seed, so the same seed gives the same logits and another seed different ones.
TEST(Seq2SeqDropout, OnlyWhenTrainingAndReproducibleFromTheSeed) {
  s2s::ModelConfig config = small_f32_config(s2s::DecoderKind::luong, s2s::ScoreKind::general);
  config.decoder_layers = 2;
  config.dropout = 0.3;
  const s2s::Seq2Seq model = s2s::Seq2Seq::create(config, 8);
  const s2s::Batch batch = s2s::make_batch(tiny_pairs(10, 11), {0, 1, 2});
  const std::vector<double> eval = model.forward(batch).logits.to_vector();
  EXPECT_EQ(model.forward(batch, {false, 7}).logits.to_vector(), eval);
  const std::vector<double> a = model.forward(batch, {true, 7}).logits.to_vector();
  EXPECT_NE(a, eval);
  EXPECT_EQ(model.forward(batch, {true, 7}).logits.to_vector(), a);
  EXPECT_NE(model.forward(batch, {true, 8}).logits.to_vector(), a);
}

// Beam 1 is greedy search, also with 2 decoder layers (whose per-layer states beam search
// gathers row by row) for Luong and Bahdanau, GRU and LSTM.
TEST(Seq2SeqDecode, BeamOfOneIsGreedy) {
  struct Setup {
    s2s::DecoderKind decoder;
    s2s::ScoreKind score;
    RnnKind rnn;
    int64_t decoder_layers;
  };
  for (const Setup setup : {Setup{s2s::DecoderKind::luong, s2s::ScoreKind::general, RnnKind::gru, 1},
                            Setup{s2s::DecoderKind::luong, s2s::ScoreKind::dot, RnnKind::gru, 1},
                            Setup{s2s::DecoderKind::luong, s2s::ScoreKind::general, RnnKind::gru, 2},
                            Setup{s2s::DecoderKind::luong, s2s::ScoreKind::general, RnnKind::lstm, 2},
                            Setup{s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, RnnKind::gru, 2},
                            Setup{s2s::DecoderKind::bahdanau, s2s::ScoreKind::additive, RnnKind::lstm, 2}}) {
    s2s::ModelConfig model_config = small_f32_config(setup.decoder, setup.score);
    model_config.rnn = setup.rnn;
    model_config.decoder_layers = setup.decoder_layers;
    const s2s::Seq2Seq model = s2s::Seq2Seq::create(model_config, 9);
    s2s::DecodeConfig config;
    config.max_length = 12;
    attn::testing::expect_beam_of_one_is_greedy(model, tiny_pairs(10, 11), config);
  }
}

// Beam search reorders and repeats the per-layer decoder states as hypotheses survive: the
// best hypothesis's log-probability must equal the teacher-forced log-probability of its tokens
// (one wrongly gathered layer would make the two differ).
TEST(Seq2SeqDecode, BeamHypothesisMatchesTeacherForcedLogProbWithTwoLayers) {
  for (RnnKind rnn : {RnnKind::gru, RnnKind::lstm})
    for (auto decoder : {s2s::DecoderKind::luong, s2s::DecoderKind::bahdanau}) {
      s2s::ModelConfig model_config = small_f32_config(
          decoder, decoder == s2s::DecoderKind::luong ? s2s::ScoreKind::general : s2s::ScoreKind::additive);
      model_config.rnn = rnn;
      model_config.encoder_layers = 2;
      model_config.decoder_layers = 2;
      const s2s::Seq2Seq model = s2s::Seq2Seq::create(model_config, 12);
      s2s::DecodeConfig config;
      config.beam = 3;
      config.max_length = 8;
      for (const auto& pair : tiny_pairs(10, 11)) {
        const s2s::Translation best = s2s::beam_decode(model, pair.source, config);
        ASSERT_FALSE(best.tokens.empty() && !best.finished);
        const s2s::Batch batch = s2s::make_batch({{pair.source, best.tokens}}, {0});
        const s2s::ForwardResult f = model.forward(batch);
        const int64_t steps = static_cast<int64_t>(best.tokens.size()) + (best.finished ? 1 : 0);
        const double log_prob =
            attn::testing::teacher_forced_log_prob(f.logits, batch.target_output, steps);
        // float32 logits through T steps: each step's log-probability carries the error of an
        // H-term reduction, and the search and the forward batch their GEMMs differently.
        const attn::testing::Tolerance tol = tolerance_for(DType::f32, model_config.hidden);
        EXPECT_NEAR(best.log_prob, log_prob, static_cast<double>(steps) * (tol.atol + tol.rtol * std::abs(log_prob)))
            << attn::nn::rnn_kind_name(rnn) << " " << s2s::decoder_kind_name(decoder);
      }
    }
}

// With alpha = 0 a hypothesis is ranked by its log-probability, and wider beams respect
// max_length.
TEST(Seq2SeqDecode, BeamScoreIsLogProbabilityWithoutLengthPenalty) {
  const s2s::Seq2Seq model = s2s::Seq2Seq::create(small_f32_config(s2s::DecoderKind::luong, s2s::ScoreKind::general), 3);
  s2s::DecodeConfig config;
  config.beam = 4;
  config.length_penalty = 0.0;
  config.max_length = 10;
  for (const auto& pair : tiny_pairs(10, 11)) {
    const s2s::Translation t = s2s::beam_decode(model, pair.source, config);
    EXPECT_DOUBLE_EQ(t.score, t.log_prob);
    EXPECT_LE(static_cast<int64_t>(t.tokens.size()), config.max_length);
  }
}

// Beam search of sentences of different lengths in one batch: each gets its own search
// (recurrent state and encoded source rows gathered per sentence; a finished sentence leaves).
TEST(Seq2SeqDecode, BatchedBeamSearchEqualsOneSentenceAtATime) {
  for (auto decoder : {s2s::DecoderKind::luong, s2s::DecoderKind::bahdanau}) {
    s2s::ModelConfig model_config = small_f32_config(
        decoder, decoder == s2s::DecoderKind::luong ? s2s::ScoreKind::general : s2s::ScoreKind::additive);
    model_config.decoder_layers = 2;
    const s2s::Seq2Seq model = s2s::Seq2Seq::create(model_config, 21);
    s2s::DecodeConfig config;
    config.beam = 3;
    config.nbest = 2;
    config.max_length = 7;
    std::vector<s2s::EncodedPair> pairs = tiny_pairs(10, 11);
    pairs.push_back({{4, 9, 8, 7, 6, 5}, {4}});  // the longest source: the others are padded
    pairs.push_back({{5}, {4}});
    attn::testing::expect_batched_beam_matches_single(model, pairs, config, model_config.hidden);
  }
}

TEST(Seq2SeqDecode, AlignmentRowsAreDistributionsOverTheSource) {
  const s2s::Seq2Seq model = s2s::Seq2Seq::create(small_f32_config(s2s::DecoderKind::luong, s2s::ScoreKind::general), 4);
  s2s::DecodeConfig config;
  config.max_length = 6;
  const auto pairs = tiny_pairs(10, 11);
  std::vector<std::vector<int32_t>> sources;
  for (const auto& p : pairs) sources.push_back(p.source);
  const auto out = s2s::greedy_decode(model, sources, config);
  ASSERT_EQ(out.size(), sources.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::size_t steps = out[i].tokens.size() + (out[i].finished ? 1 : 0);
    ASSERT_EQ(out[i].alignment.size(), steps);
    for (const auto& row : out[i].alignment) {
      ASSERT_EQ(row.size(), sources[i].size() + 1);  // source tokens and <eos>
      double sum = 0.0;
      for (double w : row) sum += w;
      EXPECT_NEAR(sum, 1.0, 1e-5);
    }
  }
  // The baseline has no attention, hence no alignment.
  const s2s::Seq2Seq baseline = s2s::Seq2Seq::create(small_f32_config(s2s::DecoderKind::none, s2s::ScoreKind::dot), 4);
  for (const auto& t : s2s::greedy_decode(baseline, sources, config)) EXPECT_TRUE(t.alignment.empty());
}

TEST(Seq2SeqModel, PresetsAndErrors) {
  for (const char* name : {"bahdanau", "luong-dot", "luong-general", "luong-concat", "location",
                           "local-m", "local-p", "scaled-dot", "cosine", "none"}) {
    const auto preset = s2s::parse_attention_preset(name);
    ASSERT_TRUE(preset.has_value()) << name;
    EXPECT_STREQ(s2s::attention_preset_name(*preset), name);
  }
  EXPECT_FALSE(s2s::parse_attention_preset("luong").has_value());
  s2s::ModelConfig bad = small_f32_config(s2s::DecoderKind::luong, s2s::ScoreKind::general);
  bad.hidden = 15;  // odd with a bidirectional encoder
  try {
    s2s::Seq2Seq::create(bad, 1);
    FAIL() << "odd hidden size accepted";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("hidden must be even"), std::string::npos) << e.what();
  }
}

TEST(Heatmap, TerminalShadesAndLabels) {
  const s2s::Tokens source = {"a", "cat"}, target = {"un", "chat"};
  const s2s::Alignment weights = {{0.95, 0.05}, {0.4, 0.6}};
  const std::string map = s2s::terminal_heatmap(source, target, weights);
  // Header rows: the source words written vertically ("a" and "cat" share the first row).
  EXPECT_NE(map.find("a  c"), std::string::npos) << map;
  EXPECT_NE(map.find("  un  \u2588\u2588    \n"), std::string::npos) << map;   // 0.95 full, 0.05 blank
  EXPECT_NE(map.find("chat  \u2592\u2592 \u2593\u2593 \n"), std::string::npos) << map;  // 0.4, 0.6
  EXPECT_THROW(s2s::terminal_heatmap(source, {"un", "chat", "noir"}, weights), attn::Error);
}

TEST(Heatmap, SvgHasACellPerWeightAndEscapesWords) {
  const s2s::Tokens source = {"<eos>", "b"}, target = {"x&y"};
  const std::string svg = s2s::svg_heatmap(source, target, {{1.0, 0.0}});
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  std::size_t cells = 0;
  for (std::size_t at = svg.find("<rect x="); at != std::string::npos; at = svg.find("<rect x=", at + 1)) ++cells;
  EXPECT_EQ(cells, 2u);
  EXPECT_NE(svg.find("&lt;eos&gt;"), std::string::npos);
  EXPECT_NE(svg.find("x&amp;y"), std::string::npos);
  EXPECT_NE(svg.find("#08306b"), std::string::npos);  // weight 1: the darkest blue
  EXPECT_NE(svg.find("#ffffff"), std::string::npos);  // weight 0: white
}

// A copying model's step-by-step log-probabilities equal the teacher-forced mixture's, and each
// row is a distribution (the copy part sums to 1 over the extended vocabulary: the target
// words and the extended ids of the source words the target vocabulary lacks).
TEST(Seq2SeqCopy, StepLogProbsMatchTheForwardMixture) {
  s2s::ModelConfig config = small_f32_config(s2s::DecoderKind::luong, s2s::ScoreKind::general);
  config.copy = true;
  s2s::Seq2Seq model = s2s::Seq2Seq::create(config, 6);
  std::vector<std::string> source = {"<pad>", "<unk>", "<bos>", "<eos>", "Marie", "12", "cat", "the", "sees", "."};
  std::vector<std::string> target = {"<pad>", "<unk>", "<bos>", "<eos>", "le", "chat", "voit", "Marie", "12", ".", "un"};
  model.set_copy_map(source, target);
  EXPECT_EQ(model.copy_map[4], 7);  // Marie -> Marie
  EXPECT_EQ(model.copy_map[5], 8);  // 12 -> 12
  EXPECT_EQ(model.copy_map[6], 1);  // cat -> <unk>
  EXPECT_EQ(model.copy_map[3], 3);  // <eos> -> <eos>
  const auto pairs = tiny_pairs(10, 11);
  const s2s::Batch batch = s2s::make_batch(pairs, {0, 1, 2});
  const s2s::ForwardResult f = model.forward(batch);
  const s2s::EncodedSource src = model.encode(batch);
  s2s::DecoderState state = src.initial;
  const int64_t B = batch.batch, V = config.target_vocab;
  // "cat", "the", "sees" and "." have no target token: each sentence gives them extended ids.
  const int64_t Vx = f.copy.size(2);
  EXPECT_GT(Vx, V);
  for (int64_t t = 0; t < batch.target_steps; ++t) {
    std::vector<int32_t> ids(batch.target_input.begin() + t * B, batch.target_input.begin() + (t + 1) * B);
    const s2s::StepResult r = model.step(src, state, ids, t, false);
    const auto logp = model.log_probs(r);
    for (int64_t b = 0; b < B; ++b) {
      double total = 0.0, copy_total = 0.0;
      ASSERT_EQ(static_cast<int64_t>(logp[b].size()), Vx);
      for (int64_t v = 0; v < Vx; ++v) {
        total += std::exp(logp[b][v]);
        copy_total += f.copy.get({t, b, v});
      }
      EXPECT_NEAR(total, 1.0, 1e-5);
      EXPECT_NEAR(copy_total, 1.0, 1e-5);
      EXPECT_NEAR(r.gate.get({b, 0}), f.gate.get({t, b, 0}), 1e-6);
    }
    state = r.state;
  }
  // The baseline cannot copy.
  s2s::ModelConfig bad = small_f32_config(s2s::DecoderKind::none, s2s::ScoreKind::dot);
  bad.copy = true;
  EXPECT_THROW(s2s::Seq2Seq::create(bad, 1), attn::Error);
}

}  // namespace
