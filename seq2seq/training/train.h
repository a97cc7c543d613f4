// Training a translator: vocabularies from the training pairs, length-bucketed batches, teacher
// forcing, label-smoothed cross-entropy, gradient clipping, Adam/AdamW with a warm-up schedule,
// periodic evaluation and checkpoints that resume bit for bit.
//
// Reproducibility: everything random is a pure function of the seed: the initial weights
// (counter-based initialisers), the bucketing tie-break and each epoch's batch order
// (batching.h). So the "RNG state" a checkpoint needs is the seed plus the data position (epoch,
// batch within the epoch, global step); with the weights and Adam's moments that is the whole
// state, and a resumed run computes the same losses as an uninterrupted one at the same thread
// count (OpenBLAS and the attention kernels are deterministic for a fixed thread count).
//
// Both architectures train here (ModelConfig::arch): the recurrent Seq2Seq (model.h) and the
// Transformer (transformer_model.h). Both models' dropout masks are counter-based and seeded per
// step from (seed, global step), so they too are part of the reproducible state for free.
//
// Checkpoint: one safetensors file <out>/checkpoint.safetensors (written atomically, with
// per-tensor checksums, and only with finite values):
//   model.<parameter>       float tensors (names from the model's parameters())
//   optim.m.<parameter>, optim.v.<parameter>, optim.step
//   train.position          I64 [epoch, batch in epoch, step]
//   train.seed              I64 [seed]
//   __metadata__            format, configuration (config.*, train.*), both vocabularies as
//                           JSON, a fingerprint of the training data (checked on resume), the
//                           subword models (source_subword, target_subword: SentencePiece's
//                           serialized model in base64) when TrainConfig::subword is on, and the
//                           validation state (run.best_bleu, run.evals_since_best)
// Validation (RunControl): every evaluation scores the validation pairs (never the training
// pairs: with no validation pairs there is no evaluation); when its sacreBLEU beats every
// earlier one, the weights are also saved as <out>/best.safetensors (a checkpoint like the
// other, loadable by Translator::load), and after `patience` evaluations in a row without a
// better score the run stops early. A run stopped by max_steps or time_limit_s evaluates its
// last weights before it stops (unless that step was just evaluated).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "seq2seq/data/batching.h"
#include "seq2seq/metrics/bleu.h"
#include "seq2seq/decoding/decode.h"
#include "seq2seq/models/model.h"
#include "seq2seq/training/optim.h"
#include "seq2seq/data/pairs_file.h"
#include "seq2seq/metrics/sacrebleu.h"
#include "seq2seq/data/subword.h"
#include "seq2seq/models/transformer_model.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

// Subword vocabularies (subword.h): off keeps the word-level tokeniser (vocab.h).
struct SubwordTrainConfig {
  bool enabled = false;
  SubwordKind kind = SubwordKind::bpe;
  int64_t vocab_size = 8000;  // per model: the joint one, or each side's
  bool joint = true;          // one model over sources and targets, else one per side
};

// What changes the arithmetic of a run (saved in checkpoints).
struct TrainConfig {
  ModelConfig model;          // vocabulary sizes are filled in from the data
  VocabConfig vocab;          // word-level vocabularies (subword off)
  SubwordTrainConfig subword;
  int64_t epochs = 10;
  int64_t batch_size = 64;
  double lr = 2e-3;
  AdamConfig adam;
  Schedule schedule{ScheduleKind::linear, 100, 0, 0.05};  // total_steps 0: epochs x batches
  double clip_norm = 1.0;     // <= 0: no clipping
  double label_smoothing = 0.1;
  uint64_t seed = 1;
};

// Data parallelism, with no MPI here (attn/dist/data_parallel.h drives it over MPI): every
// global batch is split into `shards` parts of contiguous rows (sizes differing by at most one);
// each part's gradient is computed whole, its loss divided by the whole batch's token count, and
// the parts' gradients and losses are summed in shard order 0, 1, ..., shards - 1, left to right
// in float32. The rounding thus depends on `shards` alone, never on which process computed which
// part or when: N processes and one process with the same `shards` give the same weights bit for
// bit (one process runs the parts one after the other). shards = 1 is the plain loop.
struct GradientSharding {
  int64_t shards = 1;
  int64_t first = 0;   // this process computes shards [first, first + count)
  int64_t count = -1;  // -1: all of them
  // Given this process's `count` gradient buffers of n floats each (shard-major), writes the
  // sum over all `shards` buffers, in shard order, to `sum` (n floats) on every process. Needed
  // when count < shards.
  std::function<void(const float* mine, int64_t n, float* sum)> sum_shards;
  // Returns true on every process when `stop` is true on any: the time limit, read by each
  // process's clock, must stop all of them at the same step. Unset: `stop` itself.
  std::function<bool(bool stop)> any;
};

