// The `attn` command-line tool, run as a separate process: help for every command, one-line
// errors with a non-zero exit status, and tiny train -> translate -> eval round trips (recurrent
// and Transformer).
//
// The binary is found next to the tests: <build>/tests/test_cli -> <build>/bin/attn.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <fstream>
#include <string>
#include <vector>

#include "seq2seq/data/corpus.h"
#include "seq2seq/data/pairs_file.h"

namespace {

namespace fs = std::filesystem;
namespace s2s = attn::seq2seq;

fs::path attn_binary() {
  const fs::path exe = fs::read_symlink("/proc/self/exe");
  return exe.parent_path().parent_path() / "bin" / "attn";
}

struct Process {
  int status = -1;
  std::string output;  // stdout and stderr together
};

// Runs `prefix attn args`, e.g. prefix "timeout -s KILL 1 ".
Process run_attn_with_prefix(const std::string& prefix, const std::string& args) {
  const std::string command = prefix + attn_binary().string() + " " + args + " 2>&1";
  Process r;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf;
  std::size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

Process run_attn(const std::string& args) { return run_attn_with_prefix("", args); }

int count_lines(const std::string& s) {
  int lines = 0;
  for (char c : s) lines += c == '\n';
  return lines;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    // tests/CMakeLists.txt makes test_cli depend on the binary, so a missing one is a failure.
    ASSERT_TRUE(fs::exists(attn_binary())) << "no binary at " << attn_binary();
    dir_ = fs::temp_directory_path() / ("attn_test_cli_" + std::to_string(getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  // A 200-pair corpus of short sentences, its train and test splits written to dir_/train.tsv
  // and dir_/test.tsv.
  s2s::Corpus write_small_corpus() const {
    s2s::CorpusConfig config;
    config.train_pairs = 200;
    config.valid_pairs = 20;
    config.test_pairs = 20;
    config.long_test_pairs = 5;
    config.max_train_tokens = 8;
    s2s::Corpus corpus = s2s::generate_corpus(config);
    s2s::write_pairs_file((dir_ / "train.tsv").string(), corpus.train);
    s2s::write_pairs_file((dir_ / "test.tsv").string(), corpus.test);
    return corpus;
  }

  fs::path dir_;
};

TEST_F(Cli, HelpForEveryCommand) {
  for (const char* cmd : {"", "train", "translate", "eval", "average"}) {
    const Process r = run_attn(std::string(cmd) + " --help");
    EXPECT_EQ(r.status, 0) << cmd << ": " << r.output;
    EXPECT_NE(r.output.find("--help"), std::string::npos) << cmd;
  }
  EXPECT_NE(run_attn("train --help").output.find("--attention"), std::string::npos);
  for (const char* option : {"--heads", "--ffn", "--dropout", "--decoder-layers", "--threads", "--min-frequency"})
    EXPECT_NE(run_attn("train --help").output.find(option), std::string::npos) << option;
  EXPECT_NE(run_attn("translate --help").output.find("--threads"), std::string::npos);
  EXPECT_NE(run_attn("eval --help").output.find("--threads"), std::string::npos);
  EXPECT_NE(run_attn("translate --help").output.find("--heatmap"), std::string::npos);
  EXPECT_NE(run_attn("eval --help").output.find("--corpus-split"), std::string::npos);
}

// What the tool runs on: the SIMD target, the BLAS kernel (never unnamed) and who chose it.
TEST_F(Cli, VersionNamesTheSimdTargetAndBlasKernel) {
  const Process r = run_attn("--version");
  EXPECT_EQ(r.status, 0) << r.output;
  for (const char* part : {"attn ", "SIMD target: ", "BLAS: ", "BLAS kernel: ", "chosen by ",
                           "bf16 attention kernel: ", " OpenMP, ", " BLAS, ", " cores available"})
    EXPECT_NE(r.output.find(part), std::string::npos) << part << " missing from:\n" << r.output;
  EXPECT_EQ(r.output.find("BLAS kernel:  "), std::string::npos) << r.output;
}

TEST_F(Cli, BadArgumentsGiveOneLineAndFail) {
  const std::string out = "--out " + (dir_ / "x").string();
  const std::pair<std::string, std::string> cases[] = {
      {"", "subcommand"},
      {"frobnicate", "frobnicate"},
      {"train --corpus " + out + " --attention sideways", "--attention must be"},
      {"train --corpus " + out + " --arch transformerish", "--arch must be"},
      {"train --corpus " + out + " --arch transformer --hidden 16 --heads 3", "heads (3)"},
      {"train --corpus " + out + " --arch transformer --norm sideways", "--norm must be pre or post"},
      {"train --corpus " + out + " --arch transformer --positions alibi", "--positions must be"},
      {"train --corpus " + out + " --threads 0", "--threads"},
      {"eval --model " + (dir_ / "missing").string() + " --corpus-split test --threads -1", "--threads"},
      {"train --corpus " + out + " --hidden -3", "hidden"},
      {"train " + out, "--corpus or --train"},
      {"train --corpus " + out + " --dropout 1.5", "[0, 1)"},
      {"train --corpus " + out + " --arch lstm --dropout -0.1", "[0, 1)"},
      {"train --corpus " + out + " --min-frequency 0", "--min-frequency"},
      {"train --corpus " + out + " --decoder-layers -1", "--decoder-layers"},
      {"train --corpus", "--out"},
      {"translate \"the cat\"", "--model"},
      {"translate --model " + (dir_ / "missing").string() + " \"the cat .\"", "missing"},
      {"eval --model " + (dir_ / "missing").string(), "--test FILE or --corpus-split"},
      {"train --train " + (dir_ / "nope.tsv").string() + " " + out, "nope.tsv"},
      // Non-finite values: --lr inf trained to NaN and saved a NaN checkpoint.
      {"train --corpus " + out + " --lr inf", "--lr: must be a finite number > 0, got inf"},
      {"train --corpus " + out + " --lr nan", "--lr"},
      {"train --corpus " + out + " --clip inf", "--clip"},
      {"train --corpus " + out + " --weight-decay 1e999", "--weight-decay"},
      {"train --corpus " + out + " --time-limit inf", "--time-limit"},
      {"train --corpus " + out + " --dropout nan", "--dropout"},
      {"train --corpus " + out + " --label-smoothing inf", "--label-smoothing"},
      {"translate --model m --length-penalty nan x", "--length-penalty"},
      {"train --corpus " + out + " --resume --force", "--resume and --force"},
  };
  for (const auto& [args, needle] : cases) {
    const Process r = run_attn(args);
    EXPECT_NE(r.status, 0) << args;
    EXPECT_EQ(count_lines(r.output), 1) << args << ":\n" << r.output;
    EXPECT_NE(r.output.find("error"), std::string::npos) << args << ": " << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << args << ": " << r.output;
  }
}

TEST_F(Cli, TrainTranslateEvalRoundTrip) {
  const s2s::Corpus corpus = write_small_corpus();
  const fs::path train = dir_ / "train.tsv", test = dir_ / "test.tsv", model = dir_ / "model";

  const Process t = run_attn("train --train " + train.string() + " --out " + model.string() +
                    " --emb 8 --hidden 16 --epochs 2 --batch 32 --progress-every 1 --eval-sentences 5");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("step 14/14"), std::string::npos) << t.output;
  EXPECT_NE(t.output.find("tok/s"), std::string::npos);
  EXPECT_NE(t.output.find("ETA"), std::string::npos);
  EXPECT_TRUE(fs::exists(model / "checkpoint.safetensors"));

  const fs::path svg = dir_ / "align.svg";
  const Process tr = run_attn("translate --model " + model.string() + " --heatmap " + svg.string() + " \"" +
                     corpus.test[0].source + "\"");
  ASSERT_EQ(tr.status, 0) << tr.output;
  EXPECT_GE(count_lines(tr.output), 3) << tr.output;  // translation, heatmap rows, "wrote"
  ASSERT_TRUE(fs::exists(svg));
  std::ifstream in(svg);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text.rfind("<svg", 0), 0u);
  EXPECT_NE(text.find("&lt;eos&gt;"), std::string::npos);  // the source <eos> column, escaped

  const Process stdin_run = run_attn("translate --model " + model.string() + " --beam 3 --no-alignment < " + test.string());
  ASSERT_EQ(stdin_run.status, 0) << stdin_run.output;
  EXPECT_EQ(count_lines(stdin_run.output), static_cast<int>(corpus.test.size()));

  const Process e = run_attn("eval --model " + model.string() + " --test " + test.string());
  ASSERT_EQ(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("BLEU"), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("exact match"), std::string::npos) << e.output;

  // Resuming a finished run is a no-op that still succeeds.
  const Process resumed = run_attn("train --train " + train.string() + " --out " + model.string() + " --resume");
  EXPECT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming"), std::string::npos);
}

// The pointer-sentinel mixture from the command line, with the attention statistics of
// translate --stats (text and JSON) and eval --weight-histogram (CSV and SVG).
TEST_F(Cli, CopySentinelStatsAndWeightHistogram) {
  const s2s::Corpus corpus = write_small_corpus();
  const fs::path train = dir_ / "train.tsv", test = dir_ / "test.tsv", model = dir_ / "model";
  const Process bad = run_attn("train --train " + train.string() + " --out " + model.string() + " --copy nonsense");
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_NE(bad.output.find("--copy must be generator or sentinel"), std::string::npos) << bad.output;
  const Process t = run_attn("train --train " + train.string() + " --out " + model.string() +
                             " --emb 8 --hidden 16 --epochs 1 --batch 32 --eval-sentences 5 --copy sentinel");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("copy (sentinel)"), std::string::npos) << t.output;

  const Process text = run_attn("translate --model " + model.string() + " --stats --no-alignment \"" +
                                corpus.test[0].source + "\"");
  ASSERT_EQ(text.status, 0) << text.output;
  EXPECT_NE(text.output.find("attention (largest weight / entropy nats):"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find("| mean "), std::string::npos) << text.output;
  const Process json = run_attn("translate --model " + model.string() + " --stats --json \"" +
                                corpus.test[0].source + "\"");
  ASSERT_EQ(json.status, 0) << json.output;
  EXPECT_NE(json.output.find("\"stats\":{\"words\":"), std::string::npos) << json.output;
  EXPECT_NE(json.output.find("\"largest_weight\":["), std::string::npos) << json.output;
  EXPECT_NE(json.output.find("\"entropy\":["), std::string::npos) << json.output;

  const fs::path prefix = dir_ / "weights";
  const Process e = run_attn("eval --model " + model.string() + " --test " + test.string() +
                             " --weight-histogram " + prefix.string());
  ASSERT_EQ(e.status, 0) << e.output;
  std::ifstream csv(prefix.string() + ".csv");
  std::string line;
  ASSERT_TRUE(std::getline(csv, line));
  EXPECT_EQ(line, "statistic,bin_start,bin_end,count");
  // Both histograms count every target word once: their totals agree.
  std::map<std::string, int64_t> totals;
  int rows = 0;
  while (std::getline(csv, line)) {
    ++rows;
    totals[line.substr(0, line.find(','))] += std::stoll(line.substr(line.rfind(',') + 1));
  }
  EXPECT_EQ(rows, 40);
  EXPECT_GT(totals["largest_weight"], 0);
  EXPECT_EQ(totals["largest_weight"], totals["entropy_nats"]);
  std::ifstream svg_in(prefix.string() + ".svg");
  const std::string svg((std::istreambuf_iterator<char>(svg_in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_EQ(count_lines(svg) > 0 && svg.find("data-kind=\"bar\"") != std::string::npos, true);
  EXPECT_NE(svg.find("entropy (bin start, nats)"), std::string::npos);
}

// A stacked recurrent decoder with dropout and a vocabulary cut-off trains, reports its shape,
// and its checkpoint translates (beam search over the per-layer states) and evaluates.
TEST_F(Cli, StackedDecoderWithDropoutAndMinFrequencyTrains) {
  const s2s::Corpus corpus = write_small_corpus();
  const fs::path train = dir_ / "train.tsv", test = dir_ / "test.tsv", model = dir_ / "deep";
  const std::string common = "train --train " + train.string() + " --emb 8 --hidden 16 --epochs 1"
                             " --batch 32 --progress-every 1 --eval-sentences 5 --out ";
  const Process t = run_attn(common + model.string() + " --decoder-layers 2 --dropout 0.1 --min-frequency 2");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("1 + 2 layers, dropout 0.1"), std::string::npos) << t.output;
  EXPECT_NE(t.output.find("step 7/7"), std::string::npos) << t.output;
  // Words seen once became <unk>: smaller vocabularies than the default cut-off of 1 gives.
  const Process plain = run_attn(common + (dir_ / "plain").string() + " --max-steps 1");
  ASSERT_EQ(plain.status, 0) << plain.output;
  auto vocab_of = [](const std::string& out) { return out.substr(out.find(", vocab "), 20); };
  EXPECT_NE(vocab_of(t.output), vocab_of(plain.output)) << t.output << "\n" << plain.output;
  // A recurrent run without --dropout keeps the old default of no dropout.
  EXPECT_NE(plain.output.find("1 + 1 layers, dropout 0,"), std::string::npos) << plain.output;

  const Process beam = run_attn("translate --model " + model.string() + " --beam 3 --no-alignment < " + test.string());
  ASSERT_EQ(beam.status, 0) << beam.output;
  EXPECT_EQ(count_lines(beam.output), static_cast<int>(corpus.test.size()));
  const Process e = run_attn("eval --model " + model.string() + " --test " + test.string());
  ASSERT_EQ(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("BLEU"), std::string::npos) << e.output;
}

// The same round trip for --arch transformer (pre-norm, 1 + 1 layers, d_model 16), every command
// with --threads, and beam search over the reordered KV caches.
TEST_F(Cli, TransformerTrainTranslateEvalRoundTrip) {
  const s2s::Corpus corpus = write_small_corpus();
  const fs::path train = dir_ / "train.tsv", test = dir_ / "test.tsv", model = dir_ / "xfmr";

  const Process t = run_attn("train --train " + train.string() + " --out " + model.string() +
                             " --arch transformer --hidden 16 --layers 1 --heads 2 --ffn 32"
                             " --dropout 0.1 --epochs 2 --batch 32 --progress-every 1"
                             " --eval-sentences 5 --threads 2");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("model: transformer, 1 + 1 layers, d_model 16, 2 heads, ffn 32"),
            std::string::npos) << t.output;
  EXPECT_NE(t.output.find("step 14/14"), std::string::npos) << t.output;
  EXPECT_TRUE(fs::exists(model / "checkpoint.safetensors"));

  const fs::path png = dir_ / "xfmr.png";
  const Process tr = run_attn("translate --model " + model.string() + " --threads 1 --heatmap " +
                              png.string() + " \"" + corpus.test[0].source + "\"");
  ASSERT_EQ(tr.status, 0) << tr.output;
  EXPECT_GE(count_lines(tr.output), 3) << tr.output;  // translation, heatmap rows, "wrote"
  ASSERT_TRUE(fs::exists(png));
  std::ifstream image(png, std::ios::binary);
  std::string signature(8, '\0');
  image.read(signature.data(), 8);
  EXPECT_EQ(signature, std::string("\x89PNG\r\n\x1a\n", 8));
  const Process bad_ext = run_attn("translate --model " + model.string() + " --heatmap " +
                                   (dir_ / "x.jpg").string() + " \"" + corpus.test[0].source + "\"");
  EXPECT_NE(bad_ext.status, 0);
  EXPECT_NE(bad_ext.output.find(".svg or .png"), std::string::npos) << bad_ext.output;

  const Process beam = run_attn("translate --model " + model.string() +
                                " --beam 4 --no-alignment < " + test.string());
  ASSERT_EQ(beam.status, 0) << beam.output;
  EXPECT_EQ(count_lines(beam.output), static_cast<int>(corpus.test.size()));

  const Process e = run_attn("eval --model " + model.string() + " --test " + test.string() +
                             " --threads 2");
  ASSERT_EQ(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("BLEU"), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("exact match"), std::string::npos) << e.output;

  // The configuration comes back from the checkpoint: resuming needs no --arch.
  const Process resumed = run_attn("train --train " + train.string() + " --out " + model.string() +
                                   " --resume --threads 1");
  EXPECT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming"), std::string::npos) << resumed.output;
}

// A training process killed by SIGKILL while it checkpoints after every step (so a kill very
// likely lands mid-save) leaves a checkpoint that loads: saves are atomic (safetensors.h).
TEST_F(Cli, KilledTrainingLeavesALoadableCheckpoint) {
  s2s::CorpusConfig config;
  config.train_pairs = 300;
  config.valid_pairs = 10;
  config.test_pairs = 10;
  config.long_test_pairs = 5;
  const s2s::Corpus corpus = s2s::generate_corpus(config);
  const fs::path train = dir_ / "train.tsv", model = dir_ / "model";
  s2s::write_pairs_file(train.string(), corpus.train);
  const Process killed = run_attn_with_prefix(
      "timeout -s KILL 1.5 ", "train --train " + train.string() + " --out " + model.string() +
                                  " --emb 16 --hidden 32 --epochs 1000 --batch 8 --checkpoint-every 1");
  EXPECT_NE(killed.status, 0) << "the run was meant to be killed: " << killed.output;
  ASSERT_TRUE(fs::exists(model / "checkpoint.safetensors"));
  const Process tr = run_attn("translate --model " + model.string() + " --no-alignment \"" +
                              corpus.train[0].source + "\"");
  EXPECT_EQ(tr.status, 0) << tr.output;
  EXPECT_EQ(count_lines(tr.output), 1) << tr.output;
}

// ---------------------------------------------------------------------------------------------
// Guards around training runs and translation

class CliGuards : public Cli {
 protected:
  // Trains a tiny GRU model for a few steps into `model`; returns the process result.
  Process train_tiny(const fs::path& model, const std::string& extra = "") const {
    return run_attn("train --train " + (dir_ / "train.tsv").string() + " --out " + model.string() +
                    " --emb 8 --hidden 16 --batch 32 --max-steps 3 --eval-sentences 0 " + extra);
  }
  static std::string file_bytes(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
};

// A fresh run into a directory that holds a model is refused (the model stays as it was) unless
// --force; --resume where nothing was written says what is missing.
TEST_F(CliGuards, TrainRefusesToReplaceAModelWithoutForce) {
  write_small_corpus();
  const fs::path model = dir_ / "model";
  const Process resume = train_tiny(model, "--resume");
  EXPECT_EQ(resume.status, 1) << resume.output;
  EXPECT_EQ(count_lines(resume.output), 1) << resume.output;
  EXPECT_NE(resume.output.find("nothing to resume in " + model.string()), std::string::npos)
      << resume.output;
  EXPECT_NE(resume.output.find("checkpoint.safetensors does not exist"), std::string::npos)
      << resume.output;

  ASSERT_EQ(train_tiny(model).status, 0);
  const std::string before = file_bytes(model / "checkpoint.safetensors");
  const Process again = train_tiny(model, "--seed 2");
  EXPECT_EQ(again.status, 1) << again.output;
  EXPECT_EQ(count_lines(again.output), 1) << again.output;
  EXPECT_NE(again.output.find("already holds a model"), std::string::npos) << again.output;
  EXPECT_NE(again.output.find("--force"), std::string::npos) << again.output;
  EXPECT_EQ(file_bytes(model / "checkpoint.safetensors"), before);
  const Process forced = train_tiny(model, "--seed 2 --force");
  EXPECT_EQ(forced.status, 0) << forced.output;
  EXPECT_NE(file_bytes(model / "checkpoint.safetensors"), before);
}

// Temporaries of saves whose process is gone (kill -9 mid-save) are removed when a run starts;
// one whose PID is alive is left alone.
TEST_F(CliGuards, StaleTemporariesAreRemovedOnStart) {
  write_small_corpus();
  const fs::path model = dir_ / "model";
  fs::create_directories(model);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(0);
  int status = 0;
  waitpid(child, &status, 0);
  const fs::path dead = model / (".checkpoint.safetensors.tmp-" + std::to_string(child) + "-0");
  const fs::path live = model / (".checkpoint.safetensors.tmp-" + std::to_string(getpid()) + "-0");
  std::ofstream(dead) << std::string(1000, 'x');
  std::ofstream(live) << "x";
  const Process t = train_tiny(model);
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("removed 1 temporary file(s) of 1000 bytes"), std::string::npos)
      << t.output;
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));
}

// --threads beyond the cores available runs with the cores available and says so.
TEST_F(CliGuards, ThreadsAreCappedWithAWarning) {
  write_small_corpus();
  const Process t = train_tiny(dir_ / "model", "--threads 1000");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("warning: --threads 1000 is more than the"), std::string::npos)
      << t.output;
  EXPECT_NE(t.output.find("cores available; using"), std::string::npos) << t.output;
}

