// Paged KV cache (attn/paged_kv_cache.h): decode over pages against the float64 reference of
// full attention over the same keys, beam search with shared (copy-on-write) pages against
// beams holding copies, freeing and reuse of pages, and the errors (pool exhausted, released
// sequences, shapes). Tolerances as test_mixed_precision (support/float32_tolerance.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attn/attention.h"
#include "attn/paged_kv_cache.h"
#include "attn/reference.h"
#include "support/float32_tolerance.h"
#include "support/test_support.h"

namespace attn {
namespace {

using namespace attn::testing;

constexpr int64_t kHkv = 2, kHq = 8, kD = 32;

// K and V [B, Hkv, Tk, D] in float64 holding each sequence's gathered positions (zeros past its
// length), and the key lengths: what the reference attends.
struct Dense {
  Tensor k, v;
  std::vector<int64_t> lengths;
};
Dense dense(const PagedKVCache& cache, const std::vector<int64_t>& seqs) {
  int64_t Tk = 0;
  for (int64_t s : seqs) Tk = std::max(Tk, cache.length(s));
  const auto B = static_cast<int64_t>(seqs.size());
  Dense d{Tensor::zeros({B, kHkv, Tk, kD}, DType::f64), Tensor::zeros({B, kHkv, Tk, kD}, DType::f64),
          {}};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = seqs[static_cast<size_t>(b)], L = cache.length(s);
    d.k.select(0, b).slice(1, 0, L).copy_from(cache.keys(s));
    d.v.select(0, b).slice(1, 0, L).copy_from(cache.values(s));
    d.lengths.push_back(L);
  }
  return d;
}

void expect_matches_reference(const Tensor& q, const PagedKVCache& cache,
                              const std::vector<int64_t>& seqs, AttentionParams params) {
  const AttentionOutput got = attention(q, cache, seqs, params);
  const Dense d = dense(cache, seqs);
  params.mask.key_lengths = d.lengths;
  const AttentionOutput want = reference::attention(q.to(DType::f64), d.k, d.v, params);
  const double scale = 1.0 / std::sqrt(static_cast<double>(kD));
  const Tolerance tol = float32_tolerance(kD, d.k.size(2), scale * kD);
  EXPECT_TRUE(all_close(got.out, want.out, tol, "out"));
  EXPECT_TRUE(all_close(got.lse, want.lse, tol, "lse"));
  if (params.return_weights) {
    EXPECT_TRUE(all_close(got.weights, want.weights, tol, "weights"));
  }
}

// Three sequences of lengths 5, 70 and 300 grown in interleaved chunks (their pages interleave
// in the pool), page sizes 16 (blocks split at every page) and 64; float32 and bf16 pools;
// decoder steps (kernel path) and a prefill of 20 queries (gathered path).
TEST(PagedKVCache, DecodeOverPagesEqualsFullAttention) {
  for (int64_t page_size : {16, 64}) {
    for (DType dtype : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(::testing::Message() << "page " << page_size << " " << dtype_name(dtype));
      PagedKVCache cache({.num_kv_heads = kHkv, .head_dim = kD, .page_size = page_size,
                          .num_pages = 64, .dtype = dtype});
      const std::vector<int64_t> seqs{cache.add_sequence(), cache.add_sequence(),
                                      cache.add_sequence()};
      const int64_t lengths[] = {5, 70, 300};
      uint64_t seed = 1;
      for (int64_t done = 0; done < 300; done += 25)
        for (size_t s = 0; s < 3; ++s) {
          const int64_t n = std::min<int64_t>(25, lengths[s] - done);
          if (n <= 0) continue;
          const Tensor k = random_tensor({kHkv, n, kD}, DType::f32, seed++);
          cache.append(seqs[s], k, random_tensor({kHkv, n, kD}, DType::f32, seed++));
        }
      for (size_t s = 0; s < 3; ++s) ASSERT_EQ(cache.length(seqs[s]), lengths[s]);
      AttentionParams params;
      params.mask.causal = true;
      params.mask.alignment = Alignment::bottom_right;
      for (int64_t Tq : {1, 3, 20}) {
        SCOPED_TRACE(::testing::Message() << "Tq " << Tq);
        const Tensor q = random_tensor({3, kHq, Tq, kD}, DType::f32, 100 + static_cast<uint64_t>(Tq));
        expect_matches_reference(q, cache, seqs, params);
      }
      params.return_weights = true;
      expect_matches_reference(random_tensor({2, kHq, 1, kD}, DType::f32, 7), cache,
                               {seqs[2], seqs[0]}, params);
    }
  }
}

// A prompt of 37 positions, then 4 beams decoding 6 steps each with their own rows. Shared:
// the beams fork the prompt (its 2 full pages of 16 shared, the partly filled third copied on
// each beam's first append). Copies: each beam is a sequence holding the prompt's rows again.
// The two caches give bitwise the same attention (the kernel reads the same values in the same
// order), and the shared one uses fewer pages.
TEST(PagedKVCache, BeamWithSharedPagesEqualsBeamWithCopies) {
  const PagedKVCacheOptions options{.num_kv_heads = kHkv, .head_dim = kD, .page_size = 16,
                                    .num_pages = 40};
  PagedKVCache shared(options), copied(options);
  const Tensor prompt_k = random_tensor({kHkv, 37, kD}, DType::f32, 1);
  const Tensor prompt_v = random_tensor({kHkv, 37, kD}, DType::f32, 2);
  const int64_t prompt = shared.add_sequence();
  shared.append(prompt, prompt_k, prompt_v);
  std::vector<int64_t> beams_shared, beams_copied;
  for (int beam = 0; beam < 4; ++beam) {
    beams_shared.push_back(shared.fork(prompt));
    beams_copied.push_back(copied.add_sequence());
    copied.append(beams_copied.back(), prompt_k, prompt_v);
  }
  shared.release(prompt);
  for (size_t p = 0; p < 2; ++p)  // full prompt pages: held by the 4 beams
    EXPECT_EQ(shared.references(shared.pages(beams_shared[0])[p]), 4);
  AttentionParams params;
  params.mask.causal = true;
  params.mask.alignment = Alignment::bottom_right;
  uint64_t seed = 10;
  for (int step = 0; step < 6; ++step) {
    for (int beam = 0; beam < 4; ++beam) {
      const Tensor k = random_tensor({kHkv, 1, kD}, DType::f32, seed++);
      const Tensor v = random_tensor({kHkv, 1, kD}, DType::f32, seed++);
      shared.append(beams_shared[static_cast<size_t>(beam)], k, v);
      copied.append(beams_copied[static_cast<size_t>(beam)], k, v);
    }
    const Tensor q = random_tensor({4, kHq, 1, kD}, DType::f32, 1000 + static_cast<uint64_t>(step));
    const AttentionOutput a = attention(q, shared, beams_shared, params);
    const AttentionOutput b = attention(q, copied, beams_copied, params);
    EXPECT_EQ(a.out.to_vector(), b.out.to_vector()) << "step " << step;
    EXPECT_EQ(a.lse.to_vector(), b.lse.to_vector()) << "step " << step;
  }
  for (int beam = 0; beam < 4; ++beam) {
    const int64_t s = beams_shared[static_cast<size_t>(beam)];
    EXPECT_EQ(shared.keys(s).to_vector(), copied.keys(beams_copied[static_cast<size_t>(beam)]).to_vector());
    // Each beam's third page is its own copy (the prompt's partly filled page, then its rows).
    EXPECT_EQ(shared.references(shared.pages(s)[2]), 1);
  }
  expect_matches_reference(random_tensor({4, kHq, 1, kD}, DType::f32, 5), shared, beams_shared,
                           params);
  // Shared: 2 prompt pages + 4 private third pages; copies: 4 x 3 pages.
  EXPECT_EQ(options.num_pages - shared.free_pages(), 6);
  EXPECT_EQ(options.num_pages - copied.free_pages(), 12);
}

TEST(PagedKVCache, ReleasedPagesAreReused) {
  PagedKVCache cache({.num_kv_heads = kHkv, .head_dim = kD, .page_size = 8, .num_pages = 4});
  const int64_t a = cache.add_sequence(), b = cache.add_sequence();
  cache.append(a, random_tensor({kHkv, 16, kD}, DType::f32, 1), random_tensor({kHkv, 16, kD}, DType::f32, 2));
  const Tensor b_k = random_tensor({kHkv, 10, kD}, DType::f32, 3);
  cache.append(b, b_k, random_tensor({kHkv, 10, kD}, DType::f32, 4));
  EXPECT_EQ(cache.free_pages(), 0);
  const std::vector<int32_t> a_pages = cache.pages(a);
  cache.release(a);
  EXPECT_EQ(cache.free_pages(), 2);
  const int64_t c = cache.add_sequence();
  cache.append(c, random_tensor({kHkv, 12, kD}, DType::f32, 5), random_tensor({kHkv, 12, kD}, DType::f32, 6));
  std::vector<int32_t> c_pages = cache.pages(c);
  std::sort(c_pages.begin(), c_pages.end());
  std::vector<int32_t> freed = a_pages;
  std::sort(freed.begin(), freed.end());
  EXPECT_EQ(c_pages, freed);
  EXPECT_EQ(cache.keys(b).to_vector(), b_k.to_vector());  // untouched by the reuse
  expect_error([&] { cache.length(a); }, {"[PagedKVCache::length]", "sequence 0", "released"});
}

TEST(PagedKVCache, Errors) {
  PagedKVCache cache({.num_kv_heads = kHkv, .head_dim = kD, .page_size = 8, .num_pages = 2});
  const int64_t s = cache.add_sequence();
  cache.append(s, random_tensor({kHkv, 12, kD}, DType::f32, 1), random_tensor({kHkv, 12, kD}, DType::f32, 2));
  expect_error([&] {
    cache.append(s, random_tensor({kHkv, 5, kD}, DType::f32, 3), random_tensor({kHkv, 5, kD}, DType::f32, 4));
  }, {"[PagedKVCache::append]", "pool exhausted", "needs 1 more pages", "0 of 2 are free"});
  EXPECT_EQ(cache.length(s), 12);  // unchanged by the failed append
  // A fork of a partly filled page needs a copy on its first append: also refused cleanly.
  const int64_t f = cache.fork(s);
  expect_error([&] {
    cache.append(f, random_tensor({kHkv, 1, kD}, DType::f32, 5), random_tensor({kHkv, 1, kD}, DType::f32, 6));
  }, {"[PagedKVCache::append]", "pool exhausted"});
  expect_error([&] {
    cache.append(s, random_tensor({kHkv, 1, 16}, DType::f32, 5), random_tensor({kHkv, 1, kD}, DType::f32, 6));
  }, {"[PagedKVCache::append]", "[2, 1, 16]"});
  expect_error([&] { attention(random_tensor({1, kHq, 1, kD}, DType::f32, 7), cache, {s, f}); },
               {"[attention]", "batch 1", "2 sequences"});
  expect_error([&] { PagedKVCache({.num_kv_heads = 1, .head_dim = 8, .num_pages = 1, .dtype = DType::f64}); },
               {"[PagedKVCache]", "float32 or bf16", "float64"});
  expect_error([&] { cache.fork(9); }, {"[PagedKVCache::fork]", "sequence 9"});
}

}  // namespace
}  // namespace attn
