// 2:4 sparse 4-bit weight x float activation matmul for x86 CPUs with AVX2 (and FMA).
//
// Layout (built by sluice/layers/sparse24.py): a weight row keeps two of every four inputs. Per
// block of 16 inputs (four groups of four, eight kept values) it stores
//   - codes: 4 bytes, the kept values' 4-bit codes, kept value j in bits 4j..4j+3 (little endian);
//   - index: 2 bytes, each kept value's position within its group of four, kept j in bits 2j, 2j+1;
// and per group of `group` inputs one float16 (scale, offset) pair, w = code * scale + offset.
// That is 12 bits per group of four inputs plus the scales: 0.5 byte per weight (with group 32)
// against 0.625 for dense int4.
//
// One row and block: the eight kept weights are decoded to floats (one vector), the eight
// activations they meet are picked out of the block's 16 with two in-lane permutes and a blend
// (kept j < 4 lies among inputs 0..7, kept j >= 4 among 8..15), and one fused multiply-add
// accumulates. Only the compressed bytes are read. A few activation rows share each decoded
// block; for wider inputs (prefill) the weight is expanded to dense float once and multiplied
// by ATen's GEMM, which is then compute-bound anyway.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlockInputs = 16;
constexpr int64_t kBlockCodeBytes = 4;
constexpr int64_t kBlockIndexBytes = 2;
// Activation rows multiplied straight from the compressed weight; more go through a dense copy.
constexpr int64_t kMaxDirectRows = 8;
constexpr int kRowBlock = 4;

struct Weight {
  const uint8_t* codes;          // [N, K / 4]
  const uint8_t* index;          // [N, K / 8]
  const at::Half* scale_offset;  // [N, K / group, 2]
  int64_t inputs;
  int64_t group;
};

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, sizeof word);
  return word;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t word;
  std::memcpy(&word, p, sizeof word);
  return word;
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

struct BlockDecoder {
  const __m256i code_shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i index_shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  // Kept j sits in group j / 2 of the block: groups 1 and 3 start 4 lanes into their half.
  const __m256i group_starts = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i nibble = _mm256_set1_epi32(0xF);
  const __m256i two_bits = _mm256_set1_epi32(0x3);

  inline __m256 weights(const uint8_t* codes, __m256 scale, __m256 offset) const {
    __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_u32(codes))), code_shifts);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, nibble)), scale, offset);
  }

  inline __m256i lanes(const uint8_t* index) const {
    __m256i i = _mm256_srlv_epi32(_mm256_set1_epi32(load_u16(index)), index_shifts);
    return _mm256_add_epi32(_mm256_and_si256(i, two_bits), group_starts);
  }
};

inline __m256 picked(const float* x, __m256i lanes) {
  __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), lanes);
  __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), lanes);
  return _mm256_blend_ps(low, high, 0xF0);
}

// Rows m0..m0+MR of x against weight row n. Two accumulators per row hide the FMA latency.
template <int MR>
void row_dot(const float* x, int64_t x_stride, const Weight& w, int64_t n, float* out,
             int64_t out_stride, const BlockDecoder& decode) {
  const int64_t blocks_per_group = w.group / kBlockInputs;
  const int64_t groups = w.inputs / w.group;
  const uint8_t* codes = w.codes + n * (w.inputs / 4);
  const uint8_t* index = w.index + n * (w.inputs / 8);
  const at::Half* scale_offset = w.scale_offset + n * groups * 2;
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 scale = _mm256_set1_ps(static_cast<float>(scale_offset[2 * g]));
    const __m256 offset = _mm256_set1_ps(static_cast<float>(scale_offset[2 * g + 1]));
    for (int64_t b = 0; b < blocks_per_group; ++b, k += kBlockInputs) {
      const __m256 weights = decode.weights(codes, scale, offset);
      const __m256i lanes = decode.lanes(index);
      codes += kBlockCodeBytes;
      index += kBlockIndexBytes;
      for (int m = 0; m < MR; ++m)
        acc[m][b & 1] = _mm256_fmadd_ps(weights, picked(x + m * x_stride + k, lanes), acc[m][b & 1]);
    }
  }
  for (int m = 0; m < MR; ++m)
    out[m * out_stride + n] = horizontal_sum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

template <int MR>
void rows_against_weight(const float* x, int64_t x_stride, const Weight& w, int64_t rows,
                         float* out, int64_t out_stride) {
  const BlockDecoder decode;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row_dot<MR>(x, x_stride, w, n, out, out_stride, decode);
  });
}

