// safetensors: round trips, one test per kind of corrupt file (each built here byte by byte),
// and a writer killed mid-save that leaves the previous checkpoint loadable.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "attn/error.h"
#include "seq2seq/training/safetensors.h"
#include "support/test_support.h"

namespace attn::seq2seq {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("attn_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path_)) out.push_back(e.path().filename().string());
    return out;
  }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

// A file image from a header text and a data section, with the 8-byte little-endian length.
std::vector<std::byte> image(const std::string& header, const std::vector<uint8_t>& data = {}) {
  std::vector<std::byte> out(8 + header.size() + data.size());
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

std::string parse_error(const std::vector<std::byte>& bytes) {
  try {
    SafetensorsFile::parse(bytes, "ckpt.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_PARSE_ERROR(bytes, fragment)                                                   \
  do {                                                                                        \
    const std::string message_ = parse_error(bytes);                                          \
    EXPECT_NE(message_.find("[safetensors] ckpt.safetensors: "), std::string::npos) << message_; \
    EXPECT_NE(message_.find(fragment), std::string::npos)                                     \
        << "message \"" << message_ << "\" lacks \"" << (fragment) << "\"";                 \
  } while (0)

SafetensorsFile sample() {
  SafetensorsFile f;
  // A transposed view: add() must store it in row-major order of its shape.
  const Tensor base = testing::random_tensor({3, 5}, DType::f32, 11);
  f.add("encoder.weight", base.transpose(0, 1));
  f.add("decoder.bias", testing::random_tensor({7}, DType::f64, 12));
  Tensor mask = Tensor::zeros({2, 3}, DType::b8);
  mask.set({1, 2}, 1.0);
  f.add("mask", mask);
  f.add("empty", Tensor::zeros({0, 4}));
  f.add_i64("rng.state", {-1, 0, INT64_MAX, 42});
  f.add_u8("optimizer.blob", {0, 1, 2, 255});
  const int64_t step = 1234;
  std::vector<std::byte> scalar(8);
  std::memcpy(scalar.data(), &step, 8);
  f.add_raw("step", StDType::I64, {}, scalar);
  f.metadata["config"] = R"({"hidden": 64})";
  f.metadata["format"] = "attn-checkpoint";
  return f;
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(Safetensors, RoundTripInMemoryAndOnDisk) {
  const SafetensorsFile f = sample();
  const std::vector<std::byte> bytes = f.serialize();
  const SafetensorsFile back = SafetensorsFile::parse(bytes, "memory");
  EXPECT_TRUE(back == f);
  EXPECT_TRUE(testing::all_close(back.tensor("encoder.weight"),
                                 f.tensor("encoder.weight"), {0.0, 0.0}, "encoder.weight"));
  const Tensor w = back.tensor("encoder.weight");
  EXPECT_EQ(w.shape(), (Shape{5, 3}));
  const Tensor base = testing::random_tensor({3, 5}, DType::f32, 11);
  EXPECT_EQ(w.get({4, 2}), base.get({2, 4}));
  EXPECT_EQ(back.tensor("decoder.bias").dtype(), DType::f64);
  EXPECT_EQ(back.tensor("mask").get({1, 2}), 1.0);
  EXPECT_EQ(back.tensor("empty").shape(), (Shape{0, 4}));
  EXPECT_EQ(back.i64("rng.state"), (std::vector<int64_t>{-1, 0, INT64_MAX, 42}));
  EXPECT_EQ(back.u8("optimizer.blob"), (std::vector<uint8_t>{0, 1, 2, 255}));
  EXPECT_EQ(back.entry("step").shape, Shape{});
  EXPECT_EQ(back.metadata.at("config"), R"({"hidden": 64})");

  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  f.save(path);
  EXPECT_TRUE(SafetensorsFile::load(path) == f);
  EXPECT_EQ(dir.names(), std::vector<std::string>{"model.safetensors"}) << "no temporary file left";
}

TEST(Safetensors, LayoutIsDeterministicAlignedAndLittleEndian) {
  const std::vector<std::byte> bytes = sample().serialize();
  EXPECT_EQ(bytes, sample().serialize());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u) << "data section starts 8-byte aligned";
  const nlohmann::json header = nlohmann::json::parse(
      std::string(reinterpret_cast<const char*>(bytes.data()) + 8, n));
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string dtype = entry["dtype"];
    const uint64_t begin = entry["data_offsets"][0];
    EXPECT_EQ(begin % st_dtype_size(*parse_st_dtype(dtype)), 0u) << name << " is aligned to its element";
  }
  EXPECT_EQ(header["rng.state"]["dtype"], "I64");
  EXPECT_EQ(header["encoder.weight"]["shape"], nlohmann::json({5, 3}));
  // Data are little-endian: the first I64 of rng.state is -1, all bytes 0xFF; 42 is 2A 00 ...
  const uint64_t begin = header["rng.state"]["data_offsets"][0];
  const std::byte* data = bytes.data() + 8 + n + begin;
  EXPECT_EQ(static_cast<uint8_t>(data[0]), 0xFF);
  EXPECT_EQ(static_cast<uint8_t>(data[24]), 0x2A);
  EXPECT_EQ(static_cast<uint8_t>(data[25]), 0x00);
}

TEST(Safetensors, ReadsAFileWrittenByHand) {
  // Two F32 values 1.0f (00 00 80 3F) and -2.0f (00 00 00 C0), as another writer would emit.
  const auto bytes = image(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                           {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0});
  const SafetensorsFile f = SafetensorsFile::parse(bytes, "hand");
  EXPECT_EQ(f.tensor("x").to_vector(), (std::vector<double>{1.0, -2.0}));
  // A dtype attn::Tensor cannot hold is kept as bytes.
  const auto half = image(R"({"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})", {0x00, 0x3C});
  const SafetensorsFile g = SafetensorsFile::parse(half, "hand");
  EXPECT_EQ(g.entry("h").dtype, StDType::F16);
  EXPECT_THROW(g.tensor("h"), Error);
  // BF16 is a Tensor dtype: 1.0 (80 3F) and -2.0 (00 C0), and it round-trips through add().
  const auto brain = image(R"({"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})",
                           {0x80, 0x3F, 0x00, 0xC0});
  const Tensor b = SafetensorsFile::parse(brain, "hand").tensor("b");
  EXPECT_EQ(b.dtype(), attn::DType::bf16);
  EXPECT_EQ(b.to_vector(), (std::vector<double>{1.0, -2.0}));
  SafetensorsFile out;
  out.add("b", b);
  EXPECT_EQ(out.entry("b").dtype, StDType::BF16);
  EXPECT_EQ(out.tensor("b").to_vector(), (std::vector<double>{1.0, -2.0}));
}