// A byte flipped in the weights: the translator refuses the checkpoint, naming the tensor,
// instead of printing garbage with status 0.
TEST_F(CliGuards, CorruptWeightsAreRefusedByName) {
  write_small_corpus();
  const fs::path model = dir_ / "model";
  ASSERT_EQ(train_tiny(model).status, 0);
  const fs::path file = model / "checkpoint.safetensors";
  std::string bytes = file_bytes(file);
  // The first byte of the first weight: its data_offsets in the header, past the 8-byte length.
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const std::size_t name = bytes.find("\"model.", 8);
  ASSERT_LT(name, 8 + n);
  const std::size_t offsets = bytes.find("\"data_offsets\":[", name) + 16;
  bytes[8 + n + std::stoull(bytes.substr(offsets, 20))] ^= 0x04;
  std::ofstream(file, std::ios::binary) << bytes;
  const Process tr = run_attn("translate --model " + model.string() + " \"the cat .\"");
  EXPECT_EQ(tr.status, 1) << tr.output;
  EXPECT_EQ(count_lines(tr.output), 1) << tr.output;
  EXPECT_NE(tr.output.find("fails its xxh3_64 checksum"), std::string::npos) << tr.output;
  EXPECT_NE(tr.output.find("tensor \"model."), std::string::npos) << tr.output;
}

