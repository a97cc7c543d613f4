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
#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "attn/error.h"
#include "attn/profile.h"
#include "attn/runtime.h"
#include "seq2seq/training/checkpoint_average.h"
#include "seq2seq/data/batch_log.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/decoding/heatmap.h"
#include "seq2seq/decoding/length_penalty.h"
#include "seq2seq/data/pairs_file.h"
#include "seq2seq/training/safetensors.h"
#include "seq2seq/training/train.h"
#include "tools/train_processes.h"
#include "cli_options.h"

#include <nlohmann/json.hpp>
#include "experiments/experiments.h"
#include "experiments/statistics.h"
#include "experiments/svg_chart.h"

namespace s2s = attn::seq2seq;

namespace {

using attn::cli::UsageError;

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

using attn::cli::CorpusOptions;

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

// The cores this process may run on (its affinity mask, which containers and taskset narrow).
int64_t available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// --threads N: OpenMP and OpenBLAS threads; 0 leaves their defaults (all cores, or
// OMP_NUM_THREADS / OPENBLAS_NUM_THREADS when the environment sets them). More threads than
// cores only makes the workers wait for each other at every barrier (100x slower at 1000 on
// 2 cores), so N is capped at the cores available.
void apply_threads(int64_t threads) {
  if (threads <= 0) return;
  const int64_t cores = available_cores();
  if (threads > cores) {
    std::cerr << "attn: warning: --threads " << threads << " is more than the " << cores
              << " cores available; using " << cores << "\n";
    threads = cores;
  }
  s2s::set_thread_count(static_cast<int>(threads));
}

// Temporaries of checkpoint saves that a killed run left behind (a save writes the whole
// checkpoint to one before renaming it into place).
void remove_stale_temporaries(const std::string& out_dir) {
  const std::string checkpoint = s2s::Trainer::checkpoint_file(out_dir);
  const s2s::StaleTemporaries removed = s2s::remove_stale_temporaries(checkpoint);
  if (removed.files > 0)
    std::cerr << "removed " << removed.files << " temporary file(s) of " << removed.bytes
              << " bytes left in " << out_dir << " by killed runs\n";
}

using TrainArgs = attn::cli::TrainOptions;

// The subword models beside the checkpoint (which holds them too), for SentencePiece's own
// tools: subword.model (joint), or source.model and target.model.
void write_subword_models(const s2s::Translator& t, const std::string& out_dir) {
  if (!t.source_subword) return;
  std::filesystem::create_directories(out_dir);
  const auto write = [&](const s2s::SubwordModel& m, const char* name) {
    const std::string path = (std::filesystem::path(out_dir) / name).string();
    std::ofstream f(path, std::ios::binary);
    f << m.serialized();
    if (!f.flush()) throw std::runtime_error("cannot write " + path);
  };
  if (t.source_subword == t.target_subword) {
    write(*t.source_subword, "subword.model");
  } else {
    write(*t.source_subword, "source.model");
    write(*t.target_subword, "target.model");
  }
}

int run_train(const TrainArgs& a) {
  // One process, or N under mpirun (data parallelism): rank 0 alone writes files and reports.
  attn::cli::TrainProcesses processes;
  apply_threads(a.threads);
  const std::string checkpoint = s2s::Trainer::checkpoint_file(a.out);
  if (a.resume && !std::filesystem::exists(checkpoint))
    throw std::runtime_error("--resume: nothing to resume in " + a.out + ": " + checkpoint +
                             " does not exist (no checkpoint was written yet; run without --resume "
                             "to start)");
  if (!a.resume && !a.force && std::filesystem::exists(checkpoint))
    throw std::runtime_error(a.out + " already holds a model (" + checkpoint +
                             "): give --resume to continue it or --force to start over and "
                             "replace it");
  if (processes.root()) remove_stale_temporaries(a.out);
  std::vector<s2s::SentencePair> train, valid;
  if (a.corpus) {
    s2s::Corpus corpus = make_corpus(a.corpus_options);
    train = std::move(corpus.train);
    valid = std::move(corpus.valid);
  } else {
    s2s::PairsReadOptions options;
    // Subword runs count pieces, not words: the trainer leaves out sources over the limit. A
    // resumed run is whatever its checkpoint says (--subword need not be given again).
    bool subword = a.subword != "none";
    if (a.resume) {
      const auto metadata = s2s::SafetensorsFile::load(checkpoint).metadata;
      const auto it = metadata.find("train.subword");
      subword = it != metadata.end() && it->second != "none";
    }
    options.max_tokens = subword ? 0 : a.max_source - 1;
    options.policy = a.skip_bad_lines ? s2s::BadLinePolicy::skip : s2s::BadLinePolicy::refuse;
    s2s::PairsFile file = s2s::read_pairs_file(a.train_file, options);
    std::cerr << file.report.summary(a.train_file) << "\n";
    train = std::move(file.pairs);
    if (!a.valid_file.empty()) {
      valid = s2s::read_pairs_file(a.valid_file, options).pairs;
    } else {
      // Never validate on the training data: hold a slice out (sources that occur once).
      const int64_t n = static_cast<int64_t>(train.size());
      const int64_t size = a.valid_size >= 0 ? a.valid_size : n < 100 ? 0 : std::min<int64_t>(1000, n / 50);
      valid = s2s::hold_out_validation(train, size, a.seed);
      if (!valid.empty())
        std::cerr << "validation: " << valid.size() << " pairs held out of " << a.train_file
                  << " (their sources never occur in training); " << train.size()
                  << " pairs left to train on\n";
    }
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
    c.model.copy = a.copy != "off";
    if (c.model.copy) c.model.copy_kind = *s2s::parse_copy_kind(a.copy.empty() ? "generator" : a.copy);
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
    if (a.subword != "none") {
      c.subword.enabled = true;
      c.subword.kind = a.subword == "bpe" ? s2s::SubwordKind::bpe : s2s::SubwordKind::unigram;
      c.subword.vocab_size = a.vocab_size;
      c.subword.joint = !a.subword_per_side;
    }
    trainer.emplace(c, std::move(train), std::move(valid));
    if (processes.root()) write_subword_models(trainer->translator(), a.out);
    if (trainer->dropped_long_pairs() > 0)
      std::cerr << "left out " << trainer->dropped_long_pairs()
                << " training pairs whose source has more than " << a.max_source - 1
                << " subword pieces (--max-source " << a.max_source << ")\n";
    const auto& m = trainer->config().model;
    if (transformer)
      std::cerr << "model: transformer, " << m.encoder_layers << " + " << m.decoder_layers
                << " layers, d_model " << m.hidden << ", " << m.heads << " heads, ffn "
                << (m.ffn > 0 ? m.ffn : 4 * m.hidden) << ", " << attn::nn::norm_placement_name(m.norm)
                << "-norm, " << s2s::position_kind_name(m.positions) << " positions, dropout "
                << m.dropout;
    else
      std::cerr << "model: " << a.arch << " " << s2s::decoder_kind_name(m.decoder) << " decoder, "
                << s2s::score_kind_name(m.score) << " score" << (m.copy ? std::string(", copy (") + s2s::copy_kind_name(m.copy_kind) + ")" : "") << ", emb "
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
  control.out_dir = processes.root() ? a.out : "";
  control.patience = a.patience;
  control.sharding = processes.sharding(a.grad_shards);
  s2s::TrainCallbacks callbacks;
  if (a.keep_checkpoints > 0)
    callbacks.on_checkpoint = [&trainer, keep = a.keep_checkpoints](const std::string& path) {
      s2s::keep_numbered_checkpoint(path, trainer->step(), keep);
    };
  callbacks.on_progress = [](const s2s::Progress& p) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "epoch %lld/%lld  step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  elapsed %s  ETA %s",
                  static_cast<long long>(p.epoch + 1), static_cast<long long>(p.epochs),
                  static_cast<long long>(p.step), static_cast<long long>(p.total_steps), p.loss, p.lr,
                  p.tokens_per_s, format_duration(p.elapsed_s).c_str(), format_duration(p.eta_s).c_str());
    std::cerr << buf << std::endl;
  };
  callbacks.on_eval = [patience = a.patience](const s2s::EvalReport& e) {
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "eval step %lld: valid nll %.4f, BLEU %.2f, chrF2 %.2f, exact match %.1f%% (%lld "
                  "sentences)%s",
                  static_cast<long long>(e.step), e.valid_loss, e.bleu.bleu, e.chrf.score,
                  e.exact_match, static_cast<long long>(e.sentences),
                  e.best ? ", best so far" : "");
    std::cerr << buf;
    if (!e.best && patience > 0)
      std::cerr << " (" << e.evals_since_best << "/" << patience << " without improvement"
                << (e.evals_since_best >= patience ? ": stopping early" : "") << ")";
    std::cerr << std::endl;
  };
  callbacks.on_skipped_step = [](int64_t step, double loss, double grad_norm) {
    std::cerr << "attn: warning: step " << step << " skipped: loss " << loss << ", gradient norm "
              << grad_norm << " (not finite)" << std::endl;
  };
  // ATTN_PROFILE=1: where the training steps' time went, by phase (attn/profile.h).
  // ATTN_DUMP_BATCHES=FILE: every step's token ids, replayed by bench/torch_translators.py.
  // The steady training rate counts source and target tokens (one <eos> each) from the first
  // step's start to the last step's start, as the PyTorch twin does.
  const bool profiling = attn::profile::enable_from_environment();
  std::ofstream batch_log;
  if (const char* path = std::getenv("ATTN_DUMP_BATCHES"); path && *path) {
    batch_log.open(path);
    if (!batch_log) throw std::runtime_error(std::string("ATTN_DUMP_BATCHES: cannot write ") + path);
    s2s::write_batch_log_header(batch_log, trainer->config().model.source_vocab,
                                trainer->config().model.target_vocab);
  }
  int64_t rate_steps = 0, rate_tokens = 0, last_batch_tokens = 0;
  std::chrono::steady_clock::time_point first_batch, last_batch;
  std::clock_t first_cpu = 0, last_cpu = 0;  // CPU time of the process, all threads
  callbacks.on_batch = [&](int64_t step, const s2s::Batch& batch) {
    last_batch = std::chrono::steady_clock::now();
    last_cpu = std::clock();
    if (rate_steps++ == 0) first_batch = last_batch, first_cpu = last_cpu;
    rate_tokens += last_batch_tokens;  // the previous step's, now finished
    last_batch_tokens = s2s::batch_training_tokens(batch);
    if (batch_log.is_open()) s2s::write_batch_log_entry(batch_log, step, batch);
  };
  const auto start = std::chrono::steady_clock::now();
  const bool complete = trainer->run(control, callbacks);
  if (rate_steps > 1) {
    const double s = std::chrono::duration<double>(last_batch - first_batch).count();
    const double cpu = static_cast<double>(last_cpu - first_cpu) / CLOCKS_PER_SEC;
    std::cerr << "training rate: " << rate_tokens << " tokens (source + target) in " << rate_steps - 1
              << " steps, " << s << " s: " << static_cast<int64_t>(rate_tokens / s)
              << " tokens/s, " << static_cast<int64_t>(rate_tokens / cpu) << " tokens per CPU second\n";
  }
  if (profiling) {
    std::cerr << "profile of " << rate_steps << " training steps (ATTN_PROFILE):\n"
              << attn::profile::table(rate_steps);
    attn::profile::disable();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  processes.report(std::cerr, seconds);
  std::cerr << (complete ? "finished" : "stopped") << " at step " << trainer->step() << " after "
            << format_duration(seconds) << "; checkpoint in " << a.out << "\n";
  if (trainer->best_bleu() >= 0)
    std::cerr << "best validation BLEU " << trainer->best_bleu() << ": "
              << s2s::Trainer::best_checkpoint_file(a.out) << "\n";
  std::cout << "train_seconds " << seconds << "\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------

using TranslateArgs = attn::cli::TranslateOptions;

std::string numbered_path(const std::string& path, std::size_t index, std::size_t count) {
  if (count <= 1) return path;
  std::filesystem::path p(path);
  return (p.parent_path() / (p.stem().string() + "-" + std::to_string(index + 1) + p.extension().string())).string();
}

// Lines of `path` ("" or "-": stdin), CR of CRLF endings dropped.
std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> lines;
  std::ifstream file;
  if (!path.empty() && path != "-") {
    file.open(path, std::ios::binary);
    if (!file) throw std::runtime_error("--input: cannot open " + path);
  }
  std::istream& in = path.empty() || path == "-" ? std::cin : file;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
  }
  return lines;
}

