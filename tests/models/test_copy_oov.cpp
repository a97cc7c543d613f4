// Copying words the target vocabulary lacks (pointer-generator extended vocabulary, See et al.
// 2017, and the pointer-sentinel mixture, Merity et al. 2016): the extended copy loss against
// finite differences (float64), extended ids assigned deterministically by batching and agreeing
// with the ids the model derives when decoding, both mixtures' model gradients against finite
// differences, the sentinel's step by hand and saturated, and a tiny seeded training run per
// mixture that learns to copy names and numbers it never saw, with greedy and beam search both
// emitting them (the sentinel model also through a checkpoint).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "attn/random.h"
#include "seq2seq/data/batching.h"
#include "seq2seq/decoding/decode.h"
#include "seq2seq/models/loss.h"
#include "seq2seq/models/model.h"
#include "seq2seq/training/train.h"
#include "seq2seq/data/vocab.h"
#include "support/test_support.h"
#include "support/training_checks.h"

namespace {

using attn::DType;
using attn::Tensor;
using attn::testing::check_gradient;
namespace s2s = attn::seq2seq;

// ---------------------------------------------------------------------------------------------
// The loss over V words and X extended ids

// Copy rows over V + X ids summing to 1, with the extended ids a row's sentence lacks at 0.
Tensor copy_rows(int64_t N, int64_t V, int64_t X, const std::vector<int64_t>& extra_of_row, uint64_t seed) {
  Tensor copy = attn::testing::random_tensor({N, V + X}, DType::f64, seed, 0.1, 1.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t v = V + extra_of_row[n]; v < V + X; ++v) copy.set({n, v}, 0.0);
    double sum = 0.0;
    for (int64_t v = 0; v < V + X; ++v) sum += copy.get({n, v});
    for (int64_t v = 0; v < V + X; ++v) copy.set({n, v}, copy.get({n, v}) / sum);
  }
  return copy;
}

TEST(ExtendedCopyLoss, GradientsMatchFiniteDifferences) {
  const int64_t N = 4, V = 6, X = 3;
  Tensor logits = attn::testing::random_tensor({N, V}, DType::f64, 11, -2.0, 2.0);
  // Row 1's sentence has one extended id, row 3's none: their other extended ids have p = 0.
  Tensor copy = copy_rows(N, V, X, {3, 1, 2, 0}, 12);
  Tensor gate = attn::testing::random_tensor({N}, DType::f64, 13, 0.2, 0.8);
  const std::vector<int32_t> targets = {7, 6, 0, 4};  // extended, extended, padding, a word
  for (double eps : {0.0, 0.1}) {
    s2s::CrossEntropyConfig c;
    c.label_smoothing = eps;
    const auto r = s2s::copy_mixture_loss(logits, copy, gate, targets, c);
    EXPECT_EQ(r.count, 3);
    EXPECT_TRUE(std::isfinite(r.loss)) << r.loss;
    s2s::CrossEntropyConfig no_grad = c;
    no_grad.compute_grad = false;
    auto loss = [&] { return s2s::copy_mixture_loss(logits, copy, gate, targets, no_grad).loss; };
    const std::string tag = " (eps " + std::to_string(eps) + ")";
    EXPECT_TRUE(check_gradient(loss, logits, r.dlogits, "dlogits" + tag, 24));
    EXPECT_TRUE(check_gradient(loss, copy, r.dcopy, "dcopy" + tag, N * (V + X)));
    EXPECT_TRUE(check_gradient(loss, gate, r.dgate, "dgate" + tag, N));
  }
}