// Input longer than the model's --max-source is refused, naming the line, before any decoding:
// a 1 MB line comes back in bounded time (it ran for minutes).
TEST_F(CliGuards, OverLongInputIsRefusedNamingTheLine) {
  const s2s::Corpus corpus = write_small_corpus();
  const fs::path model = dir_ / "model";
  ASSERT_EQ(train_tiny(model, "--max-source 20").status, 0);
  const fs::path input = dir_ / "long.txt";
  std::string huge;
  while (huge.size() < (1 << 20)) huge += "the cat sees the dog . ";
  std::ofstream(input) << corpus.test[0].source << "\n\n" << huge << "\n";
  const auto start = std::chrono::steady_clock::now();
  const Process tr = run_attn("translate --model " + model.string() + " --no-alignment < " +
                              input.string());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(tr.status, 1) << tr.output.substr(0, 500);
  EXPECT_EQ(count_lines(tr.output), 1) << tr.output.substr(0, 500);
  EXPECT_NE(tr.output.find("line 3 has "), std::string::npos) << tr.output.substr(0, 500);
  EXPECT_NE(tr.output.find("takes at most 19 (its training --max-source 20"), std::string::npos)
      << tr.output.substr(0, 500);
  EXPECT_LT(seconds, 30.0);
  // The same limit for sentences given as arguments.
  const Process arg = run_attn("translate --model " + model.string() + " \"" +
                               corpus.test[0].source + "\" \"" + huge.substr(0, 2000) + "\"");
  EXPECT_EQ(arg.status, 1) << arg.output.substr(0, 500);
  EXPECT_NE(arg.output.find("sentence argument 2 has "), std::string::npos)
      << arg.output.substr(0, 500);
  // And for eval's test pairs.
  std::vector<s2s::SentencePair> pairs = {corpus.test[0], {huge.substr(0, 2000), "le chat ."}};
  s2s::write_pairs_file((dir_ / "long.tsv").string(), pairs);
  const Process e = run_attn("eval --model " + model.string() + " --test " +
                             (dir_ / "long.tsv").string());
  EXPECT_EQ(e.status, 1) << e.output.substr(0, 500);
  EXPECT_NE(e.output.find("long.tsv line 2 has "), std::string::npos) << e.output.substr(0, 500);
}

