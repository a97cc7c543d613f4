#include "tools/experiments/conclusions.h"

#include <cmath>
#include <cstdio>

namespace attn::experiments {

std::string num(double value, int digits) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*g", digits, value);
  return buf;
}

std::string compare_times(const std::string& a, double a_seconds, const std::string& b,
                          double b_seconds, const std::string& where) {
  const std::string at = where.empty() ? "" : " " + where;
  if (!(a_seconds > 0) || !(b_seconds > 0)) return a + " and " + b + " could not be compared" + at;
  const double ratio = a_seconds / b_seconds;
  if (ratio > 1.05) return a + " was " + num(ratio, 2) + "x slower than " + b + at;
  if (ratio < 1 / 1.05) return a + " was " + num(1 / ratio, 2) + "x faster than " + b + at;
  return a + " was as fast as " + b + " (within 5%)" + at;
}

std::string versus_claim(bool holds, const std::string& claim) {
  return std::string(holds ? "This agrees with" : "This contradicts") + " the usual claim that " +
         claim + ".";
}

}  // namespace attn::experiments