// How a run is driven (not saved: may differ between a run and its resumption).
struct RunControl {
  int64_t max_steps = 0;         // stop (and checkpoint) once the global step reaches it; 0: off
  double time_limit_s = 0.0;     // stop (and checkpoint) after this much training time; 0: off
  int64_t eval_every = 0;        // steps between evaluations; 0: at the end of every epoch
  int64_t eval_sentences = 200;  // validation pairs used for the periodic BLEU
  int64_t checkpoint_every = 0;  // steps between checkpoints; 0: end of every epoch and the run
  int64_t progress_every = 50;   // steps between progress reports
  std::string out_dir;           // where checkpoint.safetensors goes; empty: no checkpoints
  // Early stopping: stop after this many evaluations in a row without a better validation
  // BLEU (0: never). Needs validation pairs.
  int64_t patience = 0;
  GradientSharding sharding;  // changes the rounding only: a resumed run may use other shards
};

struct Progress {
  int64_t epoch = 0;  // 0-based
  int64_t epochs = 0;
  int64_t step = 0;   // steps done
  int64_t total_steps = 0;
  double loss = 0.0;  // mean over the steps since the last report
  double lr = 0.0;
  double tokens_per_s = 0.0;
  double elapsed_s = 0.0;
  double eta_s = 0.0;
};

struct EvalReport {
  int64_t step = 0;
  double valid_loss = 0.0;  // teacher-forced, label smoothing off (the NLL per token)
  BleuScore bleu;           // sacreBLEU-style on the detokenised output (sacrebleu.h)
  ChrfScore chrf;
  double exact_match = 0.0;
  int64_t sentences = 0;    // 0: no validation pairs, nothing was evaluated
  bool best = false;        // the best BLEU so far (saved as best.safetensors when checkpointing)
  int64_t evals_since_best = 0;
};

struct TrainCallbacks {
  std::function<void(const Progress&)> on_progress;
  std::function<void(const EvalReport&)> on_eval;
  std::function<void(const std::string& path)> on_checkpoint;
  // A step whose loss or gradient norm is not finite changes nothing (weights and Adam state
  // stay; the batch is consumed), as mixed-precision trainers skip overflowing steps.
  std::function<void(int64_t step, double loss, double grad_norm)> on_skipped_step;
  // After the backward pass of global step `step` (0-based), before clipping: tests use it to
  // inject non-finite gradients or weights.
  std::function<void(int64_t step, const nn::ParameterList& params)> on_gradients;
  // The batch of global step `step` (0-based) before its forward pass, in training order
  // (unsharded steps only): what a benchmark twin in another framework replays.
  std::function<void(int64_t step, const Batch& batch)> on_batch;
};

// Either architecture; config().arch says which. A closed variant rather than a virtual base:
// the two models share no state, both stay plain structs, and every caller that dispatches
// (training loss, decoding) is a std::visit the compiler checks for both alternatives.
using TranslationModel = std::variant<Seq2Seq, TransformerSeq2Seq>;

// Builds the model config.arch names, deterministic from (config, seed).
TranslationModel create_model(const ModelConfig& config, uint64_t seed);

// Sets the number of threads of OpenMP (the attention kernels) and of OpenBLAS (the GEMMs),
// process-wide. Results are reproducible for a fixed thread count.
void set_thread_count(int threads);

// A trained model with its vocabularies: what `attn translate` and `attn eval` load.
struct Translator {
  TranslationModel model;
  Vocab source_vocab;
  Vocab target_vocab;
  // Subword models (null: the word-level tokeniser). Joint models are one object shared.
  std::shared_ptr<const SubwordModel> source_subword, target_subword;

  const ModelConfig& config() const;
  nn::ParameterList parameters() const;

  // Tokenises (seq2seq::tokenize, a capitalised first word counts as a name when the source
  // vocabulary knows it) and translates. The tokens of each source are in `source_tokens`.
  std::vector<Translation> translate(const std::vector<std::string>& sentences,
                                     const DecodeConfig& config,
                                     std::vector<Tokens>* source_tokens = nullptr) const;
  // translate() over any number of sentences: sorted by length and decoded `batch` at a time
  // (greedy decoding runs a batch at once), returned in input order.
  std::vector<Translation> translate_all(const std::vector<std::string>& sentences,
                                         const DecodeConfig& config,
                                         std::vector<Tokens>* source_tokens = nullptr,
                                         int64_t batch = 64) const;
  Tokens target_tokens(const Translation& t) const;
  // The translation as text, one line: the subword model's decoding (cased, detokenised; any
  // line break or tab a byte piece spells becomes a space), or the word-level tokens joined by
  // spaces.
  std::string target_text(const Translation& t) const;
  // Tokens of training text: the subword pieces, or tokenize_training_text.
  Tokens training_source_tokens(std::string_view text) const;
  Tokens training_target_tokens(std::string_view text) const;

