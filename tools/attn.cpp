// attn: train, evaluate and run attention translators from the command line.
//
//   attn train --corpus --out runs/luong          (the embedded English -> French corpus)
//   attn train --corpus --out runs/xfmr --arch transformer --hidden 128 --layers 2 --heads 4
//   attn train --corpus --out runs/deep --arch lstm --decoder-layers 2 --dropout 0.2
//   attn translate --model runs/luong "the black cat sees the dog ."
//   attn eval --model runs/luong --corpus-split test
//
// Every error is one line on stderr ("attn: error: ...") and a non-zero exit status: 2 for bad
// command-line arguments, 1 for everything else (unreadable files, bad checkpoints, ...).
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/corpus.h"
#include "seq2seq/heatmap.h"
#include "seq2seq/pairs_file.h"
#include "seq2seq/train.h"

namespace s2s = attn::seq2seq;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string format_duration(double seconds) {
  if (seconds < 0) seconds = 0;
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

struct CorpusOptions {
  uint64_t seed = 1;
  int64_t train_pairs = 20000;
};

s2s::Corpus make_corpus(const CorpusOptions& o) {
  s2s::CorpusConfig c;
  c.seed = o.seed;
  c.train_pairs = o.train_pairs;
  return s2s::generate_corpus(c);
}

const std::vector<s2s::SentencePair>& corpus_split(const s2s::Corpus& corpus, const std::string& name) {
  if (name == "train") return corpus.train;
  if (name == "valid") return corpus.valid;
  if (name == "test") return corpus.test;
  if (name == "test_long" || name == "long") return corpus.test_long;
  throw UsageError("--corpus-split must be train, valid, test or test_long, got " + name);
}

// ---------------------------------------------------------------------------------------------

// --threads N: OpenMP and OpenBLAS threads; 0 leaves their defaults (all cores, or
// OMP_NUM_THREADS / OPENBLAS_NUM_THREADS when the environment sets them).
void apply_threads(int64_t threads) {
  if (threads > 0) s2s::set_thread_count(static_cast<int>(threads));
}

struct TrainArgs {
  std::string arch = "gru";
  std::string attention = "luong-general";
  int64_t emb = 64, hidden = 128, layers = 1, attention_hidden = 0, local_width = 4;
  bool emb_given = false;  // the Transformer's embedding width follows --hidden unless given
  // Decoder depth (0: --layers for the transformer, 1 for gru/lstm) and dropout (when not
  // given: 0.1 for the transformer, 0 for gru/lstm, so recurrent runs train as before).
  int64_t decoder_layers = 0;
  double dropout = 0.1;
  bool dropout_given = false;
  int64_t min_frequency = 1;  // VocabConfig's default
  // Transformer sizes (--arch transformer).
  int64_t heads = 4, ffn = 0;
  std::string norm = "pre", positions = "sinusoidal";
  int64_t threads = 0;
  bool unidirectional = false;
  int64_t epochs = 10, batch = 64, max_steps = 0, warmup = 100, eval_every = 0, eval_sentences = 200;
  int64_t progress_every = 50, checkpoint_every = 0, max_source = 64;
  double lr = 2e-3, clip = 1.0, label_smoothing = 0.1, weight_decay = 0.0, time_limit = 0.0;
  std::string schedule = "linear";
  bool adamw = false, copy = false;
  uint64_t seed = 1;
  std::string train_file, valid_file, out;
  bool corpus = false, resume = false, skip_bad_lines = false;
  CorpusOptions corpus_options;
};

int run_train(const TrainArgs& a) {
  apply_threads(a.threads);
  std::vector<s2s::SentencePair> train, valid;
  if (a.corpus == !a.train_file.empty())
    throw UsageError("give exactly one of --corpus or --train FILE");
  if (a.corpus) {
    s2s::Corpus corpus = make_corpus(a.corpus_options);
    train = std::move(corpus.train);
    valid = std::move(corpus.valid);
  } else {
    s2s::PairsReadOptions options;
    options.max_tokens = a.max_source - 1;
    options.policy = a.skip_bad_lines ? s2s::BadLinePolicy::skip : s2s::BadLinePolicy::refuse;
    s2s::PairsFile file = s2s::read_pairs_file(a.train_file, options);
    std::cerr << file.report.summary(a.train_file) << "\n";
    train = std::move(file.pairs);
    if (!a.valid_file.empty()) valid = s2s::read_pairs_file(a.valid_file, options).pairs;
  }
  std::optional<s2s::Trainer> trainer;
  if (a.resume) {
    trainer.emplace(s2s::Trainer::resume(a.out, std::move(train), std::move(valid)));
    std::cerr << "resuming " << a.out << " at step " << trainer->step() << "/"
              << trainer->total_steps() << "\n";
  } else {
    s2s::TrainConfig c;
    if (a.arch != "gru" && a.arch != "lstm" && a.arch != "transformer")
      throw UsageError("--arch must be gru, lstm or transformer, got " + a.arch);
    const bool transformer = a.arch == "transformer";
    if (transformer) {
      c.model.arch = s2s::Architecture::transformer;
      c.model.decoder_layers = a.decoder_layers > 0 ? a.decoder_layers : a.layers;
      c.model.heads = a.heads;
      c.model.ffn = a.ffn;
      c.model.dropout = a.dropout;
      if (a.norm != "pre" && a.norm != "post") throw UsageError("--norm must be pre or post, got " + a.norm);
      c.model.norm = a.norm == "pre" ? attn::nn::NormPlacement::pre : attn::nn::NormPlacement::post;
      const auto positions = s2s::parse_position_kind(a.positions);
      if (!positions) throw UsageError("--positions must be sinusoidal or rope, got " + a.positions);
      c.model.positions = *positions;
    } else {
      c.model.rnn = a.arch == "gru" ? attn::nn::RnnKind::gru : attn::nn::RnnKind::lstm;
      c.model.decoder_layers = a.decoder_layers > 0 ? a.decoder_layers : 1;
      c.model.dropout = a.dropout_given ? a.dropout : 0.0;
    }
    c.vocab.min_frequency = a.min_frequency;
    const auto preset = s2s::parse_attention_preset(a.attention);
    if (!preset)
      throw UsageError("--attention must be bahdanau, luong-dot, luong-general, luong-concat, "
                       "location, local-m, local-p, scaled-dot, cosine or none, got " + a.attention);
    s2s::apply_attention_preset(c.model, *preset);
    c.model.embedding = transformer && !a.emb_given ? a.hidden : a.emb;
    c.model.hidden = a.hidden;
    c.model.encoder_layers = a.layers;
    c.model.bidirectional = !a.unidirectional;
    c.model.attention_hidden = a.attention_hidden;
    c.model.local_half_width = a.local_width;
    c.model.max_source_steps = a.max_source;
    c.model.copy = a.copy;
    c.epochs = a.epochs;
    c.batch_size = a.batch;
    c.lr = a.lr;
    c.clip_norm = a.clip;
    c.label_smoothing = a.label_smoothing;
    c.adam.weight_decay = a.weight_decay;
    c.adam.decoupled = a.adamw;
    c.schedule.warmup_steps = a.warmup;
    bool known = false;
    for (auto k : {s2s::ScheduleKind::constant, s2s::ScheduleKind::linear, s2s::ScheduleKind::cosine,
                   s2s::ScheduleKind::inverse_sqrt})
      if (a.schedule == s2s::schedule_kind_name(k)) c.schedule.kind = k, known = true;
    if (!known)
      throw UsageError("--schedule must be constant, linear, cosine or inverse_sqrt, got " + a.schedule);
    c.seed = a.seed;
    trainer.emplace(c, std::move(train), std::move(valid));
    const auto& m = trainer->config().model;
    if (transformer)
      std::cerr << "model: transformer, " << m.encoder_layers << " + " << m.decoder_layers
                << " layers, d_model " << m.hidden << ", " << m.heads << " heads, ffn "
                << (m.ffn > 0 ? m.ffn : 4 * m.hidden) << ", " << attn::nn::norm_placement_name(m.norm)
                << "-norm, " << s2s::position_kind_name(m.positions) << " positions, dropout "
                << m.dropout;
    else
      std::cerr << "model: " << a.arch << " " << s2s::decoder_kind_name(m.decoder) << " decoder, "
                << s2s::score_kind_name(m.score) << " score" << (m.copy ? ", copy" : "") << ", emb "
                << m.embedding << ", hidden " << m.hidden << ", " << m.encoder_layers << " + "
                << m.decoder_layers << " layers, dropout " << m.dropout;
    std::cerr << ", vocab " << m.source_vocab << " -> " << m.target_vocab << ", "
              << attn::nn::parameter_count(trainer->translator().parameters())
              << " parameters, " << trainer->total_steps() << " steps\n";
  }
  s2s::RunControl control;
  control.max_steps = a.max_steps;
  control.time_limit_s = a.time_limit;
  control.eval_every = a.eval_every;
  control.eval_sentences = a.eval_sentences;
  control.checkpoint_every = a.checkpoint_every;
  control.progress_every = a.progress_every;
  control.out_dir = a.out;
  s2s::TrainCallbacks callbacks;
  callbacks.on_progress = [](const s2s::Progress& p) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "epoch %lld/%lld  step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  elapsed %s  ETA %s",
                  static_cast<long long>(p.epoch + 1), static_cast<long long>(p.epochs),
                  static_cast<long long>(p.step), static_cast<long long>(p.total_steps), p.loss, p.lr,
                  p.tokens_per_s, format_duration(p.elapsed_s).c_str(), format_duration(p.eta_s).c_str());
    std::cerr << buf << std::endl;
  };
  callbacks.on_eval = [](const s2s::EvalReport& e) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "eval step %lld: valid nll %.4f, BLEU %.2f, exact match %.1f%% (%lld sentences)",
                  static_cast<long long>(e.step), e.valid_loss, e.bleu.bleu, e.exact_match,
                  static_cast<long long>(e.sentences));
    std::cerr << buf << std::endl;
  };
  const auto start = std::chrono::steady_clock::now();
  const bool complete = trainer->run(control, callbacks);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cerr << (complete ? "finished" : "stopped") << " at step " << trainer->step() << " after "
            << format_duration(seconds) << "; checkpoint in " << a.out << "\n";
  std::cout << "train_seconds " << seconds << "\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------

