// build_tree: schema, argument checks shared with the CUDA binding, and the CPU kernel.
//
// Slot i >= 1 of sequence b is candidate v = selected_index[b, i-1] of the EAGLE-2 candidate list.
// Its parent is the root when v / topk == 0, else the slot holding candidate u = parent_list[b, v / topk],
// found by binary search in the sorted selected_index row. Because u must lie in an earlier row of
// the candidate list (u < (v / topk) * topk), every parent slot is smaller than its child's, so one
// pass in slot order computes depths and mask rows (a child's row is its parent's plus itself), and
// one reverse pass builds the child lists in ascending slot order. Sequences run in parallel.
// Malformed trees raise ValueError (CPU validation costs no synchronisation).
#include "build_tree.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace eagle {

void check_build_tree_args(const at::Tensor& parent_list, const at::Tensor& selected_index,
                           const at::Tensor& seq_lens, const at::Tensor& tree_mask,
                           const at::Tensor& positions, const at::Tensor& retrive_index,
                           const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
                           int64_t topk, int64_t depth, int64_t n, int64_t mask_mode) {
  TORCH_CHECK_VALUE(topk >= 1 && depth >= 1, "topk and depth must be >= 1, got topk=", topk, ", depth=", depth);
  TORCH_CHECK_VALUE(n >= 1 && n <= 1024, "num_draft_tokens must be in [1, 1024], got ", n);
  TORCH_CHECK_VALUE(mask_mode >= kFullMask && mask_mode <= kQlenBitsI32, "mask_mode must be 0..3, got ", mask_mode);
  TORCH_CHECK_VALUE(mask_mode != kQlenBitsU8 || n <= 32,
                    "mask mode qlen_bits_u8 packs a row into at most 4 bytes: num_draft_tokens=", n, " > 32");
  auto is_index = [](const at::Tensor& t) {
    return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
  };
  TORCH_CHECK_VALUE(selected_index.dim() == 2 && selected_index.size(1) == n - 1,
                    "selected_index must be [B, num_draft_tokens-1=", n - 1, "], got ", selected_index.sizes());
  const int64_t B = selected_index.size(0);
  // depth 1 reads no parent: SGLang then passes an empty [B, 0] list.
  const bool empty_ok = depth == 1 && parent_list.dim() == 2 && parent_list.size(1) == 0;
  TORCH_CHECK_VALUE(parent_list.dim() == 2 && parent_list.size(0) == B &&
                        (parent_list.size(1) == topk * (depth - 1) + 1 || empty_ok),
                    "parent_list must be [B=", B, ", topk*(depth-1)+1=", topk * (depth - 1) + 1, "], got ",
                    parent_list.sizes());
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == B, "seq_lens must be [B=", B, "], got ",
                    seq_lens.sizes());
  TORCH_CHECK_TYPE(is_index(parent_list) && is_index(selected_index) && is_index(seq_lens),
                   "parent_list, selected_index and seq_lens must be int32 or int64");
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "positions must be int64");
  TORCH_CHECK_VALUE(positions.numel() == B * n, "positions must have B*n=", B * n, " elements");
  for (const auto* t : {&retrive_index, &retrive_next_token, &retrive_next_sibling}) {
    TORCH_CHECK_TYPE(is_index(*t), "retrive_* outputs must be int32 or int64");
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == n, "retrive_* outputs must be [B, n]=[", B,
                      ", ", n, "], got ", t->sizes());
  }
  const at::ScalarType mask_dtype =
      mask_mode == kQlenBitsU8 ? at::kByte : (mask_mode == kQlenBitsI32 ? at::kInt : at::kBool);
  TORCH_CHECK_TYPE(tree_mask.scalar_type() == mask_dtype, "tree_mask must be ", mask_dtype, " for mask mode ",
                   mask_mode, ", got ", tree_mask.scalar_type());
  const int64_t units = mask_mode == kQlenBitsU8 ? build_tree_u8_bytes(n) : (mask_mode == kQlenBitsI32 ? (n + 31) / 32 : n);
  TORCH_CHECK_VALUE(mask_mode == kFullMask || tree_mask.numel() == B * n * units, "tree_mask must have ",
                    B * n * units, " elements for mask mode ", mask_mode, ", got ", tree_mask.numel());
  for (const auto* t : {&tree_mask, &positions, &retrive_index, &retrive_next_token, &retrive_next_sibling}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), "build_tree outputs must be contiguous");
    TORCH_CHECK_VALUE(t->device() == selected_index.device(), "all tensors must be on ", selected_index.device());
  }
  for (const auto* t : {&parent_list, &seq_lens}) {
    TORCH_CHECK_VALUE(t->device() == selected_index.device(), "all tensors must be on ", selected_index.device());
  }
}