  // The longest source translate() accepts, in tokens without <eos>: the model's
  // max_source_steps - 1, the --max-source its training data was held to. Longer input is
  // refused rather than decoded: outside its training lengths a model returns a short guess, and
  // the decoding time grows with the length.
  int64_t max_source_tokens() const;
  // The tokens translate() makes of `sentence`.
  Tokens source_tokens(std::string_view sentence) const;

  // Loads <dir>/checkpoint.safetensors (or a .safetensors path). A missing checkpoint is an
  // error saying which file was expected.
  static Translator load(const std::string& path);
};

struct EvalResult {
  BleuScore bleu;                      // over tokens (bleu.h), lowercased for word-level models
  BleuScore sacre_bleu;                // sacreBLEU-style over the texts (sacrebleu.h)
  ChrfScore chrf;
  ChrfScore chrf_plus_plus;  // chrF++ (word_order 2)
  double exact_match = 0.0;
  std::vector<Tokens> hypotheses;
  std::vector<Tokens> references;
  std::vector<std::string> hypothesis_texts;  // Translator::target_text, in input order
};

// Translates every source and scores against the targets: token BLEU against the targets
// tokenised as in training, sacreBLEU and chrF against the target texts as written.
EvalResult evaluate(const Translator& translator, const std::vector<SentencePair>& pairs,
                    const DecodeConfig& config = {});

// Tokenisation of training data: the corpus's own convention (names keep their capital).
Tokens tokenize_training_text(std::string_view text);

class Trainer {
 public:
  // A fresh run: builds the vocabularies from `train` and the model from config.model.
  Trainer(const TrainConfig& config, std::vector<SentencePair> train,
          std::vector<SentencePair> valid);
  // Continues from a checkpoint; `train` must be the data the run started with (checked by
  // fingerprint). Subword models are learnt on `train` (a fresh run), or restored (resume).
  static Trainer resume(const std::string& checkpoint_path, std::vector<SentencePair> train,
                        std::vector<SentencePair> valid);

  // Trains until the epochs are done or `control` stops it. Returns true when all epochs ran.
  // Throws, without writing a checkpoint, when a step leaves non-finite weights or 100 steps in
  // a row are skipped (see TrainCallbacks::on_skipped_step): the last good checkpoint stays.
  bool run(const RunControl& control, const TrainCallbacks& callbacks = {});
  EvalReport evaluate_now(int64_t sentences);
  // Refuses (attn::Error, nothing written) when a weight or optimiser moment is not finite.
  void save_checkpoint(const std::string& path) const;

  const TrainConfig& config() const { return config_; }
  // Training pairs left out because their source has more than max_source_steps - 1 subword
  // pieces (subword runs only; word-level runs refuse such a pair).
  int64_t dropped_long_pairs() const { return dropped_long_pairs_; }
  double best_bleu() const { return best_bleu_; }
  const Translator& translator() const { return translator_; }
  int64_t step() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  // The loss of every step this object ran (not those before a resume).
  const std::vector<double>& losses() const { return losses_; }
  // Steps this object skipped for a non-finite loss or gradient.
  int64_t skipped_steps() const { return skipped_steps_; }

  // The checkpoint path of an output directory: <out_dir>/checkpoint.safetensors.
  static std::string checkpoint_file(const std::string& out_dir);
  // <out_dir>/best.safetensors: the checkpoint of the best validation BLEU.
  static std::string best_checkpoint_file(const std::string& out_dir);

 private:
  Trainer() = default;
  void prepare_data();

  TrainConfig config_;
  Translator translator_;
  std::vector<SentencePair> train_, valid_;
  std::vector<EncodedPair> encoded_;
  std::vector<std::vector<int64_t>> batches_;
  std::unique_ptr<Adam> optimizer_;
  int64_t epoch_ = 0, batch_in_epoch_ = 0, step_ = 0, total_steps_ = 0;
  uint64_t fingerprint_ = 0;
  std::vector<double> losses_;
  int64_t skipped_steps_ = 0;
  int64_t dropped_long_pairs_ = 0;
  double best_bleu_ = -1.0;
  int64_t evals_since_best_ = 0;
};

// Moves `count` pairs out of `train` into the returned validation set: pairs drawn by `seed`
// whose source occurs once in `train`, so no validation source is ever trained on. Throws when
// `train` would be left with fewer than `count` pairs.
std::vector<SentencePair> hold_out_validation(std::vector<SentencePair>& train, int64_t count,
                                              uint64_t seed);

}  // namespace attn::seq2seq
