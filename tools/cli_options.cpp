#include "cli_options.h"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>

#include "seq2seq/models/model.h"
#include "seq2seq/training/optim.h"

namespace attn::cli {
namespace {

namespace s2s = attn::seq2seq;

// CLI11's own number validators print their bounds as 300-digit doubles; these say it plainly.
// Non-finite values are refused everywhere: "--lr inf" would train to NaN.
CLI::Validator number_check(double low, bool low_allowed, double high, const std::string& text,
                            const std::string& name) {
  return CLI::Validator(
      [=](std::string& input) -> std::string {
        try {
          std::size_t used = 0;
          const double value = std::stod(input, &used);
          if (used == input.size() && std::isfinite(value) &&
              (value > low || (low_allowed && value == low)) && value < high)
            return {};
        } catch (const std::exception&) {
        }
        return "must be " + text + ", got " + input;
      },
      name);
}
const CLI::Validator kPositive =
    number_check(0, false, HUGE_VAL, "a finite number > 0", "POSITIVE");
const CLI::Validator kNonNegative =
    number_check(0, true, HUGE_VAL, "a finite number >= 0", "NONNEGATIVE");
const CLI::Validator kFinite =
    number_check(-HUGE_VAL, false, HUGE_VAL, "a finite number", "NUMBER");
// A probability that may be 0 but not 1 (dropout).
const CLI::Validator kDropRate = number_check(0, true, 1, "a number in [0, 1)", "RATE");

const char* const kThreadsHelp =
    "OpenMP and OpenBLAS threads, at most the cores available (default: all cores, or the "
    "environment's setting)";

void add_train_options(CLI::App& train, TrainOptions& ta, CLI::Option*& emb,
                       CLI::Option*& dropout) {
  train.add_option("--arch", ta.arch, "gru or lstm (recurrent encoder-decoder) or transformer")
      ->capture_default_str();
  train.add_option("--attention", ta.attention,
                   "bahdanau, luong-dot, luong-general, luong-concat, location, local-m, local-p, "
                   "scaled-dot, cosine or none (no-attention baseline)")->capture_default_str();
  emb = train.add_option("--emb", ta.emb, "Embedding width (transformer: --hidden)")
            ->capture_default_str()->check(kPositive);
  train.add_option("--hidden", ta.hidden,
                   "Hidden width (encoder output and decoder state; the transformer's d_model)")
      ->capture_default_str()->check(kPositive);
  train.add_option("--layers", ta.layers,
                   "Encoder layers (transformer: encoder and decoder layers)")
      ->capture_default_str()->check(kPositive);
  train.add_option("--decoder-layers", ta.decoder_layers,
                   "Decoder layers: stacked decoder cells for gru/lstm, decoder layers for the "
                   "transformer (0: 1 for gru/lstm, --layers for the transformer)")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--heads", ta.heads, "Transformer attention heads (must divide --hidden)")
      ->capture_default_str()->check(kPositive);
  train.add_option("--ffn", ta.ffn, "Transformer feed-forward width (0: 4 x --hidden)")
      ->capture_default_str()->check(kNonNegative);
  dropout = train.add_option(
      "--dropout", ta.dropout,
      "Dropout rate in [0, 1) when training. gru/lstm (default 0): embeddings, between stacked "
      "layers, the attentional output before the output layer; transformer (default 0.1): "
      "residual, feed-forward, embeddings, attention weights")
      ->check(kDropRate);
  train.add_option("--norm", ta.norm, "Transformer LayerNorm placement: pre or post")
      ->capture_default_str();
  train.add_option("--positions", ta.positions, "Transformer positions: sinusoidal or rope")
      ->capture_default_str();
  train.add_option("--threads", ta.threads, kThreadsHelp)->check(kPositive);
  train.add_option("--copy", ta.copy,
                   "Copy source words into the output: --copy or --copy generator "
                   "(pointer-generator), --copy sentinel (pointer-sentinel mixture)")
      ->expected(0, 1);
  train.add_flag("--unidirectional", ta.unidirectional,
                 "Forward-only encoder (default: bidirectional)");
  train.add_option("--attention-hidden", ta.attention_hidden,
                   "Hidden width of additive/concat scoring (0: --hidden)")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--local-width", ta.local_width, "Half width D of local-m / local-p windows")
      ->capture_default_str()->check(kPositive);
  train.add_option("--max-source", ta.max_source,
                   "Longest source in tokens, <eos> included (also the longest input `attn "
                   "translate` accepts)")
      ->capture_default_str()->check(CLI::Range(2, 100000));
  train.add_option("--epochs", ta.epochs, "Passes over the training data")
      ->capture_default_str()->check(kPositive);
  train.add_option("--batch", ta.batch, "Sentence pairs per batch")
      ->capture_default_str()->check(kPositive);
  train.add_option("--lr", ta.lr, "Peak learning rate")->capture_default_str()->check(kPositive);
  train.add_option("--warmup", ta.warmup, "Linear warm-up steps")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--schedule", ta.schedule,
                   "After warm-up: constant, linear, cosine or inverse_sqrt")
      ->capture_default_str();
  train.add_option("--clip", ta.clip, "Clip gradients to this global norm (0: off)")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--label-smoothing", ta.label_smoothing, "Label smoothing epsilon")
      ->capture_default_str()->check(number_check(0, true, 0.99, "a number in [0, 0.99)", "EPS"));
  train.add_option("--weight-decay", ta.weight_decay, "Weight decay")
      ->capture_default_str()->check(kNonNegative);
  train.add_flag("--adamw", ta.adamw, "Decoupled weight decay (AdamW) instead of L2");
  train.add_option("--min-frequency", ta.min_frequency,
                   "Vocabulary: words seen fewer times in the training data become <unk>")
      ->capture_default_str()->check(kPositive);
  train.add_option("--seed", ta.seed, "Seed of the weights and the batch order")
      ->capture_default_str();
  train.add_option("--train", ta.train_file, "Training pairs: source TAB target per line");
  train.add_option("--valid", ta.valid_file, "Validation pairs for the periodic evaluation");
  train.add_flag("--skip-bad-lines", ta.skip_bad_lines,
                 "Skip (and count) bad lines instead of refusing the file");
  train.add_flag("--corpus", ta.corpus, "Train on the embedded English -> French corpus");
  train.add_option("--corpus-seed", ta.corpus_options.seed, "Seed of the embedded corpus")
      ->capture_default_str();
  train.add_option("--corpus-train-pairs", ta.corpus_options.train_pairs,
                   "Training pairs drawn from the corpus")
      ->capture_default_str()->check(kPositive);
  train.add_option("--out", ta.out, "Directory of checkpoint.safetensors")->required();
  train.add_flag("--resume", ta.resume, "Continue the run in --out (its configuration wins)");
  train.add_flag("--force", ta.force,
                 "Start a fresh run even if --out already holds a checkpoint (replacing it)");
  train.add_option("--max-steps", ta.max_steps, "Stop (with a checkpoint) at this global step")
      ->check(kNonNegative);
  train.add_option("--time-limit", ta.time_limit,
                   "Stop (with a checkpoint) after this many seconds")
      ->check(kNonNegative);
  train.add_option("--eval-every", ta.eval_every, "Steps between evaluations (0: every epoch)")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--eval-sentences", ta.eval_sentences, "Validation sentences per evaluation")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--checkpoint-every", ta.checkpoint_every,
                   "Steps between checkpoints (0: every epoch)")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--progress-every", ta.progress_every, "Steps between progress lines")
      ->capture_default_str()->check(kPositive);
  train.add_option("--subword", ta.subword,
                   "Vocabulary: none (words, the embedded corpus's tokeniser), or a SentencePiece "
                   "bpe or unigram model learnt from the training data (cased, detokenised output)")
      ->capture_default_str();
  train.add_option("--vocab-size", ta.vocab_size,
                   "Subword vocabulary size (per model; at least 256 byte pieces + characters)")
      ->capture_default_str()->check(CLI::Range(int64_t{8}, int64_t{1000000}));
  train.add_flag("--subword-per-side", ta.subword_per_side,
                 "One subword model per language instead of a joint one");
  train.add_option("--valid-size", ta.valid_size,
                   "Pairs held out of --train for validation when no --valid is given (-1: 2%, at "
                   "most 1000; 0: none)")
      ->capture_default_str()->check(CLI::Range(int64_t{-1}, int64_t{1000000000}));
  train.add_option("--patience", ta.patience,
                   "Stop after this many evaluations without a better validation BLEU (0: never)")
      ->capture_default_str()->check(kNonNegative);
  train.add_option("--grad-shards", ta.grad_shards,
                   "Split every batch into this many parts whose gradients are summed in a fixed "
                   "order (default: one per process; under mpirun -np N, N). Runs with the same "
                   "value give the same weights bit for bit on any number of processes")
      ->check(kNonNegative);
  train.add_option("--keep-checkpoints", ta.keep_checkpoints,
                   "Also keep the last N checkpoints as checkpoint-<step>.safetensors, for "
                   "`attn average` (0: only the latest)")
      ->capture_default_str()->check(kNonNegative);
}