// Standard output, or the file `path` names ("" or "-": standard output).
struct OutputStream {
  std::ofstream file;
  std::ostream* stream = &std::cout;
  OutputStream(const std::string& path, const char* option) {
    if (path.empty() || path == "-") return;
    file.open(path, std::ios::binary | std::ios::trunc);
    if (!file) throw std::runtime_error(std::string(option) + ": cannot write " + path);
    stream = &file;
  }
  void close(const std::string& path, const char* option) {
    if (!stream->flush()) throw std::runtime_error(std::string(option) + ": error writing " + path);
  }
};

nlohmann::ordered_json translation_json(const s2s::Translator& translator, const s2s::Translation& t) {
  nlohmann::ordered_json j;
  j["translation"] = translator.target_text(t);
  j["tokens"] = translator.target_tokens(t);
  j["score"] = t.score;
  j["log_prob"] = t.log_prob;
  j["finished"] = t.finished;
  return j;
}

// The attention statistics of a translation's alignment rows (one per target word, <eos> too
// when finished): the largest weight and the entropy in nats.
struct WordStats {
  s2s::Tokens words;
  attn::experiments::WeightRowStats rows;
};
WordStats word_stats(const s2s::Translator& translator, const s2s::Translation& t) {
  WordStats w;
  w.words = translator.target_tokens(t);
  if (t.finished) w.words.push_back("<eos>");
  w.words.resize(t.alignment.size(), "?");
  w.rows = attn::experiments::weight_row_stats(t.alignment);
  return w;
}

