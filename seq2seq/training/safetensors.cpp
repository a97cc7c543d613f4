#include "seq2seq/training/safetensors.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "attn/error.h"

namespace attn::seq2seq {

// Data are written and read with memcpy in host order; the format is little-endian.
static_assert(std::endian::native == std::endian::little,
              "safetensors I/O assumes a little-endian host");

namespace {

constexpr const char* kOp = "safetensors";
constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference's cap
constexpr const char* kMetadataKey = "__metadata__";
constexpr std::string_view kChecksumPrefix = "checksum.xxh3_64.";

std::string hex64(uint64_t x) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

uint64_t data_checksum(const std::vector<std::byte>& data) {
  return XXH3_64bits(data.data(), data.size());
}

// The metadata's own checksum covers every key and value but the checksums: a flipped digit in
// a configuration value parses as JSON just as well as the right one.
uint64_t metadata_checksum(const std::map<std::string, std::string>& metadata) {
  XXH3_state_t* state = XXH3_createState();
  ATTN_CHECK(state != nullptr, kOp, "cannot allocate an xxHash state");
  XXH3_64bits_reset(state);
  for (const auto& [key, value] : metadata) {
    if (key.rfind(kChecksumPrefix, 0) == 0) continue;
    const uint64_t sizes[2] = {key.size(), value.size()};  // length-prefixed: no ambiguity
    XXH3_64bits_update(state, sizes, sizeof sizes);
    XXH3_64bits_update(state, key.data(), key.size());
    XXH3_64bits_update(state, value.data(), value.size());
  }
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

struct DTypeInfo {
  StDType dtype;
  const char* name;
  std::size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {StDType::BOOL, "BOOL", 1}, {StDType::U8, "U8", 1},       {StDType::I8, "I8", 1},
    {StDType::F8_E5M2, "F8_E5M2", 1}, {StDType::F8_E4M3, "F8_E4M3", 1},
    {StDType::I16, "I16", 2},   {StDType::U16, "U16", 2},     {StDType::F16, "F16", 2},
    {StDType::BF16, "BF16", 2}, {StDType::I32, "I32", 4},     {StDType::U32, "U32", 4},
    {StDType::F32, "F32", 4},   {StDType::F64, "F64", 8},     {StDType::I64, "I64", 8},
    {StDType::U64, "U64", 8},
};

const DTypeInfo& info(StDType dtype) {
  for (const DTypeInfo& d : kDTypes) {
    if (d.dtype == dtype) return d;
  }
  throw Error(kOp, "unknown dtype enum value");
}

// numel(shape) * element_size with every product checked for uint64 overflow.
std::optional<uint64_t> checked_byte_size(const Shape& shape, std::size_t element_size) {
  uint64_t bytes = element_size;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes)) return std::nullopt;
  }
  return bytes;
}