// The checks CLI11 cannot express: names from fixed lists and mutually exclusive options.
void check_train(const TrainOptions& a) {
  if (a.corpus == !a.train_file.empty())
    throw UsageError("give exactly one of --corpus or --train FILE");
  if (a.resume && a.force) throw UsageError("give at most one of --resume and --force");
  if (a.subword != "none" && a.subword != "bpe" && a.subword != "unigram")
    throw UsageError("--subword must be none, bpe or unigram, got " + a.subword);
  if (a.corpus && a.valid_size > 0)
    throw UsageError("--valid-size holds pairs out of --train; the embedded corpus has its own "
                     "validation split");
  if (!a.valid_file.empty() && a.valid_size > 0)
    throw UsageError("give at most one of --valid FILE and --valid-size N");
  if (a.arch != "gru" && a.arch != "lstm" && a.arch != "transformer")
    throw UsageError("--arch must be gru, lstm or transformer, got " + a.arch);
  if (a.norm != "pre" && a.norm != "post")
    throw UsageError("--norm must be pre or post, got " + a.norm);
  if (!s2s::parse_position_kind(a.positions))
    throw UsageError("--positions must be sinusoidal or rope, got " + a.positions);
  if (a.copy != "off" && !a.copy.empty() && !s2s::parse_copy_kind(a.copy))
    throw UsageError("--copy must be generator or sentinel (or no value: generator), got " + a.copy);
  if (!s2s::parse_attention_preset(a.attention))
    throw UsageError("--attention must be bahdanau, luong-dot, luong-general, luong-concat, "
                     "location, local-m, local-p, scaled-dot, cosine or none, got " + a.attention);
  bool known = false;
  for (auto k : {s2s::ScheduleKind::constant, s2s::ScheduleKind::linear, s2s::ScheduleKind::cosine,
                 s2s::ScheduleKind::inverse_sqrt})
    known = known || a.schedule == s2s::schedule_kind_name(k);
  if (!known)
    throw UsageError("--schedule must be constant, linear, cosine or inverse_sqrt, got " +
                     a.schedule);
}