// "  attention (largest weight / entropy nats): le 0.91/0.31  chat 0.88/0.40 ... | mean 0.9/0.35"
std::string word_stats_text(const WordStats& w) {
  std::string line = "  attention (largest weight / entropy nats):";
  char buf[64];
  double mean_largest = 0.0, mean_entropy = 0.0;
  for (std::size_t k = 0; k < w.words.size(); ++k) {
    std::snprintf(buf, sizeof buf, " %.2f/%.2f", w.rows.largest[k], w.rows.entropy[k]);
    line += " " + w.words[k] + buf;
    mean_largest += w.rows.largest[k], mean_entropy += w.rows.entropy[k];
  }
  const double n = static_cast<double>(std::max<std::size_t>(1, w.words.size()));
  std::snprintf(buf, sizeof buf, " | mean %.2f/%.2f", mean_largest / n, mean_entropy / n);
  return line + buf + "\n";
}

// One output line per input line, always: a blank input line gives a blank output line (and no
// heatmap), so outputs can be pasted next to their inputs. Every line is checked against the
// model's longest input before anything is decoded, so decoding time stays bounded. With
// --nbest K: K lines "LINE ||| translation ||| score" per input line (LINE counts from 0, as
// Moses's n-best lists); with --json one object per input line.
int run_translate(TranslateArgs a) {
  apply_threads(a.threads);
  const s2s::Translator translator = s2s::Translator::load(a.model);
  const bool from_args = !a.sentences.empty();
  if (!from_args) a.sentences = read_lines(a.input);
  if (a.sentences.empty())
    throw UsageError("no sentences to translate (arguments, --input FILE or stdin)");
  const std::string where = from_args ? "sentence argument " : a.input.empty() || a.input == "-" ? "line " : a.input + ":";
  const int64_t limit = translator.max_source_tokens();
  std::vector<std::string> sentences;  // the non-blank lines
  std::vector<std::size_t> line_of;    // their 0-based index in a.sentences
  for (std::size_t i = 0; i < a.sentences.size(); ++i) {
    std::string& line = a.sentences[i];
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (!s2s::is_valid_utf8(line))
      throw std::runtime_error("translate: " + where + std::to_string(i + 1) + " is not valid UTF-8");
    const std::size_t tokens = translator.source_tokens(line).size();
    if (static_cast<int64_t>(tokens) > limit)
      throw std::runtime_error(
          "translate: " + where + std::to_string(i + 1) + " has " + std::to_string(tokens) +
          " tokens; the model in " + a.model + " takes at most " + std::to_string(limit) +
          " (its training --max-source " + std::to_string(limit + 1) + ", <eos> included); split the line");
    sentences.push_back(line);
    line_of.push_back(i);
  }
  s2s::DecodeConfig config;
  config.beam = std::max(a.beam, a.nbest);
  config.nbest = a.nbest;
  config.length_penalty = a.length_penalty;
  const bool terminal = !a.json && a.nbest == 1 && a.input.empty() && (a.output.empty() || a.output == "-");
  if (a.stats && a.nbest > 1 && !a.json)
    throw UsageError("--stats with --nbest needs --json (the n-best lines keep Moses's format)");
  config.alignment = a.json || a.stats || !a.heatmap.empty() || (terminal && !a.no_alignment);
  OutputStream output(a.output, "--output");  // opened first: a bad path fails before decoding
  std::vector<s2s::Tokens> sources;
  const auto start = std::chrono::steady_clock::now();
  const auto out = sentences.empty() ? std::vector<s2s::Translation>{}
                                     : translator.translate_all(sentences, config, &sources);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ostream& os = *output.stream;
  std::size_t next = 0;  // the next translation to print
  for (std::size_t line = 0; line < a.sentences.size(); ++line) {
    const bool blank = next >= out.size() || line_of[next] != line;
    if (a.json) {
      nlohmann::ordered_json j;
      j["line"] = line + 1;
      j["source"] = a.sentences[line];
      if (blank) {
        j["translation"] = "";
      } else {
        const s2s::Translation& t = out[next];
        j.update(translation_json(translator, t));
        j["source_tokens"] = sources[next];
        j["alignment"] = t.alignment;
        if (a.stats) {
          const WordStats w = word_stats(translator, t);
          j["stats"] = {{"words", w.words}, {"largest_weight", w.rows.largest}, {"entropy", w.rows.entropy}};
        }
        if (a.nbest > 1) {
          j["nbest"] = nlohmann::ordered_json::array();
          for (const s2s::Translation& alt : t.nbest) j["nbest"].push_back(translation_json(translator, alt));
        }
        ++next;
      }
      os << j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
      continue;
    }
    if (a.nbest > 1) {
      if (blank) {
        os << line << " |||  ||| 0\n";
        continue;
      }
      for (const s2s::Translation& alt : out[next].nbest) {
        char score[32];
        std::snprintf(score, sizeof score, "%.6f", alt.score);
        os << line << " ||| " << translator.target_text(alt) << " ||| " << score << "\n";
      }
      ++next;
      continue;
    }
    if (blank) {
      os << "\n";
      continue;
    }
    const std::size_t i = next++;
    os << translator.target_text(out[i]) << "\n";
    if (a.stats) os << word_stats_text(word_stats(translator, out[i]));
    if (out[i].alignment.empty()) continue;
    s2s::Tokens src = sources[i], tgt = translator.target_tokens(out[i]);
    src.push_back("<eos>");
    if (out[i].finished) tgt.push_back("<eos>");
    if (terminal && !a.no_alignment) os << s2s::terminal_heatmap(src, tgt, out[i].alignment) << "\n";
    if (!a.heatmap.empty()) {
      const std::string path = numbered_path(a.heatmap, i, out.size());
      s2s::write_heatmap(path, src, tgt, out[i].alignment);
      std::cerr << "wrote " << path << "\n";
    }
  }
  output.close(a.output, "--output");
  if (!terminal && !out.empty())
    std::cerr << "translated " << out.size() << " sentences in " << format_duration(seconds) << " ("
              << static_cast<double>(out.size()) / std::max(seconds, 1e-9) << " sentences/s)\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------

using EvalArgs = attn::cli::EvalOptions;
using attn::cli::AverageOptions;

// `attn eval --weight-histogram PREFIX`: the largest attention weight and the entropy of every
// target word's weights over the test set (the sources decoded again, keeping the weights), as
// PREFIX.csv (statistic, bin_start, bin_end, count) and PREFIX.svg (two bar charts).
void write_weight_histograms(const s2s::Translator& translator, const std::vector<s2s::SentencePair>& pairs,
                             s2s::DecodeConfig config, const std::string& prefix, OutputStream& csv) {
  namespace ex = attn::experiments;
  config.alignment = true;
  std::vector<std::string> sources;
  for (const s2s::SentencePair& p : pairs) sources.push_back(p.source);
  std::vector<double> largest, entropy;
  if (!sources.empty())
    for (const s2s::Translation& t : translator.translate_all(sources, config)) {
      const ex::WeightRowStats rows = ex::weight_row_stats(t.alignment);
      largest.insert(largest.end(), rows.largest.begin(), rows.largest.end());
      entropy.insert(entropy.end(), rows.entropy.begin(), rows.entropy.end());
    }
  if (largest.empty()) throw std::runtime_error("--weight-histogram: the translations have no attention weights");
  double entropy_max = 0.0;
  for (const double e : entropy) entropy_max = std::max(entropy_max, e);
  const ex::Histogram h_largest = ex::histogram(largest, 0.0, 1.0, 20);
  const ex::Histogram h_entropy = ex::histogram(entropy, 0.0, std::max(0.5, std::ceil(2.0 * entropy_max) / 2.0), 20);
  std::ostream& os = *csv.stream;
  os << "statistic,bin_start,bin_end,count\n";
  for (const auto& [name, h] : {std::pair{"largest_weight", &h_largest}, std::pair{"entropy_nats", &h_entropy}})
    for (std::size_t b = 0; b < h->counts.size(); ++b)
      os << name << "," << h->lo + h->bin_width() * static_cast<double>(b) << ","
         << h->lo + h->bin_width() * static_cast<double>(b + 1) << "," << h->counts[b] << "\n";
  csv.close(prefix + ".csv", "--weight-histogram");
  const std::string words = std::to_string(largest.size()) + " target words";
  const std::string svg = ex::svg_document(
      {ex::render(ex::histogram_chart(h_largest, "Largest attention weight (" + words + ")",
                                      "largest weight (bin start, 0-1)", "target words")),
       ex::render(ex::histogram_chart(h_entropy, "Entropy of the attention weights (" + words + ")",
                                      "entropy (bin start, nats)", "target words"))},
      330, 230);
  OutputStream svg_file(prefix + ".svg", "--weight-histogram");
  *svg_file.stream << svg;
  svg_file.close(prefix + ".svg", "--weight-histogram");
  std::cerr << "wrote " << prefix << ".csv and " << prefix << ".svg (" << words << ")\n";
}

int run_eval(const EvalArgs& a) {
  apply_threads(a.threads);
  std::vector<s2s::SentencePair> pairs;
  std::string name;
  if (!a.split.empty()) {
    const s2s::Corpus corpus = make_corpus(a.corpus_options);
    pairs = corpus_split(corpus, a.split);
    name = "corpus " + a.split;
  } else {
    pairs = s2s::read_pairs_file(a.test_file).pairs;
    name = a.test_file;
  }
  if (a.limit > 0 && static_cast<int64_t>(pairs.size()) > a.limit) pairs.resize(a.limit);
  const s2s::Translator translator = s2s::Translator::load(a.model);
  // As in translate: a source longer than the model was trained on is refused, by line (a pairs
  // file has one pair per line, so pair i is line i).
  const int64_t max_tokens = translator.max_source_tokens();
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const std::size_t tokens = translator.source_tokens(pairs[i].source).size();
    if (static_cast<int64_t>(tokens) > max_tokens)
      throw std::runtime_error(
          "eval: " + name + (a.split.empty() ? " line " : " pair ") + std::to_string(i + 1) +
          " has " + std::to_string(tokens) + " source tokens; the model in " + a.model +
          " takes at most " + std::to_string(max_tokens) + " (its training --max-source " +
          std::to_string(max_tokens + 1) + ", <eos> included)");
  }
  s2s::DecodeConfig config;
  config.beam = a.beam;
  config.length_penalty = a.length_penalty;
  if (!a.length_penalties.empty()) {
    const auto scores = s2s::score_length_penalties(translator, pairs, config, a.length_penalties);
    for (const s2s::LengthPenaltyScore& s : scores)
      std::printf("length penalty %g: %s\n  %s\n", s.length_penalty,
                  s2s::format_sacre_bleu(s.bleu).c_str(), s2s::format_chrf(s.chrf).c_str());
    const s2s::LengthPenaltyScore& best = s2s::best_length_penalty(scores);
    std::printf("best length penalty on %s (beam %lld, %zu sentences): %g (BLEU %.2f)\n",
                name.c_str(), static_cast<long long>(a.beam), pairs.size(), best.length_penalty,
                best.bleu.bleu);
    return 0;
  }
  std::optional<OutputStream> output;
  if (!a.output.empty()) output.emplace(a.output, "--output");  // fails before decoding
  std::optional<OutputStream> histogram_csv;
  if (!a.weight_histogram.empty()) histogram_csv.emplace(a.weight_histogram + ".csv", "--weight-histogram");
  const s2s::EvalResult r = s2s::evaluate(translator, pairs, config);
  if (output) {
    for (const std::string& text : r.hypothesis_texts) *output->stream << text << "\n";
    output->close(a.output, "--output");
  }
  if (histogram_csv) write_weight_histograms(translator, pairs, config, a.weight_histogram, *histogram_csv);
  // sacreBLEU and chrF over the detokenised output against the references as written; then
  // the token BLEU of the training tokenisation (lowercased words for word-level models).
  s2s::ChrfOptions plus_plus;
  plus_plus.word_order = 2;
  std::printf("%s: %zu sentences\n%s\n%s\n%s\ntokens: %s\nexact match %.2f%%\n", name.c_str(),
              pairs.size(), s2s::format_sacre_bleu(r.sacre_bleu).c_str(),
              s2s::format_chrf(r.chrf).c_str(), s2s::format_chrf(r.chrf_plus_plus, 1, plus_plus).c_str(),
              s2s::format_bleu(r.bleu).c_str(), r.exact_match);
  return 0;
}

