// libFuzzer target: the `attn` command-line parser (tools/cli_options.h) on arbitrary argument
// vectors. The input is split at each LF into arguments (argv[1..]), so a seed file holds one
// argument per line.
//
// Contract (cli_options.h): parse_command_line is pure and either returns or throws
// attn::cli::UsageError; any other exception, a crash or a sanitizer report is a bug. A parse
// that succeeds must also succeed, with the same command, on the same arguments again.
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "cli_options.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> args;
  std::size_t begin = 0;
  while (begin <= text.size() && !text.empty()) {
    const std::size_t end = std::min(text.find('\n', begin), text.size());
    args.emplace_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  attn::cli::ParsedCommandLine first;
  try {
    first = attn::cli::parse_command_line(args);
  } catch (const attn::cli::UsageError&) {
    return 0;
  }
  if (attn::cli::parse_command_line(args).command != first.command) std::abort();
  return 0;
}