// Row 0 of the test above by hand: an extended target is reached only by copying, and the
// smoothing mass sits on the V words.
TEST(ExtendedCopyLoss, ValueByHand) {
  const int64_t V = 5, X = 2;
  const Tensor logits = attn::testing::random_tensor({1, V}, DType::f64, 21, -1.0, 1.0);
  const Tensor copy = copy_rows(1, V, X, {2}, 22);
  const Tensor gate = Tensor::full({1}, 0.3, DType::f64);
  const double eps = 0.2, g = 0.3;
  s2s::CrossEntropyConfig c;
  c.label_smoothing = eps;
  c.compute_grad = false;
  const auto r = s2s::copy_mixture_loss(logits, copy, gate, {6}, c);
  double z = 0.0;
  for (int64_t v = 0; v < V; ++v) z += std::exp(logits.get({0, v}));
  double expected = -(1.0 - eps) * std::log((1.0 - g) * copy.get({0, 6}));
  for (int64_t v = 0; v < V; ++v)
    expected -= eps / V * std::log(g * std::exp(logits.get({0, v})) / z + (1.0 - g) * copy.get({0, v}));
  EXPECT_NEAR(r.loss, expected, 1e-12);
  EXPECT_NEAR(r.nll, -std::log((1.0 - g) * copy.get({0, 6})), 1e-12);
  attn::testing::expect_error(
      [&] { s2s::copy_mixture_loss(logits, copy, gate, {7}, c); },
      {"[copy_mixture_loss]", "target 7", "5 words and 2 extended ids"});
  attn::testing::expect_error(
      [&] { s2s::copy_mixture_loss(logits, copy.slice(1, 0, 4), gate, {1}, c); },
      {"[copy_mixture_loss]", "V + X >= V"});
}

// ---------------------------------------------------------------------------------------------
// Extended ids in batching

struct Vocabs {
  s2s::Vocab source, target;
};

// Source ids: bob 4, cat 5, say 6, to 7 (frequency ties go by byte order); target ids: bob 4,
// dis 5, "à" 6. V = 7.
Vocabs small_vocabs() {
  return {s2s::Vocab::build({{"say", "bob", "to", "cat"}}), s2s::Vocab::build({{"dis", "bob", "\xC3\xA0"}})};
}

TEST(ExtendedVocabulary, BatchingAssignsIdsDeterministically) {
  const Vocabs v = small_vocabs();
  ASSERT_EQ(v.target.size(), 7);
  const s2s::Tokens source = {"say", "zorg", "to", "bob", "zorg", "42"};
  const s2s::Tokens target = {"dis", "zorg", "\xC3\xA0", "42", "bob", "zut"};
  const s2s::EncodedPair p = s2s::encode_pair(v.source, v.target, source, target);
  EXPECT_EQ(p.source, (std::vector<int32_t>{6, 1, 7, 4, 1, 1}));
  EXPECT_EQ(p.target, (std::vector<int32_t>{5, 1, 6, 1, 4, 1}));
  // say 7, zorg 8 (twice), to 9: every source word the target vocabulary lacks, in order of
  // first occurrence; bob is a target word; 42 is 10.
  EXPECT_EQ(p.source_copy, (std::vector<int32_t>{7, 8, 9, 4, 8, 10}));
  // zorg and 42 occur in the source: their extended ids; zut does not: <unk>.
  EXPECT_EQ(p.target_copy, (std::vector<int32_t>{5, 8, 6, 10, 4, 1}));
  const s2s::EncodedPair again = s2s::encode_pair(v.source, v.target, source, target);
  EXPECT_EQ(again.source_copy, p.source_copy);
  EXPECT_EQ(again.target_copy, p.target_copy);

  // Decoding derives the same ids from the source ids alone: unknown words as 8 + k.
  const std::vector<int32_t> words = s2s::encode_source_words(v.source, source);
  EXPECT_EQ(words, (std::vector<int32_t>{6, 8, 7, 4, 8, 9}));
  s2s::ModelConfig mc;
  mc.source_vocab = v.source.size();
  mc.target_vocab = v.target.size();
  mc.copy = true;
  s2s::Seq2Seq model = s2s::Seq2Seq::create(mc, 1);
  model.set_copy_map(v.source.tokens(), v.target.tokens());
  const s2s::ExtendedSource e = s2s::extend_source(words, model.copy_map, v.target.size());
  EXPECT_EQ(e.copy_ids, p.source_copy);
  EXPECT_EQ(e.extra, 4);
  EXPECT_EQ(s2s::copy_words(source, e), (s2s::Tokens{"say", "zorg", "to", "42"}));

  // The batch: copy ids then <eos> then <pad> per source row; copy targets time-major like
  // target_output. Pair 1 has nothing to extend.
  const std::vector<s2s::EncodedPair> pairs = {p, s2s::encode_pair(v.source, v.target, {"bob"}, {"bob"})};
  const s2s::Batch b = s2s::make_batch(pairs, {0, 1});
  ASSERT_EQ(b.source_steps, 7);
  ASSERT_EQ(b.target_steps, 7);
  EXPECT_EQ(std::vector<int32_t>(b.source_copy.begin(), b.source_copy.begin() + 7),
            (std::vector<int32_t>{7, 8, 9, 4, 8, 10, 3}));
  EXPECT_EQ(std::vector<int32_t>(b.source_copy.begin() + 7, b.source_copy.end()),
            (std::vector<int32_t>{4, 3, 0, 0, 0, 0, 0}));
  const int64_t B = 2;
  EXPECT_EQ(b.target_copy[1 * B + 0], 8);   // zorg
  EXPECT_EQ(b.target_output[1 * B + 0], 1); // <unk> for the plain loss
  EXPECT_EQ(b.target_copy[6 * B + 0], 3);   // <eos>
  EXPECT_EQ(b.target_copy[0 * B + 1], 4);
  EXPECT_EQ(b.target_copy[1 * B + 1], 3);
  EXPECT_EQ(b.target_copy[2 * B + 1], 0);

  // The model reads the same values from the batch's copy ids as from the decoding ids: 4
  // extended ids beyond V for the first sentence.
  const s2s::EncodedSource from_batch = model.encode(s2s::make_batch(pairs, {0}));
  const s2s::EncodedSource from_ids = model.encode(s2s::make_source_batch({words}));
  EXPECT_EQ(from_batch.values.size(-1), mc.hidden + 7 + 4);
  EXPECT_EQ(from_batch.values.to_vector(), from_ids.values.to_vector());

  // Pairs built from ids alone carry no extended vocabulary; mixing them is refused.
  const std::vector<s2s::EncodedPair> mixed = {p, {{4}, {4}}};
  attn::testing::expect_error([&] { s2s::make_batch(mixed, {0, 1}); }, {"[batch]", "1 of 2"});
  const s2s::Batch plain = s2s::make_batch(mixed, {1});
  EXPECT_TRUE(plain.source_copy.empty());
  EXPECT_EQ(plain.target_copy, plain.target_output);
}