TEST(Safetensors, BuilderAndAccessorErrors) {
  SafetensorsFile f;
  f.add("w", Tensor::zeros({2}));
  EXPECT_THROW(f.add("w", Tensor::zeros({2})), Error);
  EXPECT_THROW(f.add("__metadata__", Tensor::zeros({2})), Error);
  EXPECT_THROW(f.add("", Tensor::zeros({2})), Error);
  EXPECT_THROW(f.add("undefined", Tensor()), Error);
  EXPECT_THROW(f.add_raw("raw", StDType::F32, {3}, std::vector<std::byte>(8)), Error);
  EXPECT_THROW(f.add_i64("ints", {1, 2, 3}, {2, 2}), Error);
  EXPECT_THROW(f.tensor("missing"), Error);
  EXPECT_THROW(f.i64("w"), Error);
  EXPECT_THROW(f.u8("w"), Error);
}

// ---------------------------------------------------------------------------------------------
// Corrupt files: every one is refused with a message naming the file and the problem.

TEST(SafetensorsCorrupt, FileShorterThanTheLengthField) {
  EXPECT_PARSE_ERROR(std::vector<std::byte>(5), "too short for the 8-byte header length");
  EXPECT_PARSE_ERROR(std::vector<std::byte>{}, "file is 0 bytes");
}

TEST(SafetensorsCorrupt, HeaderLargerThanTheCap) {
  std::vector<std::byte> bytes = image("{}");
  const uint64_t n = 100'000'001;
  std::memcpy(bytes.data(), &n, 8);
  EXPECT_PARSE_ERROR(bytes, "exceeds the 100000000-byte cap");
}

TEST(SafetensorsCorrupt, HeaderLengthPastTheEndOfFile) {
  std::vector<std::byte> bytes = image("{}");
  bytes[0] = std::byte{200};
  EXPECT_PARSE_ERROR(bytes, "runs past the end of the file");
}

