// compact_kv_cache: schema, argument checks shared with the CUDA binding, and the CPU kernel.
//
// For every (layer, k/v, sequence, kv-head) row block, the accepted tree slots are copied in order
// j = 0..accept_token_num[b]:  cache[.., b, h, seqlen[b] + j, :] = cache[.., b, h, seqlen[b] + slot_j, :]
// where slot_j = accept_index[b, j] - b * num_draft_tokens. Slots along an accepted path are strictly
// increasing (slot_j >= j), so an in-order copy never reads a row that was already overwritten.
// The copy is byte-wise, so every dtype is handled by one kernel. paged_compact_kv_cache is the same over
// a block pool [num_layers, 2, num_blocks, page_size, Hkv, D]: position p of sequence b is slot
// p % page_size of block block_table[b, p / page_size].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "compact_kv_cache.h"

namespace eagle {

// The lengths' and the paths' shapes, dtypes and devices, for B sequences (both layouts).
void check_path_args(const at::Tensor& kv_cache, int64_t B, const at::Tensor& cache_seqlens,
                     const at::Tensor& accept_index, const at::Tensor& accept_token_num) {
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              "cache_seqlens must be [B] with B=", B, ", got ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32");
  TORCH_CHECK(accept_index.dim() == 2 && accept_index.size(0) == B,
              "accept_index must be [B, num_spec_steps] with B=", B, ", got ", accept_index.sizes());
  TORCH_CHECK(accept_index.scalar_type() == at::kInt || accept_index.scalar_type() == at::kLong,
              "accept_index must be int32 or int64");
  TORCH_CHECK(accept_token_num.dim() == 1 && accept_token_num.size(0) == B,
              "accept_token_num must be [B] with B=", B, ", got ", accept_token_num.sizes());
  TORCH_CHECK(accept_token_num.scalar_type() == at::kInt || accept_token_num.scalar_type() == at::kLong,
              "accept_token_num must be int32 or int64");
  TORCH_CHECK(accept_index.size(1) >= 1, "accept_index must have at least one column (the root)");
  for (const auto* t : {&cache_seqlens, &accept_index, &accept_token_num}) {
    TORCH_CHECK(t->device() == kv_cache.device(), "all inputs must be on ", kv_cache.device());
  }
}

void check_compact_kv_cache_args(const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                                 const at::Tensor& accept_index, const at::Tensor& accept_token_num,
                                 int64_t num_draft_tokens) {
  TORCH_CHECK(kv_cache.dim() == 6, "kv_cache must be [num_layers, 2, B, Hkv, S_max, D], got ",
              kv_cache.sizes());
  TORCH_CHECK(kv_cache.size(1) == 2, "kv_cache dim 1 must be 2 (K and V), got ", kv_cache.size(1));
  TORCH_CHECK(kv_cache.stride(5) == 1, "kv_cache's last dimension must be contiguous");
  const int64_t esize = kv_cache.element_size();
  TORCH_CHECK(esize == 1 || esize == 2 || esize == 4 || esize == 8,
              "kv_cache must have a dtype of 1, 2, 4 or 8 bytes, got ", kv_cache.scalar_type());
  check_path_args(kv_cache, kv_cache.size(2), cache_seqlens, accept_index, accept_token_num);
  TORCH_CHECK(num_draft_tokens >= 1, "num_draft_tokens must be >= 1, got ", num_draft_tokens);
  // (also keeps b * num_draft_tokens and the fit checks below far from int64 overflow)
  TORCH_CHECK(num_draft_tokens <= kv_cache.size(4), "num_draft_tokens=", num_draft_tokens,
              " exceeds the cache's S_max=", kv_cache.size(4));
}

