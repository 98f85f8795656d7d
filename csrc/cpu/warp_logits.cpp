// warp_logits: Hugging Face's temperature -> top-k -> top-p -> min-p warpers and softmax, per row.
//
// Rows run in parallel (at::parallel_for). Per row, nothing is sorted:
//   * top-k: a size-k heap (or std::nth_element for large k) finds the k-th largest score; scores
//     below it are removed (ties stay);
//   * top-p: a mass-weighted quickselect finds the score t of the last token HF keeps (the smallest
//     score whose strictly larger kept scores carry probability < top_p); in the group of scores
//     equal to t, the tokens HF keeps are counted and the largest vocabulary ids kept (the order of a
//     stable ascending sort, see eagle_kernels/warp_logits.py);
//   * min-p: tokens with probability < min_p * max probability are removed.
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
  std::vector<float> scores;                     // logits / temperature
  std::vector<float> weights;                    // exp(score - row max)
  std::vector<float> values;                     // top-k selection buffer
  std::vector<std::pair<float, float>> entries;  // (score, weight) of top-k survivors for top-p
};

void check_row_params(int64_t r, const RowParams& p) {
  TORCH_CHECK_VALUE(std::isfinite(p.temperature) && p.temperature >= 0.f,
                    "temperature must be finite and >= 0, got ", p.temperature, " at row ", r);
  TORCH_CHECK_VALUE(p.top_k >= -1, "top_k must be >= 0, or -1 (0 and -1 disable it), got ", p.top_k, " at row ", r);
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

// The k-th largest of v[0..V) (counting repeats). Small k: a min-heap of the k largest seen, which
// rejects most elements with one comparison; large k: std::nth_element on a copy.
float kth_largest(const float* v, int64_t V, int64_t k, std::vector<float>& buf) {
  if (k * 16 > V) {
    buf.assign(v, v + V);
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    return buf[k - 1];
  }
  buf.assign(v, v + k);
  std::make_heap(buf.begin(), buf.end(), std::greater<float>());
  for (int64_t i = k; i < V; ++i) {
    if (v[i] > buf.front()) {
      std::pop_heap(buf.begin(), buf.end(), std::greater<float>());
      buf.back() = v[i];
      std::push_heap(buf.begin(), buf.end(), std::greater<float>());
    }
  }
  return buf.front();
}

// Probabilities of one row into out. Per-thread scratch buffers (no per-call page faults); the
// division is exact IEEE float division like torch's, and exp runs in ATen's vectorised kernel.
template <typename scalar_t>
void warp_row(const scalar_t* x, float* out, int64_t V, int64_t r, const RowParams& p, RowScratch& s) {
  s.scores.resize(V);
  s.weights.resize(V);
  float* scores = s.scores.data();
  float* weights = s.weights.data();
  const float scale = p.temperature == 0.f ? 1.f : p.temperature;
  // -inf is a masked token (probability 0, as in HF's warpers), and so is a negative logit that the
  // division takes to -inf; NaN, +inf and an upward overflow are errors.
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < V; ++i) {
    scores[i] = static_cast<float>(x[i]) / scale;
    bad |= !(scores[i] <= std::numeric_limits<float>::max());
  }
  if (bad) {
    for (int64_t i = 0; i < V; ++i) {
      const float xi = static_cast<float>(x[i]);
      TORCH_CHECK_VALUE(!std::isnan(xi) && xi != std::numeric_limits<float>::infinity(),
                        "logits contain NaN or +inf (row ", r, ", token ", i, "; -inf, a masked token, is allowed)");
    }
    TORCH_CHECK_VALUE(false, "logits / temperature overflows float32; raise the temperature (row ", r, ")");
  }
  float y_max = scores[0];
#pragma omp simd reduction(max : y_max)
  for (int64_t i = 0; i < V; ++i) y_max = std::max(y_max, scores[i]);
  if (!(y_max > -std::numeric_limits<float>::infinity())) {
    for (int64_t i = 0; i < V; ++i) {
      TORCH_CHECK_VALUE(!std::isfinite(static_cast<float>(x[i])), "logits / temperature underflows to -inf for every token of row ",
                        r, " (every logit is below -3.4e38 * temperature); raise the temperature");
    }
    TORCH_CHECK_VALUE(false, "a row of logits has no finite value (row ", r, ": every token masked with -inf)");
  }
  if (p.temperature == 0.f) {
    std::fill(out, out + V, 0.f);
    out[std::find(scores, scores + V, y_max) - scores] = 1.f;  // the first maximum
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) weights[i] = scores[i] - y_max;
  at::Tensor w = at::from_blob(weights, {V}, at::TensorOptions().dtype(at::kFloat));
  w.exp_();

  float kth = -std::numeric_limits<float>::infinity();  // top-k keeps scores >= kth
  if (p.top_k > 0 && p.top_k < V) kth = kth_largest(scores, V, p.top_k, s.values);

  // top-p keeps: score > cut, or score == cut and id >= first_tie.
  float cut = kth;
  int64_t first_tie = 0;
  if (p.top_p < 1.f) {
    s.entries.clear();
    double z1 = 0.0;
    if (kth == -std::numeric_limits<float>::infinity()) {
      s.entries.resize(V);
      for (int64_t i = 0; i < V; ++i) s.entries[i] = {scores[i], weights[i]};
#pragma omp simd reduction(+ : z1)
      for (int64_t i = 0; i < V; ++i) z1 += weights[i];
    } else {  // few top-k survivors
      for (int64_t i = 0; i < V; ++i) {
        if (scores[i] >= kth) {
          s.entries.emplace_back(scores[i], weights[i]);
          z1 += weights[i];
        }
      }
    }
    double mass_above = 0.0;
    const double limit = static_cast<double>(p.top_p) * z1;
    cut = top_p_cut(s.entries, limit, &mass_above);
    int64_t ties = 0;  // every score equal to the cut survived top-k, so it is among the entries
    for (const auto& e : s.entries) ties += e.first == cut;
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
  // out[i] = weight of the tokens top-k and top-p keep, 0 for the others.
  double z2 = 0.0;
#pragma omp simd reduction(+ : z2)
  for (int64_t i = 0; i < V; ++i) {
    const bool kept = scores[i] > cut || (scores[i] == cut && i >= first_tie);
    out[i] = kept ? weights[i] : 0.f;
    z2 += out[i];
  }
  if (p.min_p > 0.f) {
    const float z = static_cast<float>(z2);
    const float min_prob = p.min_p * (1.f / z);  // the max probability after top-p is exp(0) / z2
    double z3 = 0.0;
#pragma omp simd reduction(+ : z3)
    for (int64_t i = 0; i < V; ++i) {
      out[i] = out[i] / z >= min_prob ? out[i] : 0.f;
      z3 += out[i];
    }
    z2 = z3;
  }
  const float total = static_cast<float>(z2);
#pragma omp simd
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
  const at::Tensor temp = temperature.contiguous(), k = top_k.contiguous();
  const at::Tensor tp = top_p.contiguous(), mp = min_p.contiguous();
  const float* t_data = temp.data_ptr<float>();
  const int64_t* k_data = k.data_ptr<int64_t>();
  const float* p_data = tp.data_ptr<float>();
  const float* m_data = mp.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) check_row_params(r, RowParams{t_data[r], k_data[r], p_data[r], m_data[r]});

  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  at::Tensor out = at::empty({R, V}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "warp_logits_cpu", [&] {
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    const int64_t row_stride = x.stride(0);
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