void check_translate(const TranslateOptions& a) {
  if (!a.heatmap.empty()) {
    std::string ext = std::filesystem::path(a.heatmap).extension().string();
    for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (ext != ".svg" && ext != ".png")
      throw UsageError(
          "--heatmap writes SVG or PNG: give a file name ending in .svg or .png, got " + a.heatmap);
  }
  if (a.beam < 1) throw UsageError("--beam must be >= 1, got " + std::to_string(a.beam));
  if (a.nbest < 1) throw UsageError("--nbest must be >= 1, got " + std::to_string(a.nbest));
  if (!a.input.empty() && !a.sentences.empty())
    throw UsageError("give sentences as arguments or --input FILE, not both");
}

void check_eval(const EvalOptions& a) {
  if (a.test_file.empty() == a.split.empty())
    throw UsageError("give exactly one of --test FILE or --corpus-split NAME");
  if (!a.split.empty() && a.split != "train" && a.split != "valid" && a.split != "test" &&
      a.split != "test_long" && a.split != "long")
    throw UsageError("--corpus-split must be train, valid, test or test_long, got " + a.split);
  if (a.beam < 1) throw UsageError("--beam must be >= 1, got " + std::to_string(a.beam));
  if (!a.length_penalties.empty() && a.beam < 2)
    throw UsageError("--length-penalties tunes beam search: give --beam 2 or more");
  if (!a.length_penalties.empty() && !a.output.empty())
    throw UsageError("give at most one of --length-penalties and --output");
}