// ---------------------------------------------------------------------------------------------
// The model: pointer-generator and pointer-sentinel (Merity et al. 2016) mixtures

// A float64 copying model with a 3-wide embedding and a 4-wide state, and a batch of three
// sentences whose names and numbers ("zorg", "7") only copying reaches.
struct CopyFixture {
  s2s::Vocab source = s2s::Vocab::build({{"say", "please", "now", "call"}});
  s2s::Vocab target = s2s::Vocab::build({{"dis", "appelle", "maintenant", "stp"}});
  s2s::ModelConfig config(s2s::DecoderKind decoder, s2s::CopyKind kind) const {
    s2s::ModelConfig mc;
    mc.decoder = decoder;
    mc.score = decoder == s2s::DecoderKind::luong ? s2s::ScoreKind::general : s2s::ScoreKind::additive;
    mc.source_vocab = source.size();
    mc.target_vocab = target.size();
    mc.embedding = 3;
    mc.hidden = 4;
    mc.copy = true;
    mc.copy_kind = kind;
    mc.dtype = DType::f64;
    return mc;
  }
  s2s::Batch batch() const {
    const std::vector<s2s::EncodedPair> pairs = {
        s2s::encode_pair(source, target, {"say", "zorg", "please"}, {"dis", "zorg", "stp"}),
        s2s::encode_pair(source, target, {"call", "ana", "7", "now"}, {"appelle", "ana", "7", "maintenant"}),
        s2s::encode_pair(source, target, {"say", "bo"}, {"dis", "bo", "bo"})};
    return s2s::make_batch(pairs, {0, 1, 2});
  }
};

// The whole model with extended copy targets: every parameter's gradient through the mixture
// over V + X ids against finite differences, for both mixtures and both attention decoders.
// Returns the parameter names.
std::set<std::string> expect_model_gradients(s2s::CopyKind kind, s2s::DecoderKind decoder) {
  const CopyFixture fx;
  const s2s::Batch batch = fx.batch();
  EXPECT_NE(batch.target_copy, batch.target_output);  // the extended targets are in play
  s2s::Seq2Seq model = s2s::Seq2Seq::create(fx.config(decoder, kind), 5);
  model.set_copy_map(fx.source.tokens(), fx.target.tokens());
  s2s::CrossEntropyConfig ce;
  ce.label_smoothing = 0.1;
  model.zero_grad();
  const s2s::ForwardResult f = model.forward(batch);
  EXPECT_GT(f.copy.size(2), model.config.target_vocab);
  const auto r = s2s::copy_mixture_loss(f.logits, f.copy, f.gate, batch.target_copy, ce);
  model.backward(batch, f, r.dlogits, r.dcopy, r.dgate);
  auto loss = [&] {
    s2s::CrossEntropyConfig no_grad = ce;
    no_grad.compute_grad = false;
    const s2s::ForwardResult g = model.forward(batch);
    return s2s::copy_mixture_loss(g.logits, g.copy, g.gate, batch.target_copy, no_grad).loss;
  };
  // h = 1e-5 on an O(1) loss: central differences err by ~h^2 + 1e-16 / h ~ 1e-10.
  std::set<std::string> names;
  for (const attn::nn::Parameter& p : model.parameters()) {
    names.insert(p.name);
    EXPECT_TRUE(check_gradient(loss, p.value, p.grad,
                               std::string(s2s::copy_kind_name(kind)) + " " + s2s::decoder_kind_name(decoder) +
                                   " " + p.name, 6, 1e-5, 1e-6));
  }
  return names;
}