struct TranslateArgs {
  std::string model;
  std::vector<std::string> sentences;
  int64_t beam = 1;
  double length_penalty = 1.0;
  std::string heatmap;
  bool no_alignment = false;
  int64_t threads = 0;
};

std::string numbered_path(const std::string& path, std::size_t index, std::size_t count) {
  if (count <= 1) return path;
  std::filesystem::path p(path);
  return (p.parent_path() / (p.stem().string() + "-" + std::to_string(index + 1) + p.extension().string())).string();
}

int run_translate(TranslateArgs a) {
  if (!a.heatmap.empty()) {
    std::string ext = std::filesystem::path(a.heatmap).extension().string();
    for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (ext != ".svg" && ext != ".png")
      throw UsageError("--heatmap writes SVG or PNG: give a file name ending in .svg or .png, got " +
                       a.heatmap);
  }
  if (a.beam < 1) throw UsageError("--beam must be >= 1");
  apply_threads(a.threads);
  const s2s::Translator translator = s2s::Translator::load(a.model);
  if (a.sentences.empty()) {
    std::string line;
    while (std::getline(std::cin, line))
      if (line.find_first_not_of(" \t\r") != std::string::npos) a.sentences.push_back(line);
  }
  if (a.sentences.empty()) throw UsageError("no sentences to translate (arguments or stdin)");
  s2s::DecodeConfig config;
  config.beam = a.beam;
  config.length_penalty = a.length_penalty;
  std::vector<s2s::Tokens> sources;
  const auto out = translator.translate(a.sentences, config, &sources);
  for (std::size_t i = 0; i < out.size(); ++i) {
    s2s::Tokens target = translator.target_tokens(out[i]);
    std::cout << s2s::join_tokens(target) << "\n";
    if (out[i].alignment.empty()) continue;
    s2s::Tokens src = sources[i], tgt = target;
    src.push_back("<eos>");
    if (out[i].finished) tgt.push_back("<eos>");
    if (!a.no_alignment) std::cout << s2s::terminal_heatmap(src, tgt, out[i].alignment) << "\n";
    if (!a.heatmap.empty()) {
      const std::string path = numbered_path(a.heatmap, i, out.size());
      s2s::write_heatmap(path, src, tgt, out[i].alignment);
      std::cerr << "wrote " << path << "\n";
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------

struct EvalArgs {
  std::string model, test_file, split;
  int64_t beam = 1, limit = 0;
  double length_penalty = 1.0;
  CorpusOptions corpus_options;
  int64_t threads = 0;
};

int run_eval(const EvalArgs& a) {
  if (a.test_file.empty() == a.split.empty())
    throw UsageError("give exactly one of --test FILE or --corpus-split NAME");
  if (a.beam < 1) throw UsageError("--beam must be >= 1");
  apply_threads(a.threads);
  std::vector<s2s::SentencePair> pairs;
  std::string name;
  if (!a.split.empty()) {
    corpus_split(s2s::Corpus{}, a.split);  // validates the name before generating
    const s2s::Corpus corpus = make_corpus(a.corpus_options);
    pairs = corpus_split(corpus, a.split);
    name = "corpus " + a.split;
  } else {
    pairs = s2s::read_pairs_file(a.test_file).pairs;
    name = a.test_file;
  }
  if (a.limit > 0 && static_cast<int64_t>(pairs.size()) > a.limit) pairs.resize(a.limit);
  const s2s::Translator translator = s2s::Translator::load(a.model);
  s2s::DecodeConfig config;
  config.beam = a.beam;
  config.length_penalty = a.length_penalty;
  const s2s::EvalResult r = s2s::evaluate(translator, pairs, config);
  std::printf("%s: %zu sentences\n%s\nexact match %.2f%%\n", name.c_str(), pairs.size(),
              s2s::format_bleu(r.bleu).c_str(), r.exact_match);
  return 0;
}

// CLI11's own number validators print their bounds as 300-digit doubles; these say it plainly.
CLI::Validator sign_check(bool zero_allowed, const std::string& name) {
  return CLI::Validator(
      [zero_allowed](std::string& input) -> std::string {
        try {
          std::size_t used = 0;
          const double value = std::stod(input, &used);
          if (used == input.size() && (value > 0 || (zero_allowed && value == 0))) return {};
        } catch (const std::exception&) {
        }
        return std::string(zero_allowed ? "must be a number >= 0" : "must be a number > 0") +
               ", got " + input;
      },
      name);
}
const CLI::Validator kPositive = sign_check(false, "POSITIVE");
const CLI::Validator kNonNegative = sign_check(true, "NONNEGATIVE");
// A probability that may be 0 but not 1 (dropout).
const CLI::Validator kDropRate(
    [](std::string& input) -> std::string {
      try {
        std::size_t used = 0;
        const double value = std::stod(input, &used);
        if (used == input.size() && value >= 0 && value < 1) return {};
      } catch (const std::exception&) {
      }
      return "must be a number in [0, 1), got " + input;
    },
    "RATE");

}  // namespace

// libgomp's default keeps OpenMP workers spinning after each parallel region, and OpenBLAS's
// workers spin after each GEMM: between the many small GEMMs and kernels of a training step the
// two fight over the cores. Measured on 2 cores, one epoch of the Transformer in BENCHMARKS.md:
// 32 s with the default, 18 s with OMP_WAIT_POLICY=passive (the GRU translator within 3%).
// libgomp reads the variable when it loads, before main, so the tool sets it and runs itself
// again once; an OMP_WAIT_POLICY already in the environment is left as it is.
void prefer_passive_openmp_waits(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  if (setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: go on with the default policy
}

int main(int argc, char** argv) {
  prefer_passive_openmp_waits(argv);
  CLI::App app{"attn: attention encoder-decoder translators (train, translate, eval)", "attn"};
  app.require_subcommand(1);

  TrainArgs ta;
  CLI::App* train = app.add_subcommand("train", "Train a translator; checkpoints go to --out DIR");
  train->add_option("--arch", ta.arch, "gru or lstm (recurrent encoder-decoder) or transformer")
      ->capture_default_str();
  train->add_option("--attention", ta.attention,
                    "bahdanau, luong-dot, luong-general, luong-concat, location, local-m, local-p, "
                    "scaled-dot, cosine or none (no-attention baseline)")->capture_default_str();
  CLI::Option* emb_option = train->add_option("--emb", ta.emb, "Embedding width (transformer: --hidden)")
      ->capture_default_str()->check(kPositive);
  train->add_option("--hidden", ta.hidden, "Hidden width (encoder output and decoder state; the transformer's d_model)")
      ->capture_default_str()->check(kPositive);
  train->add_option("--layers", ta.layers, "Encoder layers (transformer: encoder and decoder layers)")
      ->capture_default_str()->check(kPositive);
  train->add_option("--decoder-layers", ta.decoder_layers,
                    "Decoder layers: stacked decoder cells for gru/lstm, decoder layers for the "
                    "transformer (0: 1 for gru/lstm, --layers for the transformer)")
      ->capture_default_str()->check(kNonNegative);
  train->add_option("--heads", ta.heads, "Transformer attention heads (must divide --hidden)")
      ->capture_default_str()->check(kPositive);
  train->add_option("--ffn", ta.ffn, "Transformer feed-forward width (0: 4 x --hidden)")
      ->capture_default_str()->check(kNonNegative);
  CLI::Option* dropout_option = train->add_option(
      "--dropout", ta.dropout,
      "Dropout rate in [0, 1) when training. gru/lstm (default 0): embeddings, between stacked "
      "layers, the attentional output before the output layer; transformer (default 0.1): "
      "residual, feed-forward, embeddings, attention weights")
      ->check(kDropRate);
  train->add_option("--norm", ta.norm, "Transformer LayerNorm placement: pre or post")->capture_default_str();
  train->add_option("--positions", ta.positions, "Transformer positions: sinusoidal or rope")->capture_default_str();
  train->add_option("--threads", ta.threads, "OpenMP and OpenBLAS threads (default: all cores, or the environment's setting)")
      ->check(kPositive);
  train->add_flag("--copy", ta.copy, "Pointer-generator output: mix the vocabulary softmax with copying source words");
  train->add_flag("--unidirectional", ta.unidirectional, "Forward-only encoder (default: bidirectional)");
  train->add_option("--attention-hidden", ta.attention_hidden, "Hidden width of additive/concat scoring (0: --hidden)")
      ->capture_default_str()->check(kNonNegative);
  train->add_option("--local-width", ta.local_width, "Half width D of local-m / local-p windows")
      ->capture_default_str()->check(kPositive);
  train->add_option("--max-source", ta.max_source, "Longest source in tokens, <eos> included")
      ->capture_default_str()->check(CLI::Range(2, 100000));
  train->add_option("--epochs", ta.epochs, "Passes over the training data")->capture_default_str()->check(kPositive);
  train->add_option("--batch", ta.batch, "Sentence pairs per batch")->capture_default_str()->check(kPositive);
  train->add_option("--lr", ta.lr, "Peak learning rate")->capture_default_str()->check(kPositive);
  train->add_option("--warmup", ta.warmup, "Linear warm-up steps")->capture_default_str()->check(kNonNegative);
  train->add_option("--schedule", ta.schedule, "After warm-up: constant, linear, cosine or inverse_sqrt")->capture_default_str();
  train->add_option("--clip", ta.clip, "Clip gradients to this global norm (0: off)")->capture_default_str()->check(kNonNegative);
  train->add_option("--label-smoothing", ta.label_smoothing, "Label smoothing epsilon")->capture_default_str()->check(CLI::Range(0.0, 0.99));
  train->add_option("--weight-decay", ta.weight_decay, "Weight decay")->capture_default_str()->check(kNonNegative);
  train->add_flag("--adamw", ta.adamw, "Decoupled weight decay (AdamW) instead of L2");
  train->add_option("--min-frequency", ta.min_frequency,
                    "Vocabulary: words seen fewer times in the training data become <unk>")
      ->capture_default_str()->check(kPositive);
  train->add_option("--seed", ta.seed, "Seed of the weights and the batch order")->capture_default_str();
  train->add_option("--train", ta.train_file, "Training pairs: source TAB target per line");
  train->add_option("--valid", ta.valid_file, "Validation pairs for the periodic evaluation");
  train->add_flag("--skip-bad-lines", ta.skip_bad_lines, "Skip (and count) bad lines instead of refusing the file");
  train->add_flag("--corpus", ta.corpus, "Train on the embedded English -> French corpus");
  train->add_option("--corpus-seed", ta.corpus_options.seed, "Seed of the embedded corpus")->capture_default_str();
  train->add_option("--corpus-train-pairs", ta.corpus_options.train_pairs, "Training pairs drawn from the corpus")
      ->capture_default_str()->check(kPositive);
  train->add_option("--out", ta.out, "Directory of checkpoint.safetensors")->required();
  train->add_flag("--resume", ta.resume, "Continue the run in --out (its configuration wins)");
  train->add_option("--max-steps", ta.max_steps, "Stop (with a checkpoint) at this global step")->check(kNonNegative);
  train->add_option("--time-limit", ta.time_limit, "Stop (with a checkpoint) after this many seconds")->check(kNonNegative);
  train->add_option("--eval-every", ta.eval_every, "Steps between evaluations (0: every epoch)")->capture_default_str()->check(kNonNegative);
  train->add_option("--eval-sentences", ta.eval_sentences, "Validation sentences per evaluation")->capture_default_str()->check(kNonNegative);
  train->add_option("--checkpoint-every", ta.checkpoint_every, "Steps between checkpoints (0: every epoch)")->capture_default_str()->check(kNonNegative);
  train->add_option("--progress-every", ta.progress_every, "Steps between progress lines")->capture_default_str()->check(kPositive);

  TranslateArgs tr;
  CLI::App* translate = app.add_subcommand("translate", "Translate sentences (arguments, or one per line on stdin) and show the alignment");
  translate->add_option("--model", tr.model, "Checkpoint directory (or .safetensors file)")->required();
  translate->add_option("sentences", tr.sentences, "Sentences to translate; none: read stdin");
  translate->add_option("--beam", tr.beam, "Beam size (1: greedy)")->capture_default_str();
  translate->add_option("--length-penalty", tr.length_penalty, "Beam ranking: log p / length^alpha")->capture_default_str();
  translate->add_option("--heatmap", tr.heatmap, "Write the alignment as an SVG or PNG image, chosen by the extension (numbered when several sentences)");
  translate->add_flag("--no-alignment", tr.no_alignment, "Do not print the terminal heatmap");
  translate->add_option("--threads", tr.threads, "OpenMP and OpenBLAS threads (default: all cores, or the environment's setting)")
      ->check(kPositive);

  EvalArgs ev;
  CLI::App* eval = app.add_subcommand("eval", "Print BLEU and exact match on a test set");
  eval->add_option("--model", ev.model, "Checkpoint directory (or .safetensors file)")->required();
  eval->add_option("--test", ev.test_file, "Test pairs: source TAB target per line");
  eval->add_option("--corpus-split", ev.split, "A split of the embedded corpus: train, valid, test, test_long");
  eval->add_option("--corpus-seed", ev.corpus_options.seed, "Seed the corpus was generated with")->capture_default_str();
  eval->add_option("--corpus-train-pairs", ev.corpus_options.train_pairs,
                   "Training pairs the corpus was generated with (the splits depend on it)")
      ->capture_default_str()->check(kPositive);
  eval->add_option("--beam", ev.beam, "Beam size (1: greedy)")->capture_default_str();
  eval->add_option("--length-penalty", ev.length_penalty, "Beam ranking: log p / length^alpha")->capture_default_str();
  eval->add_option("--limit", ev.limit, "Evaluate only the first N pairs")->check(kNonNegative);
  eval->add_option("--threads", ev.threads, "OpenMP and OpenBLAS threads (default: all cores, or the environment's setting)")
      ->check(kPositive);

  if (argc > 1 && argv[1][0] != '-' && std::string(argv[1]) != "train" &&
      std::string(argv[1]) != "translate" && std::string(argv[1]) != "eval") {
    std::cerr << "attn: error: unknown command '" << argv[1]
              << "' (expected train, translate or eval; see attn --help)\n";
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string message = e.what();
    if (message.empty()) message = "invalid arguments";
    std::cerr << "attn: error: " << message << " (see attn --help)\n";
    return 2;
  }
  ta.emb_given = emb_option->count() > 0;
  ta.dropout_given = dropout_option->count() > 0;
  try {
    if (*train) return run_train(ta);
    if (*translate) return run_translate(tr);
    if (*eval) return run_eval(ev);
  } catch (const UsageError& e) {
    std::cerr << "attn: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "attn: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