namespace {

enum TreeErrorKind { kOk = 0, kRange, kUnsorted, kNotSelected, kNotPreceding, kTooDeep };

struct TreeError {
  TreeErrorKind kind = kOk;
  int64_t slot = 0, value = 0, row = 0, parent = 0, prev = 0;
};

struct TreeShape {
  int64_t n, topk, depth, parent_width, num_candidates, mode;
};

// Where sequence b's mask rows live: row i starts at row_start + i * row_stride + col_start.
struct MaskRows {
  int64_t row_start, row_stride, col_start;
};

template <typename par_t, typename sel_t>
TreeError build_one_tree(int64_t b, const TreeShape& s, const par_t* parent_list, const sel_t* selected,
                         int64_t seq_len, const MaskRows& rows, void* tree_mask, int64_t* positions,
                         sel_t* retrive_index, sel_t* next_token, sel_t* next_sibling) {
  const int64_t n = s.n, count = n - 1;
  const sel_t* sel = selected + b * count;
  const par_t* parents = parent_list + b * s.parent_width;
  TreeError err;
  for (int64_t k = 0; k < count; ++k) {
    if (sel[k] < 0 || sel[k] >= s.num_candidates) return {kRange, k, int64_t(sel[k])};
    if (k > 0 && sel[k] <= sel[k - 1]) return {kUnsorted, k, int64_t(sel[k]), 0, 0, int64_t(sel[k - 1])};
  }
  std::vector<int64_t> parent(n, -1), level(n, 0);
  for (int64_t i = 1; i < n; ++i) {
    const int64_t v = sel[i - 1], row = v / s.topk;
    if (row == 0) {
      parent[i] = 0;
    } else {
      const int64_t u = parents[row];
      const sel_t* hit = std::lower_bound(sel, sel + count, u, [](sel_t a, int64_t x) { return int64_t(a) < x; });
      if (hit == sel + count || int64_t(*hit) != u) return {kNotSelected, i, v, row, u};
      if (u >= row * s.topk) return {kNotPreceding, i, v, row, u};
      parent[i] = (hit - sel) + 1;  // < i, since u < v
    }
    level[i] = level[parent[i]] + 1;
    if (level[i] > s.depth) return {kTooDeep, i};
  }
  for (int64_t i = 0; i < n; ++i) {
    positions[b * n + i] = seq_len + level[i];
    retrive_index[b * n + i] = static_cast<sel_t>(b * n + i);
    next_token[b * n + i] = -1;
    next_sibling[b * n + i] = -1;
  }
  for (int64_t i = n - 1; i > 0; --i) {  // push-front onto the parent's list: ascending slot order
    next_sibling[b * n + i] = next_token[b * n + parent[i]];
    next_token[b * n + parent[i]] = static_cast<sel_t>(i);
  }
  // Mask rows: a child's row is its parent's row plus its own column.
  if (s.mode == kFullMask || s.mode == kQlenBool) {
    auto* mask = static_cast<bool*>(tree_mask);
    auto row_of = [&](int64_t i) { return mask + rows.row_start + i * rows.row_stride + rows.col_start; };
    std::memset(row_of(0), 0, n);
    row_of(0)[0] = true;
    for (int64_t i = 1; i < n; ++i) {
      std::memcpy(row_of(i), row_of(parent[i]), n);
      row_of(i)[i] = true;
    }
  } else {
    const int64_t units = (n + 31) / 32;  // one word per row in u8 mode (n <= 32)
    std::vector<uint32_t> words(n * units, 0u);
    words[0] = 1u;
    for (int64_t i = 1; i < n; ++i) {
      std::copy_n(&words[parent[i] * units], units, &words[i * units]);
      words[i * units + i / 32] |= 1u << (i % 32);
    }
    if (s.mode == kQlenBitsU8) {
      const int64_t nbytes = build_tree_u8_bytes(n);
      auto* out = static_cast<uint8_t*>(tree_mask) + b * n * nbytes;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t k = 0; k < nbytes; ++k) out[i * nbytes + k] = uint8_t(words[i] >> (8 * k));
      }
    } else {
      std::memcpy(static_cast<int32_t*>(tree_mask) + b * n * units, words.data(), n * units * sizeof(int32_t));
    }
  }
  return err;
}

