// Sentences of the report generated from measured numbers, never written in advance: the same
// function says "3.2x slower" or "1.4x faster" depending on what it is given, and whether a
// result agrees with or contradicts the usual claim.
#pragma once

#include <string>

namespace attn::experiments {

// "additive was 3.2x slower than dot at d=64" (ratio of times; "faster" when a's time is the
// smaller, "as fast as" within 5%).
std::string compare_times(const std::string& a, double a_seconds, const std::string& b,
                          double b_seconds, const std::string& where);

// "This agrees with the usual claim that <claim>." or "This contradicts the usual claim that
// <claim>." depending on `holds`.
std::string versus_claim(bool holds, const std::string& claim);

// Formats a number with `digits` significant digits ("3.2", "0.0041", "1.2e+05").
std::string num(double value, int digits = 3);

}  // namespace attn::experiments