// One output line per input line: blank (or space-only) input lines give blank output lines.
TEST_F(CliGuards, BlankLinesGiveBlankLines) {
  const s2s::Corpus corpus = write_small_corpus();
  const fs::path model = dir_ / "model";
  ASSERT_EQ(train_tiny(model).status, 0);
  const fs::path input = dir_ / "blank.txt";
  std::ofstream(input) << "\n" << corpus.test[0].source << "\n  \t\n\r\n" << corpus.test[1].source
                       << "\n\n";
  const std::string command = attn_binary().string() + " translate --model " + model.string() +
                              " --no-alignment < " + input.string() + " 2>/dev/null";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  std::size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) out.append(buf.data(), n);
  ASSERT_EQ(pclose(pipe), 0) << out;
  std::vector<std::string> lines;
  std::size_t start = 0;
  for (std::size_t at; (at = out.find('\n', start)) != std::string::npos; start = at + 1)
    lines.push_back(out.substr(start, at - start));
  ASSERT_EQ(lines.size(), 6u) << out;
  for (std::size_t i : {0, 2, 3, 5}) EXPECT_EQ(lines[i], "") << "line " << i + 1 << ":\n" << out;
  EXPECT_NE(lines[1], "");
  EXPECT_NE(lines[4], "");
  // Only blank lines: as many blank lines back, status 0.
  std::ofstream(input) << "\n\n";
  const Process blank = run_attn("translate --model " + model.string() + " < " + input.string());
  EXPECT_EQ(blank.status, 0) << blank.output;
  EXPECT_EQ(blank.output, "\n\n");
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The lines of `text`, without the tool's "translated N sentences ..." report (stderr, which
// run_attn merges into the output).
std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  for (std::size_t at; (at = text.find('\n', start)) != std::string::npos; start = at + 1)
    if (text.compare(start, 11, "translated ") != 0) lines.push_back(text.substr(start, at - start));
  return lines;
}