TEST(ExtendedVocabulary, ModelGradientsMatchFiniteDifferences) {
  for (const auto decoder : {s2s::DecoderKind::luong, s2s::DecoderKind::bahdanau}) {
    const std::set<std::string> names = expect_model_gradients(s2s::CopyKind::generator, decoder);
    EXPECT_TRUE(names.count("gate.weight"));
  }
}

// The sentinel and the pointer's query projection included; no pointer-generator gate.
TEST(PointerSentinel, ModelGradientsMatchFiniteDifferences) {
  for (const auto decoder : {s2s::DecoderKind::luong, s2s::DecoderKind::bahdanau}) {
    const std::set<std::string> names = expect_model_gradients(s2s::CopyKind::sentinel, decoder);
    EXPECT_TRUE(names.count("pointer.sentinel") && names.count("pointer.query.weight"));
    EXPECT_FALSE(names.count("gate.weight"));
  }
}

// One decoder step by hand: q = tanh(W_q s + b), a = softmax(q . [x; h_1..h_S]) over
// the sentence's own positions and the sentinel; g = a_0, and the copy distribution is the
// source mass a_1..a_S scattered to the copy ids, over 1 - g. log_probs sum to 1 over V + X.
TEST(PointerSentinel, StepMatchesTheMixtureByHand) {
  const CopyFixture fx;
  const s2s::Batch batch = fx.batch();
  s2s::Seq2Seq model = s2s::Seq2Seq::create(fx.config(s2s::DecoderKind::luong, s2s::CopyKind::sentinel), 9);
  model.set_copy_map(fx.source.tokens(), fx.target.tokens());
  const s2s::EncodedSource src = model.encode(batch);
  const std::vector<int32_t> bos(batch.batch, static_cast<int32_t>(s2s::Vocab::bos_id));
  const s2s::StepResult r = model.step(src, src.initial, bos, 0, false);
  const int64_t H = model.config.hidden, S = batch.source_steps, Vx = src.extended_vocab;
  const std::vector<std::vector<double>> logp = model.log_probs(r);
  for (int64_t b = 0; b < batch.batch; ++b) {
    std::vector<double> q(H);
    for (int64_t i = 0; i < H; ++i) {
      double z = model.pointer_query.params.bias.get({i});
      for (int64_t k = 0; k < H; ++k) z += model.pointer_query.params.weight.get({i, k}) * r.state.h.back().get({b, k});
      q[i] = std::tanh(z);
    }
    const int64_t n = batch.source_lengths[b];
    std::vector<double> score(n + 1);
    for (int64_t j = 0; j <= n; ++j) {
      double d = 0.0;
      for (int64_t i = 0; i < H; ++i) d += q[i] * (j == 0 ? model.sentinel.get({i}) : src.memory.get({b, j - 1, i}));
      score[j] = d;
    }
    double mx = score[0], z = 0.0;
    for (double x : score) mx = std::max(mx, x);
    for (double x : score) z += std::exp(x - mx);
    const double g = std::exp(score[0] - mx) / z;
    EXPECT_NEAR(r.gate.get({b, 0}), g, 1e-12) << "row " << b;
    std::vector<double> copy(Vx, 0.0);
    for (int64_t j = 1; j <= n; ++j) copy[batch.source_copy[b * S + j - 1]] += std::exp(score[j] - mx) / z / (1.0 - g);
    double total = 0.0;
    for (int64_t v = 0; v < Vx; ++v) {
      EXPECT_NEAR(r.copy.get({b, v}), copy[v], 1e-12) << "row " << b << ", id " << v;
      total += std::exp(logp[b][v]);
    }
    EXPECT_NEAR(total, 1.0, 1e-12) << "row " << b;
  }
}

