#include "attn/paged_kv_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attention_validate.h"
#include "attn/error.h"
#include "kernels/decode/decode_attention.h"

namespace attn {

namespace {

std::string shape_or_undefined(const Tensor& t) {
  return t.defined() ? t.shape_str() : "undefined";
}

}  // namespace

PagedKVCache::PagedKVCache(const PagedKVCacheOptions& options) : options_(options) {
  const char* op = "PagedKVCache";
  if (options_.value_head_dim == 0) options_.value_head_dim = options_.head_dim;
  const PagedKVCacheOptions& o = options_;
  ATTN_CHECK(o.num_kv_heads > 0 && o.head_dim > 0 && o.value_head_dim > 0 && o.page_size > 0 &&
                 o.num_pages > 0,
             op, "num_kv_heads, head_dim, value_head_dim, page_size and num_pages must be > 0, got ",
             o.num_kv_heads, ", ", o.head_dim, ", ", o.value_head_dim, ", ", o.page_size, ", ",
             o.num_pages);
  ATTN_CHECK(o.num_pages <= INT32_MAX, op, "num_pages ", o.num_pages, " exceeds int32 page ids");
  ATTN_CHECK(o.dtype == DType::f32 || o.dtype == DType::bf16, op,
             "dtype must be float32 or bf16, got ", dtype_name(o.dtype));
  k_pool_ = Tensor::zeros({o.num_pages, o.num_kv_heads, o.page_size, o.head_dim}, o.dtype);
  v_pool_ = Tensor::zeros({o.num_pages, o.num_kv_heads, o.page_size, o.value_head_dim}, o.dtype);
  refs_.assign(static_cast<std::size_t>(o.num_pages), 0);
  // Taken from the back: page 0 first.
  for (int64_t p = o.num_pages; p-- > 0;) free_.push_back(static_cast<int32_t>(p));
}

const PagedKVCache::Sequence& PagedKVCache::live(const char* op, int64_t seq) const {
  ATTN_CHECK(seq >= 0 && seq < static_cast<int64_t>(seqs_.size()) &&
                 seqs_[static_cast<std::size_t>(seq)].live,
             op, "sequence ", seq, " does not exist or was released");
  return seqs_[static_cast<std::size_t>(seq)];
}

int64_t PagedKVCache::add_sequence() {
  seqs_.push_back(Sequence{{}, 0, true});
  return static_cast<int64_t>(seqs_.size()) - 1;
}

int64_t PagedKVCache::fork(int64_t parent) {
  Sequence child = live("PagedKVCache::fork", parent);
  for (int32_t p : child.pages) ++refs_[static_cast<std::size_t>(p)];
  seqs_.push_back(std::move(child));
  return static_cast<int64_t>(seqs_.size()) - 1;
}

void PagedKVCache::drop_page(int32_t page) {
  if (--refs_[static_cast<std::size_t>(page)] == 0) free_.push_back(page);
}

void PagedKVCache::release(int64_t seq) {
  live("PagedKVCache::release", seq);
  Sequence& s = seqs_[static_cast<std::size_t>(seq)];
  for (int32_t p : s.pages) drop_page(p);
  s = Sequence{};
}

int32_t PagedKVCache::take_page() {
  const int32_t page = free_.back();
  free_.pop_back();
  refs_[static_cast<std::size_t>(page)] = 1;
  return page;
}

int64_t PagedKVCache::length(int64_t seq) const { return live("PagedKVCache::length", seq).length; }

const std::vector<int32_t>& PagedKVCache::pages(int64_t seq) const {
  return live("PagedKVCache::pages", seq).pages;
}

int64_t PagedKVCache::references(int64_t page) const {
  ATTN_CHECK(page >= 0 && page < options_.num_pages, "PagedKVCache::references", "page ", page,
             " outside [0, ", options_.num_pages, ")");
  return refs_[static_cast<std::size_t>(page)];
}

void PagedKVCache::append(int64_t seq, const Tensor& k, const Tensor& v) {
  const char* op = "PagedKVCache::append";
  live(op, seq);
  const PagedKVCacheOptions& o = options_;
  ATTN_CHECK(k.defined() && v.defined() && k.dim() == 3 && v.dim() == 3 &&
                 k.size(0) == o.num_kv_heads && v.size(0) == o.num_kv_heads &&
                 k.size(2) == o.head_dim && v.size(2) == o.value_head_dim &&
                 k.size(1) == v.size(1),
             op, "k must be [Hkv, n, Dk] = [", o.num_kv_heads, ", n, ", o.head_dim,
             "] and v [Hkv, n, Dv] = [", o.num_kv_heads, ", n, ", o.value_head_dim, "], got ",
             shape_or_undefined(k), " and ", shape_or_undefined(v));
  ATTN_CHECK(k.dtype() == DType::f32 || k.dtype() == DType::f64 || k.dtype() == DType::bf16, op,
             "k and v must be float32, float64 or bf16, got ", dtype_name(k.dtype()));
  Sequence& s = seqs_[static_cast<std::size_t>(seq)];
  const int64_t n = k.size(1), P = o.page_size;
  // Pages needed before anything changes: new pages past the last, and a private copy of a
  // shared, partly filled last page.
  const int64_t have = static_cast<int64_t>(s.pages.size());
  const int64_t want = (s.length + n + P - 1) / P;
  const bool copy_last = n > 0 && s.length % P != 0 &&
                         refs_[static_cast<std::size_t>(s.pages.back())] > 1;
  const int64_t needed = want - have + (copy_last ? 1 : 0);
  ATTN_CHECK(needed <= free_pages(), op, "pool exhausted: sequence ", seq, " (length ", s.length,
             ") needs ", needed, " more pages of ", P, " positions to append ", n, ", ",
             free_pages(), " of ", o.num_pages, " are free");
  const auto page_bytes = [&](const Tensor& pool) {
    return static_cast<std::size_t>(pool.size(1) * P * pool.size(3)) * dtype_size(o.dtype);
  };
  if (copy_last) {
    const int32_t from = s.pages.back(), to = take_page();
    for (const Tensor* pool : {&k_pool_, &v_pool_}) {
      auto* base = static_cast<std::byte*>(pool->raw_data());
      std::memcpy(base + to * page_bytes(*pool), base + from * page_bytes(*pool),
                  page_bytes(*pool));
    }
    drop_page(from);
    s.pages.back() = to;
  }
  while (static_cast<int64_t>(s.pages.size()) < want) s.pages.push_back(take_page());
  const Tensor kc = k.to(o.dtype).contiguous(), vc = v.to(o.dtype).contiguous();
  const auto write = [&](const Tensor& src, Tensor& pool) {
    const int64_t D = pool.size(3);
    const auto elem = static_cast<int64_t>(dtype_size(o.dtype));
    const auto* in = static_cast<const std::byte*>(src.raw_data());
    auto* base = static_cast<std::byte*>(pool.raw_data());
    for (int64_t h = 0; h < o.num_kv_heads; ++h)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = s.length + t;
        const int64_t page = s.pages[static_cast<std::size_t>(pos / P)];
        std::memcpy(base + (((page * o.num_kv_heads + h) * P + pos % P) * D) * elem,
                    in + ((h * n + t) * D) * elem, static_cast<std::size_t>(D * elem));
      }
  };
  write(kc, k_pool_);
  write(vc, v_pool_);
  s.length += n;
}