int run_average(const AverageOptions& a) {
  std::vector<std::string> inputs = a.inputs;
  if (!a.model.empty()) {
    const std::vector<s2s::NumberedCheckpoint> all = s2s::numbered_checkpoints(a.model);
    if (static_cast<int64_t>(all.size()) < a.last)
      throw std::runtime_error("--last " + std::to_string(a.last) + ": " + a.model + " holds " +
                               std::to_string(all.size()) +
                               " numbered checkpoints (train with --keep-checkpoints N to keep them)");
    for (std::size_t i = all.size() - static_cast<std::size_t>(a.last); i < all.size(); ++i)
      inputs.push_back(all[i].path);
  }
  s2s::average_checkpoints(inputs).save(a.output);
  std::cerr << "averaged " << inputs.size() << " checkpoints into " << a.output << ":";
  for (const std::string& p : inputs) std::cerr << " " << std::filesystem::path(p).filename().string();
  std::cerr << "\n";
  return 0;
}

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

// glibc serves every block over its mmap threshold (128 KiB to start with) with a fresh mmap and
// unmaps it on free, so a training step's large temporaries (logits and their gradient, the
// layers' activations: ~40 MiB per step for the d 128 Transformer) came back as zeroed pages,
// about 11,000 page faults per step: a quarter of the step's CPU time went to the kernel. Above
// the threshold's maximum (32 MiB) blocks still come from mmap; below it the heap keeps them
// for the next step.
void keep_large_blocks_in_the_heap() {
#ifdef __GLIBC__
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
#endif
}

int main(int argc, char** argv) {
  prefer_passive_openmp_waits(argv);
  keep_large_blocks_in_the_heap();
  if (argc > 1 && std::string(argv[1]) == "experiments")  // its own parser: tools/experiments/
    return attn::experiments::main_experiments(std::vector<std::string>(argv + 2, argv + argc));
  attn::cli::ParsedCommandLine parsed;
  try {
    parsed = attn::cli::parse_command_line(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const UsageError& e) {
    std::cerr << "attn: error: " << e.what() << "\n";
    return 2;
  }
  try {
    switch (parsed.command) {
      case attn::cli::Command::help: std::cout << parsed.help_text; return 0;
      case attn::cli::Command::version:
        std::cout << "attn " << ATTN_VERSION << "\n" << attn::runtime_summary();
        return 0;
      case attn::cli::Command::train: return run_train(parsed.train);
      case attn::cli::Command::translate: return run_translate(parsed.translate);
      case attn::cli::Command::eval: return run_eval(parsed.eval);
      case attn::cli::Command::average: return run_average(parsed.average);
    }
  } catch (const UsageError& e) {
    std::cerr << "attn: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "attn: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
