// Paged KV cache (Kwon et al. 2023, vLLM's PagedAttention): the keys and values of many
// sequences of different lengths live in one pool of fixed-size pages; each sequence keeps a
// table of its pages. A sequence grows a page at a time and never moves (no reallocation, no
// copy on growth), and a freed page is reused by any sequence.
//
// Beam search shares prefixes instead of copying them: fork() gives the child the parent's
// page table and counts one more reference on every page. Full pages are only ever read, so
// they stay shared; the first append to a shared, partly filled last page copies that page
// (copy-on-write) and the writer continues in its own copy. release() drops a sequence's
// references; a page returns to the pool when its count reaches 0.
//
//   pool k [num_pages, Hkv, page_size, Dk], v [num_pages, Hkv, page_size, Dv], float32 or bf16
//   position t of a sequence: row t % page_size of page pages(seq)[t / page_size]
//
// Not thread-safe: one thread appends, forks and releases (attention() only reads).
#pragma once

#include <cstdint>
#include <vector>

#include "attn/attention.h"
#include "attn/tensor.h"

namespace attn {

struct PagedKVCacheOptions {
  int64_t num_kv_heads = 1;    // Hkv
  int64_t head_dim = 0;        // Dk
  int64_t value_head_dim = 0;  // Dv; 0 means head_dim
  int64_t page_size = 64;      // positions per page (64 and up keep the decode kernel's blocks)
  int64_t num_pages = 0;       // pool size, fixed
  DType dtype = DType::f32;    // float32 or bf16 (appended rows are rounded once)
};

class PagedKVCache {
 public:
  // Throws attn::Error ("[PagedKVCache]") for sizes <= 0 or another dtype.
  explicit PagedKVCache(const PagedKVCacheOptions& options);

  // A new empty sequence; returns its id (ids are never reused).
  int64_t add_sequence();
  // A new sequence sharing all of `parent`'s positions (its pages, by reference).
  int64_t fork(int64_t parent);
  // Drops the sequence; its pages no other sequence references return to the pool.
  void release(int64_t seq);
  // Appends k [Hkv, n, Dk] and v [Hkv, n, Dv] (any float dtype, converted) at the end of `seq`.
  // Throws attn::Error ("pool exhausted", with the pages needed and free) before changing
  // anything when the pool lacks the pages.
  void append(int64_t seq, const Tensor& k, const Tensor& v);

  int64_t length(int64_t seq) const;
  const std::vector<int32_t>& pages(int64_t seq) const;
  int64_t references(int64_t page) const;  // sequences holding the page
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  const PagedKVCacheOptions& options() const { return options_; }
  const Tensor& key_pool() const { return k_pool_; }
  const Tensor& value_pool() const { return v_pool_; }
  // The sequence's keys [Hkv, length, Dk] / values [Hkv, length, Dv], gathered (a copy).
  Tensor keys(int64_t seq) const;
  Tensor values(int64_t seq) const;

 private:
  struct Sequence {
    std::vector<int32_t> pages;
    int64_t length = 0;
    bool live = false;
  };
  const Sequence& live(const char* op, int64_t seq) const;
  int32_t take_page();
  void drop_page(int32_t page);
  Tensor gather(const Tensor& pool, int64_t seq) const;

  PagedKVCacheOptions options_;
  Tensor k_pool_, v_pool_;
  std::vector<int32_t> refs_;  // per page
  std::vector<int32_t> free_;  // free pages, taken from the back
  std::vector<Sequence> seqs_;
};

// Attention of q [B, Hq, Tq, Dk] (float32, float64 or bf16) over the sequences
// `sequences[0..B)` of the cache: batch b attends the length(sequences[b]) positions of its
// sequence (params.mask.key_lengths are set from them and must be empty; Tk is the longest).
// Use params.mask.alignment = bottom_right for decoder steps (the Tq queries are the last Tq
// positions of each sequence). Decoder steps with a float32 query and dot-product scores read
// the pages in place through the decode kernel; other calls gather the keys first. Results as
// attention() for K/V [B, Hkv, Tk, D] holding each sequence's positions (weights [B, Hq, Tq, Tk]).
AttentionOutput attention(const Tensor& q, const PagedKVCache& cache,
                          const std::vector<int64_t>& sequences,
                          const AttentionParams& params = {});

}  // namespace attn