TEST(SafetensorsCorrupt, HeaderIsNotAJsonObject) {
  EXPECT_PARSE_ERROR(image("[1, 2]"), "must be a JSON object");
  EXPECT_PARSE_ERROR(image(""), "must be a JSON object");
  EXPECT_PARSE_ERROR(image(R"({"x": )"), "not valid JSON");
  EXPECT_PARSE_ERROR(image("{\"x\xff\": 1}"), "not valid JSON");  // invalid UTF-8 in a key
  EXPECT_PARSE_ERROR(image(R"({"x": 5})"), "must be an object with dtype, shape, data_offsets");
}

TEST(SafetensorsCorrupt, DuplicateNames) {
  const auto bytes = image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                           R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                           {1, 2});
  EXPECT_PARSE_ERROR(bytes, "duplicate key \"w\" in the header (two tensors with one name)");
  const auto field = image(R"({"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}})", {1});
  EXPECT_PARSE_ERROR(field, "duplicate key \"dtype\"");
}

TEST(SafetensorsCorrupt, UnknownDtype) {
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}})", {0, 0, 0, 0}),
                     "unknown dtype \"F17\"");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", {0, 0, 0, 0}),
                     "needs a string \"dtype\"");
}

TEST(SafetensorsCorrupt, BadShapesAndOffsets) {
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})"),
                     "shape dimension must be a non-negative integer, got -1");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[2.5],"data_offsets":[0,0]}})"),
                     "non-negative integer, got 2.5");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":3,"data_offsets":[0,3]}})", {1, 2, 3}),
                     "needs an array \"shape\"");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", {1}),
                     "needs \"data_offsets\": [begin, end]");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})"),
                     "begin after end");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,-1]}})"),
                     "data_offsets end must be a non-negative integer");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", {1}),
                     "unknown field \"extra\"");
  EXPECT_PARSE_ERROR(image(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", {1}), "empty name");
  EXPECT_PARSE_ERROR(image(R"({"__metadata__":{"step":5}})"), "metadata \"step\" must be a string");
  EXPECT_PARSE_ERROR(image(R"({"w":[[[[[[1]]]]]]})"), "nests deeper");
}

TEST(SafetensorsCorrupt, ShapeTimesDtypeSizeDisagreesWithTheByteRange) {
  // F32 [2, 3] needs 24 bytes; the range spans 20.
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
                           std::vector<uint8_t>(20)),
                     "needs 24 bytes but data_offsets [0, 20] span 20");
}

TEST(SafetensorsCorrupt, ShapeProductOverflowIsCaught) {
  // 2^62 x 2^62 x 4 bytes wraps around uint64 (to 0, matching an empty range if unchecked).
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],)"
                           R"("data_offsets":[0,0]}})"),
                     "overflows 64 bits");
  EXPECT_PARSE_ERROR(image(R"({"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})"),
                     "is too large");
}

TEST(SafetensorsCorrupt, OverlappingRanges) {
  const auto bytes = image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           std::vector<uint8_t>(12));
  EXPECT_PARSE_ERROR(bytes, "tensor \"b\" at [4, 12) overlaps tensor \"a\" ending at 8");
}

TEST(SafetensorsCorrupt, GapBetweenRanges) {
  const auto gap = image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                         std::vector<uint8_t>(20));
  EXPECT_PARSE_ERROR(gap, "gap of 4 bytes before tensor \"b\" at offset 12");
  const auto late_start = image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", {0, 0, 0, 0});
  EXPECT_PARSE_ERROR(late_start, "gap of 2 bytes before tensor \"a\"");
}

TEST(SafetensorsCorrupt, TruncatedData) {
  const auto bytes = image(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})", std::vector<uint8_t>(9));
  EXPECT_PARSE_ERROR(bytes, "tensors need 16 data bytes but the file has 9 (truncated)");
}

TEST(SafetensorsCorrupt, TrailingGarbage) {
  const auto bytes = image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", {1, 2, 3, 4, 5});
  EXPECT_PARSE_ERROR(bytes, "3 trailing bytes after the last tensor");
}

TEST(SafetensorsCorrupt, BoolBytesOtherThanZeroAndOne) {
  EXPECT_PARSE_ERROR(image(R"({"m":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", {1, 2}),
                     "holds byte 2");
}

TEST(SafetensorsCorrupt, EveryTruncationOfAValidFileIsRefused) {
  const std::vector<std::byte> bytes = sample().serialize();
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    const std::vector<std::byte> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(size));
    EXPECT_THROW(SafetensorsFile::parse(cut, "cut"), Error) << "cut at " << size << " of " << bytes.size();
  }
}

