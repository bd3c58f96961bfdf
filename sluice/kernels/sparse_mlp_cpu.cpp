// Activation-sparse SwiGLU MLP on 4-bit weights, for any x86-64 or ARM CPU (plain C++ loops that
// the compiler vectorises for the CPU it builds for: AVX2 on a Zen 3).
//
// Layout (built by sluice/sparse/store.py), groups of 32 along each stored row: byte b of a
// group's 16 bytes holds element b in its low nibble and element b + 16 in its high one, and
// W = code * scale + offset per group.
// - gathered_gate_up: the gate and up rows of each neuron side by side, codes
//   [neurons, 2, hidden / 2] and (scale, offset) [neurons, 2, hidden / 32, 2]. For the listed
//   rows it returns silu(gate . x) * (up . x), zeroed where |h| <= threshold.
// - gathered_down: the down projection's columns stored as rows (a column-major copy), codes
//   [neurons, hidden / 2], with the original per-32-neuron groups' (scale, offset) tables
//   [neurons / 32, hidden] each: y = sum_j h_j (scale[g_j] * c_j) + sum_g offset[g] * (sum of
//   h over g's rows), exactly the product with the quantized weight, in any order of rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kHalf = kGroup / 2;
// Outputs per task of the down projection: 2 groups, 16 float accumulators a lane-row.
constexpr int64_t kTile = 64;

// The dot product of x with one stored row of `inputs` 4-bit weights.
float row_dot(const float* x, const float* group_sums, const uint8_t* codes,
              const float* scale_offset, int64_t inputs) {
  float acc[kHalf] = {};
  float offsets = 0.0f;
  for (int64_t g = 0; g < inputs / kGroup; ++g) {
    const uint8_t* c = codes + g * kHalf;
    const float* xg = x + g * kGroup;
    const float scale = scale_offset[2 * g];
    offsets += scale_offset[2 * g + 1] * group_sums[g];
#pragma omp simd
    for (int64_t b = 0; b < kHalf; ++b)
      acc[b] += scale * (static_cast<float>(c[b] & 15) * xg[b] +
                         static_cast<float>(c[b] >> 4) * xg[b + kHalf]);
  }
  float total = offsets;
  for (int64_t b = 0; b < kHalf; ++b) total += acc[b];
  return total;
}

at::Tensor gathered_gate_up(const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& scale_offset, const at::Tensor& rows,
                            double threshold) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat, "x must be float32 [hidden]");
  TORCH_CHECK(codes.dim() == 3 && codes.size(1) == 2 && codes.size(2) * 2 == x.size(0),
              "codes must be uint8 [neurons, 2, hidden / 2], got ", codes.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong, "rows must be int64");
  const int64_t hidden = x.size(0), groups = hidden / kGroup, n = rows.size(0);
  const at::Tensor xc = x.contiguous(), rc = rows.contiguous();
  const float* xp = xc.data_ptr<float>();
  std::vector<float> sums(groups, 0.0f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < kGroup; ++i) sums[g] += xp[g * kGroup + i];
  at::Tensor h = at::empty({n}, x.options());
  float* hp = h.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale_offset.data_ptr<float>();
  const int64_t* rp = rc.data_ptr<int64_t>();
  const int64_t row_bytes = hidden / 2, row_groups = groups * 2;
  const float limit = static_cast<float>(threshold);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t j = rp[k];
      const float gate = row_dot(xp, sums.data(), cp + (2 * j) * row_bytes,
                                 sp + (2 * j) * row_groups, hidden);
      const float up = row_dot(xp, sums.data(), cp + (2 * j + 1) * row_bytes,
                               sp + (2 * j + 1) * row_groups, hidden);
      const float value = gate / (1.0f + std::exp(-gate)) * up;
      hp[k] = std::fabs(value) > limit ? value : 0.0f;
    }
  });
  return h;
}

at::Tensor gathered_down(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scales,
                         const at::Tensor& offsets, const at::Tensor& rows,
                         const at::Tensor& groups) {
  TORCH_CHECK(h.dim() == 1 && h.scalar_type() == at::kFloat, "h must be float32 [n]");
  TORCH_CHECK(codes.dim() == 2, "codes must be uint8 [neurons, hidden / 2]");
  TORCH_CHECK(rows.size(0) == h.size(0) && groups.size(0) == h.size(0),
              "h, rows and groups must have one entry per neuron");
  const int64_t hidden = codes.size(1) * 2, n = h.size(0), num_groups = scales.size(0);
  TORCH_CHECK(hidden % kTile == 0, "hidden size must be a multiple of ", kTile);
  const at::Tensor hc = h.contiguous(), rc = rows.contiguous(), gc = groups.contiguous();
  const float* hp = hc.data_ptr<float>();
  const int64_t* rp = rc.data_ptr<int64_t>();
  const int64_t* gp = gc.data_ptr<int64_t>();
  std::vector<float> group_h(num_groups, 0.0f);
  for (int64_t k = 0; k < n; ++k) group_h[gp[k]] += hp[k];
  at::Tensor y = at::empty({hidden}, h.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  at::parallel_for(0, hidden / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kTile;
      float acc[kTile] = {};
      for (int64_t k = 0; k < n; ++k) {
        const float hk = hp[k];
        if (hk == 0.0f) continue;
        const uint8_t* c = cp + rp[k] * (hidden / 2) + first / 2;
        const float* s = sp + gp[k] * hidden + first;
        for (int64_t q = 0; q < kTile / kGroup; ++q) {
#pragma omp simd
          for (int64_t b = 0; b < kHalf; ++b) {
            const uint8_t byte = c[q * kHalf + b];
            acc[q * kGroup + b] += hk * s[q * kGroup + b] * static_cast<float>(byte & 15);
            acc[q * kGroup + kHalf + b] +=
                hk * s[q * kGroup + kHalf + b] * static_cast<float>(byte >> 4);
          }
        }
      }
      for (int64_t g = 0; g < num_groups; ++g) {
        if (group_h[g] == 0.0f) continue;
        const float* o = op + g * hidden + first;
#pragma omp simd
        for (int64_t i = 0; i < kTile; ++i) acc[i] += group_h[g] * o[i];
      }
      for (int64_t i = 0; i < kTile; ++i) yp[first + i] = acc[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def(
      "gathered_gate_up(Tensor x, Tensor codes, Tensor scale_offset, Tensor rows, "
      "float threshold) -> Tensor");
  m.def(
      "gathered_down(Tensor h, Tensor codes, Tensor scales, Tensor offsets, Tensor rows, "
      "Tensor groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) {
  m.impl("gathered_gate_up", &gathered_gate_up);
  m.impl("gathered_down", &gathered_down);
}
