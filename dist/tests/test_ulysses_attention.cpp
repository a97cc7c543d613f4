// All-to-all attention over heads (attn::dist::ulysses_attention) against single-process
// attn::attention on the gathered sequence, under mpirun with 1, 2, 3 and 4 ranks (ctest). The
// cases and their float32 bound are shared with the ring (sequence_parallel_cases.h); the head
// counts here (12 or 24 query heads, 12 key/value heads) divide by every rank count tested.
#include <gtest/gtest.h>
#include <mpi.h>

#include <string>
#include <vector>

#include "attn/dist/ulysses_attention.h"
#include "mpi_test_main.h"
#include "sequence_parallel_cases.h"
#include "support/test_support.h"

namespace {

using namespace attn::testing::sequence_parallel;

// 12 heads divide by 1, 2, 3 and 4 ranks.
Case ulysses_case(const std::string& name) {
  Case c;
  c.name = name;
  c.method = Method::ulysses;
  c.Hq = c.Hkv = 12;
  c.D = c.Dv = 8;
  return c;
}

TEST(UlyssesAttention, NonCausalAndCausalBothLayouts) {
  for (Layout layout : {Layout::contiguous, Layout::zigzag}) {
    for (bool causal : {false, true}) {
      for (int64_t T : {37, 3}) {  // 3 < 4 ranks: some contiguous shards are empty
        Case c = ulysses_case(std::string(causal ? "causal" : "noncausal") + "-T" +
                              std::to_string(T) +
                              (layout == Layout::zigzag ? "-zigzag" : "-contig"));
        c.layout = layout;
        c.causal = causal;
        c.Tq = c.Tk = T;
        run_case(c);
      }
    }
  }
}

TEST(UlyssesAttention, GroupedQueryAndCrossAttention) {
  Case c = ulysses_case("gqa-24-12");
  c.Hq = 24;
  run_case(c);
  c.name = "cross-padding";
  c.Tq = 23;
  c.Tk = 41;
  c.Dv = 4;
  c.key_lengths = {41, 17};
  run_case(c);
  // Causal cross-attention, bottom-right aligned (the ring refuses it with lengths).
  c.name = "cross-causal-bottom-right";
  c.causal = true;
  c.alignment = attn::Alignment::bottom_right;
  c.key_lengths.clear();
  run_case(c);
}

TEST(UlyssesAttention, KeyAndQueryPadding) {
  for (bool causal : {false, true}) {
    Case c = ulysses_case(causal ? "padding-causal" : "padding");
    c.causal = causal;
    c.key_lengths = {30, 5};
    c.query_lengths = {37, 20};
    run_case(c);
    c.name += "-no-keys";
    c.query_lengths.clear();
    c.key_lengths = {0, 19};  // batch entry 0: every row fully masked
    run_case(c);
  }
}

// Windows and ALiBi: each rank sees the whole sequence, so the core applies them as in one
// process — also bottom-right aligned, which the ring refuses.
TEST(UlyssesAttention, WindowsAndAlibi) {
  for (auto alignment : {attn::Alignment::top_left, attn::Alignment::bottom_right}) {
    const std::string where = alignment == attn::Alignment::top_left ? "" : "-bottom-right";
    Case c = ulysses_case("window-5-3" + where);
    c.alignment = alignment;
    c.causal = true;
    c.window = attn::Window{5, 3};
    run_case(c);
    c.name = "alibi-window-padding" + where;
    c.window = attn::Window{9, 9};
    c.alibi = true;
    c.key_lengths = {30, 5};
    c.Tk = 40;  // cross-attention: the alignment matters
    c.causal = false;
    run_case(c);
  }
}

TEST(UlyssesAttention, ScoresIncludingLocation) {
  const int64_t D = 8, A = 8;
  const uint64_t s = 91;
  std::vector<std::pair<std::string, Score>> scores = {
      {"general", attn::GeneralScore{random_tensor({D, D}, DType::f32, s, -0.3, 0.3), {}, {}}},
      {"additive", attn::AdditiveScore{random_tensor({A, D}, DType::f32, s + 1, -0.3, 0.3),
                                       random_tensor({A, D}, DType::f32, s + 2, -0.3, 0.3),
                                       random_tensor({A}, DType::f32, s + 3),
                                       random_tensor({A}, DType::f32, s + 4)}},
      {"location", attn::LocationScore{random_tensor({32, D}, DType::f32, s + 5, -0.3, 0.3)}},
  };
  for (const auto& [name, score] : scores) {
    Case c = ulysses_case(name);
    c.score = score;
    c.Tq = c.Tk = 29;
    c.key_lengths = {29, 21};
    c.A = A;
    run_case(c);
  }
}

// Luong local attention needs every key of the sequence: monotonic, and predictive whose w_p and
// v_p gradients are summed over the ranks' heads.
TEST(UlyssesAttention, LuongLocal) {
  Case c = ulysses_case("local-monotonic");
  c.local.kind = attn::LocalKind::monotonic;
  c.local.half_width = 3;
  run_case(c);
  c.name = "local-predictive";
  c.local.kind = attn::LocalKind::predictive;
  c.local.w_p = random_tensor({6, c.D}, DType::f32, 41, -0.25, 0.25);
  c.local.v_p = random_tensor({6}, DType::f32, 42, -0.5, 0.5);
  c.key_lengths = {37, 30};
  run_case(c);
}

TEST(UlyssesAttention, Bf16AndFloat64Backward) {
  Case c = ulysses_case("bf16-causal");
  c.dtype = DType::bf16;
  c.causal = true;
  run_case(c);
  c.name = "f64-causal";  // the ring refuses the float64 backward
  c.dtype = DType::f64;
  run_case(c);
}

TEST(UlyssesAttention, ChoiceOfMethod) {
  using attn::dist::choose_sequence_parallel, attn::dist::SequenceParallel;
  const AttentionParams plain;
  EXPECT_EQ(choose_sequence_parallel(8, 8, 4, plain), SequenceParallel::ulysses);
  EXPECT_EQ(choose_sequence_parallel(8, 8, 2, plain), SequenceParallel::ulysses);  // equal bytes
  EXPECT_EQ(choose_sequence_parallel(8, 8, 3, plain), SequenceParallel::ring);     // 3 does not divide 8
  EXPECT_EQ(choose_sequence_parallel(32, 4, 4, plain), SequenceParallel::ring);    // GQA: ring moves less
  AttentionParams dropout;
  dropout.dropout.p = 0.1;
  EXPECT_EQ(choose_sequence_parallel(8, 8, 4, dropout), SequenceParallel::ring);
  AttentionParams location;
  location.score = attn::LocationScore{random_tensor({8, 4}, DType::f32, 1)};
  EXPECT_EQ(choose_sequence_parallel(32, 4, 4, location), SequenceParallel::ulysses);
}

// Bad input raises attn::Error on every rank, and Ulysses works afterwards.
TEST(UlyssesAttention, BadInputRaisesOnEveryRank) {
  using attn::dist::ulysses_attention, attn::testing::expect_error;
  const int P = ranks(), r = rank_of();
  const int64_t H = 12;
  const Tensor q = random_tensor({1, H, 20, 8}, DType::f32, 1);
  const Tensor k = random_tensor({1, H, 20, 8}, DType::f32, 2);
  const Tensor v = random_tensor({1, H, 20, 8}, DType::f32, 3);
  const Tensor sq = shard(q, Layout::zigzag), sk = shard(k, Layout::zigzag),
               sv = shard(v, Layout::zigzag);

  AttentionParams bias;
  bias.mask.bias = random_tensor({1, H, 20, 20}, DType::f32, 6);
  expect_error([&] { ulysses_attention(sq, sk, sv, bias, MPI_COMM_WORLD); },
               {"ulysses_attention", "additive biases"});
  AttentionParams heads;
  heads.head_scores.assign(static_cast<std::size_t>(H), attn::DotScore{});
  expect_error([&] { ulysses_attention(sq, sk, sv, heads, MPI_COMM_WORLD); }, {"head_scores"});
  // attn's own checks, raised after the all-to-all on every rank (location weight too short).
  AttentionParams location;
  location.score = attn::LocationScore{random_tensor({10, 8}, DType::f32, 4)};
  expect_error([&] { ulysses_attention(sq, sk, sv, location, MPI_COMM_WORLD); },
               {"ulysses_attention"});
  // A shape error on one rank only: v one position longer than k.
  const Tensor bad_v = r == P - 1 ? random_tensor({1, H, sv.size(2) + 1, 8}, DType::f32, 5) : sv;
  expect_error([&] { ulysses_attention(sq, sk, bad_v, {}, MPI_COMM_WORLD); },
               {"ulysses_attention", "k and v the same heads and length"});
  if (P > 1) {
    // Heads that do not divide by the ranks.
    const int64_t odd = P + 1;
    const Tensor oq = shard(random_tensor({1, odd, 20, 8}, DType::f32, 7), Layout::zigzag);
    expect_error([&] { ulysses_attention(oq, oq, oq, {}, MPI_COMM_WORLD); },
                 {"ulysses_attention", "do not divide by", "ring_attention"});
    // GQA whose key/value heads do not divide (12 query heads, 1 key/value head).
    const Tensor one = shard(random_tensor({1, 1, 20, 8}, DType::f32, 8), Layout::zigzag);
    expect_error([&] { ulysses_attention(sq, one, one, {}, MPI_COMM_WORLD); },
                 {"key/value heads do not divide"});
    // Shards that break the zigzag layout (one row moved from rank 0 to the last rank).
    auto moved = [&](const Tensor& s, uint64_t seed) {
      return r == 0 ? s.slice(2, 0, s.size(2) - 1)
                    : (r == P - 1 ? random_tensor({1, H, s.size(2) + 1, 8}, DType::f32, seed) : s);
    };
    expect_error([&] { ulysses_attention(moved(sq, 9), moved(sk, 10), moved(sv, 11), {},
                                         MPI_COMM_WORLD); },
                 {"zigzag shards"});
    AttentionParams lengths;
    lengths.mask.key_lengths = {r == 0 ? 10 : 11};
    expect_error([&] { ulysses_attention(sq, sk, sv, lengths, MPI_COMM_WORLD); },
                 {"differ between rank 0 and rank"});
  }
  const AttentionOutput ref = attn::attention(q, k, v, {});
  const AttentionOutput got = ulysses_attention(sq, sk, sv, {}, MPI_COMM_WORLD);
  EXPECT_TRUE(close(got.out, shard(ref.out, Layout::zigzag), DType::f32, 28, "out after errors"));
}

}  // namespace

int main(int argc, char** argv) { return attn::testing::mpi_gtest_main(argc, argv); }