void check_average(const AverageOptions& a) {
  if (a.inputs.empty() == a.model.empty())
    throw UsageError("give either the checkpoint files to average or --model DIR --last N (exactly one)");
  if (!a.model.empty() && a.last < 1)
    throw UsageError("--model DIR needs --last N (N >= 1): the number of its newest numbered "
                     "checkpoints to average");
  if (a.model.empty() && a.last > 0) throw UsageError("--last N needs --model DIR");
}

}  // namespace

ParsedCommandLine parse_command_line(const std::vector<std::string>& args) {
  if (!args.empty() && !args[0].empty() && args[0][0] != '-' && args[0] != "train" &&
      args[0] != "translate" && args[0] != "eval" && args[0] != "average")
    throw UsageError("unknown command '" + args[0] +
                     "' (expected train, translate, eval, average or experiments; see attn --help)");

  ParsedCommandLine out;
  CLI::App app{"attn: attention encoder-decoder translators (train, translate, eval, average; "
                "attn experiments --help for the measured questions)", "attn"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("attn"),
                       "Print the version, SIMD target, BLAS kernel and thread counts");

  CLI::App* train = app.add_subcommand("train", "Train a translator; checkpoints go to --out DIR");
  CLI::Option* emb_option = nullptr;
  CLI::Option* dropout_option = nullptr;
  add_train_options(*train, out.train, emb_option, dropout_option);

  TranslateOptions& tr = out.translate;
  CLI::App* translate = app.add_subcommand(
      "translate",
      "Translate sentences (arguments, or one per line on stdin: one output line per input line, "
      "blank for blank) and show the alignment");
  translate->add_option("--model", tr.model, "Checkpoint directory (or .safetensors file)")
      ->required();
  translate->add_option("sentences", tr.sentences, "Sentences to translate; none: read stdin");
  translate->add_option("--beam", tr.beam, "Beam size (1: greedy)")->capture_default_str();
  translate->add_option("--length-penalty", tr.length_penalty, "Beam ranking: log p / length^alpha")
      ->capture_default_str()->check(kFinite);
  translate->add_option("--heatmap", tr.heatmap,
                        "Write the alignment as an SVG or PNG image, chosen by the extension "
                        "(numbered when several sentences)");
  translate->add_flag("--no-alignment", tr.no_alignment, "Do not print the terminal heatmap");
  translate->add_option("--threads", tr.threads, kThreadsHelp)->check(kPositive);
  translate->add_option("--input,-i", tr.input, "Read sentences from this file, one per line ('-': stdin)");
  translate->add_option("--output,-o", tr.output, "Write translations to this file ('-': stdout)");
  translate->add_option("--nbest", tr.nbest,
                        "Print the K best translations with their scores (beam search with a beam "
                        "of at least K): 'LINE ||| translation ||| score' lines, or in --json")
      ->capture_default_str();
  translate->add_flag("--stats", tr.stats,
                      "Per sentence: the largest attention weight and the entropy (nats) of the "
                      "weights for each target word (also in --json)");
  translate->add_flag("--json", tr.json,
                      "One JSON object per input line: translation, tokens, score, log_prob, "
                      "alignment (and nbest)");

  EvalOptions& ev = out.eval;
  CLI::App* eval = app.add_subcommand("eval", "Print BLEU and exact match on a test set");
  eval->add_option("--model", ev.model, "Checkpoint directory (or .safetensors file)")->required();
  eval->add_option("--test", ev.test_file, "Test pairs: source TAB target per line");
  eval->add_option("--corpus-split", ev.split,
                   "A split of the embedded corpus: train, valid, test, test_long");
  eval->add_option("--corpus-seed", ev.corpus_options.seed, "Seed the corpus was generated with")
      ->capture_default_str();
  eval->add_option("--corpus-train-pairs", ev.corpus_options.train_pairs,
                   "Training pairs the corpus was generated with (the splits depend on it)")
      ->capture_default_str()->check(kPositive);
  eval->add_option("--beam", ev.beam, "Beam size (1: greedy)")->capture_default_str();
  eval->add_option("--length-penalty", ev.length_penalty, "Beam ranking: log p / length^alpha")
      ->capture_default_str()->check(kFinite);
  eval->add_option("--limit", ev.limit, "Evaluate only the first N pairs")->check(kNonNegative);
  eval->add_option("--threads", ev.threads, kThreadsHelp)->check(kPositive);
  eval->add_option("--output,-o", ev.output, "Write the translations to this file, one per pair");
  eval->add_option("--length-penalties", ev.length_penalties,
                   "Tune beam search's length penalty: score each of these (comma-separated; "
                   "needs --beam >= 2) from one search, and print the best (give it to "
                   "translate --length-penalty)")
      ->delimiter(',')->check(kFinite);
  eval->add_option("--weight-histogram", ev.weight_histogram,
                   "Write histograms of the largest attention weight and the entropy per target "
                   "word over the test set to PREFIX.csv and PREFIX.svg");

  AverageOptions& av = out.average;
  CLI::App* average = app.add_subcommand(
      "average", "Average the weights of checkpoints of one model (e.g. the last N of a run)");
  average->add_option("checkpoints", av.inputs, "Checkpoint files to average");
  average->add_option("--model", av.model,
                      "A training directory: average its newest numbered checkpoints "
                      "(attn train --keep-checkpoints)");
  average->add_option("--last", av.last, "How many of --model's numbered checkpoints")
      ->check(kPositive);
  average->add_option("--output,-o", av.output, "The averaged checkpoint (.safetensors) to write")
      ->required();

  // CLI11 consumes its argument vector from the back.
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(std::move(reversed));
  } catch (const CLI::CallForHelp&) {
    out.help_text = app.help();  // the selected subcommand's help, when there is one
    return out;
  } catch (const CLI::CallForVersion&) {
    out.command = Command::version;
    return out;
  } catch (const CLI::CallForAllHelp&) {
    out.help_text = app.help("", CLI::AppFormatMode::All);
    return out;
  } catch (const CLI::ParseError& e) {
    std::string message = e.what();
    if (message.empty()) message = "invalid arguments";
    std::replace(message.begin(), message.end(), '\n', ' ');
    throw UsageError(message + " (see attn --help)");
  }
  out.train.emb_given = emb_option->count() > 0;
  out.train.dropout_given = dropout_option->count() > 0;
  if (*train) {
    out.command = Command::train;
    check_train(out.train);
  } else if (*translate) {
    out.command = Command::translate;
    check_translate(out.translate);
  } else if (*eval) {
    out.command = Command::eval;
    check_eval(out.eval);
  } else if (*average) {
    out.command = Command::average;
    check_average(out.average);
  } else {
    throw UsageError("a subcommand is required (see attn --help)");  // require_subcommand(1)
  }
  return out;
}

}  // namespace attn::cli