// Real-text features end to end: a SentencePiece vocabulary learnt by `attn train` (stored
// beside the checkpoint), validation held out of --train with best.safetensors kept, and the
// translator's file, n-best and JSON outputs; eval writes its translations and reports
// sacreBLEU-style BLEU and chrF.
TEST_F(Cli, SubwordValidationAndTranslatorOutputs) {
  const s2s::Corpus corpus = write_small_corpus();
  std::vector<s2s::SentencePair> pairs = corpus.train;
  pairs.push_back({"Could not open '%s': %d errors", "Impossible d'ouvrir « %s » : %d erreurs"});
  s2s::write_pairs_file((dir_ / "mixed.tsv").string(), pairs);
  const fs::path model = dir_ / "sub";
  const Process t = run_attn("train --train " + (dir_ / "mixed.tsv").string() + " --out " +
                             model.string() + " --arch transformer --hidden 32 --heads 2 --ffn 64 "
                             "--subword bpe --vocab-size 400 --valid-size 20 --max-steps 12 "
                             "--eval-every 6 --eval-sentences 10 --threads 1");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("validation: 20 pairs held out"), std::string::npos) << t.output;
  EXPECT_NE(t.output.find("chrF2"), std::string::npos) << t.output;
  EXPECT_TRUE(fs::exists(model / "subword.model"));
  EXPECT_TRUE(fs::exists(model / "best.safetensors"));

  const fs::path input = dir_ / "in.txt", output = dir_ / "out.txt";
  std::ofstream(input) << corpus.test[0].source << "\n\nSaved %s in {0}\n";
  const Process tr = run_attn("translate --model " + model.string() + " --input " + input.string() +
                              " --output " + output.string());
  ASSERT_EQ(tr.status, 0) << tr.output;
  EXPECT_NE(tr.output.find("sentences/s"), std::string::npos) << tr.output;
  const std::vector<std::string> lines = split_lines(read_file(output));
  ASSERT_EQ(lines.size(), 3u) << read_file(output);
  EXPECT_EQ(lines[1], "");
  EXPECT_EQ(lines[0].find("\xe2\x96\x81"), std::string::npos) << lines[0];  // detokenised: no ▁

  const Process nbest = run_attn("translate --model " + model.string() + " --nbest 3 --input " +
                                 input.string());
  ASSERT_EQ(nbest.status, 0) << nbest.output;
  const std::vector<std::string> n_lines = split_lines(nbest.output);
  ASSERT_EQ(n_lines.size(), 7u) << nbest.output;  // 3 + blank line's 1 + 3
  EXPECT_EQ(n_lines[0].rfind("0 ||| ", 0), 0u) << n_lines[0];
  EXPECT_EQ(n_lines[3], "1 |||  ||| 0");
  EXPECT_EQ(n_lines[6].rfind("2 ||| ", 0), 0u) << n_lines[6];

  const Process json = run_attn("translate --model " + model.string() + " --json --nbest 2 --input " +
                                input.string());
  ASSERT_EQ(json.status, 0) << json.output;
  const std::vector<std::string> j_lines = split_lines(json.output);
  ASSERT_EQ(j_lines.size(), 3u) << json.output;
  for (const char* key : {"\"translation\":", "\"tokens\":", "\"score\":", "\"alignment\":", "\"nbest\":"})
    EXPECT_NE(j_lines[0].find(key), std::string::npos) << key << " in " << j_lines[0];
  EXPECT_EQ(j_lines[1], "{\"line\":2,\"source\":\"\",\"translation\":\"\"}");

  const fs::path hyp = dir_ / "hyp.txt";
  const Process e = run_attn("eval --model " + (model / "best.safetensors").string() + " --test " +
                             (dir_ / "test.tsv").string() + " --output " + hyp.string());
  ASSERT_EQ(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp = "), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("chrF2|nrefs:1|"), std::string::npos) << e.output;
  EXPECT_EQ(split_lines(read_file(hyp)).size(), corpus.test.size());

  // Resuming needs no --subword (the checkpoint knows it); the same --valid-size holds out the
  // same pairs again.
  const Process resumed = run_attn("train --train " + (dir_ / "mixed.tsv").string() + " --out " +
                                   model.string() + " --resume --valid-size 20 --max-steps 14 "
                                   "--eval-every 7 --eval-sentences 10 --threads 1");
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming"), std::string::npos) << resumed.output;
  EXPECT_NE(resumed.output.find("eval step 14"), std::string::npos) << resumed.output;

  const Process bad = run_attn("translate --model " + model.string() + " --input " +
                               (dir_ / "missing.txt").string());
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find("missing.txt"), std::string::npos) << bad.output;
  EXPECT_EQ(run_attn("train --train x --out y --subword words").status, 2);
}