Tensor PagedKVCache::gather(const Tensor& pool, int64_t seq) const {
  const Sequence& s = live("PagedKVCache::keys", seq);
  const int64_t H = pool.size(1), P = pool.size(2), D = pool.size(3);
  Tensor out = Tensor::empty({H, s.length, D}, pool.dtype());
  const auto elem = static_cast<int64_t>(dtype_size(pool.dtype()));
  const auto* base = static_cast<const std::byte*>(pool.raw_data());
  auto* o = static_cast<std::byte*>(out.raw_data());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < s.length; ++t)
      std::memcpy(o + ((h * s.length + t) * D) * elem,
                  base + (((s.pages[static_cast<std::size_t>(t / P)] * H + h) * P + t % P) * D) *
                             elem,
                  static_cast<std::size_t>(D * elem));
  return out;
}

Tensor PagedKVCache::keys(int64_t seq) const { return gather(k_pool_, seq); }
Tensor PagedKVCache::values(int64_t seq) const { return gather(v_pool_, seq); }

AttentionOutput attention(const Tensor& q, const PagedKVCache& cache,
                          const std::vector<int64_t>& sequences, const AttentionParams& params) {
  const char* op = "attention";
  ATTN_CHECK(q.defined() && q.dim() == 4, op, "q must be [B, Hq, Tq, Dk] against a paged cache, got ",
             shape_or_undefined(q));
  ATTN_CHECK(static_cast<int64_t>(sequences.size()) == q.size(0), op, "q has batch ", q.size(0),
             " but ", sequences.size(), " sequences were given");
  ATTN_CHECK(params.mask.key_lengths.empty(), op,
             "mask.key_lengths must be empty against a paged cache (the sequences' lengths set "
             "them)");
  const PagedKVCacheOptions& o = cache.options();
  const int64_t B = q.size(0);
  AttentionParams with_lengths = params;
  int64_t Tk = 0, max_pages = 0;
  for (int64_t seq : sequences) {
    const int64_t length = cache.length(seq);
    with_lengths.mask.key_lengths.push_back(length);
    Tk = std::max(Tk, length);
    max_pages = std::max(max_pages, static_cast<int64_t>(cache.pages(seq).size()));
  }
  const bool bf16 = o.dtype == DType::bf16;
  ATTN_CHECK(q.dtype() == DType::f32 || q.dtype() == DType::f64 || q.dtype() == DType::bf16, op,
             "q must be float32, float64 or bf16, got ", dtype_name(q.dtype()));
  // Shape-only stand-ins of K and V (every stride 0 over one zero) for attention()'s validation.
  static float zero32 = 0.0f;
  static double zero64 = 0.0;
  static BFloat16 zero16{};
  const DType wide = q.dtype() == DType::f64 ? DType::f64 : DType::f32;
  const auto stand_in = [&](int64_t D) {
    const Shape shape{B, o.num_kv_heads, Tk, D}, zeros(4, 0);
    if (bf16) return Tensor::wrap(&zero16, shape, zeros);
    return wide == DType::f32 ? Tensor::wrap(&zero32, shape, zeros)
                              : Tensor::wrap(&zero64, shape, zeros);
  };
  const Tensor qw = q.to(wide);
  const detail::AttentionDims dims = detail::validate_attention(
      op, qw, stand_in(o.head_dim), stand_in(o.value_head_dim), with_lengths);
  if (wide == DType::f32 && B > 0) {
    const AttentionParams params32 = detail::convert_params(with_lengths, DType::f32);
    if (kernels::decode_attention_supported(DType::f32, dims, params32)) {
      std::vector<int32_t> table(static_cast<std::size_t>(B * std::max<int64_t>(max_pages, 1)), 0);
      for (int64_t b = 0; b < B; ++b) {
        const std::vector<int32_t>& pages = cache.pages(sequences[static_cast<std::size_t>(b)]);
        std::copy(pages.begin(), pages.end(), table.begin() + b * std::max<int64_t>(max_pages, 1));
      }
      return kernels::decode_attention_paged(dims, qw.to(DType::f32).contiguous(),
                                             cache.key_pool(), cache.value_pool(), table.data(),
                                             std::max<int64_t>(max_pages, 1), params32);
    }
  }
  // Gather each sequence's positions into [B, Hkv, Tk, D] (rows past its length stay 0, masked
  // by key_lengths) and take attention()'s paths.
  const auto gathered = [&](bool keys, int64_t D) {
    Tensor t = Tensor::zeros({B, o.num_kv_heads, Tk, D}, bf16 ? DType::bf16 : wide);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t seq = sequences[static_cast<std::size_t>(b)];
      const Tensor rows = keys ? cache.keys(seq) : cache.values(seq);
      t.select(0, b).slice(1, 0, rows.size(1)).copy_from(rows);
    }
    return t;
  };
  return attn::attention(qw, gathered(true, o.head_dim), gathered(false, o.value_head_dim),
                         with_lengths);
}

}  // namespace attn