namespace {

// A paged cache's block table (contiguous int64 [rows, cols]). `paged` is its own flag: an empty
// table's data pointer may be null, and a batch of none read as a contiguous cache indexed lengths it
// does not have (a segfault at B = 0).
struct Paging {
  bool paged = false;
  const int64_t* table = nullptr;
  int64_t rows = 0, cols = 0, page = 0;
  int64_t capacity = 0;  // positions the whole table maps (cols may be fewer: the columns read)
};

template <typename idx_t, typename cnt_t>
void compact_cpu_impl(at::Tensor& kv_cache, const int32_t* seqlens, const idx_t* accept_index,
                      const cnt_t* accept_num, int64_t num_steps, int64_t n, const Paging& pg) {
  const bool paged = pg.paged;
  // contiguous [L, 2, B, H, S, D]; paged [L, 2, num_blocks, page, H, D] with B = the table's rows
  const int64_t L = kv_cache.size(0), D = kv_cache.size(5), num_blocks = kv_cache.size(2);
  const int64_t B = paged ? pg.rows : kv_cache.size(2), H = kv_cache.size(paged ? 4 : 3);
  const int64_t S = paged ? pg.capacity : kv_cache.size(4);
  const char* capacity = paged ? "the block table's capacity (max_blocks * page_size)" : "S_max";
  // Validate every path before touching the cache (CPU: costs no synchronisation).
  for (int64_t b = 0; b < B; ++b) {
    const int64_t acc = accept_num[b];
    TORCH_CHECK_VALUE(acc >= 0 && acc < num_steps, "accept_token_num must be in [0, ", num_steps - 1,
                      "], got accept_token_num[", b, "]=", acc);
    TORCH_CHECK_VALUE(seqlens[b] >= 0 && n <= S - seqlens[b], "cache_seqlens + num_draft_tokens=", n,
                      " must fit ", capacity, "=", S, ", got cache_seqlens[", b, "]=", seqlens[b]);
    int64_t prev = -1;
    for (int64_t j = 0; j <= acc; ++j) {
      const int64_t slot = static_cast<int64_t>(accept_index[b * num_steps + j]) - b * n;
      TORCH_CHECK_VALUE(slot >= 0 && slot < n, "accept_index[", b, ", ", j, "]=",
                        accept_index[b * num_steps + j], " holds a row outside its sequence's tree (expected ",
                        b * n, "..", b * n + n - 1, ")");
      TORCH_CHECK_VALUE(slot > prev, "accept_index must list strictly increasing tree slots per sequence");
      prev = slot;
    }
    if (paged) {
      const int64_t pages = (seqlens[b] + n + pg.page - 1) / pg.page;  // the prefix and the tree
      for (int64_t c = 0; c < pages; ++c) {
        const int64_t id = pg.table[b * pg.cols + c];
        TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block_table[", b, ", ", c, "] = ", id,
                          " is not a block of the cache (0 .. ", num_blocks - 1, "); sequence ", b,
                          "'s tree covers its first ", pages, " entries");
      }
    }
  }
  const int64_t esize = kv_cache.element_size(), row_bytes = D * esize;
  const int64_t s_layer = kv_cache.stride(0), s_kv = kv_cache.stride(1), s_b = kv_cache.stride(2);
  const int64_t s_h = kv_cache.stride(paged ? 4 : 3), s_pos = kv_cache.stride(paged ? 3 : 4);
  char* base = static_cast<char*>(kv_cache.data_ptr());
  at::parallel_for(0, L * 2 * B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % H, b = (r / H) % B, kv = (r / (H * B)) % 2, layer = r / (H * B * 2);
      char* head = base + (layer * s_layer + kv * s_kv + h * s_h + (paged ? 0 : b * s_b)) * esize;
      // byte offset of position pos's row from `head`
      const auto row = [&](int64_t pos) {
        if (!paged) return pos * s_pos * esize;
        return (pg.table[b * pg.cols + pos / pg.page] * s_b + pos % pg.page * s_pos) * esize;
      };
      const int64_t start = seqlens[b];
      for (int64_t j = 0; j <= accept_num[b]; ++j) {
        const int64_t slot = static_cast<int64_t>(accept_index[b * num_steps + j]) - b * n;
        if (slot == j) continue;
        std::memcpy(head + row(start + j), head + row(start + slot), row_bytes);
      }
    }
  });
}

