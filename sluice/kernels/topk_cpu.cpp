// The indices of each row's k largest values, in no particular order, for the output head's
// shortlist (k of ~50k logits per row). A row's k-th largest value is at most the k-th largest
// of its blocks' maxima (k blocks hold a value at least that large), so one pass takes the
// maxima, a small selection among them gives that bound, and only the few values that reach it
// (a few hundred of ~50k for logits) are selected among. Plain C++: the compiler vectorises the
// passes over the row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;

// Larger first; NaN counts as the largest, as torch.topk orders it.
bool larger(float a, float b) { return std::isnan(a) ? !std::isnan(b) : a > b; }

void select_row(const float* x, int64_t n, int64_t k, int64_t* out,
                std::vector<float>& maxima, std::vector<int64_t>& candidates) {
  maxima.clear();
  for (int64_t b = 0; b < n; b += kBlock) {
    float largest = -INFINITY;
    bool nan = false;
#pragma omp simd reduction(max : largest) reduction(| : nan)
    for (int64_t i = b; i < std::min(n, b + kBlock); ++i) {
      largest = largest > x[i] ? largest : x[i];
      nan |= x[i] != x[i];
    }
    maxima.push_back(nan ? NAN : largest);
  }
  candidates.clear();
  if (static_cast<int64_t>(maxima.size()) >= k) {  // else every value is a candidate
    std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), larger);
    const float bound = maxima[k - 1];
    for (int64_t i = 0; i < n; ++i)
      if (!(x[i] < bound)) candidates.push_back(i);  // at least the bound, or NaN
  }
  if (static_cast<int64_t>(candidates.size()) < k) {  // short blocks, or NaN: take every value
    candidates.resize(n);
    for (int64_t i = 0; i < n; ++i) candidates[i] = i;
  }
  std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(),
                   [x](int64_t a, int64_t b) { return larger(x[a], x[b]); });
  std::copy(candidates.begin(), candidates.begin() + k, out);
}

at::Tensor top_k_indices(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "top_k_indices: x must be float32 [rows, n], got ", x.scalar_type(), " ", x.sizes());
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "top_k_indices: k = ", k, " must lie in [1, ", n, "]");
  const at::Tensor values = x.contiguous();
  at::Tensor out = at::empty({rows, k}, x.options().dtype(at::kLong));
  const float* in = values.data_ptr<float>();
  int64_t* indices = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> maxima;
    std::vector<int64_t> candidates;
    for (int64_t r = begin; r < end; ++r)
      select_row(in + r * n, n, k, indices + r * k, maxima, candidates);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) { m.def("top_k_indices(Tensor x, int k) -> Tensor"); }

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("top_k_indices", &top_k_indices); }
