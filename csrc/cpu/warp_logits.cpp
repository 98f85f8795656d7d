// warp_logits: Hugging Face's temperature -> top-k -> top-p -> min-p warpers and softmax, per row.
//
// Rows run in parallel (at::parallel_for). Per row, nothing is sorted:
//   * top-k: std::nth_element finds the k-th largest score; scores below it are removed (ties stay);
//   * top-p: a mass-weighted quickselect finds the score t of the last token HF keeps (the smallest
//     score whose strictly larger kept scores carry probability < top_p); in the group of scores
//     equal to t, the tokens HF keeps are counted and the largest vocabulary ids kept (the order of a
//     stable ascending sort, see eagle_kernels/warp_logits.py);
//   * min-p: tokens with probability < min_p * max probability are removed.
// The output row doubles as the buffer of scaled scores until the final probabilities are written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace eagle {
namespace {

struct RowParams {
  float temperature;
  int64_t top_k;
  float top_p;
  float min_p;
};

struct RowScratch {
  std::vector<float> weights;                    // exp(score - max) of top-k survivors, 0 otherwise
  std::vector<float> values;                     // copy of the scores for nth_element
  std::vector<std::pair<float, float>> entries;  // (score, weight) of top-k survivors for top-p
};

void check_row_params(int64_t r, const RowParams& p) {
  TORCH_CHECK_VALUE(std::isfinite(p.temperature) && p.temperature >= 0.f,
                    "temperature must be finite and >= 0, got ", p.temperature, " at row ", r);
  TORCH_CHECK_VALUE(p.top_k >= 0, "top_k must be >= 0 (0 disables it), got ", p.top_k, " at row ", r);
  TORCH_CHECK_VALUE(p.top_p > 0.f && p.top_p <= 1.f, "top_p must be in (0, 1], got ", p.top_p, " at row ", r);
  TORCH_CHECK_VALUE(p.min_p >= 0.f && p.min_p <= 1.f, "min_p must be in [0, 1], got ", p.min_p, " at row ", r);
}

// The smallest score t such that the entries with score > t carry mass < limit; *mass_above gets
// that mass. Quickselect with a three-way partition: expected O(size).
float top_p_cut(std::vector<std::pair<float, float>>& entries, double limit, double* mass_above) {
  auto lo = entries.begin(), hi = entries.end();
  double above = 0.0;  // mass of the entries already known to be greater than everything in [lo, hi)
  while (true) {
    const float a = lo->first, b = (lo + (hi - lo) / 2)->first, c = (hi - 1)->first;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    auto greater_end = std::partition(lo, hi, [pivot](const auto& e) { return e.first > pivot; });
    auto equal_end = std::partition(greater_end, hi, [pivot](const auto& e) { return e.first == pivot; });
    double greater = 0.0, equal = 0.0;
    for (auto it = lo; it != greater_end; ++it) greater += it->second;
    for (auto it = greater_end; it != equal_end; ++it) equal += it->second;
    if (above + greater >= limit) {  // the cut lies above the pivot (that part is never empty)
      hi = greater_end;
    } else if (above + greater + equal >= limit || equal_end == hi) {  // the pivot is the cut
      *mass_above = above + greater;
      return pivot;
    } else {
      above += greater + equal;
      lo = equal_end;
    }
  }
}

template <typename scalar_t>
void warp_row(const scalar_t* x, float* out, int64_t V, int64_t r, const RowParams& p, RowScratch& s) {
  check_row_params(r, p);
  const bool greedy = p.temperature == 0.f;
  float* scores = out;
  float y_max = -std::numeric_limits<float>::infinity();
  int64_t arg_max = 0;
  for (int64_t i = 0; i < V; ++i) {
    const float xi = static_cast<float>(x[i]);
    TORCH_CHECK_VALUE(std::isfinite(xi), "logits contain NaN or inf (row ", r, ", token ", i, ")");
    const float yi = greedy ? xi : xi / p.temperature;
    TORCH_CHECK_VALUE(std::isfinite(yi), "logits / temperature overflows float32; raise the temperature (row ",
                      r, ")");
    scores[i] = yi;
    if (yi > y_max) {
      y_max = yi;
      arg_max = i;
    }
  }
  if (greedy) {
    std::fill(out, out + V, 0.f);
    out[arg_max] = 1.f;
    return;
  }

  float kth = -std::numeric_limits<float>::infinity();  // top-k keeps scores >= kth
  if (p.top_k > 0 && p.top_k < V) {
    s.values.assign(scores, scores + V);
    std::nth_element(s.values.begin(), s.values.begin() + (p.top_k - 1), s.values.end(), std::greater<float>());
    kth = s.values[p.top_k - 1];
  }
  s.weights.assign(V, 0.f);
  double z1 = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (scores[i] >= kth) {
      s.weights[i] = std::exp(scores[i] - y_max);
      z1 += s.weights[i];
    }
  }