void check_new_name(const std::map<std::string, SafetensorsEntry>& entries, const std::string& name) {
  ATTN_CHECK(!name.empty(), kOp, "tensor name must not be empty");
  ATTN_CHECK(name != kMetadataKey, kOp, "\"", kMetadataKey, "\" is reserved for metadata");
  ATTN_CHECK(entries.count(name) == 0, kOp, "tensor \"", name, "\" was already added");
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

const char* st_dtype_name(StDType dtype) { return info(dtype).name; }
std::size_t st_dtype_size(StDType dtype) { return info(dtype).size; }

std::optional<StDType> parse_st_dtype(std::string_view name) {
  for (const DTypeInfo& d : kDTypes) {
    if (name == d.name) return d.dtype;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Building and reading entries

void SafetensorsFile::insert(const std::string& name, SafetensorsEntry entry) {
  check_new_name(entries_, name);
  const auto bytes = checked_byte_size(entry.shape, st_dtype_size(entry.dtype));
  ATTN_CHECK(bytes.has_value(), kOp, "tensor \"", name, "\" has shape ", shape_str(entry.shape),
             ": negative dimension or byte size overflows 64 bits");
  ATTN_CHECK(*bytes == entry.data.size(), kOp, "tensor \"", name, "\" of dtype ",
             st_dtype_name(entry.dtype), " and shape ", shape_str(entry.shape), " needs ", *bytes,
             " bytes, got ", entry.data.size());
  entries_.emplace(name, std::move(entry));
}

void SafetensorsFile::add(const std::string& name, const Tensor& tensor) {
  ATTN_CHECK(tensor.defined(), kOp, "tensor \"", name, "\" is undefined");
  SafetensorsEntry entry;
  switch (tensor.dtype()) {
    case DType::f32: entry.dtype = StDType::F32; break;
    case DType::f64: entry.dtype = StDType::F64; break;
    case DType::b8: entry.dtype = StDType::BOOL; break;
    case DType::bf16: entry.dtype = StDType::BF16; break;
  }
  entry.shape = tensor.shape();
  const Tensor dense = tensor.contiguous();
  const std::size_t bytes = static_cast<std::size_t>(dense.numel()) * dtype_size(dense.dtype());
  entry.data.resize(bytes);
  if (bytes) std::memcpy(entry.data.data(), dense.raw_data(), bytes);
  insert(name, std::move(entry));
}

void SafetensorsFile::add_i64(const std::string& name, const std::vector<int64_t>& values, Shape shape) {
  if (shape.empty()) shape = {static_cast<int64_t>(values.size())};
  std::vector<std::byte> data(values.size() * sizeof(int64_t));
  if (!data.empty()) std::memcpy(data.data(), values.data(), data.size());
  insert(name, {StDType::I64, std::move(shape), std::move(data)});
}

void SafetensorsFile::add_u8(const std::string& name, const std::vector<uint8_t>& bytes) {
  std::vector<std::byte> data(bytes.size());
  if (!data.empty()) std::memcpy(data.data(), bytes.data(), data.size());
  insert(name, {StDType::U8, {static_cast<int64_t>(bytes.size())}, std::move(data)});
}

void SafetensorsFile::add_raw(const std::string& name, StDType dtype, const Shape& shape,
                              std::vector<std::byte> data) {
  insert(name, {dtype, shape, std::move(data)});
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, entry] : entries_) out.push_back(name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  ATTN_CHECK(it != entries_.end(), kOp, "no tensor named \"", name, "\" (the file has ", entries_.size(),
             " tensors)");
  return it->second;
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  DType dtype = DType::f32;
  switch (e.dtype) {
    case StDType::F32: dtype = DType::f32; break;
    case StDType::F64: dtype = DType::f64; break;
    case StDType::BOOL: dtype = DType::b8; break;
    case StDType::BF16: dtype = DType::bf16; break;
    default:
      throw Error(kOp, detail::concat("tensor \"", name, "\" has dtype ", st_dtype_name(e.dtype),
                                      "; attn::Tensor holds F32, F64, BF16 and BOOL (read it as raw bytes)"));
  }
  Tensor t = Tensor::empty(e.shape, dtype);
  if (!e.data.empty()) std::memcpy(t.raw_data(), e.data.data(), e.data.size());
  return t;
}

std::vector<int64_t> SafetensorsFile::i64(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  ATTN_CHECK(e.dtype == StDType::I64, kOp, "tensor \"", name, "\" has dtype ", st_dtype_name(e.dtype),
             ", expected I64");
  std::vector<int64_t> values(e.data.size() / sizeof(int64_t));
  if (!values.empty()) std::memcpy(values.data(), e.data.data(), e.data.size());
  return values;
}

std::vector<uint8_t> SafetensorsFile::u8(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  ATTN_CHECK(e.dtype == StDType::U8, kOp, "tensor \"", name, "\" has dtype ", st_dtype_name(e.dtype),
             ", expected U8");
  std::vector<uint8_t> values(e.data.size());
  if (!values.empty()) std::memcpy(values.data(), e.data.data(), e.data.size());
  return values;
}

bool SafetensorsFile::operator==(const SafetensorsFile& other) const {
  if (metadata != other.metadata || entries_.size() != other.entries_.size()) return false;
  for (auto a = entries_.begin(), b = other.entries_.begin(); a != entries_.end(); ++a, ++b) {
    if (a->first != b->first || a->second.dtype != b->second.dtype ||
        a->second.shape != b->second.shape || a->second.data != b->second.data) {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Serialisation

std::vector<std::byte> SafetensorsFile::serialize() const {
  // Largest element first, then by name: each tensor's offset is a multiple of its element size.
  std::vector<const std::pair<const std::string, SafetensorsEntry>*> order;
  for (const auto& item : entries_) order.push_back(&item);
  std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return st_dtype_size(a->second.dtype) > st_dtype_size(b->second.dtype);
  });

  nlohmann::json header = nlohmann::json::object();
  // Checksums of every tensor's bytes and of the metadata, verified by parse(); readers that
  // do not know them see ordinary string metadata.
  std::map<std::string, std::string> stored = metadata;
  for (const auto& [key, value] : metadata)
    ATTN_CHECK(key.rfind(kChecksumPrefix, 0) != 0, kOp, "metadata key \"", key,
               "\" is reserved for checksums");
  for (const auto& [name, e] : entries_)
    stored[std::string(kChecksumPrefix) + name] = hex64(data_checksum(e.data));
  stored[std::string(kChecksumPrefix) + kMetadataKey] = hex64(metadata_checksum(metadata));
  header[kMetadataKey] = stored;
  uint64_t offset = 0;
  for (const auto* item : order) {
    const SafetensorsEntry& e = item->second;
    const uint64_t end = offset + e.data.size();
    header[item->first] = {{"dtype", st_dtype_name(e.dtype)},
                           {"shape", e.shape},
                           {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data section 8-byte aligned in the file

  std::vector<std::byte> out(8 + text.size() + offset);
  const uint64_t n = text.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::byte* data = out.data() + 8 + text.size();
  for (const auto* item : order) {
    const auto& bytes = item->second.data;
    if (!bytes.empty()) std::memcpy(data, bytes.data(), bytes.size());
    data += bytes.size();
  }
  return out;
}

SafetensorsFile SafetensorsFile::parse(std::span<const std::byte> bytes, const std::string& source_name) {
  const std::string& src = source_name;
  ATTN_CHECK(bytes.size() >= 8, kOp, src, ": file is ", bytes.size(),
             " bytes, too short for the 8-byte header length (truncated?)");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  ATTN_CHECK(n <= kMaxHeaderBytes, kOp, src, ": header length ", n, " exceeds the ", kMaxHeaderBytes,
             "-byte cap");
  ATTN_CHECK(n <= bytes.size() - 8, kOp, src, ": header length ", n, " runs past the end of the file (",
             bytes.size() - 8, " bytes follow the length field; truncated?)");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  ATTN_CHECK(!text.empty() && text.front() == '{', kOp, src, ": header must be a JSON object starting with '{'");

  // Duplicate keys: nlohmann keeps the last value silently, so the parse callback tracks the
  // keys of every open object. The header's shape is at most 3 levels deep; a deeper nesting
  // is refused early rather than built.
  std::vector<std::set<std::string>> open_objects;
  int depth = 0;
  auto callback = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start || event == E::array_start) {
      ATTN_CHECK(++depth <= 3, kOp, src, ": header JSON nests deeper than a safetensors header can");
      if (event == E::object_start) open_objects.emplace_back();
    } else if (event == E::object_end || event == E::array_end) {
      --depth;
      if (event == E::object_end) open_objects.pop_back();
    } else if (event == E::key) {
      const std::string key = parsed.get<std::string>();
      ATTN_CHECK(open_objects.back().insert(key).second, kOp, src, ": duplicate key \"", key,
                 "\" in the header", open_objects.size() == 1 ? " (two tensors with one name)" : "");
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& e) {
    throw Error(kOp, src + ": header is not valid JSON: " + e.what());
  }
  ATTN_CHECK(header.is_object(), kOp, src, ": header must be a JSON object");

  SafetensorsFile file;
  struct Range {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Range> ranges;
  auto read_u64 = [&](const nlohmann::json& v, const std::string& what) -> uint64_t {
    ATTN_CHECK(v.is_number_unsigned(), kOp, src, ": ", what, " must be a non-negative integer, got ",
               v.dump());
    return v.get<uint64_t>();
  };
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      ATTN_CHECK(value.is_object(), kOp, src, ": \"__metadata__\" must be an object of strings");
      for (const auto& [key, v] : value.items()) {
        ATTN_CHECK(v.is_string(), kOp, src, ": metadata \"", key, "\" must be a string, got ", v.dump());
        file.metadata[key] = v.get<std::string>();
      }
      continue;
    }
    const std::string what = "tensor \"" + name + "\"";
    ATTN_CHECK(!name.empty(), kOp, src, ": a tensor has an empty name");
    ATTN_CHECK(value.is_object(), kOp, src, ": ", what, " must be an object with dtype, shape, data_offsets");
    for (const auto& [field, v] : value.items()) {
      ATTN_CHECK(field == "dtype" || field == "shape" || field == "data_offsets", kOp, src, ": ", what,
                 " has unknown field \"", field, "\"");
    }
    ATTN_CHECK(value.contains("dtype") && value["dtype"].is_string(), kOp, src, ": ", what,
               " needs a string \"dtype\"");
    const std::string dtype_text = value["dtype"].get<std::string>();
    const auto dtype = parse_st_dtype(dtype_text);
    ATTN_CHECK(dtype.has_value(), kOp, src, ": ", what, " has unknown dtype \"", dtype_text, "\"");
    ATTN_CHECK(value.contains("shape") && value["shape"].is_array(), kOp, src, ": ", what,
               " needs an array \"shape\"");
    Shape shape;
    for (const auto& d : value["shape"]) {
      const uint64_t dim = read_u64(d, what + " shape dimension");
      ATTN_CHECK(dim <= static_cast<uint64_t>(INT64_MAX), kOp, src, ": ", what, " dimension ", dim,
                 " is too large");
      shape.push_back(static_cast<int64_t>(dim));
    }
    ATTN_CHECK(value.contains("data_offsets") && value["data_offsets"].is_array() &&
                   value["data_offsets"].size() == 2,
               kOp, src, ": ", what, " needs \"data_offsets\": [begin, end]");
    const uint64_t begin = read_u64(value["data_offsets"][0], what + " data_offsets begin");
    const uint64_t end = read_u64(value["data_offsets"][1], what + " data_offsets end");
    ATTN_CHECK(begin <= end, kOp, src, ": ", what, " has data_offsets [", begin, ", ", end,
               "] with begin after end");
    const auto expected = checked_byte_size(shape, st_dtype_size(*dtype));
    ATTN_CHECK(expected.has_value(), kOp, src, ": ", what, " shape ", shape_str(shape), " x ",
               st_dtype_size(*dtype), " bytes overflows 64 bits");
    ATTN_CHECK(*expected == end - begin, kOp, src, ": ", what, " of dtype ", dtype_text, " and shape ",
               shape_str(shape), " needs ", *expected, " bytes but data_offsets [", begin, ", ", end,
               "] span ", end - begin);
    ranges.push_back({begin, end, name});
    SafetensorsEntry entry;
    entry.dtype = *dtype;
    entry.shape = std::move(shape);
    file.entries_.emplace(name, std::move(entry));
  }

  // The byte ranges must tile the data section exactly: sorted by offset, each starts where the
  // previous one ended, and the last ends at the end of the file.
  const uint64_t data_size = bytes.size() - 8 - n;
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected_begin = 0;
  const Range* previous = nullptr;
  for (const Range& r : ranges) {
    ATTN_CHECK(r.begin >= expected_begin, kOp, src, ": tensor \"", r.name, "\" at [", r.begin, ", ", r.end,
               ") overlaps tensor \"", previous ? previous->name : "", "\" ending at ", expected_begin);
    ATTN_CHECK(r.begin == expected_begin, kOp, src, ": gap of ", r.begin - expected_begin,
               " bytes before tensor \"", r.name, "\" at offset ", r.begin);
    expected_begin = r.end;
    previous = &r;
  }
  ATTN_CHECK(expected_begin <= data_size, kOp, src, ": tensors need ", expected_begin,
             " data bytes but the file has ", data_size, " (truncated)");
  ATTN_CHECK(expected_begin == data_size, kOp, src, ": ", data_size - expected_begin,
             " trailing bytes after the last tensor");

  const std::byte* data = bytes.data() + 8 + n;
  for (const Range& r : ranges) {
    SafetensorsEntry& e = file.entries_.at(r.name);
    e.data.assign(data + r.begin, data + r.end);
    if (e.dtype == StDType::BOOL) {
      for (std::byte b : e.data) {
        ATTN_CHECK(b == std::byte{0} || b == std::byte{1}, kOp, src, ": BOOL tensor \"", r.name,
                   "\" holds byte ", static_cast<int>(b), " (only 0 and 1 are booleans)");
      }
    }
  }
  file.verify_checksums(src);
  return file;
}

void SafetensorsFile::verify_checksums(const std::string& src) {
  // Files from other writers have no checksums and load as they are. Once any is present, all
  // must be: a header edited to drop one would otherwise hide a corrupt tensor.
  std::map<std::string, std::string> sums;
  for (auto it = metadata.begin(); it != metadata.end();) {
    if (it->first.rfind(kChecksumPrefix, 0) == 0) {
      sums.emplace(it->first.substr(kChecksumPrefix.size()), it->second);
      it = metadata.erase(it);
    } else {
      ++it;
    }
  }
  if (sums.empty()) return;
  auto check = [&](const std::string& what, const std::string& name, uint64_t computed) {
    auto it = sums.find(name);
    ATTN_CHECK(it != sums.end(), kOp, src, ": ", what, " has no checksum while the file stores ",
               "checksums (the header was edited or damaged)");
    ATTN_CHECK(it->second == hex64(computed), kOp, src, ": ", what, " fails its xxh3_64 checksum ",
               "(stored ", it->second, ", computed ", hex64(computed), "): the file is corrupt");
    sums.erase(it);
  };
  check("the metadata", kMetadataKey, metadata_checksum(metadata));
  for (const auto& [name, e] : entries_)
    check("tensor \"" + name + "\"", name, data_checksum(e.data));
  ATTN_CHECK(sums.empty(), kOp, src, ": checksum for \"", sums.empty() ? "" : sums.begin()->first,
             "\", which is not a tensor in the file");
}

void SafetensorsFile::save(const std::string& path) const {
  const std::vector<std::byte> image = serialize();
  write_file_atomically(path, image, kOp);
}

SafetensorsFile SafetensorsFile::load(const std::string& path) {
  const std::vector<std::byte> image = read_file_bytes(path, kOp);
  return parse(image, path);
}

// ---------------------------------------------------------------------------------------------
// Files

std::string atomic_temp_prefix(const std::string& path) {
  const std::filesystem::path target(path);
  // Built by appending: GCC 12 flags `"." + std::string` with a false -Wrestrict warning.
  std::string name = ".";
  name += target.filename().string();
  name += ".tmp-";
  return (target.parent_path() / name).string();
}

StaleTemporaries remove_stale_temporaries(const std::string& path) {
  namespace fs = std::filesystem;
  StaleTemporaries removed;
  const fs::path prefix(atomic_temp_prefix(path));
  const fs::path dir = prefix.parent_path().empty() ? fs::path(".") : prefix.parent_path();
  const std::string name_prefix = prefix.filename().string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return removed;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(name_prefix, 0) != 0 || !e.is_regular_file(ec)) continue;
    // "<prefix><pid>-<n>": anything else is not ours to remove.
    const std::string rest = name.substr(name_prefix.size());
    const std::size_t dash = rest.find('-');
    if (dash == 0 || dash == std::string::npos ||
        rest.find_first_not_of("0123456789-") != std::string::npos)
      continue;
    const long long pid = std::atoll(rest.substr(0, dash).c_str());
    if (pid <= 0 || pid > INT32_MAX) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive (or not ours)
    std::error_code size_ec;
    const uint64_t size = e.file_size(size_ec);
    if (fs::remove(e.path(), ec)) {
      ++removed.files;
      removed.bytes += size_ec ? 0 : size;
    }
  }
  return removed;
}

void write_file_atomically(const std::string& path, std::span<const std::byte> bytes, const std::string& op) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  ATTN_CHECK(!target.filename().empty(), op, "cannot write \"", path, "\": not a file name");
  const fs::path dir = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  static std::atomic<uint64_t> counter{0};
  const std::string temp = atomic_temp_prefix(path) + std::to_string(::getpid()) + "-" +
                           std::to_string(counter.fetch_add(1));

  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  ATTN_CHECK(fd >= 0, op, "cannot create ", temp, ": ", errno_text());
  auto fail = [&](const std::string& what) {
    const std::string reason = errno_text();
    ::close(fd);
    ::unlink(temp.c_str());
    throw Error(op, what + " " + temp + ": " + reason);
  };
  std::size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t r = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (r < 0) {
      if (errno == EINTR) continue;
      fail("cannot write");
    }
    written += static_cast<std::size_t>(r);
  }
  // The data must be on disk before the rename makes it visible under `path`; otherwise a
  // crash could leave a complete directory entry pointing at an incomplete file.
  if (::fsync(fd) != 0) fail("cannot fsync");
  if (::close(fd) != 0) {
    const std::string reason = errno_text();
    ::unlink(temp.c_str());
    throw Error(op, "cannot close " + temp + ": " + reason);
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string reason = errno_text();
    ::unlink(temp.c_str());
    throw Error(op, "cannot rename " + temp + " to " + path + ": " + reason);
  }
  // The rename itself lives in the directory; fsync it so the new name survives a crash.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ATTN_CHECK(dir_fd >= 0, op, "cannot open directory ", dir.string(), " to fsync it: ", errno_text());
  const int synced = ::fsync(dir_fd);
  const std::string reason = synced != 0 ? errno_text() : "";
  ::close(dir_fd);
  ATTN_CHECK(synced == 0, op, "cannot fsync directory ", dir.string(), ": ", reason);
}

std::vector<std::byte> read_file_bytes(const std::string& path, const std::string& op) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  ATTN_CHECK(!ec && std::filesystem::exists(status), op, "cannot open ", path, ": ",
             ec ? ec.message() : "no such file");
  // A directory opens as a stream on Linux and then reports a nonsense size.
  ATTN_CHECK(std::filesystem::is_regular_file(status), op, "cannot read ", path, ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  ATTN_CHECK(in, op, "cannot open ", path, ": ", errno_text());
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  ATTN_CHECK(size >= 0, op, "cannot determine the size of ", path);
  in.seekg(0, std::ios::beg);
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  if (size > 0) in.read(reinterpret_cast<char*>(bytes.data()), size);
  ATTN_CHECK(in.good() || (size == 0), op, "cannot read ", path);
  return bytes;
}

}  // namespace attn::seq2seq
