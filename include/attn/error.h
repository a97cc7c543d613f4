// attn::Error: the one exception type the library throws for bad input.
//
// Every message starts with the op in brackets and names the argument and the shapes involved,
// e.g. "[attention] key has 32 features, query has 64".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace attn {

class Error : public std::runtime_error {
 public:
  Error(std::string op, const std::string& message)
      : std::runtime_error("[" + op + "] " + message), op_(std::move(op)) {}
  const std::string& op() const { return op_; }

 private:
  std::string op_;
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

// ATTN_CHECK(cond, "op", "message parts", ...) throws attn::Error when cond is false.
#define ATTN_CHECK(cond, op, ...)                                       \
  do {                                                                  \
    if (!(cond)) throw ::attn::Error((op), ::attn::detail::concat(__VA_ARGS__)); \
  } while (0)

}  // namespace attn