[[noreturn]] void raise_tree_error(const TreeError& e, int64_t b, const TreeShape& s) {
  switch (e.kind) {
    case kRange:
      TORCH_CHECK_VALUE(false, "selected_index[", b, ", ", e.slot, "]=", e.value, " is out of range [0, ",
                        s.num_candidates, ") (topk + (depth-1)*topk^2 for topk=", s.topk, ", depth=", s.depth, ")");
    case kUnsorted:
      TORCH_CHECK_VALUE(false, "selected_index[", b,
                        "] must be strictly increasing (sort the top-k indices ascending), but entry ", e.slot, " (",
                        e.value, ") follows ", e.prev);
    case kNotSelected:
      TORCH_CHECK_VALUE(false, "tree slot ", e.slot, " of sequence ", b, " (selected_index=", e.value,
                        "): its parent parent_list[", b, ", ", e.row, "]=", e.parent,
                        " is not among the selected nodes; the draft scores probably contain NaN");
    case kNotPreceding:
      TORCH_CHECK_VALUE(false, "tree slot ", e.slot, " of sequence ", b, " (selected_index=", e.value,
                        "): its parent parent_list[", b, ", ", e.row, "]=", e.parent,
                        " does not precede it (a parent must come from an earlier row of the candidate list)");
    case kTooDeep:
      TORCH_CHECK_VALUE(false, "tree slot ", e.slot, " of sequence ", b, " is deeper than depth=", s.depth);
    default:
      TORCH_CHECK(false, "build_tree: unknown error");
  }
}

template <typename par_t, typename sel_t>
void build_tree_cpu_impl(const at::Tensor& parent_list, const at::Tensor& selected_index,
                         const std::vector<int64_t>& seq_lens, const std::vector<MaskRows>& rows,
                         at::Tensor& tree_mask, at::Tensor& positions, at::Tensor& retrive_index,
                         at::Tensor& next_token, at::Tensor& next_sibling, const TreeShape& s) {
  const int64_t B = selected_index.size(0);
  std::vector<TreeError> errors(B);
  const par_t* parents = parent_list.data_ptr<par_t>();
  const sel_t* sel = selected_index.data_ptr<sel_t>();
  // A sequence costs about n*(n+depth) byte operations: only batches worth a parallel region get one.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (s.n * (s.n + s.depth)));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      errors[b] = build_one_tree<par_t, sel_t>(b, s, parents, sel, seq_lens[b], rows[b], tree_mask.data_ptr(),
                                               positions.data_ptr<int64_t>(), retrive_index.data_ptr<sel_t>(),
                                               next_token.data_ptr<sel_t>(), next_sibling.data_ptr<sel_t>());
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    if (errors[b].kind != kOk) raise_tree_error(errors[b], b, s);
  }
}

}  // namespace