// A sentinel that takes all of the pointer's mass (g = 1 exactly in float64): the copy term
// vanishes, extended ids get log p = -inf, vocabulary words the softmax's log p, and the
// backward stays finite with no gradient through the saturated pointer.
TEST(PointerSentinel, SaturatedSentinelGivesTheVocabularySoftmaxAndFiniteGradients) {
  const CopyFixture fx;
  const s2s::Batch batch = fx.batch();
  s2s::Seq2Seq model = s2s::Seq2Seq::create(fx.config(s2s::DecoderKind::bahdanau, s2s::CopyKind::sentinel), 3);
  model.set_copy_map(fx.source.tokens(), fx.target.tokens());
  Tensor(model.pointer_query.params.weight).fill(0.0);
  Tensor(model.pointer_query.params.bias).fill(40.0);  // q = tanh(40) = 1 in every coordinate
  Tensor(model.sentinel).fill(1e4);             // the sentinel's score is 4e4, the others' < 4
  const s2s::EncodedSource src = model.encode(batch);
  const std::vector<int32_t> bos(batch.batch, static_cast<int32_t>(s2s::Vocab::bos_id));
  const s2s::StepResult r = model.step(src, src.initial, bos, 0, false);
  const std::vector<std::vector<double>> logp = model.log_probs(r);
  const int64_t V = model.config.target_vocab, Vx = src.extended_vocab;
  ASSERT_GT(Vx, V);
  const Tensor logits = model.logits(r.output);
  for (int64_t b = 0; b < batch.batch; ++b) {
    EXPECT_EQ(r.gate.get({b, 0}), 1.0);
    double mx = -INFINITY, z = 0.0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits.get({b, v}));
    for (int64_t v = 0; v < V; ++v) z += std::exp(logits.get({b, v}) - mx);
    for (int64_t v = 0; v < V; ++v) {
      EXPECT_EQ(r.copy.get({b, v}), 0.0);
      EXPECT_NEAR(logp[b][v], logits.get({b, v}) - mx - std::log(z), 1e-12);
    }
    for (int64_t v = V; v < Vx; ++v) EXPECT_EQ(logp[b][v], -INFINITY);
  }
  // Vocabulary targets only (a copy-only target would have p = 0): finite loss and gradients.
  model.zero_grad();
  const s2s::ForwardResult f = model.forward(batch);
  const auto loss = s2s::copy_mixture_loss(f.logits, f.copy, f.gate, batch.target_output, {});
  ASSERT_TRUE(std::isfinite(loss.loss));
  model.backward(batch, f, loss.dlogits, loss.dcopy, loss.dgate);
  for (const attn::nn::Parameter& p : model.parameters())
    for (double x : p.grad.to_vector()) ASSERT_TRUE(std::isfinite(x)) << p.name;
  for (double x : model.sentinel_grad.to_vector()) EXPECT_EQ(x, 0.0);
  for (double x : model.pointer_query.grads.weight.to_vector()) EXPECT_EQ(x, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Learning to copy unseen words

// Nonsense names of three consonant-vowel syllables, and numbers, from a seeded generator.
std::string random_word(uint64_t& state) {
  static const char* consonants = "bdfgklmnprstvz";
  static const char* vowels = "aeiou";
  state = attn::mix64(state + 0x9e3779b97f4a7c15ULL);
  if (state % 4 == 0) return std::to_string(100 + (state >> 8) % 9900);
  std::string w;
  for (int s = 0; s < 3; ++s) {
    state = attn::mix64(state + 0x9e3779b97f4a7c15ULL);
    w += consonants[state % 14];
    w += vowels[(state >> 8) % 5];
  }
  return w;
}

// "say X" -> "dis X" and three other templates. Each word fills one pair only, so with a
// minimum frequency of 2 no name or number enters either vocabulary: the training targets
// copy them through extended ids, exactly as the test sentences must.
std::vector<s2s::SentencePair> copy_task(const std::vector<std::string>& words) {
  std::vector<s2s::SentencePair> pairs;
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    switch (i % 4) {
      case 0: pairs.push_back({"say " + w, "dis " + w}); break;
      case 1: pairs.push_back({"say " + w + " please", "dis " + w + " stp"}); break;
      case 2: pairs.push_back({"call " + w + " now", "appelle " + w + " maintenant"}); break;
      default: pairs.push_back({"we see " + w, "nous voyons " + w}); break;
    }
  }
  return pairs;
}

