// Training pieces and whole runs: cross-entropy with label smoothing, Adam/AdamW, clipping,
// schedules, batching, a tiny training run that learns, and checkpoints that resume bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <string>
#include <unistd.h>
#include <variant>
#include <vector>

#include "seq2seq/data/batching.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/models/loss.h"
#include "seq2seq/training/optim.h"
#include "seq2seq/training/safetensors.h"
#include "seq2seq/training/train.h"
#include "support/test_support.h"
#include "support/training_checks.h"

namespace {

using attn::DType;
using attn::Tensor;
using attn::testing::check_gradient;
using attn::testing::run_into;
using attn::testing::small_corpus;
namespace s2s = attn::seq2seq;
namespace fs = std::filesystem;

fs::path temp_dir(const std::string& name) { return attn::testing::scratch_dir("train_" + name); }

// ---------------------------------------------------------------------------------------------
// Loss

TEST(CrossEntropy, UniformLogitsGiveLogV) {
  const int64_t V = 7;
  const Tensor logits = Tensor::zeros({3, V}, DType::f64);
  for (double eps : {0.0, 0.1}) {
    s2s::CrossEntropyConfig c;
    c.label_smoothing = eps;
    c.ignore_id = 0;
    const auto r = s2s::cross_entropy(logits, {2, 0, 5}, c);  // the 0 is padding
    EXPECT_EQ(r.count, 2);
    EXPECT_NEAR(r.loss, std::log(7.0), 1e-12);
    EXPECT_NEAR(r.nll, std::log(7.0), 1e-12);
    // Padding rows get no gradient.
    for (int64_t v = 0; v < V; ++v) EXPECT_EQ(r.dlogits.get({1, v}), 0.0);
  }
}

TEST(CrossEntropy, GradientMatchesFiniteDifferences) {
  Tensor logits = attn::testing::random_tensor({4, 6}, DType::f64, 3, -3.0, 3.0);
  const std::vector<int32_t> targets = {1, 0, 5, 3};
  s2s::CrossEntropyConfig c;
  c.label_smoothing = 0.2;
  const auto r = s2s::cross_entropy(logits, targets, c);
  s2s::CrossEntropyConfig no_grad = c;
  no_grad.compute_grad = false;
  auto loss = [&] { return s2s::cross_entropy(logits, targets, no_grad).loss; };
  EXPECT_TRUE(check_gradient(loss, logits, r.dlogits, "dlogits", 24));
}

TEST(CopyMixtureLoss, GradientsMatchFiniteDifferences) {
  const int64_t N = 3, V = 5;
  Tensor logits = attn::testing::random_tensor({N, V}, DType::f64, 4, -2.0, 2.0);
  // Copy rows: positive, summing to 1; gate in (0, 1).
  Tensor copy = attn::testing::random_tensor({N, V}, DType::f64, 5, 0.1, 1.0);
  for (int64_t n = 0; n < N; ++n) {
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += copy.get({n, v});
    for (int64_t v = 0; v < V; ++v) copy.set({n, v}, copy.get({n, v}) / sum);
  }
  Tensor gate = attn::testing::random_tensor({N}, DType::f64, 6, 0.2, 0.8);
  const std::vector<int32_t> targets = {2, 0, 4};  // the 0 is padding
  s2s::CrossEntropyConfig c;
  c.label_smoothing = 0.1;
  const auto r = s2s::copy_mixture_loss(logits, copy, gate, targets, c);
  EXPECT_EQ(r.count, 2);
  s2s::CrossEntropyConfig no_grad = c;
  no_grad.compute_grad = false;
  auto loss = [&] { return s2s::copy_mixture_loss(logits, copy, gate, targets, no_grad).loss; };
  EXPECT_TRUE(check_gradient(loss, logits, r.dlogits, "dlogits"));
  EXPECT_TRUE(check_gradient(loss, copy, r.dcopy, "dcopy"));
  EXPECT_TRUE(check_gradient(loss, gate, r.dgate, "dgate"));
  // Gate 1 is plain cross-entropy.
  const Tensor one = Tensor::full({N}, 1.0, DType::f64);
  EXPECT_NEAR(s2s::copy_mixture_loss(logits, copy, one, targets, c).loss,
              s2s::cross_entropy(logits, targets, c).loss, 1e-12);
}

TEST(CrossEntropy, LargeLogitsDoNotOverflow) {
  const Tensor logits = Tensor::from(std::vector<float>{1e4f, 0.f, -1e4f}, {1, 3});
  const auto r = s2s::cross_entropy(logits, {1}, {});
  EXPECT_NEAR(r.loss, 1e4, 1e-3);
  EXPECT_TRUE(std::isfinite(r.dlogits.get({0, 0})));
}

TEST(CrossEntropy, ErrorsNameTheProblem) {
  const Tensor logits = Tensor::zeros({2, 3});
  EXPECT_THROW(s2s::cross_entropy(logits, {1}, {}), attn::Error);
  EXPECT_THROW(s2s::cross_entropy(logits, {1, 3}, {}), attn::Error);
}

// ---------------------------------------------------------------------------------------------
// Optimisers

attn::nn::ParameterList one_parameter(double w, double g) {
  attn::nn::ParameterList list;
  attn::nn::add_parameter(list, "", "w", Tensor::full({1}, w, DType::f64), Tensor::full({1}, g, DType::f64));
  return list;
}

TEST(Adam, FirstStepMovesByTheLearningRate) {
  // Step 1: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g).
  const auto params = one_parameter(1.0, 0.5);
  s2s::Adam adam(params, {});
  adam.step(params, 0.1);
  EXPECT_NEAR(params[0].value.get({0}), 0.9, 1e-7);
  EXPECT_EQ(adam.steps(), 1);
}

TEST(Adam, SecondStepByHand) {
  const auto params = one_parameter(1.0, 0.5);
  s2s::AdamConfig c;
  s2s::Adam adam(params, c);
  adam.step(params, 0.1);
  const double w1 = params[0].value.get({0});  // 0.9 up to eps
  Tensor(params[0].grad).fill(-1.0);
  adam.step(params, 0.1);
  const double m = 0.9 * 0.05 + 0.1 * -1.0, v = 0.999 * 0.00025 + 0.001 * 1.0;
  const double expected = w1 - 0.1 * (m / (1 - 0.81)) / (std::sqrt(v / (1 - 0.999 * 0.999)) + 1e-8);
  EXPECT_NEAR(params[0].value.get({0}), expected, 1e-12);
}

TEST(Adam, DecoupledWeightDecayShrinksWithoutAGradient) {
  const auto params = one_parameter(2.0, 0.0);
  s2s::AdamConfig c;
  c.weight_decay = 0.5;
  c.decoupled = true;
  s2s::Adam adamw(params, c);
  adamw.step(params, 0.1);
  EXPECT_NEAR(params[0].value.get({0}), 2.0 - 0.1 * 0.5 * 2.0, 1e-12);
  // L2 (not decoupled): the decay goes through the moments, so the first step is lr * sign.
  const auto params2 = one_parameter(2.0, 0.0);
  c.decoupled = false;
  s2s::Adam adam(params2, c);
  adam.step(params2, 0.1);
  EXPECT_NEAR(params2[0].value.get({0}), 1.9, 1e-7);
}

TEST(Adam, StateRoundTripsThroughSafetensors) {
  const auto params = one_parameter(1.0, 0.5);
  s2s::Adam a(params, {});
  a.step(params, 0.1);
  s2s::SafetensorsFile file;
  a.save(file, params);
  s2s::Adam b(params, {});
  b.load(file, params);
  const auto p1 = one_parameter(params[0].value.get({0}), 0.3);
  const auto p2 = one_parameter(params[0].value.get({0}), 0.3);
  a.step(p1, 0.1);
  b.step(p2, 0.1);
  EXPECT_EQ(p1[0].value.get({0}), p2[0].value.get({0}));
  EXPECT_EQ(b.steps(), 2);
}

TEST(ClipGradNorm, ScalesToTheMaximumNorm) {
  attn::nn::ParameterList list;
  attn::nn::add_parameter(list, "", "a", Tensor::zeros({1}, DType::f64), Tensor::full({1}, 3.0, DType::f64));
  attn::nn::add_parameter(list, "", "b", Tensor::zeros({1}, DType::f64), Tensor::full({1}, 4.0, DType::f64));
  EXPECT_DOUBLE_EQ(s2s::clip_grad_norm(list, 1.0), 5.0);
  EXPECT_NEAR(list[0].grad.get({0}), 0.6, 1e-12);
  EXPECT_NEAR(list[1].grad.get({0}), 0.8, 1e-12);
  // Below the maximum nothing changes.
  EXPECT_NEAR(s2s::clip_grad_norm(list, 10.0), 1.0, 1e-12);
  EXPECT_NEAR(list[1].grad.get({0}), 0.8, 1e-12);
}

TEST(Schedule, WarmupThenDecay) {
  s2s::Schedule s{s2s::ScheduleKind::linear, 10, 110, 0.0};
  EXPECT_DOUBLE_EQ(s2s::learning_rate(s, 1.0, 0), 0.1);
  EXPECT_DOUBLE_EQ(s2s::learning_rate(s, 1.0, 9), 1.0);
  EXPECT_DOUBLE_EQ(s2s::learning_rate(s, 1.0, 60), 0.5);
  EXPECT_DOUBLE_EQ(s2s::learning_rate(s, 1.0, 110), 0.0);
  s.kind = s2s::ScheduleKind::cosine;
  EXPECT_NEAR(s2s::learning_rate(s, 1.0, 60), 0.5, 1e-12);
  s.kind = s2s::ScheduleKind::inverse_sqrt;
  EXPECT_NEAR(s2s::learning_rate(s, 1.0, 39), 0.5, 1e-12);  // sqrt(10 / 40)
  s.kind = s2s::ScheduleKind::constant;
  EXPECT_DOUBLE_EQ(s2s::learning_rate(s, 2.0, 50), 2.0);
}

// ---------------------------------------------------------------------------------------------
// Batching

TEST(Batching, PadsTimeMajorTargetsAndCountsTokens) {
  const std::vector<s2s::EncodedPair> pairs = {{{5, 6}, {7}}, {{8}, {9, 10, 11}}};
  const s2s::Batch b = s2s::make_batch(pairs, {0, 1});
  EXPECT_EQ(b.source_steps, 3);
  EXPECT_EQ(b.target_steps, 4);
  EXPECT_EQ(b.source, (std::vector<int32_t>{5, 6, 3, 8, 3, 0}));
  EXPECT_EQ(b.source_lengths, (std::vector<int64_t>{3, 2}));
  // [T, B]: <bos> y, then padding.
  EXPECT_EQ(b.target_input, (std::vector<int32_t>{2, 2, 7, 9, 0, 10, 0, 11}));
  EXPECT_EQ(b.target_output, (std::vector<int32_t>{7, 9, 3, 10, 0, 11, 0, 3}));
  EXPECT_EQ(b.target_tokens, 2 + 4);
}

TEST(Batching, BucketsAreLengthSortedAndEpochOrdersReproducible) {
  std::vector<s2s::EncodedPair> pairs;
  for (int i = 0; i < 50; ++i) pairs.push_back({std::vector<int32_t>(1 + (i * 7) % 13, 4), {4}});
  const auto batches = s2s::bucket_batches(pairs, 8, 1);
  ASSERT_EQ(batches.size(), 7u);
  std::set<int64_t> seen;
  std::size_t previous_max = 0;
  for (const auto& b : batches) {
    std::size_t lo = 1000, hi = 0;
    for (int64_t i : b) {
      seen.insert(i);
      lo = std::min(lo, pairs[i].source.size());
      hi = std::max(hi, pairs[i].source.size());
    }
    EXPECT_GE(lo, previous_max);  // batches do not interleave lengths
    previous_max = hi;
  }
  EXPECT_EQ(seen.size(), pairs.size());
  const auto a = s2s::epoch_order(7, 3, 0), again = s2s::epoch_order(7, 3, 0), next = s2s::epoch_order(7, 3, 1);
  EXPECT_EQ(a, again);
  EXPECT_NE(a, next);
  EXPECT_EQ(std::set<int64_t>(a.begin(), a.end()).size(), 7u);
}

// ---------------------------------------------------------------------------------------------
// Whole runs

s2s::TrainConfig small_config(int64_t emb, int64_t hidden, int64_t batch, int64_t epochs) {
  s2s::TrainConfig c;
  c.model.embedding = emb;
  c.model.hidden = hidden;
  c.batch_size = batch;
  c.epochs = epochs;
  c.lr = 1e-2;
  c.schedule.warmup_steps = 10;
  return c;
}

// A seeded tiny run: the label-smoothed loss must fall below 2.5 within 3 epochs of 1500 pairs
// (282 steps; about 2 s of CPU time).
TEST(Training, TinyRunLearns) {
  attn::testing::expect_run_learns(small_config(32, 64, 16, 3), small_corpus(1500), "tiny run");
}

TEST(Training, ResumeContinuesBitForBit) {
  attn::testing::expect_resume_bit_for_bit(small_config(16, 32, 16, 2), small_corpus(300), 13);
}

// The recurrent model with dropout (embeddings, between encoder and decoder layers, o_t) and a
// 2-layer decoder: its masks come from (seed, global step, site), so a resumed run draws the
// uninterrupted run's masks. The checkpoint carries the depth, the rate and the vocabulary's
// minimum frequency.
TEST(Training, ResumeWithDropoutAndStackedDecoderContinuesBitForBit) {
  s2s::TrainConfig config = small_config(16, 32, 16, 2);
  config.model.rnn = attn::nn::RnnKind::lstm;
  config.model.encoder_layers = 2;
  config.model.decoder_layers = 2;
  config.model.dropout = 0.2;
  config.vocab.min_frequency = 2;
  attn::testing::expect_resume_bit_for_bit(config, small_corpus(300), 13, [](const s2s::Trainer& t) {
    EXPECT_EQ(t.config().model.decoder_layers, 2);
    EXPECT_EQ(t.config().model.dropout, 0.2);
    EXPECT_EQ(t.config().vocab.min_frequency, 2);
  });
}

// Dropout changes what a training step computes, and a rarer-word cut-off shrinks the
// vocabularies (both are part of the run, not decoration).
TEST(Training, DropoutAndMinimumFrequencyTakeEffect) {
  const s2s::Corpus corpus = small_corpus(300);
  s2s::TrainConfig plain = small_config(8, 16, 32, 1);
  plain.model.decoder_layers = 2;
  s2s::TrainConfig dropped = plain;
  dropped.model.dropout = 0.3;
  s2s::RunControl three;
  three.max_steps = 3;
  s2s::Trainer a(plain, corpus.train, corpus.valid), b(dropped, corpus.train, corpus.valid);
  a.run(three);
  b.run(three);
  EXPECT_NE(a.losses(), b.losses());
  s2s::TrainConfig rare = plain;
  rare.vocab.min_frequency = 3;
  const s2s::Trainer c(rare, corpus.train, corpus.valid);
  EXPECT_LT(c.config().model.source_vocab, a.config().model.source_vocab);
  EXPECT_LT(c.config().model.target_vocab, a.config().model.target_vocab);
}

TEST(Training, ResumeRefusesDifferentData) {
  const s2s::Corpus corpus = small_corpus(300);
  const fs::path dir = temp_dir("refuse");
  s2s::Trainer t(small_config(8, 16, 32, 1), corpus.train, corpus.valid);
  run_into(t, dir, 2);
  auto other = corpus.train;
  other.pop_back();
  try {
    s2s::Trainer::resume(dir.string(), other, corpus.valid);
    FAIL() << "resumed on different data";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("training data differs"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

// The checkpoint file of one training step of a small recurrent model, written into `dir`: what
// the tests below rewrite as an older version would have written it.
std::string one_step_checkpoint(const fs::path& dir) {
  const s2s::Corpus corpus = small_corpus(300);
  s2s::Trainer t(small_config(8, 16, 32, 1), corpus.train, corpus.valid);
  run_into(t, dir, 1);
  return (dir / "checkpoint.safetensors").string();
}

// Rewrites the checkpoint at `path` without the metadata `keys`, as a version from before them
// wrote it.
void drop_metadata(const std::string& path, std::initializer_list<const char*> keys) {
  s2s::SafetensorsFile file = s2s::SafetensorsFile::load(path);
  for (const char* key : keys) file.metadata.erase(key);
  file.save(path);
}

// Checkpoints written before the Transformer existed carry no config.arch: they load as the
// recurrent model they are.
TEST(Training, CheckpointWithoutArchitectureLoadsAsRecurrent) {
  const fs::path dir = temp_dir("no_arch");
  const std::string path = one_step_checkpoint(dir);
  ASSERT_EQ(s2s::SafetensorsFile::load(path).metadata.at("config.arch"), "rnn");
  drop_metadata(path, {"config.arch"});
  const s2s::Translator loaded = s2s::Translator::load(path);
  EXPECT_EQ(loaded.config().arch, s2s::Architecture::rnn);
  EXPECT_TRUE(std::holds_alternative<s2s::Seq2Seq>(loaded.model));
  fs::remove_all(dir);
}

// Recurrent checkpoints written before stacked decoders and recurrent dropout carry neither
// config.decoder_layers nor config.dropout: they load as one decoder cell (decoder.cell.*)
// without dropout.
TEST(Training, CheckpointWithoutDecoderLayersLoadsWithOneCell) {
  const fs::path dir = temp_dir("one_cell");
  const std::string path = one_step_checkpoint(dir);
  ASSERT_EQ(s2s::SafetensorsFile::load(path).metadata.at("config.decoder_layers"), "1");
  drop_metadata(path, {"config.decoder_layers", "config.dropout"});
  const s2s::Translator loaded = s2s::Translator::load(path);
  EXPECT_EQ(loaded.config().decoder_layers, 1);
  EXPECT_EQ(loaded.config().dropout, 0.0);
  std::set<std::string> names;
  for (const auto& p : loaded.parameters()) names.insert(p.name);
  EXPECT_TRUE(names.count("decoder.cell.weight_ih"));
  EXPECT_FALSE(names.count("decoder.cell_l1.weight_ih"));
  fs::remove_all(dir);
}

TEST(Training, CheckpointLoadsAsATranslator) {
  const s2s::Corpus corpus = small_corpus(300);
  const fs::path dir = temp_dir("translator");
  s2s::Trainer t(small_config(16, 32, 32, 1), corpus.train, corpus.valid);
  ASSERT_TRUE(run_into(t, dir));
  const s2s::Translator loaded = s2s::Translator::load(dir.string());
  EXPECT_EQ(loaded.source_vocab, t.translator().source_vocab);
  EXPECT_EQ(loaded.target_vocab, t.translator().target_vocab);
  s2s::DecodeConfig config;
  config.beam = 3;
  attn::testing::expect_same_translations(t.translator(), loaded,
                                          {corpus.test[0].source, corpus.test[1].source}, config);
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Non-finite steps and checkpoints

// Sets element 0 of `t` (a parameter's value or gradient, shared storage) to NaN.
void poison(const Tensor& t) {
  if (t.dtype() == DType::f64)
    static_cast<double*>(t.raw_data())[0] = std::nan("");
  else
    static_cast<float*>(t.raw_data())[0] = std::nanf("");
}

std::vector<std::vector<double>> weights_of(const s2s::Trainer& t) {
  std::vector<std::vector<double>> out;
  for (const auto& p : t.translator().parameters()) out.push_back(p.value.to_vector());
  return out;
}

// A NaN gradient (as an overflow gives) skips the step: no weight and no Adam moment moves, the
// batch is consumed, and the run goes on and checkpoints finite weights.
TEST(NonFinite, NonFiniteGradientSkipsTheStep) {
  const s2s::Corpus corpus = small_corpus(300);
  const fs::path dir = temp_dir("skip");
  s2s::Trainer t(small_config(8, 16, 32, 1), corpus.train, corpus.valid);
  std::vector<std::vector<double>> before_2, before_3;
  std::vector<int64_t> skipped;
  s2s::TrainCallbacks callbacks;
  callbacks.on_gradients = [&](int64_t step, const attn::nn::ParameterList& params) {
    if (step == 2) {
      before_2 = weights_of(t);
      poison(params[0].grad);
    }
    if (step == 3) before_3 = weights_of(t);
  };
  callbacks.on_skipped_step = [&](int64_t step, double, double norm) {
    skipped.push_back(step);
    EXPECT_FALSE(std::isfinite(norm));
  };
  s2s::RunControl control;
  control.max_steps = 5;
  control.out_dir = dir.string();
  t.run(control, callbacks);
  EXPECT_EQ(skipped, std::vector<int64_t>{3});  // 1-based: the third step
  EXPECT_EQ(t.skipped_steps(), 1);
  EXPECT_EQ(t.step(), 5);
  ASSERT_FALSE(before_2.empty());
  EXPECT_TRUE(before_2 == before_3) << "the skipped step changed the weights";
  const s2s::Translator loaded = s2s::Translator::load(dir.string());
  for (const auto& p : loaded.parameters())
    for (double x : p.value.to_vector()) ASSERT_TRUE(std::isfinite(x)) << p.name;
  fs::remove_all(dir);
}

// Weights that turn non-finite stop the run, and the checkpoint on disk stays the last good one
// (here the one of step 3, written by --checkpoint-every 1) rather than NaNs.
TEST(NonFinite, NonFiniteWeightsNeverReplaceTheLastGoodCheckpoint) {
  const s2s::Corpus corpus = small_corpus(300);
  const fs::path dir = temp_dir("nan_weights");
  s2s::Trainer t(small_config(8, 16, 32, 1), corpus.train, corpus.valid);
  s2s::TrainCallbacks callbacks;
  callbacks.on_gradients = [&](int64_t step, const attn::nn::ParameterList& params) {
    if (step == 3) poison(params[0].value);
  };
  s2s::RunControl control;
  control.max_steps = 6;
  control.checkpoint_every = 1;
  control.out_dir = dir.string();
  try {
    t.run(control, callbacks);
    FAIL() << "a run with NaN weights finished";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 4"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("last good checkpoint"), std::string::npos) << e.what();
  }
  const std::string path = (dir / "checkpoint.safetensors").string();
  EXPECT_EQ(s2s::SafetensorsFile::load(path).i64("train.position")[2], 3);
  const s2s::Translator loaded = s2s::Translator::load(dir.string());
  for (const auto& p : loaded.parameters())
    for (double x : p.value.to_vector()) ASSERT_TRUE(std::isfinite(x)) << p.name;
  // save_checkpoint itself refuses the NaN weights and leaves the file alone.
  EXPECT_THROW(t.save_checkpoint(path), attn::Error);
  EXPECT_EQ(s2s::SafetensorsFile::load(path).i64("train.position")[2], 3);
  fs::remove_all(dir);
}

// A byte flipped in a checkpoint's data (weights or Adam moments) is found on load and named;
// resuming from a directory without a checkpoint says which file is missing.
TEST(NonFinite, CorruptOrMissingCheckpointIsNamed) {
  const fs::path dir = temp_dir("corrupt");
  const std::string path = one_step_checkpoint(dir);
  const s2s::SafetensorsFile good = s2s::SafetensorsFile::load(path);
  std::string weight;  // the first parameter, and its second Adam moment
  for (const std::string& name : good.names())
    if (weight.empty() && name.rfind("model.", 0) == 0) weight = name;
  for (const std::string& name : {weight, "optim.v." + weight.substr(6)}) {
    ASSERT_TRUE(good.contains(name)) << name;
    // The tensor's first data byte: find it through the header.
    auto bytes = s2s::read_file_bytes(path, "test");
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    const std::string header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
    const std::size_t at = header.find("\"" + name + "\":");
    ASSERT_NE(at, std::string::npos);
    const std::size_t offsets = header.find("\"data_offsets\":[", at);
    const uint64_t begin = std::stoull(header.substr(offsets + 16));
    auto broken = bytes;
    broken[8 + n + begin + 1] ^= std::byte{0x10};
    s2s::write_file_atomically(path, broken, "test");
    try {
      s2s::Translator t = s2s::Translator::load(dir.string());
      FAIL() << "a flipped byte in " << name << " loaded";
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find("tensor \"" + name + "\" fails its xxh3_64 checksum"),
                std::string::npos) << e.what();
    }
    s2s::write_file_atomically(path, bytes, "test");
  }
  const fs::path empty = temp_dir("no_checkpoint");
  try {
    s2s::Trainer::resume(empty.string(), small_corpus(300).train, {});
    FAIL() << "resumed from nothing";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint.safetensors does not exist"),
              std::string::npos) << e.what();
  }
  fs::remove_all(dir);
  fs::remove_all(empty);
}

// Validation held out of the training pairs: sources that occur once, never trained on.
TEST(HoldOutValidation, SourcesNeverInTraining) {
  std::vector<s2s::SentencePair> train;
  for (int i = 0; i < 100; ++i) {
    s2s::SentencePair pair{"s", "t"};  // appended to, not "s" + ...: GCC 12's false -Wrestrict
    pair.source += std::to_string(i % 60);
    pair.target += std::to_string(i);
    train.push_back(pair);
  }
  const std::vector<s2s::SentencePair> all = train;
  const std::vector<s2s::SentencePair> valid = s2s::hold_out_validation(train, 5, 7);
  ASSERT_EQ(valid.size(), 5u);
  EXPECT_EQ(train.size(), 95u);
  for (const auto& v : valid)
    for (const auto& t : train) EXPECT_NE(v.source, t.source);
  EXPECT_EQ(s2s::hold_out_validation(train, 0, 7).size(), 0u);
  std::vector<s2s::SentencePair> again = all;
  EXPECT_EQ(s2s::hold_out_validation(again, 5, 7), valid);  // a pure function of the seed
  std::vector<s2s::SentencePair> few = {{"a", "b"}, {"c", "d"}};
  EXPECT_THROW(s2s::hold_out_validation(few, 2, 1), attn::Error);
}

}  // namespace