void direct_linear(const float* x, int64_t M, const Weight& w, int64_t N, float* out) {
  const int64_t K = w.inputs;
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock)
    rows_against_weight<kRowBlock>(x + m * K, K, w, N, out + m * N, N);
  switch (M - m) {
    case 3: rows_against_weight<3>(x + m * K, K, w, N, out + m * N, N); break;
    case 2: rows_against_weight<2>(x + m * K, K, w, N, out + m * N, N); break;
    case 1: rows_against_weight<1>(x + m * K, K, w, N, out + m * N, N); break;
    default: break;
  }
}

void dequantize_rows(const Weight& w, int64_t N, float* dense) {
  const BlockDecoder decode;
  const int64_t K = w.inputs, groups = K / w.group, blocks_per_group = w.group / kBlockInputs;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* codes = w.codes + n * (K / 4);
      const uint8_t* index = w.index + n * (K / 8);
      const at::Half* scale_offset = w.scale_offset + n * groups * 2;
      float* row = dense + n * K;
      std::memset(row, 0, K * sizeof(float));
      int64_t k = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 scale = _mm256_set1_ps(static_cast<float>(scale_offset[2 * g]));
        const __m256 offset = _mm256_set1_ps(static_cast<float>(scale_offset[2 * g + 1]));
        for (int64_t b = 0; b < blocks_per_group; ++b, k += kBlockInputs) {
          alignas(32) float values[8];
          alignas(32) int32_t lanes[8];
          _mm256_store_ps(values, decode.weights(codes, scale, offset));
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), decode.lanes(index));
          codes += kBlockCodeBytes;
          index += kBlockIndexBytes;
          for (int j = 0; j < 8; ++j) row[k + (j >= 4 ? 8 : 0) + lanes[j]] = values[j];
        }
      }
    }
  });
}

Weight checked_weight(const at::Tensor& codes, const at::Tensor& index,
                      const at::Tensor& scale_offset, int64_t group) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "sparse24_int4: codes must be contiguous uint8 [N, K / 4]");
  const int64_t N = codes.size(0), K = codes.size(1) * 4;
  TORCH_CHECK(group % kBlockInputs == 0 && K % group == 0,
              "sparse24_int4: group ", group, " must be a multiple of 16 dividing K = ", K);
  TORCH_CHECK(index.scalar_type() == at::kByte && index.is_contiguous() &&
                  index.sizes() == at::IntArrayRef({N, K / 8}),
              "sparse24_int4: index must be contiguous uint8 [N, K / 8]");
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.sizes() == at::IntArrayRef({N, K / group, 2}),
              "sparse24_int4: scale_offset must be contiguous float16 [N, K / group, 2]");
  return {codes.data_ptr<uint8_t>(), index.data_ptr<uint8_t>(),
          scale_offset.data_ptr<at::Half>(), K, group};
}

at::Tensor sparse24_int4_dequantize(const at::Tensor& codes, const at::Tensor& index,
                                    const at::Tensor& scale_offset, int64_t group) {
  const Weight w = checked_weight(codes, index, scale_offset, group);
  at::Tensor dense = at::empty({codes.size(0), w.inputs}, codes.options().dtype(at::kFloat));
  dequantize_rows(w, codes.size(0), dense.data_ptr<float>());
  return dense;
}

at::Tensor sparse24_int4_linear(const at::Tensor& x, const at::Tensor& codes,
                                const at::Tensor& index, const at::Tensor& scale_offset,
                                int64_t group) {
  const Weight w = checked_weight(codes, index, scale_offset, group);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.inputs,
              "sparse24_int4_linear: x must be [M, ", w.inputs, "], got ", x.sizes());
  const at::Tensor rows = x.to(at::kFloat).contiguous();
  const int64_t M = rows.size(0), N = codes.size(0);
  if (M > kMaxDirectRows)
    return at::mm(rows, sparse24_int4_dequantize(codes, index, scale_offset, group).t()).to(x.scalar_type());
  at::Tensor out = at::empty({M, N}, rows.options());
  direct_linear(rows.data_ptr<float>(), M, w, N, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("sparse24_int4_linear(Tensor x, Tensor codes, Tensor index, Tensor scale_offset, "
        "int group) -> Tensor");
  m.def("sparse24_int4_dequantize(Tensor codes, Tensor index, Tensor scale_offset, int group) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) {
  m.impl("sparse24_int4_linear", &sparse24_int4_linear);
  m.impl("sparse24_int4_dequantize", &sparse24_int4_dequantize);
}
