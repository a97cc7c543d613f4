// The `attn` command line, parsed without running anything: the argument vector in, the command
// and its options out, or a UsageError. tools/attn.cpp runs what this returns; a fuzzer or a test
// can call it on any argument vector.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace attn::cli {

// A bad command line: one line, without the "attn: error: " prefix (the tool adds it and exits
// with status 2).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CorpusOptions {
  uint64_t seed = 1;
  int64_t train_pairs = 20000;
};

// `attn train`. Names (arch, attention, norm, positions, schedule) are validated by the parser.
struct TrainOptions {
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
  int64_t threads = 0;  // 0: the default (all cores or the environment's setting)
  bool unidirectional = false;
  int64_t epochs = 10, batch = 64, max_steps = 0, warmup = 100, eval_every = 0;
  int64_t eval_sentences = 200, progress_every = 50, checkpoint_every = 0, max_source = 64;
  double lr = 2e-3, clip = 1.0, label_smoothing = 0.1, weight_decay = 0.0, time_limit = 0.0;
  std::string schedule = "linear";
  bool adamw = false;
  // --copy [generator|sentinel]: "off" when not given, "" when given without a value (generator).
  std::string copy = "off";
  uint64_t seed = 1;
  std::string train_file, valid_file, out;  // exactly one of corpus and train_file
  bool corpus = false, resume = false, skip_bad_lines = false;
  bool force = false;  // a fresh run may replace the checkpoint already in `out`
  CorpusOptions corpus_options;
  // Subword vocabularies: "none" (word-level), "bpe" or "unigram"; joint unless per_side.
  std::string subword = "none";
  int64_t vocab_size = 8000;
  bool subword_per_side = false;
  // Validation held out of --train when no --valid is given: -1 automatic (2% of the pairs,
  // at most 1000; none below 100 pairs), 0 none.
  int64_t valid_size = -1;
  int64_t patience = 0;  // early stopping after this many evaluations without a better BLEU
  // Gradient shards of every batch (seq2seq::GradientSharding), summed in a fixed order; 0: one
  // per process (under mpirun, N). Runs with the same value give the same weights bit for bit,
  // whatever their number of processes.
  int64_t grad_shards = 0;
  // Keep numbered copies of the last N checkpoints (checkpoint-<step>.safetensors) for
  // `attn average`; 0: only checkpoint.safetensors.
  int64_t keep_checkpoints = 0;
};

// `attn translate`. heatmap is empty or ends in .svg / .png (any case); beam >= 1.
struct TranslateOptions {
  std::string model;
  std::vector<std::string> sentences;  // empty: one sentence per line of stdin
  int64_t beam = 1;
  double length_penalty = 1.0;
  std::string heatmap;
  bool no_alignment = false;
  int64_t threads = 0;
  std::string input, output;  // files instead of arguments/stdin and stdout ("-": standard)
  int64_t nbest = 1;          // > 1: the K best translations with their scores (beam >= K)
  bool json = false;          // one JSON object per input line: tokens, scores, alignment
  bool stats = false;         // per sentence: largest attention weight and entropy per word
};

// `attn eval`. Exactly one of test_file and split (a known split name); beam >= 1.
struct EvalOptions {
  std::string model, test_file, split;
  int64_t beam = 1, limit = 0;
  double length_penalty = 1.0;
  CorpusOptions corpus_options;
  int64_t threads = 0;
  std::string output;  // write the translations (detokenised), one line per pair
  // Histograms of the largest attention weight and entropy per target word: PREFIX.csv, .svg.
  std::string weight_histogram;
  // Score each of these length penalties (beam >= 2) from one search instead of one decode.
  std::vector<double> length_penalties;
};

// `attn average`: the mean weights of several checkpoints of one model, written to output.
// Either the files are given, or `last` N numbered checkpoints of the directory `model`.
struct AverageOptions {
  std::vector<std::string> inputs;
  std::string model;
  int64_t last = 0;
  std::string output;
};

// version: `attn --version` (tools/attn.cpp prints attn::runtime_summary()).
enum class Command { help, version, train, translate, eval, average };

struct ParsedCommandLine {
  Command command = Command::help;
  std::string help_text;  // Command::help: what to print on stdout (then exit 0)
  TrainOptions train;     // filled for Command::train
  TranslateOptions translate;
  EvalOptions eval;
  AverageOptions average;
};

// Parses `args`, the arguments after the program name (argv[1..argc)). Returns the command and
// its options with every value range-checked (numbers finite, sizes positive, names known,
// exclusive options exclusive), or Command::help with the text --help asks for. Throws
// UsageError for anything else. Pure: reads no files or environment, prints nothing, never
// exits; any exception other than UsageError is a bug.
ParsedCommandLine parse_command_line(const std::vector<std::string>& args);

}  // namespace attn::cli