// Early stopping: with a learning rate too small to change anything, the validation BLEU never
// improves after the first evaluation, so --patience 1 stops at the second.
TEST_F(Cli, PatienceStopsEarly) {
  write_small_corpus();
  const fs::path model = dir_ / "patient";
  const Process t = run_attn("train --train " + (dir_ / "train.tsv").string() + " --out " +
                             model.string() + " --emb 8 --hidden 16 --lr 1e-12 --warmup 0 "
                             "--eval-every 3 --eval-sentences 4 --patience 1 --max-steps 30 --threads 1");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("stopping early"), std::string::npos) << t.output;
  EXPECT_NE(t.output.find("stopped at step 6 "), std::string::npos) << t.output;
  EXPECT_TRUE(fs::exists(model / "best.safetensors"));
}

// One beam search answers for every length penalty: each alpha of the grid scores exactly what a
// search run at that alpha returns.
TEST_F(CliGuards, LengthPenaltyGridEqualsSearchesAtEachPenalty) {
  write_small_corpus();
  const fs::path model = dir_ / "grid";
  ASSERT_EQ(train_tiny(model, "--threads 1").status, 0);
  const std::string eval_any_beam =
      "eval --model " + model.string() + " --test " + (dir_ / "test.tsv").string() + " --threads 1";
  const std::string eval = eval_any_beam + " --beam 3";
  const Process grid = run_attn(eval + " --length-penalties 0,0.5,2");
  ASSERT_EQ(grid.status, 0) << grid.output;
  for (const char* alpha : {"0", "0.5", "2"}) {
    const Process one = run_attn(eval + " --length-penalty " + alpha);
    ASSERT_EQ(one.status, 0) << one.output;
    const std::size_t bleu = one.output.find("BLEU|");
    ASSERT_NE(bleu, std::string::npos) << one.output;
    const std::string line = one.output.substr(bleu, one.output.find('\n', bleu) - bleu);
    EXPECT_NE(grid.output.find(std::string("length penalty ") + alpha + ": " + line), std::string::npos)
        << "alpha " << alpha << ": " << line << "\nnot in:\n" << grid.output;
  }
  EXPECT_NE(grid.output.find("best length penalty on"), std::string::npos) << grid.output;
  const Process greedy = run_attn(eval_any_beam + " --beam 1 --length-penalties 1");
  EXPECT_EQ(greedy.status, 2);
  EXPECT_NE(greedy.output.find("--length-penalties tunes beam search"), std::string::npos) << greedy.output;
}