TEST(SafetensorsCorrupt, FlippedBytesNeverCrash) {
  // Every byte of the length field and header, and of the data, set to a few values: the
  // parser either reads a file (a flip that leaves the byte as it was, or pads the header
  // differently) or throws attn::Error.
  const std::vector<std::byte> bytes = sample().serialize();
  int64_t refused = 0;
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t value : {0x00, 0x22, 0x5B, 0x7D, 0xFF}) {
      std::vector<std::byte> broken = bytes;
      broken[i] = static_cast<std::byte>(value);
      try {
        SafetensorsFile::parse(broken, "flipped");
      } catch (const Error&) {
        ++refused;
      }
    }
  }
  EXPECT_GT(refused, static_cast<int64_t>(bytes.size()));
}

// ---------------------------------------------------------------------------------------------
// Checksums

// The header of a file image as JSON, and the image rebuilt around another header.
nlohmann::json header_of(const std::vector<std::byte>& bytes) {
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return nlohmann::json::parse(std::string(reinterpret_cast<const char*>(bytes.data()) + 8, n));
}
std::vector<std::byte> with_header(const std::vector<std::byte>& bytes,
                                   const nlohmann::json& header) {
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const std::vector<uint8_t> data(reinterpret_cast<const uint8_t*>(bytes.data()) + 8 + n,
                                  reinterpret_cast<const uint8_t*>(bytes.data()) + bytes.size());
  return image(header.dump(), data);
}

// One flipped bit in any byte of any tensor is refused with the tensor's name.
TEST(SafetensorsChecksum, FlippedByteInTensorDataNamesTheTensor) {
  const std::vector<std::byte> bytes = sample().serialize();
  const nlohmann::json header = header_of(bytes);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  int64_t checked = 0;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const uint64_t begin = entry["data_offsets"][0], end = entry["data_offsets"][1];
    for (uint64_t at = begin; at < end; ++at) {
      std::vector<std::byte> broken = bytes;
      broken[8 + n + at] ^= std::byte{0x01};
      EXPECT_PARSE_ERROR(broken, "tensor \"" + name + "\" fails its xxh3_64 checksum");
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
}

// A checkpoint written by another tool carries no checksums and loads as it is.
TEST(SafetensorsChecksum, FileWithoutChecksumsStillLoads) {
  const std::vector<std::byte> bytes = sample().serialize();
  nlohmann::json header = header_of(bytes);
  int64_t removed = 0;
  for (auto it = header["__metadata__"].begin(); it != header["__metadata__"].end();) {
    if (it.key().rfind("checksum.", 0) == 0) {
      it = header["__metadata__"].erase(it);
      ++removed;
    } else {
      ++it;
    }
  }
  EXPECT_EQ(removed, sample().size() + 1);  // every tensor and the metadata
  const SafetensorsFile back = SafetensorsFile::parse(with_header(bytes, header), "plain");
  EXPECT_TRUE(back == sample());
  // The checksums never show in `metadata`: a loaded file saves again with fresh ones.
  EXPECT_EQ(SafetensorsFile::parse(bytes, "checked").metadata, sample().metadata);
}

// The metadata is covered too, and a header edited to drop one checksum is refused.
TEST(SafetensorsChecksum, EditedMetadataOrMissingChecksumIsRefused) {
  const std::vector<std::byte> bytes = sample().serialize();
  nlohmann::json header = header_of(bytes);
  header["__metadata__"]["config"] = R"({"hidden": 65})";
  EXPECT_PARSE_ERROR(with_header(bytes, header), "the metadata fails its xxh3_64 checksum");
  header = header_of(bytes);
  header["__metadata__"].erase("checksum.xxh3_64.decoder.bias");
  EXPECT_PARSE_ERROR(with_header(bytes, header), "tensor \"decoder.bias\" has no checksum");
  SafetensorsFile reserved;
  reserved.metadata["checksum.xxh3_64.w"] = "0";
  EXPECT_THROW(reserved.serialize(), Error);
}

// Temporaries whose writer is dead are removed; a live writer's and other files stay.
TEST(SafetensorsAtomic, StaleTemporariesOfDeadWritersAreRemoved) {
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);  // reaped: its PID names no process (until reused)
  const std::string prefix = atomic_temp_prefix(path);
  const std::string dead = prefix + std::to_string(child) + "-0";
  const std::string live = prefix + std::to_string(::getpid()) + "-3";
  const std::string other = prefix + "notes";
  for (const std::string& f : {dead, live, other, path}) std::ofstream(f) << "0123456789";
  const StaleTemporaries removed = remove_stale_temporaries(path);
  EXPECT_EQ(removed.files, 1);
  EXPECT_EQ(removed.bytes, 10u);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other));
  EXPECT_TRUE(fs::exists(path));
}