// Dispatch on the index dtypes (counts are read in their own dtype: an int64 count is validated before
// anything narrows it); returns the new lengths.
at::Tensor compact(at::Tensor& kv_cache, const at::Tensor& cache_seqlens, const at::Tensor& accept_index,
                   const at::Tensor& accept_token_num, int64_t num_draft_tokens, const Paging& pg) {
  auto seqlens = cache_seqlens.contiguous();
  auto index = accept_index.contiguous();
  auto num = accept_token_num.contiguous();
  const int64_t steps = index.size(1), n = num_draft_tokens;
  const bool long_index = index.scalar_type() == at::kLong, long_num = num.scalar_type() == at::kLong;
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  if (long_index && long_num) {
    compact_cpu_impl(kv_cache, lens, index.data_ptr<int64_t>(), num.data_ptr<int64_t>(), steps, n, pg);
  } else if (long_index) {
    compact_cpu_impl(kv_cache, lens, index.data_ptr<int64_t>(), num.data_ptr<int32_t>(), steps, n, pg);
  } else if (long_num) {
    compact_cpu_impl(kv_cache, lens, index.data_ptr<int32_t>(), num.data_ptr<int64_t>(), steps, n, pg);
  } else {
    compact_cpu_impl(kv_cache, lens, index.data_ptr<int32_t>(), num.data_ptr<int32_t>(), steps, n, pg);
  }
  return cache_seqlens + num.to(at::kInt) + 1;
}

at::Tensor compact_kv_cache_cpu(at::Tensor kv_cache, const at::Tensor& cache_seqlens,
                                const at::Tensor& accept_index, const at::Tensor& accept_token_num,
                                int64_t num_draft_tokens) {
  check_compact_kv_cache_args(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens);
  return compact(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens, Paging{});
}

at::Tensor paged_compact_kv_cache_cpu(at::Tensor kv_cache, const at::Tensor& block_table,
                                      const at::Tensor& cache_seqlens, const at::Tensor& accept_index,
                                      const at::Tensor& accept_token_num, int64_t num_draft_tokens) {
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.size(2) > 0 && kv_cache.size(3) > 0,
              "kv_cache must be [num_layers, 2, num_blocks, page_size, Hkv, D] with at least one block of at "
              "least one position, got ", kv_cache.sizes());
  TORCH_CHECK(kv_cache.stride(5) == 1, "kv_cache's last dimension must be contiguous");
  const int64_t esize = kv_cache.element_size();
  TORCH_CHECK(esize == 1 || esize == 2 || esize == 4 || esize == 8,
              "kv_cache must have a dtype of 1, 2, 4 or 8 bytes, got ", kv_cache.scalar_type());
  TORCH_CHECK(block_table.dim() == 2, "block_table must be [B, max_blocks], got ", block_table.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt || block_table.scalar_type() == at::kLong,
              "block_table must be int32 or int64, got ", block_table.scalar_type());
  const int64_t B = block_table.size(0), page = kv_cache.size(3);
  TORCH_CHECK(block_table.device() == kv_cache.device(), "all inputs must be on ", kv_cache.device());
  check_path_args(kv_cache, B, cache_seqlens, accept_index, accept_token_num);
  TORCH_CHECK(num_draft_tokens >= 1 && num_draft_tokens <= block_table.size(1) * page, "num_draft_tokens=",
              num_draft_tokens, " must be >= 1 and fit the block table's ", block_table.size(1), " blocks of ",
              page, " positions");
  // only the columns some sequence's prefix and tree cover (a table may be as wide as the longest
  // context); capped at the table's width, past which the length check refuses the call
  const auto seq = cache_seqlens.contiguous();
  const int32_t* lens = seq.data_ptr<int32_t>();
  int64_t read = 0;
  for (int64_t b = 0; b < B; ++b) read = std::max<int64_t>(read, (std::max(lens[b], 0) + num_draft_tokens + page - 1) / page);
  read = std::min(read, block_table.size(1));
  const auto table = block_table.narrow(1, 0, read).to(at::kLong).contiguous();
  const Paging pg{true, table.data_ptr<int64_t>(), B, read, page, block_table.size(1) * page};
  return compact(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens, pg);
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "compact_kv_cache(Tensor(a!) kv_cache, Tensor cache_seqlens, Tensor accept_index, "
      "Tensor accept_token_num, int num_draft_tokens) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "paged_compact_kv_cache(Tensor(a!) kv_cache, Tensor block_table, Tensor cache_seqlens, "
      "Tensor accept_index, Tensor accept_token_num, int num_draft_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("compact_kv_cache", &eagle::compact_kv_cache_cpu);
  m.impl("paged_compact_kv_cache", &eagle::paged_compact_kv_cache_cpu);
}