TEST_F(CliGuards, KeptCheckpointsAverageIntoOneThatTranslates) {
  write_small_corpus();
  const fs::path model = dir_ / "averaged";
  const Process t = train_tiny(model, "--checkpoint-every 1 --keep-checkpoints 2 --threads 1");  // 3 steps
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_FALSE(fs::exists(model / "checkpoint-1.safetensors"));
  EXPECT_TRUE(fs::exists(model / "checkpoint-2.safetensors"));
  EXPECT_TRUE(fs::exists(model / "checkpoint-3.safetensors"));
  const fs::path avg = model / "avg.safetensors";
  const Process a = run_attn("average --model " + model.string() + " --last 2 -o " + avg.string());
  ASSERT_EQ(a.status, 0) << a.output;
  EXPECT_NE(a.output.find("averaged 2 checkpoints"), std::string::npos) << a.output;
  const Process e = run_attn("eval --model " + avg.string() + " --test " + (dir_ / "test.tsv").string() +
                             " --limit 3 --threads 1");
  EXPECT_EQ(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("BLEU"), std::string::npos) << e.output;
  const Process too_many = run_attn("average --model " + model.string() + " --last 3 -o " + avg.string());
  EXPECT_EQ(too_many.status, 1);
  EXPECT_NE(too_many.output.find("holds 2 numbered checkpoints"), std::string::npos) << too_many.output;
  const Process neither = run_attn("average -o " + avg.string());
  EXPECT_EQ(neither.status, 2) << neither.output;
}

}  // namespace