// Both mixtures; the pointer-sentinel model also goes through a checkpoint and back.
TEST(CopyUnseenWords, TinyRunLearnsToCopyNamesAndNumbersItNeverSaw) {
  for (const s2s::CopyKind kind : {s2s::CopyKind::generator, s2s::CopyKind::sentinel}) {
  SCOPED_TRACE(s2s::copy_kind_name(kind));
  uint64_t state = 2024;
  std::set<std::string> seen;
  std::vector<std::string> train_words, test_words;
  while (train_words.size() < 800 || test_words.size() < 80) {
    const std::string w = random_word(state);
    if (!seen.insert(w).second) continue;
    (train_words.size() < 800 ? train_words : test_words).push_back(w);
  }
  const auto train = copy_task(train_words), test = copy_task(test_words);

  s2s::TrainConfig config;
  config.model.embedding = 16;
  config.model.hidden = 32;
  config.model.copy = true;
  config.model.copy_kind = kind;
  config.vocab.min_frequency = 2;
  config.batch_size = 32;
  config.epochs = 6;
  config.lr = 1e-2;
  config.schedule.warmup_steps = 10;
  config.seed = 7;
  const auto start = std::chrono::steady_clock::now();
  s2s::Trainer trainer(config, train, {});
  const s2s::Translator& translator = trainer.translator();
  // No name or number is a vocabulary word: each is <unk> to the encoder and an extended id.
  for (const std::string& w : {train_words[0], train_words[1], test_words[0]}) {
    EXPECT_FALSE(translator.target_vocab.contains(w)) << w;
    EXPECT_FALSE(translator.source_vocab.contains(w)) << w;
  }
  ASSERT_TRUE(trainer.run({}));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  s2s::DecodeConfig greedy, beam;
  beam.beam = 4;
  const s2s::EvalResult g = s2s::evaluate(translator, test, greedy);
  const s2s::EvalResult b = s2s::evaluate(translator, test, beam);
  std::printf("copy task (%s): %zu training pairs, %.1f s; unseen words: exact match greedy %.1f%%, beam %.1f%%\n",
              s2s::copy_kind_name(kind), train.size(), seconds, g.exact_match, b.exact_match);
  // Without the extended vocabulary every test word would come out as <unk>: exact match 0.
  EXPECT_GE(g.exact_match, 90.0);
  EXPECT_GE(b.exact_match, 90.0);

  // One sentence by hand: both searches emit the unseen word itself.
  for (const s2s::DecodeConfig& c : {greedy, beam}) {
    std::vector<s2s::Tokens> sources;
    const auto out = translator.translate({"say " + test_words[0]}, c, &sources);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(sources[0], (s2s::Tokens{"say", test_words[0]}));
    EXPECT_EQ(out[0].copied_words, (s2s::Tokens{"say", test_words[0]}));
    EXPECT_EQ(translator.target_tokens(out[0]), (s2s::Tokens{"dis", test_words[0]})) << "beam " << c.beam;
    // The copied word is an extended id: V + 1 ("say" is V + 0).
    ASSERT_EQ(out[0].tokens.size(), 2u);
    EXPECT_EQ(out[0].tokens[1], translator.target_vocab.size() + 1);
  }
  if (kind == s2s::CopyKind::sentinel) {
    // The checkpoint keeps the mixture and its parameters: the loaded model translates alike.
    const std::filesystem::path dir = attn::testing::scratch_dir("copy_sentinel");
    const std::string path = (dir / "checkpoint.safetensors").string();
    trainer.save_checkpoint(path);
    const s2s::Translator loaded = s2s::Translator::load(path);
    EXPECT_EQ(loaded.config().copy_kind, s2s::CopyKind::sentinel);
    const std::vector<std::string> some = {"say " + test_words[1], "call " + test_words[2] + " now"};
    const auto a = translator.translate(some, {}), b = loaded.translate(some, {});
    for (size_t i = 0; i < some.size(); ++i)
      EXPECT_EQ(translator.target_tokens(a[i]), loaded.target_tokens(b[i])) << some[i];
    std::filesystem::remove_all(dir);
  }
  }
}

}  // namespace