// ---------------------------------------------------------------------------------------------
// Atomic saves

TEST(SafetensorsAtomic, OverwriteReplacesAndFailureLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  SafetensorsFile a;
  a.add("w", Tensor::full({4}, 1.0));
  a.save(path);
  SafetensorsFile b;
  b.add("w", Tensor::full({4}, 2.0));
  b.save(path);
  EXPECT_TRUE(SafetensorsFile::load(path) == b);
  EXPECT_EQ(dir.names(), std::vector<std::string>{"ckpt.safetensors"});
  try {
    b.save(dir.file("no_such_dir/ckpt.safetensors"));
    FAIL() << "expected attn::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create"), std::string::npos) << e.what();
  }
  EXPECT_THROW(SafetensorsFile::load(dir.file("missing.safetensors")), Error);
  fs::create_directory(dir.file("a_directory"));
  try {
    SafetensorsFile::load(dir.file("a_directory"));
    FAIL() << "expected attn::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
}

// A child process starts replacing a checkpoint with a large one and is SIGKILLed while the
// new file is still a temporary; the checkpoint at the path must be the previous one, intact.
TEST(SafetensorsAtomic, KilledWriterLeavesThePreviousCheckpoint) {
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  SafetensorsFile previous = sample();
  previous.metadata["step"] = "100";

  SafetensorsFile next;
  next.add_u8("blob", std::vector<uint8_t>(64 << 20, 7));  // 64 MiB: a save takes a while
  next.metadata["step"] = "200";
  const std::vector<std::byte> next_image = next.serialize();  // built before fork
  const std::string temp_prefix = fs::path(atomic_temp_prefix(path)).filename().string();

  bool killed_mid_save = false;
  for (int attempt = 0; attempt < 20 && !killed_mid_save; ++attempt) {
    previous.save(path);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0) << "fork failed";
    if (child == 0) {
      ::alarm(60);  // never outlive a broken parent
      try {
        write_file_atomically(path, next_image, "child");
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    // Wait for the temporary file, freeze the child, and kill it if the rename has not happened.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    bool child_exited = false;
    while (std::chrono::steady_clock::now() < deadline) {
      bool temp_exists = false;
      for (const std::string& name : dir.names()) temp_exists |= name.rfind(temp_prefix, 0) == 0;
      if (temp_exists) {
        ::kill(child, SIGSTOP);
        int status = 0;
        ::waitpid(child, &status, WUNTRACED);
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
          child_exited = true;
          break;
        }
        bool still_temp = false;
        for (const std::string& name : dir.names()) still_temp |= name.rfind(temp_prefix, 0) == 0;
        if (still_temp) {
          ::kill(child, SIGKILL);
          ::waitpid(child, &status, 0);
          killed_mid_save = true;
          break;
        }
        ::kill(child, SIGCONT);
      }
      int status = 0;
      if (::waitpid(child, &status, WNOHANG) == child) {
        child_exited = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    if (!killed_mid_save && !child_exited) {
      ::kill(child, SIGKILL);
      int status = 0;
      ::waitpid(child, &status, 0);
    }
    if (!killed_mid_save) {
      // The save finished before it could be caught: clean up and try again.
      for (const std::string& name : dir.names()) {
        if (name.rfind(temp_prefix, 0) == 0) fs::remove(dir.file(name));
      }
    }
  }
  ASSERT_TRUE(killed_mid_save) << "could not catch the writer mid-save in 20 attempts";

  const SafetensorsFile loaded = SafetensorsFile::load(path);
  EXPECT_TRUE(loaded == previous);
  EXPECT_EQ(loaded.metadata.at("step"), "100");
  // The killed save's debris is a separate temporary file, which is all a crash can leave.
  int temporaries = 0;
  for (const std::string& name : dir.names()) {
    if (name.rfind(temp_prefix, 0) != 0) continue;
    ++temporaries;
    const auto partial = read_file_bytes(dir.file(name), "test");
    if (partial.size() < next_image.size()) {
      EXPECT_THROW(SafetensorsFile::parse(partial, name), Error) << "a partial file is refused";
    }
  }
  EXPECT_EQ(temporaries, 1);
}

}  // namespace
}  // namespace attn::seq2seq
