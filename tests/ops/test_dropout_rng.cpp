// Statistical quality of dropout's split counter hash (attn/random.h): a per-row key mixed once
// per (seed, b, h, i), then ONE 32-bit multiply-xorshift round per key j. The tests check what
// dropout relies on:
//   - keep rates: Binomial(n, 1 - p) for p in {0.1, 0.5, 0.9} over a million draws;
//   - independence: the correlation of keep indicators of neighbours in j, i, h, b and the seed;
//   - uniformity: chi-square of the 24-bit uniforms over 256 buckets, from the top byte (which
//     decides most comparisons) and the low byte (the bits the last xorshift mixes least);
//   - the definitions: the integer threshold is exactly u 2^-24 >= p, keys past 2^32 do not
//     alias, and nn dropout's flat positions map onto (stream, 0, segment, offset).
//
// Bounds: each statistic is compared against its distribution under true independence at about
// 5 standard deviations (a false alarm has probability ~6e-7 per check). The draws are fixed by
// the seeds, so a failure is a property of the hash, not bad luck of a run.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "attn/random.h"
#include "nn/dropout.h"

namespace {

using attn::dropout_bits;
using attn::dropout_keep;
using attn::dropout_row_key;

constexpr double kSigmas = 5.0;

// A block of (b, h, i, j) coordinates of about a million elements.
constexpr uint64_t kB = 2, kH = 4, kRows = 128, kKeys = 1024;
constexpr double kDraws = double(kB * kH * kRows * kKeys);

// Calls f(b, h, i, j) over the block.
void for_each_element(const std::function<void(uint64_t, uint64_t, uint64_t, uint64_t)>& f) {
  for (uint64_t b = 0; b < kB; ++b)
    for (uint64_t h = 0; h < kH; ++h)
      for (uint64_t i = 0; i < kRows; ++i)
        for (uint64_t j = 0; j < kKeys; ++j) f(b, h, i, j);
}

TEST(DropoutRng, KeepRateWithinBinomialBounds) {
  for (double p : {0.1, 0.5, 0.9})
    for (uint64_t seed : {uint64_t{1}, uint64_t{0xdeadbeef}}) {
      double kept = 0.0;
      for_each_element([&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
        kept += dropout_keep(seed, p, b, h, i, j);
      });
      const double sd = std::sqrt(kDraws * p * (1.0 - p));
      EXPECT_NEAR(kept, kDraws * (1.0 - p), kSigmas * sd) << "p " << p << " seed " << seed;
    }
}

// Sample correlation of keep indicators X = keep(element), Y = keep(its neighbour) over the
// block. Under independence r is about Normal(0, 1 / n).
double keep_correlation(double p, uint64_t seed,
                        const std::function<bool(uint64_t, uint64_t, uint64_t, uint64_t)>& other) {
  double sx = 0.0, sy = 0.0, sxy = 0.0;
  for_each_element([&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
    const double x = dropout_keep(seed, p, b, h, i, j);
    const double y = other(b, h, i, j);
    sx += x, sy += y, sxy += x * y;
  });
  const double mx = sx / kDraws, my = sy / kDraws;
  const double cov = sxy / kDraws - mx * my;
  return cov / std::sqrt(mx * (1.0 - mx) * my * (1.0 - my));
}

TEST(DropoutRng, NeighboursAreUncorrelated) {
  const double bound = kSigmas / std::sqrt(kDraws);
  for (double p : {0.1, 0.5}) {
    const uint64_t seed = 77;
    struct Neighbour {
      std::string name;
      std::function<bool(uint64_t, uint64_t, uint64_t, uint64_t)> keep;
    };
    const Neighbour neighbours[] = {
        {"j + 1", [&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
           return dropout_keep(seed, p, b, h, i, j + 1);
         }},
        {"i + 1", [&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
           return dropout_keep(seed, p, b, h, i + 1, j);
         }},
        {"h + 1", [&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
           return dropout_keep(seed, p, b, h + 1, i, j);
         }},
        {"b + 1", [&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
           return dropout_keep(seed, p, b + 1, h, i, j);
         }},
        {"seed + 1", [&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
           return dropout_keep(seed + 1, p, b, h, i, j);
         }},
        // The transposed element: rows and keys play symmetric roles in attention.
        {"(j, i)", [&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
           return dropout_keep(seed, p, b, h, j, i);
         }},
    };
    for (const Neighbour& n : neighbours) {
      const double r = keep_correlation(p, seed, n.keep);
      EXPECT_LT(std::abs(r), bound) << "p " << p << " neighbour " << n.name << " r " << r;
    }
  }
}

// The upper 1 - 6e-7 quantile of chi-square with k degrees of freedom (Wilson-Hilferty: the cube
// root of chi-square / k is nearly normal), z = 5 standard deviations as everywhere here.
double chi_square_bound(double k) {
  const double c = 2.0 / (9.0 * k);
  return k * std::pow(1.0 - c + kSigmas * std::sqrt(c), 3.0);
}

TEST(DropoutRng, UniformsPassChiSquareIn256Buckets) {
  for (int shift : {16, 0}) {  // top byte, low byte of the 24-bit uniform
    std::array<double, 256> counts{};
    const uint64_t seed = 2024;
    for_each_element([&](uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
      const uint32_t u = dropout_bits(dropout_row_key(seed, b, h, i), static_cast<uint32_t>(j));
      ASSERT_LT(u, uint32_t{1} << 24);
      counts[(u >> shift) & 255u] += 1.0;
    });
    const double expected = kDraws / 256.0;
    double chi2 = 0.0;
    for (double c : counts) chi2 += (c - expected) * (c - expected) / expected;
    EXPECT_LT(chi2, chi_square_bound(255.0)) << "byte at bit " << shift;
    // A chi-square far BELOW its mean would mean suspiciously even counts (a lattice, not a
    // random sequence): the lower 5-sigma quantile of the same approximation.
    const double c = 2.0 / (9.0 * 255.0);
    EXPECT_GT(chi2, 255.0 * std::pow(1.0 - c - kSigmas * std::sqrt(c), 3.0))
        << "byte at bit " << shift;
  }
}

// keep iff the 24-bit uniform u satisfies u 2^-24 >= p, also for p on and next to the grid.
TEST(DropoutRng, ThresholdIsExactlyTheUniformComparison) {
  EXPECT_EQ(attn::dropout_threshold(0.0), 0u);
  EXPECT_EQ(attn::dropout_threshold(-1.0), 0u);
  EXPECT_EQ(attn::dropout_threshold(0.5), 1u << 23);
  EXPECT_EQ(attn::dropout_threshold(1.0), 1u << 24);
  const double grid = 1.0 / 16777216.0;
  for (double p : {grid, 3.0 * grid, 0.5 - grid, 0.5 + 0.5 * grid, 0.1, 1.0 / 3.0,
                   1.0 - grid})
    for (uint64_t j = 0; j < 20000; ++j) {
      const double u = attn::dropout_uniform(5, 1, 2, 3, j);
      ASSERT_EQ(dropout_keep(5, p, 1, 2, 3, j), u >= p) << "p " << p << " j " << j;
    }
  // p = 0 keeps everything.
  for (uint64_t j = 0; j < 1000; ++j) EXPECT_TRUE(dropout_keep(5, 0.0, 0, 0, 0, j));
}

// Keys j and j + 2^32 of one row draw different decisions (the high half joins the row key).
TEST(DropoutRng, KeysPast32BitsDoNotAlias) {
  int differ = 0;
  for (uint64_t j = 0; j < 1000; ++j)
    differ += dropout_keep(9, 0.5, 0, 0, 0, j) != dropout_keep(9, 0.5, 0, 0, 0, j + (1ULL << 32));
  // Binomial(1000, 1/2) under independence: mean 500, sd ~16.
  EXPECT_NEAR(differ, 500, kSigmas * std::sqrt(1000 * 0.25));
}

// nn dropout's keep decision is random.h's with (b, h, i, j) = (stream, 0, segment, offset), and
// its vectorised tensor loop applies exactly those decisions.
TEST(DropoutRng, ModelDropoutUsesTheSharedSplitHash) {
  const attn::nn::DropoutSpec spec{0.3, 31, 4};
  const int64_t n = 3 * attn::nn::kDropoutRowLength + 17;  // a partial last segment
  std::vector<double> ones(static_cast<size_t>(n), 1.0);
  const attn::Tensor y = attn::nn::dropout_forward(attn::Tensor::from(ones, {n}), spec);
  for (int64_t i = 0; i < n; ++i) {
    const auto segment = static_cast<uint64_t>(i / attn::nn::kDropoutRowLength);
    const auto offset = static_cast<uint64_t>(i % attn::nn::kDropoutRowLength);
    const bool want = dropout_keep(spec.seed, spec.p, spec.stream, 0, segment, offset);
    ASSERT_EQ(attn::nn::dropout_keeps(spec, i), want) << "position " << i;
    ASSERT_EQ(y.get_flat(i), want ? 1.0 / (1.0 - spec.p) : 0.0) << "position " << i;
  }
}

}  // namespace
