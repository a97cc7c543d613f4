// libFuzzer target: SafetensorsFile::parse on arbitrary bytes (seq2seq/training/safetensors.h).
//
// The reader's contract: any byte string either parses or throws attn::Error; nothing else may
// escape (a crash, a sanitizer report, another exception type, a hang). A file that parses must
// also survive every accessor and round-trip: serialize() of it parses back to an equal file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>

#include "attn/error.h"
#include "seq2seq/training/safetensors.h"

using attn::seq2seq::SafetensorsFile;
using attn::seq2seq::StDType;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  SafetensorsFile file;
  try {
    file = SafetensorsFile::parse(bytes, "fuzz.safetensors");
  } catch (const attn::Error&) {
    return 0;  // a clean refusal
  }
  // Every accessor of every entry, typed by its dtype.
  for (const std::string& name : file.names()) {
    const auto& entry = file.entry(name);
    switch (entry.dtype) {
      case StDType::F32: case StDType::F64: case StDType::BOOL: (void)file.tensor(name); break;
      case StDType::I64: (void)file.i64(name); break;
      case StDType::U8: (void)file.u8(name); break;
      default: break;
    }
  }
  // A file the reader accepted is one the writer can write and the reader read back unchanged.
  const auto image = file.serialize();
  const SafetensorsFile again = SafetensorsFile::parse(image, "fuzz.reserialized");
  if (!(again == file)) std::abort();
  return 0;
}