void build_tree_cpu(const at::Tensor& parent_list, const at::Tensor& selected_index, const at::Tensor& seq_lens,
                    at::Tensor tree_mask, at::Tensor positions, at::Tensor retrive_index,
                    at::Tensor retrive_next_token, at::Tensor retrive_next_sibling, int64_t topk, int64_t depth,
                    int64_t n, int64_t mask_mode) {
  check_build_tree_args(parent_list, selected_index, seq_lens, tree_mask, positions, retrive_index,
                        retrive_next_token, retrive_next_sibling, topk, depth, n, mask_mode);
  const at::ScalarType out_dtype = selected_index.scalar_type();
  TORCH_CHECK_TYPE(retrive_index.scalar_type() == out_dtype && retrive_next_token.scalar_type() == out_dtype &&
                       retrive_next_sibling.scalar_type() == out_dtype,
                   "the C++ kernel writes retrive_* in selected_index's dtype ", out_dtype);
  const int64_t B = selected_index.size(0);
  const TreeShape s{n, topk, depth, parent_list.size(1), topk + (depth - 1) * topk * topk, mask_mode};
  auto seq64 = seq_lens.to(at::kLong).contiguous();
  std::vector<int64_t> lens(seq64.data_ptr<int64_t>(), seq64.data_ptr<int64_t>() + B);
  std::vector<MaskRows> rows(B);
  int64_t start = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, "seq_lens[", b, "]=", lens[b], " must be >= 0");
    if (mask_mode == kFullMask) {
      rows[b] = {start, lens[b] + n, lens[b]};
      // the mask's size in int64, refused where it overflows (it wrapped to a small number that a small
      // tree_mask matched, and rows were then written at wild addresses)
      int64_t width = 0, size = 0;
      TORCH_CHECK_VALUE(!__builtin_add_overflow(lens[b], n, &width) && !__builtin_mul_overflow(n, width, &size) &&
                            !__builtin_add_overflow(start, size, &start),
                        "seq_lens[", b, "]=", lens[b], " is too large: the full-mode tree_mask size overflows int64");
    } else {
      rows[b] = {b * n * n, n, 0};
    }
  }
  // (a larger buffer is fine: SGLang passes its worst-case CUDA-graph mask; the rest is left alone)
  TORCH_CHECK_VALUE(mask_mode != kFullMask || tree_mask.numel() >= start, "tree_mask has ", tree_mask.numel(),
                    " elements but mask mode full needs at least ", start);
  if (B == 0) return;
  auto parents = parent_list.contiguous();
  auto sel = selected_index.contiguous();
  const bool par64 = parents.scalar_type() == at::kLong, sel64 = sel.scalar_type() == at::kLong;
  auto run = [&](auto par_tag, auto sel_tag) {
    using par_t = decltype(par_tag);
    using sel_t = decltype(sel_tag);
    build_tree_cpu_impl<par_t, sel_t>(parents, sel, lens, rows, tree_mask, positions, retrive_index,
                                      retrive_next_token, retrive_next_sibling, s);
  };
  if (par64 && sel64) run(int64_t{}, int64_t{});
  else if (par64) run(int64_t{}, int32_t{});
  else if (sel64) run(int32_t{}, int64_t{});
  else run(int32_t{}, int32_t{});
}

}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "build_tree(Tensor parent_list, Tensor selected_index, Tensor seq_lens, Tensor(a!) tree_mask, "
      "Tensor(b!) positions, Tensor(c!) retrive_index, Tensor(d!) retrive_next_token, "
      "Tensor(e!) retrive_next_sibling, int topk, int depth, int num_draft_tokens, int mask_mode) -> ()");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("build_tree", &eagle::build_tree_cpu); }
