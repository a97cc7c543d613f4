// Checkpoint averaging: the mean of the model weights (float64 accumulation, each tensor's own
// dtype), everything else from the last file, refusals that name the file and tensor, and the
// numbered checkpoints training keeps for it.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "attn/error.h"
#include "seq2seq/training/checkpoint_average.h"
#include "seq2seq/training/safetensors.h"
#include "support/training_checks.h"

namespace attn::seq2seq {
namespace {

namespace fs = std::filesystem;

// A checkpoint-shaped file: model identity metadata, two model tensors (F32 and F64) whose
// elements are base + index, and non-model state tagged with `tag`.
SafetensorsFile fake_checkpoint(double base, int64_t tag) {
  SafetensorsFile f;
  f.metadata["format"] = "attn.seq2seq";
  f.metadata["version"] = "1";
  f.metadata["config.hidden"] = "3";
  f.metadata["source_vocab"] = "[\"a\",\"b\"]";
  f.metadata["train.lr"] = std::to_string(tag);  // training settings may differ
  std::vector<float> w(6);
  for (int i = 0; i < 6; ++i) w[i] = static_cast<float>(base + i);
  f.add("model.w", Tensor::from(w, {2, 3}));
  f.add("model.b", Tensor::from(std::vector<double>{base, -base}, {2}));
  f.add_i64("train.position", {0, tag, tag});
  f.add_u8("optimizer.state", {static_cast<uint8_t>(tag)});
  return f;
}

std::vector<std::string> write_all(const fs::path& dir, const std::vector<SafetensorsFile>& files) {
  std::vector<std::string> paths;
  for (std::size_t i = 0; i < files.size(); ++i) {
    paths.push_back((dir / ("c" + std::to_string(i) + ".safetensors")).string());
    files[i].save(paths.back());
  }
  return paths;
}

std::string error_of(const std::vector<std::string>& paths) {
  try {
    average_checkpoints(paths);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(CheckpointAverage, MeanOfModelTensorsRestFromLastFile) {
  const fs::path dir = testing::scratch_dir("average_mean");
  // 0.1 is not representable: the float32 mean must be the float64 mean rounded once.
  const auto paths = write_all(dir, {fake_checkpoint(0.1, 1), fake_checkpoint(1.0, 2),
                                     fake_checkpoint(2.2, 3)});
  const SafetensorsFile avg = average_checkpoints(paths);
  const Tensor w = avg.tensor("model.w");
  ASSERT_EQ(w.dtype(), DType::f32);
  for (int i = 0; i < 6; ++i) {
    const double mean_of_stored =
        (static_cast<double>(static_cast<float>(0.1 + i)) + (1.0 + i) +
         static_cast<double>(static_cast<float>(2.2 + i))) / 3.0;
    EXPECT_EQ(w.data<float>()[i], static_cast<float>(mean_of_stored)) << "element " << i;
  }
  const Tensor b = avg.tensor("model.b");
  ASSERT_EQ(b.dtype(), DType::f64);
  EXPECT_DOUBLE_EQ(b.data<double>()[0], (0.1 + 1.0 + 2.2) / 3.0);
  EXPECT_DOUBLE_EQ(b.data<double>()[1], -(0.1 + 1.0 + 2.2) / 3.0);
  // Non-model state and metadata: the last file's.
  EXPECT_EQ(avg.i64("train.position"), (std::vector<int64_t>{0, 3, 3}));
  EXPECT_EQ(avg.u8("optimizer.state"), (std::vector<uint8_t>{3}));
  EXPECT_EQ(avg.metadata.at("train.lr"), "3");
  EXPECT_EQ(nlohmann::json::parse(avg.metadata.at("averaged_from")),
            (nlohmann::json{"c0.safetensors", "c1.safetensors", "c2.safetensors"}));
  // The result is a checkpoint like any other: it saves and loads with its checksums.
  avg.save((dir / "avg.safetensors").string());
  EXPECT_EQ(SafetensorsFile::load((dir / "avg.safetensors").string()).tensor("model.b").data<double>()[0],
            b.data<double>()[0]);
  fs::remove_all(dir);
}

TEST(CheckpointAverage, OneFileIsItself) {
  const fs::path dir = testing::scratch_dir("average_one");
  const auto paths = write_all(dir, {fake_checkpoint(0.3, 7)});
  const SafetensorsFile avg = average_checkpoints(paths);
  const SafetensorsFile one = SafetensorsFile::load(paths[0]);
  for (const std::string& name : one.names())
    EXPECT_EQ(avg.entry(name).data, one.entry(name).data) << name;
  fs::remove_all(dir);
}

TEST(CheckpointAverage, RefusesAnotherModel) {
  const fs::path dir = testing::scratch_dir("average_refuse");
  SafetensorsFile other_config = fake_checkpoint(1, 1);
  other_config.metadata["config.hidden"] = "4";
  SafetensorsFile other_vocab = fake_checkpoint(1, 1);
  other_vocab.metadata["source_vocab"] = "[\"a\",\"c\"]";
  SafetensorsFile missing_key = fake_checkpoint(1, 1);
  missing_key.metadata.erase("config.hidden");
  SafetensorsFile other_shape;
  other_shape.metadata = fake_checkpoint(1, 1).metadata;
  other_shape.add("model.w", Tensor::zeros({3, 2}));
  other_shape.add("model.b", Tensor::zeros({2}, DType::f64));
  SafetensorsFile other_dtype;
  other_dtype.metadata = fake_checkpoint(1, 1).metadata;
  other_dtype.add("model.w", Tensor::zeros({2, 3}, DType::f64));
  other_dtype.add("model.b", Tensor::zeros({2}, DType::f64));
  SafetensorsFile missing_tensor;
  missing_tensor.metadata = fake_checkpoint(1, 1).metadata;
  missing_tensor.add("model.w", Tensor::zeros({2, 3}));
  SafetensorsFile extra_tensor = fake_checkpoint(1, 1);
  extra_tensor.add("model.extra", Tensor::zeros({1}));
  const auto paths = write_all(dir, {other_config, other_vocab, missing_key, other_shape,
                                     other_dtype, missing_tensor, extra_tensor,
                                     fake_checkpoint(2, 2)});
  const std::string last = paths.back();
  struct Case {
    std::size_t file;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {0, {"c0.safetensors", "config.hidden", "\"4\"", "not checkpoints of one model"}},
      {1, {"c1.safetensors", "source_vocab", "not checkpoints of one model"}},
      {2, {"c2.safetensors", "has no \"config.hidden\""}},
      {3, {"c3.safetensors", "model.w", "[3, 2]", "[2, 3]"}},
      {4, {"c4.safetensors", "model.w", "F64", "F32"}},
      {5, {"c5.safetensors", "no tensor model.b"}},
      {6, {"c6.safetensors", "model.extra", "is not in"}},
  };
  for (const Case& c : cases) {
    const std::string message = error_of({paths[c.file], last});
    for (const std::string& word : c.words)
      EXPECT_NE(message.find(word), std::string::npos) << "missing \"" << word << "\" in: " << message;
  }
  EXPECT_NE(error_of({}).find("no checkpoints"), std::string::npos);
  EXPECT_NE(error_of({(dir / "absent.safetensors").string(), last}).find("absent.safetensors"),
            std::string::npos);
  fs::remove_all(dir);
}

TEST(CheckpointAverage, KeepsTheNewestNumberedCheckpoints) {
  const fs::path dir = testing::scratch_dir("average_keep");
  const std::string latest = (dir / "checkpoint.safetensors").string();
  for (int64_t step : {4, 8, 12, 16}) {
    fake_checkpoint(static_cast<double>(step), step).save(latest);
    const std::string kept = keep_numbered_checkpoint(latest, step, 2);
    EXPECT_EQ(fs::path(kept).filename(), "checkpoint-" + std::to_string(step) + ".safetensors");
    EXPECT_EQ(SafetensorsFile::load(kept), SafetensorsFile::load(latest));
  }
  // Names that only look numbered are not ours to delete.
  SafetensorsFile().save((dir / "checkpoint-x.safetensors").string());
  SafetensorsFile().save((dir / "checkpoint-3.safetensors.bak").string());
  const std::vector<NumberedCheckpoint> kept = numbered_checkpoints(dir.string());
  ASSERT_EQ(kept.size(), 2u);
  EXPECT_EQ(kept[0].step, 12);
  EXPECT_EQ(kept[1].step, 16);
  EXPECT_TRUE(fs::exists(dir / "checkpoint-x.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "checkpoint-3.safetensors.bak"));
  const SafetensorsFile avg = average_checkpoints({kept[0].path, kept[1].path});
  EXPECT_DOUBLE_EQ(avg.tensor("model.b").data<double>()[0], 14.0);
  EXPECT_THROW(keep_numbered_checkpoint(latest, 20, 0), Error);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace attn::seq2seq
