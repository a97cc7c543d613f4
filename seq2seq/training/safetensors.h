// The safetensors checkpoint format, written atomically and read with full validation.
//
// Layout (https://github.com/huggingface/safetensors, the format's reference implementation):
//   bytes [0, 8)        N, the header length, unsigned 64-bit little-endian
//   bytes [8, 8 + N)    a UTF-8 JSON object:
//                         {"__metadata__": {"key": "value", ...},            (optional, strings only)
//                          "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
//   bytes [8 + N, EOF)  the data section; offsets are relative to its start, data little-endian
//                       and row-major.
//
// Writer: JSON keys in byte order (a file is a pure function of its contents); data ordered by
// element size, largest first, then by name, so every tensor starts at a multiple of its element
// size (the header is space-padded to a multiple of 8 bytes, as the reference does), which lets
// a reader map the data in place.
//
// Reader: refuses, with an attn::Error naming the file, anything the reference refuses: a header
// length over 100,000,000 bytes or past the end of the file, a header that is not a JSON object,
// duplicate names, an unknown dtype, a negative or non-integer shape or offset, a byte range
// that disagrees with shape x dtype size (computed with overflow checks), offsets that overlap or
// leave a gap, a file shorter than its tensors (truncated) or longer (trailing bytes). It also
// refuses unknown fields in a tensor entry and BOOL bytes other than 0 and 1.
//
// Checksums: the writer stores the xxh3_64 hash of each tensor's bytes, and of the rest of the
// metadata, as metadata "checksum.xxh3_64.<tensor name>" and "checksum.xxh3_64.__metadata__"
// (16 hex digits). The reader verifies them and names the tensor whose bytes changed, then
// drops them from `metadata`. A file with no checksum keys (another writer) loads unverified;
// one with some but not all is refused.
//
// Tensors that attn::Tensor can hold (F32, F64, BOOL) convert both ways; every other dtype
// (I64 and U8 for RNG and optimizer state, and the rest of the reference's list) is stored and
// returned as raw little-endian bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attn/tensor.h"

namespace attn::seq2seq {

// Element types, spelled as the reference spells them in the header.
enum class StDType { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

const char* st_dtype_name(StDType dtype);
std::size_t st_dtype_size(StDType dtype);
std::optional<StDType> parse_st_dtype(std::string_view name);

struct SafetensorsEntry {
  StDType dtype = StDType::F32;
  Shape shape;                  // every dimension >= 0; {} is a scalar
  std::vector<std::byte> data;  // numel x dtype size bytes, little-endian, row-major
};

class SafetensorsFile {
 public:
  // Free-form string metadata (configuration, data position, format versions).
  std::map<std::string, std::string> metadata;

  // Adds a copy of `tensor` (any strides) as F32, F64 or BOOL. Names must be new, non-empty and
  // not "__metadata__".
  void add(const std::string& name, const Tensor& tensor);
  // 64-bit integers (RNG counters, step numbers); shape defaults to {values.size()}.
  void add_i64(const std::string& name, const std::vector<int64_t>& values, Shape shape = {});
  // A raw byte blob (serialised optimizer or RNG state), stored as a 1-d U8 tensor.
  void add_u8(const std::string& name, const std::vector<uint8_t>& bytes);
  // Any dtype: `data` must hold exactly numel(shape) x st_dtype_size(dtype) bytes.
  void add_raw(const std::string& name, StDType dtype, const Shape& shape, std::vector<std::byte> data);

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;  // in byte order
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  const SafetensorsEntry& entry(const std::string& name) const;
  // An owning tensor from an F32, F64 or BOOL entry.
  Tensor tensor(const std::string& name) const;
  std::vector<int64_t> i64(const std::string& name) const;
  std::vector<uint8_t> u8(const std::string& name) const;

  std::vector<std::byte> serialize() const;
  // Validates and decodes a whole file image; `source_name` (a path) prefixes every error.
  static SafetensorsFile parse(std::span<const std::byte> bytes, const std::string& source_name);

  // save() goes through write_file_atomically: a crash leaves the previous file intact.
  void save(const std::string& path) const;
  static SafetensorsFile load(const std::string& path);

  bool operator==(const SafetensorsFile& other) const;

 private:
  void insert(const std::string& name, SafetensorsEntry entry);
  // Checks and removes the checksum keys of `metadata`; `src` prefixes errors.
  void verify_checksums(const std::string& src);
  std::map<std::string, SafetensorsEntry> entries_;
};

// Replaces `path` with `bytes` so that a reader sees either the old file or the complete new
// one, whatever happens to this process or (with a journalling file system) the machine:
// writes "<dir>/.<name>.tmp-<pid>-<n>", fsyncs it, renames it over `path`, fsyncs <dir>.
// A process killed mid-write leaves only the temporary file behind. `op` names the caller in
// errors.
void write_file_atomically(const std::string& path, std::span<const std::byte> bytes,
                           const std::string& op = "write");
// Prefix of the temporary files write_file_atomically makes for `path` (for clean-up tools).
std::string atomic_temp_prefix(const std::string& path);

struct StaleTemporaries {
  int64_t files = 0;
  uint64_t bytes = 0;
};
// Removes the temporary files of write_file_atomically(path) whose writer is gone: those whose
// PID names no live process. A live PID's file is kept (it may be a save in progress, or the
// PID was reused: a file too many beats a save broken). Returns what was removed.
StaleTemporaries remove_stale_temporaries(const std::string& path);

// The whole file; attn::Error naming `op` and the path when it cannot be read.
std::vector<std::byte> read_file_bytes(const std::string& path, const std::string& op);

}  // namespace attn::seq2seq
