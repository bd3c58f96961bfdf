// Activation-sparse SwiGLU MLP on 4-bit weights: AVX2 + FMA intrinsics where the CPU has them
// (a Zen 3 does; AVX-512 is not needed), plain C++ loops for the compiler to vectorise elsewhere.
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
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SLUICE_AVX2 1
#endif

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kHalf = kGroup / 2;
// Outputs per task of the down projection: 2 groups, held in 8 AVX2 registers across its rows.
constexpr int64_t kTile = 64;

#ifdef SLUICE_AVX2
// 8 codes (bytes 0..7 of `codes`, values 0..15) as floats.
inline __m256 codes_to_floats(__m128i codes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
}

// A group's 16 bytes as its 32 codes in order: element b in the low nibble of byte b,
// element 16 + b in the high one.
inline void unpack_group(const uint8_t* bytes, __m256 out[4]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low = _mm_and_si128(packed, _mm_set1_epi8(15));
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
  out[0] = codes_to_floats(low);
  out[1] = codes_to_floats(_mm_srli_si128(low, 8));
  out[2] = codes_to_floats(high);
  out[3] = codes_to_floats(_mm_srli_si128(high, 8));
}

inline float horizontal_sum(__m256 v) {
  const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

float row_dot(const float* x, const float* group_sums, const uint8_t* codes,
              const float* scale_offset, int64_t inputs) {
  __m256 total = _mm256_setzero_ps();
  float offsets = 0.0f;
  for (int64_t g = 0; g < inputs / kGroup; ++g) {
    __m256 c[4];
    unpack_group(codes + g * kHalf, c);
    const float* xg = x + g * kGroup;
    __m256 dot = _mm256_mul_ps(c[0], _mm256_loadu_ps(xg));
    dot = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xg + 8), dot);
    dot = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xg + 16), dot);
    dot = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xg + 24), dot);
    total = _mm256_fmadd_ps(_mm256_set1_ps(scale_offset[2 * g]), dot, total);
    offsets += scale_offset[2 * g + 1] * group_sums[g];
  }
  return horizontal_sum(total) + offsets;
}

// acc[0..8) (64 outputs) += h * scale[0..64) * the 64 codes at `codes` (two groups).
inline void add_column_tile(const uint8_t* codes, const float* scale, float h, __m256 acc[8]) {
  const __m256 hv = _mm256_set1_ps(h);
  for (int q = 0; q < 2; ++q) {
    __m256 c[4];
    unpack_group(codes + q * kHalf, c);
    for (int v = 0; v < 4; ++v) {
      const __m256 hs = _mm256_mul_ps(hv, _mm256_loadu_ps(scale + q * kGroup + 8 * v));
      acc[4 * q + v] = _mm256_fmadd_ps(hs, c[v], acc[4 * q + v]);
    }
  }
}
#else
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

void add_column_tile(const uint8_t* c, const float* s, float hk, float acc[kTile]) {
  for (int64_t q = 0; q < kTile / kGroup; ++q) {
#pragma omp simd
    for (int64_t b = 0; b < kHalf; ++b) {
      const uint8_t byte = c[q * kHalf + b];
      acc[q * kGroup + b] += hk * s[q * kGroup + b] * static_cast<float>(byte & 15);
      acc[q * kGroup + kHalf + b] += hk * s[q * kGroup + kHalf + b] * static_cast<float>(byte >> 4);
    }
  }
}
#endif

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
#ifdef SLUICE_AVX2
      __m256 tile[8];
      for (auto& v : tile) v = _mm256_setzero_ps();
#else
      float tile[kTile] = {};
#endif
      for (int64_t k = 0; k < n; ++k) {
        if (hp[k] == 0.0f) continue;
        add_column_tile(cp + rp[k] * (hidden / 2) + first / 2, sp + gp[k] * hidden + first, hp[k],
                        tile);
      }
      float acc[kTile];
#ifdef SLUICE_AVX2
      for (int v = 0; v < 8; ++v) _mm256_storeu_ps(acc + 8 * v, tile[v]);
#else
      for (int64_t i = 0; i < kTile; ++i) acc[i] = tile[i];
#endif
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
