// Every validation check of the attention front-end: bad input raises attn::Error whose message
// names the op, the argument and the shapes. Never a crash, never a silent wrong answer.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "attn/attention.h"
#include "support/test_support.h"

namespace attn {
namespace {

using attn::testing::expect_error;

using testing::random_tensor;


struct Inputs {
  Tensor q = random_tensor({2, 4, 5, 8}, DType::f32, 1);
  Tensor k = random_tensor({2, 2, 6, 8}, DType::f32, 2);
  Tensor v = random_tensor({2, 2, 6, 3}, DType::f32, 3);
};

void run(const Inputs& in, const AttentionParams& p) { attention(in.q, in.k, in.v, p); }

TEST(AttentionErrors, KeyWidthDiffersFromQueryWidth) {
  Inputs in;
  in.k = random_tensor({2, 2, 6, 32}, DType::f32, 2);
  in.q = random_tensor({2, 4, 5, 64}, DType::f32, 1);
  expect_error([&] { run(in, {}); }, {"[attention]", "key has 32 features, query has 64"});
}

TEST(AttentionErrors, WrongRank) {
  Inputs in;
  in.q = random_tensor({4, 5, 8}, DType::f32, 1);
  expect_error([&] { run(in, {}); }, {"[attention]", "query must be [B, Hq, Tq, Dq]", "[4, 5, 8]"});
}

TEST(AttentionErrors, DtypesDiffer) {
  Inputs in;
  in.v = random_tensor({2, 2, 6, 3}, DType::f64, 3);
  expect_error([&] { run(in, {}); }, {"[attention]", "dtypes differ", "float32", "float64"});
}

TEST(AttentionErrors, BatchDiffers) {
  Inputs in;
  in.k = random_tensor({3, 2, 6, 8}, DType::f32, 2);
  expect_error([&] { run(in, {}); }, {"[attention]", "batch sizes differ", "[3, 2, 6, 8]"});
}

TEST(AttentionErrors, ValueLengthDiffersFromKey) {
  Inputs in;
  in.v = random_tensor({2, 2, 7, 3}, DType::f32, 3);
  expect_error([&] { run(in, {}); }, {"[attention]", "value [2, 2, 7, 3]", "key [2, 2, 6, 8]"});
}

TEST(AttentionErrors, KvHeadsMustDivideQueryHeads) {
  Inputs in;
  in.k = random_tensor({2, 3, 6, 8}, DType::f32, 2);
  in.v = random_tensor({2, 3, 6, 3}, DType::f32, 3);
  expect_error([&] { run(in, {}); }, {"[attention]", "key/value heads (3) must divide query heads (4)"});
}

TEST(AttentionErrors, KeyLengthLongerThanSequence) {
  Inputs in;
  AttentionParams p;
  p.mask.key_lengths = {6, 7};
  expect_error([&] { run(in, p); }, {"[attention]", "key_lengths[1] = 7", "[0, 6]"});
}

TEST(AttentionErrors, KeyLengthsWrongCount) {
  Inputs in;
  AttentionParams p;
  p.mask.key_lengths = {6};
  expect_error([&] { run(in, p); }, {"[attention]", "key_lengths has 1 entries, batch is 2"});
}

TEST(AttentionErrors, QueryLengthLongerThanSequence) {
  Inputs in;
  AttentionParams p;
  p.mask.query_lengths = {9, 1};
  expect_error([&] { run(in, p); }, {"[attention]", "query_lengths[0] = 9", "[0, 5]"});
}

TEST(AttentionErrors, BoolMaskOfWrongShape) {
  Inputs in;
  AttentionParams p;
  p.mask.allowed = Tensor::full({2, 1, 5, 7}, 1.0, DType::b8);
  expect_error([&] { run(in, p); },
               {"[attention]", "allowed mask of shape [2, 1, 5, 7]", "[2, 4, 5, 6]"});
}

TEST(AttentionErrors, BoolMaskMustBeBool) {
  Inputs in;
  AttentionParams p;
  p.mask.allowed = Tensor::full({5, 6}, 1.0, DType::f32);
  expect_error([&] { run(in, p); }, {"[attention]", "allowed mask must be bool", "float32"});
}

TEST(AttentionErrors, BiasOfWrongShape) {
  Inputs in;
  AttentionParams p;
  p.mask.bias = Tensor::zeros({4, 5, 5});
  expect_error([&] { run(in, p); }, {"[attention]", "bias of shape [4, 5, 5]", "[2, 4, 5, 6]"});
}

TEST(AttentionErrors, NegativeWindow) {
  Inputs in;
  AttentionParams p;
  p.mask.window = Window{-1, 2};
  expect_error([&] { run(in, p); }, {"[attention]", "window sizes must be >= 0", "left -1"});
}

TEST(AttentionErrors, AlibiSlopesWrongCount) {
  Inputs in;
  AttentionParams p;
  p.mask.alibi_slopes = {0.5, 0.25};
  expect_error([&] { run(in, p); }, {"[attention]", "alibi_slopes has 2 entries, query heads are 4"});
}

TEST(AttentionErrors, DropoutOutOfRange) {
  Inputs in;
  AttentionParams p;
  p.dropout.p = 1.0;
  expect_error([&] { run(in, p); }, {"[attention]", "dropout probability must be in [0, 1)"});
}

TEST(AttentionErrors, HeadScoresWrongCount) {
  Inputs in;
  AttentionParams p;
  p.head_scores = {DotScore{}, DotScore{}};
  expect_error([&] { run(in, p); }, {"[attention]", "head_scores has 2 entries, query heads are 4"});
}

TEST(AttentionErrors, GeneralScoreMissingParameters) {
  Inputs in;
  AttentionParams p;
  p.score = GeneralScore{};
  expect_error([&] { run(in, p); }, {"[attention]", "general score needs weight [8, 8]"});
}

TEST(AttentionErrors, GeneralScoreWrongShape) {
  Inputs in;
  AttentionParams p;
  p.score = GeneralScore{.weight = Tensor::zeros({8, 5})};
  expect_error([&] { run(in, p); }, {"[attention]", "general weight has shape [8, 5], expected [8, 8]"});
}

TEST(AttentionErrors, LowRankGeneralMismatchedRank) {
  Inputs in;
  AttentionParams p;
  p.score = GeneralScore{.u = Tensor::zeros({3, 8}), .v = Tensor::zeros({2, 8})};
  expect_error([&] { run(in, p); }, {"[attention]", "general v has shape [2, 8], expected [3, 8]"});
}

TEST(AttentionErrors, AdditiveScoreMissingParameters) {
  Inputs in;
  AttentionParams p;
  p.score = AdditiveScore{};
  expect_error([&] { run(in, p); }, {"[attention]", "additive score needs w_query of shape [A, 8]"});
}

TEST(AttentionErrors, AdditiveScoreHiddenWidthsDiffer) {
  Inputs in;
  AttentionParams p;
  p.score = AdditiveScore{.w_query = Tensor::zeros({6, 8}), .w_key = Tensor::zeros({6, 8}),
                          .v = Tensor::zeros({5})};
  expect_error([&] { run(in, p); }, {"[attention]", "additive v has shape [5], expected [6]"});
}

TEST(AttentionErrors, ConcatScoreWrongWidth) {
  Inputs in;
  AttentionParams p;
  p.score = ConcatScore{.weight = Tensor::zeros({6, 8}), .v = Tensor::zeros({6})};
  expect_error([&] { run(in, p); }, {"[attention]", "concat weight has shape [6, 8], expected [6, 16]"});
}

TEST(AttentionErrors, CosineScoreMissingTau) {
  Inputs in;
  AttentionParams p;
  p.score = CosineScore{};
  expect_error([&] { run(in, p); }, {"[attention]", "cosine score needs tau"});
}

TEST(AttentionErrors, LocationScoreTooShort) {
  Inputs in;
  AttentionParams p;
  p.score = LocationScore{.weight = Tensor::zeros({4, 8})};
  expect_error([&] { run(in, p); }, {"[attention]", "location score covers 4 source positions, key has 6"});
}

TEST(AttentionErrors, TrilinearNeedsEqualWidths) {
  Inputs in;
  in.k = random_tensor({2, 2, 6, 7}, DType::f32, 2);
  AttentionParams p;
  p.score = TrilinearScore{.weight = Tensor::zeros({21})};
  expect_error([&] { run(in, p); }, {"[attention]", "key has 7 features, query has 8"});
}

TEST(AttentionErrors, PerHeadScoreErrorNamesTheHead) {
  Inputs in;
  AttentionParams p;
  p.head_scores = {DotScore{}, DotScore{}, GeneralScore{}, DotScore{}};
  expect_error([&] { run(in, p); }, {"[attention]", "head 2 general score needs weight"});
}

TEST(AttentionErrors, LocalPredictiveMissingParameters) {
  Inputs in;
  AttentionParams p;
  p.mask.local = LocalAttention{.kind = LocalKind::predictive, .half_width = 2};
  expect_error([&] { run(in, p); }, {"[attention]", "local-p score needs w_p of shape [A, 8]"});
}

TEST(AttentionErrors, LocalNegativeHalfWidth) {
  Inputs in;
  AttentionParams p;
  p.mask.local = LocalAttention{.kind = LocalKind::monotonic, .half_width = -1};
  expect_error([&] { run(in, p); }, {"[attention]", "half_width must be >= 0"});
}

TEST(AttentionErrors, BackwardChecksDoutShape) {
  Inputs in;
  const AttentionOutput fwd = attention(in.q, in.k, in.v);
  expect_error([&] { attention_backward(in.q, in.k, in.v, {}, fwd, Tensor::zeros({2, 4, 5, 4})); },
               {"[attention_backward]", "dout must match the output [2, 4, 5, 3]", "[2, 4, 5, 4]"});
}

TEST(AttentionErrors, BackwardChecksSavedForward) {
  Inputs in;
  expect_error([&] { attention_backward(in.q, in.k, in.v, {}, {}, Tensor::zeros({2, 4, 5, 3})); },
               {"[attention_backward]", "forward.out must be the forward output"});
}

TEST(AttentionErrors, UndefinedInput) {
  Inputs in;
  expect_error([&] { attention(Tensor(), in.k, in.v); },
               {"[attention]", "query, key and value are required"});
}

}  // namespace
}  // namespace attn