  // top-p keeps: score > cut, or score == cut and id >= first_tie.
  float cut = kth;
  int64_t first_tie = 0;
  if (p.top_p < 1.f) {
    s.entries.clear();
    for (int64_t i = 0; i < V; ++i) {
      if (scores[i] >= kth) s.entries.emplace_back(scores[i], s.weights[i]);
    }
    double mass_above = 0.0;
    const double limit = static_cast<double>(p.top_p) * z1;
    cut = top_p_cut(s.entries, limit, &mass_above);
    int64_t ties = 0;
    for (int64_t i = 0; i < V; ++i) ties += scores[i] == cut;
    // Tied tokens j = 0, 1, ... (largest ids first) stay while mass_above + j * q < limit.
    const double q = std::exp(static_cast<double>(cut) - y_max);
    int64_t keep = 1;
    while (keep < ties && mass_above + keep * q < limit) ++keep;
    if (keep < ties) {
      int64_t seen = 0;
      for (int64_t i = V - 1; i >= 0; --i) {
        if (scores[i] == cut && ++seen == keep) {
          first_tie = i;
          break;
        }
      }
    }
  }
  auto kept_by_top_p = [&](int64_t i) { return scores[i] > cut || (scores[i] == cut && i >= first_tie); };

  float z2 = 1.f;
  if (p.min_p > 0.f) {
    double sum = 0.0;
    for (int64_t i = 0; i < V; ++i) sum += kept_by_top_p(i) ? s.weights[i] : 0.f;
    z2 = static_cast<float>(sum);
  }
  const float min_prob = p.min_p * (1.f / z2);  // the max probability after top-p is exp(0) / z2
  double z3 = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    const float w = s.weights[i];
    const bool kept = kept_by_top_p(i) && w / z2 >= min_prob;
    out[i] = kept ? w : 0.f;  // scores[i] is not read after this point
    z3 += out[i];
  }
  const float total = static_cast<float>(z3);
  for (int64_t i = 0; i < V; ++i) out[i] = out[i] / total;
}

void check_param(const char* name, const at::Tensor& t, int64_t R, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == R, name, " must have shape [", R, "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but logits are on ", device);
}

at::Tensor warp_logits_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                           const at::Tensor& top_p, const at::Tensor& min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, "logits must be [R, V] with V >= 1, got ",
                    logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "logits must have dtype in (float16, bfloat16, float32), got ", dtype);
  const int64_t R = logits.size(0), V = logits.size(1);
  check_param("temperature", temperature, R, at::kFloat, logits.device());
  check_param("top_k", top_k, R, at::kLong, logits.device());
  check_param("top_p", top_p, R, at::kFloat, logits.device());
  check_param("min_p", min_p, R, at::kFloat, logits.device());
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor temp = temperature.contiguous(), k = top_k.contiguous();
  const at::Tensor tp = top_p.contiguous(), mp = min_p.contiguous();
  at::Tensor out = at::empty({R, V}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "warp_logits_cpu", [&] {
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    const int64_t row_stride = x.stride(0);
    const float* t_data = temp.data_ptr<float>();
    const int64_t* k_data = k.data_ptr<int64_t>();
    const float* p_data = tp.data_ptr<float>();
    const float* m_data = mp.data_ptr<float>();
    float* out_data = out.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 16384 / V);
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      RowScratch scratch;
      for (int64_t r = begin; r < end; ++r) {
        const RowParams params{t_data[r], k_data[r], p_data[r], m_data[r]};
        warp_row(x_data + r * row_stride, out_data + r * V, V, r, params, scratch);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("warp_logits(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("warp_logits", &eagle::warp_logits_cpu); }
