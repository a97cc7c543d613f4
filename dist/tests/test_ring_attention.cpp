// Ring attention (attn::dist) against single-process attn::attention on the gathered sequence.
// Run under mpirun with any number of ranks (ctest: 1, 2, 3 and 4); the cases and their bound
// are in sequence_parallel_cases.h.
#include <gtest/gtest.h>
#include <mpi.h>

#include <string>
#include <vector>

#include "attn/dist/ring_attention.h"
#include "mpi_test_main.h"
#include "sequence_parallel_cases.h"
#include "support/test_support.h"

namespace {

using namespace attn::testing::sequence_parallel;

TEST(RingAttention, ShardingRoundTrips) {
  for (Layout layout : {Layout::contiguous, Layout::zigzag}) {
    for (int64_t T : {0, 1, 5, 37, 64}) {
      const Tensor full = random_tensor({2, 3, T, 4}, DType::f32, 7 + T);
      const Tensor local = shard(full, layout);
      const Tensor back = attn::dist::gather_sequence(local, 2, layout, MPI_COMM_WORLD);
      EXPECT_EQ(back.to_vector(), full.to_vector()) << "T " << T;
    }
  }
}

TEST(RingAttention, NonCausalUnevenGqa) {
  for (Layout layout : {Layout::contiguous, Layout::zigzag}) {
    Case c;
    c.name = layout == Layout::zigzag ? "noncausal-zigzag" : "noncausal-contiguous";
    c.layout = layout;
    run_case(c);
  }
}

TEST(RingAttention, CausalZigzagAndContiguous) {
  for (Layout layout : {Layout::zigzag, Layout::contiguous}) {
    for (int64_t T : {37, 64, 3}) {
      Case c;
      c.name = "causal-T" + std::to_string(T) + (layout == Layout::zigzag ? "-zigzag" : "-contig");
      c.layout = layout;
      c.causal = true;
      c.Tq = c.Tk = T;
      run_case(c);
    }
  }
}

// Shards longer than the ring's query slices (256 rows, between which transfers progress):
// diagonal blocks split into a fully visible part and a smaller diagonal.
TEST(RingAttention, LongShardsInSlices) {
  for (bool causal : {true, false}) {
    Case c;
    c.name = causal ? "long-causal" : "long";
    c.layout = Layout::contiguous;
    c.causal = causal;
    c.B = 1;
    c.Hq = 2;
    c.Hkv = 1;
    c.D = c.Dv = 8;
    c.Tq = c.Tk = 1100;
    c.key_lengths = {1000};
    run_case(c);
  }
}

// Windows and ALiBi over global positions: pairs outside a window are skipped, shifted windows
// stay native, the others become a boolean mask of the pair; ALiBi becomes a bias of the pair.
TEST(RingAttention, WindowsAndAlibiOverGlobalPositions) {
  using attn::Window;
  for (Layout layout : {Layout::zigzag, Layout::contiguous}) {
    for (bool causal : {false, true}) {
      const std::string where = (layout == Layout::zigzag ? "-zigzag" : "-contig") +
                                std::string(causal ? "-causal" : "");
      Case c;
      c.layout = layout;
      c.causal = causal;
      c.name = "window-5-3" + where;
      c.window = Window{5, 3};
      run_case(c);
      c.name = "window-left-0" + where;  // only the diagonal (causal) or the keys ahead
      c.window = Window{0, Window::unbounded};
      run_case(c);
      c.name = "window-right-2" + where;
      c.window = Window{Window::unbounded, 2};
      run_case(c);
      c.name = "alibi" + where;
      c.window.reset();
      c.alibi = true;
      run_case(c);
      c.name = "alibi-window-padding" + where;
      c.window = Window{9, 9};
      c.key_lengths = {30, 5};
      run_case(c);
    }
  }
  // Shards longer than the query slices, a window shorter than a slice.
  Case c;
  c.name = "window-long";
  c.layout = Layout::contiguous;
  c.causal = true;
  c.B = 1;
  c.Hq = 2;
  c.Hkv = 1;
  c.D = c.Dv = 8;
  c.Tq = c.Tk = 700;
  c.window = Window{100, 0};
  c.alibi = true;
  run_case(c);
}

TEST(RingAttention, KeyAndQueryPadding) {
  for (bool causal : {false, true}) {
    Case c;
    c.name = causal ? "padding-causal" : "padding";
    c.causal = causal;
    c.key_lengths = {30, 5};
    c.query_lengths = {37, 20};
    run_case(c);
    c.name += "-keys-only";
    c.query_lengths.clear();
    c.key_lengths = {0, 19};  // batch entry 0: no keys at all, every row fully masked
    run_case(c);
  }
}

TEST(RingAttention, CrossAttentionAndMultiQuery) {
  Case c;
  c.name = "cross";
  c.Tq = 23;
  c.Tk = 41;
  c.Hkv = 1;  // multi-query: every query head reads one key/value head
  c.Dv = 8;
  c.key_lengths = {41, 17};
  run_case(c);
}

TEST(RingAttention, EveryShardableScore) {
  const int64_t D = 16, A = 8;
  const uint64_t s = 77;
  std::vector<std::pair<std::string, Score>> scores = {
      {"dot", attn::DotScore{}},
      {"scaled-dot-0.3", attn::ScaledDotScore{0.3}},
      {"general", attn::GeneralScore{random_tensor({D, D}, DType::f32, s, -0.3, 0.3), {}, {}}},
      {"general-lowrank", attn::GeneralScore{{}, random_tensor({4, D}, DType::f32, s + 1, -0.5, 0.5),
                                             random_tensor({4, D}, DType::f32, s + 2, -0.5, 0.5)}},
      {"additive", attn::AdditiveScore{random_tensor({A, D}, DType::f32, s + 3, -0.3, 0.3),
                                       random_tensor({A, D}, DType::f32, s + 4, -0.3, 0.3),
                                       random_tensor({A}, DType::f32, s + 5),
                                       random_tensor({A}, DType::f32, s + 6)}},
      {"concat", attn::ConcatScore{random_tensor({A, 2 * D}, DType::f32, s + 7, -0.3, 0.3),
                                   random_tensor({A}, DType::f32, s + 8)}},
      {"cosine", attn::CosineScore{Tensor::full({1}, 4.0), 1e-8}},
      {"trilinear", attn::TrilinearScore{random_tensor({3 * D}, DType::f32, s + 9, -0.5, 0.5)}},
  };
  for (const auto& [name, score] : scores) {
    for (bool causal : {false, true}) {
      Case c;
      c.name = name + (causal ? "-causal" : "");
      c.score = score;
      c.causal = causal;
      c.Tq = c.Tk = 29;
      c.key_lengths = {29, 21};
      c.A = A;
      run_case(c);
    }
  }
}

TEST(RingAttention, Bf16AndFloat64) {
  Case c;
  c.name = "bf16-causal";
  c.dtype = DType::bf16;
  c.causal = true;
  run_case(c);
  c.name = "f64-causal-forward";
  c.dtype = DType::f64;
  c.backward = false;
  run_case(c);
}

// Bad input raises attn::Error on every rank, and the ring works afterwards (no rank hangs, no
// stray message is left).
TEST(RingAttention, BadInputRaisesOnEveryRank) {
  const int P = ranks(), r = rank_of();
  const Tensor q = random_tensor({1, 2, 20, 8}, DType::f32, 1);
  const Tensor k = random_tensor({1, 2, 20, 8}, DType::f32, 2);
  const Tensor v = random_tensor({1, 2, 20, 8}, DType::f32, 3);
  auto sq = shard(q, Layout::zigzag), sk = shard(k, Layout::zigzag), sv = shard(v, Layout::zigzag);
  using attn::testing::expect_error;

  AttentionParams location;
  location.score = attn::LocationScore{random_tensor({20, 8}, DType::f32, 4)};
  expect_error([&] { attn::dist::ring_attention(sq, sk, sv, location, MPI_COMM_WORLD); },
               {"ring_attention", "location"});
  AttentionParams window;  // global positions need top_left
  window.mask.window = attn::Window{4, 0};
  window.mask.alignment = attn::Alignment::bottom_right;
  expect_error([&] { attn::dist::ring_attention(sq, sk, sv, window, MPI_COMM_WORLD); },
               {"ring_attention", "windows and ALiBi", "top_left"});
  AttentionParams bias;
  bias.mask.bias = random_tensor({1, 2, 20, 20}, DType::f32, 6);
  expect_error([&] { attn::dist::ring_attention(sq, sk, sv, bias, MPI_COMM_WORLD); },
               {"ring_attention", "additive biases"});
  AttentionParams dropout;
  dropout.dropout.p = 0.1;
  expect_error([&] { attn::dist::ring_attention(sq, sk, sv, dropout, MPI_COMM_WORLD); },
               {"dropout"});
  // attn's own shape checks, raised on one rank, reach every rank.
  const Tensor bad_v = r == P - 1 ? random_tensor({1, 3, sv.size(2), 8}, DType::f32, 5) : sv;
  expect_error([&] { attn::dist::ring_attention(sq, sk, bad_v, {}, MPI_COMM_WORLD); },
               {"ring_attention"});
  // float64 backward.
  const Tensor q64 = sq.to(DType::f64), k64 = sk.to(DType::f64), v64 = sv.to(DType::f64);
  const AttentionOutput f64 = attn::dist::ring_attention(q64, k64, v64, {}, MPI_COMM_WORLD);
  expect_error([&] {
    attn::dist::ring_attention_backward(q64, k64, v64, {}, f64, f64.out, MPI_COMM_WORLD);
  }, {"ring_attention_backward", "float64"});
  if (P > 1) {
    // Shard sizes that do not follow the zigzag layout (one row moved from rank 0 to the last).
    const Tensor q2 = r == 0 ? sq.slice(2, 0, sq.size(2) - 1)
                             : (r == P - 1 ? random_tensor({1, 2, sq.size(2) + 1, 8}, DType::f32, 6) : sq);
    const Tensor k2 = r == 0 ? sk.slice(2, 0, sk.size(2) - 1)
                             : (r == P - 1 ? random_tensor({1, 2, sk.size(2) + 1, 8}, DType::f32, 7) : sk);
    const Tensor v2 = r == 0 ? sv.slice(2, 0, sv.size(2) - 1)
                             : (r == P - 1 ? random_tensor({1, 2, sv.size(2) + 1, 8}, DType::f32, 8) : sv);
    expect_error([&] { attn::dist::ring_attention(q2, k2, v2, {}, MPI_COMM_WORLD); },
                 {"zigzag shards"});
    // Features that differ between ranks.
    const Tensor q3 = r == P - 1 ? random_tensor({1, 2, sq.size(2), 4}, DType::f32, 9) : sq;
    const Tensor k3 = r == P - 1 ? random_tensor({1, 2, sk.size(2), 4}, DType::f32, 10) : sk;
    expect_error([&] { attn::dist::ring_attention(q3, k3, sv, {}, MPI_COMM_WORLD); },
                 {"differ between rank 0 and rank"});
    // Key lengths that differ between ranks.
    AttentionParams lengths;
    lengths.mask.key_lengths = {r == 0 ? 10 : 11};
    expect_error([&] { attn::dist::ring_attention(sq, sk, sv, lengths, MPI_COMM_WORLD); },
                 {"differ between rank 0 and rank"});
  }
  // The ring still works.
  const AttentionOutput ref = attn::attention(q, k, v, {});
  const AttentionOutput got = attn::dist::ring_attention(sq, sk, sv, {}, MPI_COMM_WORLD);
  EXPECT_TRUE(close(got.out, shard(ref.out, Layout::zigzag), DType::f32, 28, "out after errors"));
}

}  // namespace

int main(int argc, char** argv) { return attn::testing::mpi_gtest_main(argc, argv); }
