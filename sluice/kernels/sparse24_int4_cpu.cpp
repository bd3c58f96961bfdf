// 2:4 sparse 4-bit weight x float activation matmul for x86 CPUs with AVX2 (and FMA).
//
// Layout (built by sluice/layers/sparse24.py): a weight row keeps two of every four inputs. Rows
// are stored in pairs; per pair and block of 8 inputs (two groups of four, two kept values per
// row and group) it stores
//   - codes: 4 bytes, eight 4-bit codes, kept j in bits 4j..4j+3 (little endian): j < 4 those of
//     the pair's first row, j >= 4 those of its second;
//   - index: 2 bytes, each kept value's position within its group of four, kept j in bits 2j, 2j+1;
// and per pair and group of `group` inputs the float16 (scale, offset) of each row,
// w = code * scale + offset. That is 12 bits per group of four inputs plus the scales: 0.5 byte
// per weight (with group 32) against 0.625 for dense int4.
//
// One pair and block: the eight kept weights (four of each row) are decoded into one vector, the
// eight activations they meet are picked out of the block's 8 inputs with one permute (kept j
// lies in group j / 2 % 2), and one fused multiply-add accumulates both rows at once. Only the
// compressed bytes are read. A few activation rows share each decoded block; for wider inputs
// (prefill) the weight is expanded to dense float once and multiplied by ATen's GEMM, which is
// then compute-bound anyway.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlockInputs = 8;
constexpr int64_t kBlockCodeBytes = 4;
constexpr int64_t kBlockIndexBytes = 2;
constexpr int64_t kPairRows = 2;
// Activation rows multiplied straight from the compressed weight; more go through a dense copy.
constexpr int64_t kMaxDirectRows = 8;
constexpr int kRowBlock = 4;

struct Weight {
  const uint8_t* codes;          // [N / 2, K / 2]
  const uint8_t* index;          // [N / 2, K / 4]
  const at::Half* scale_offset;  // [N / 2, K / group, 2 rows, 2]
  int64_t rows;                  // N, before padding to pairs
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

struct BlockDecoder {
  const __m256i code_shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i index_shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  // Kept j sits in group j / 2 % 2 of the block: the second group starts 4 inputs in.
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

// A pair's (scale, offset) of one group as vectors: the first row's in lanes 0-3, the second's in
// lanes 4-7.
inline void pair_scales(const at::Half* scale_offset, __m256& scale, __m256& offset) {
  const float s0 = scale_offset[0], o0 = scale_offset[1], s1 = scale_offset[2],
              o1 = scale_offset[3];
  scale = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
  offset = _mm256_set_m128(_mm_set1_ps(o1), _mm_set1_ps(o0));
}

// Rows of x against pair p of the weight. Two accumulators per row hide the FMA latency.
template <int MR>
void pair_dot(const float* x, int64_t x_stride, const Weight& w, int64_t p, float* out,
              int64_t out_stride, const BlockDecoder& decode) {
  const int64_t blocks_per_group = w.group / kBlockInputs;
  const int64_t groups = w.inputs / w.group;
  const uint8_t* codes = w.codes + p * (w.inputs / 2);
  const uint8_t* index = w.index + p * (w.inputs / 4);
  const at::Half* scale_offset = w.scale_offset + p * groups * 4;
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale, offset;
    pair_scales(scale_offset + 4 * g, scale, offset);
    for (int64_t b = 0; b < blocks_per_group; ++b, k += kBlockInputs) {
      const __m256 weights = decode.weights(codes, scale, offset);
      const __m256i lanes = decode.lanes(index);
      codes += kBlockCodeBytes;
      index += kBlockIndexBytes;
      for (int m = 0; m < MR; ++m) {
        const __m256 picked = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + m * x_stride + k), lanes);
        acc[m][b & 1] = _mm256_fmadd_ps(weights, picked, acc[m][b & 1]);
      }
    }
  }
  const bool second = kPairRows * p + 1 < w.rows;
  for (int m = 0; m < MR; ++m) {
    const __m256 sum = _mm256_add_ps(acc[m][0], acc[m][1]);
    __m128 halves = _mm_hadd_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    halves = _mm_hadd_ps(halves, halves);  // [first row, second row, ...]
    out[m * out_stride + kPairRows * p] = _mm_cvtss_f32(halves);
    if (second) out[m * out_stride + kPairRows * p + 1] = _mm_cvtss_f32(_mm_movehdup_ps(halves));
  }
}

template <int MR>
void rows_against_weight(const float* x, int64_t x_stride, const Weight& w, float* out,
                         int64_t out_stride) {
  const BlockDecoder decode;
  const int64_t pairs = (w.rows + 1) / kPairRows;
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) pair_dot<MR>(x, x_stride, w, p, out, out_stride, decode);
  });
}

void direct_linear(const float* x, int64_t M, const Weight& w, float* out) {
  const int64_t K = w.inputs, N = w.rows;
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock)
    rows_against_weight<kRowBlock>(x + m * K, K, w, out + m * N, N);
  switch (M - m) {
    case 3: rows_against_weight<3>(x + m * K, K, w, out + m * N, N); break;
    case 2: rows_against_weight<2>(x + m * K, K, w, out + m * N, N); break;
    case 1: rows_against_weight<1>(x + m * K, K, w, out + m * N, N); break;
    default: break;
  }
}

void dequantize_rows(const Weight& w, float* dense) {
  const BlockDecoder decode;
  const int64_t K = w.inputs, groups = K / w.group, blocks_per_group = w.group / kBlockInputs;
  std::memset(dense, 0, w.rows * K * sizeof(float));
  at::parallel_for(0, (w.rows + 1) / kPairRows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* codes = w.codes + p * (K / 2);
      const uint8_t* index = w.index + p * (K / 4);
      const at::Half* scale_offset = w.scale_offset + p * groups * 4;
      const bool second = kPairRows * p + 1 < w.rows;
      float* first_row = dense + kPairRows * p * K;
      int64_t k = 0;
      for (int64_t g = 0; g < groups; ++g) {
        __m256 scale, offset;
        pair_scales(scale_offset + 4 * g, scale, offset);
        for (int64_t b = 0; b < blocks_per_group; ++b, k += kBlockInputs) {
          alignas(32) float values[8];
          alignas(32) int32_t lanes[8];
          _mm256_store_ps(values, decode.weights(codes, scale, offset));
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), decode.lanes(index));
          codes += kBlockCodeBytes;
          index += kBlockIndexBytes;
          for (int j = 0; j < 4; ++j) first_row[k + lanes[j]] = values[j];
          if (second)
            for (int j = 4; j < 8; ++j) first_row[K + k + lanes[j]] = values[j];
        }
      }
    }
  });
}

Weight checked_weight(const at::Tensor& codes, const at::Tensor& index,
                      const at::Tensor& scale_offset, int64_t group, int64_t rows) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "sparse24_int4: codes must be contiguous uint8 [N / 2, K / 2]");
  const int64_t pairs = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK((rows + 1) / kPairRows == pairs, "sparse24_int4: ", rows, " rows need ",
              (rows + 1) / kPairRows, " pairs, got ", pairs);
  TORCH_CHECK(group % 16 == 0 && K % group == 0,
              "sparse24_int4: group ", group, " must be a multiple of 16 dividing K = ", K);
  TORCH_CHECK(index.scalar_type() == at::kByte && index.is_contiguous() &&
                  index.sizes() == at::IntArrayRef({pairs, K / 4}),
              "sparse24_int4: index must be contiguous uint8 [N / 2, K / 4]");
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.sizes() == at::IntArrayRef({pairs, K / group, 2, 2}),
              "sparse24_int4: scale_offset must be contiguous float16 [N / 2, K / group, 2, 2]");
  return {codes.data_ptr<uint8_t>(), index.data_ptr<uint8_t>(),
          scale_offset.data_ptr<at::Half>(), rows, K, group};
}

at::Tensor sparse24_int4_dequantize(const at::Tensor& codes, const at::Tensor& index,
                                    const at::Tensor& scale_offset, int64_t group, int64_t rows) {
  const Weight w = checked_weight(codes, index, scale_offset, group, rows);
  at::Tensor dense = at::empty({rows, w.inputs}, codes.options().dtype(at::kFloat));
  dequantize_rows(w, dense.data_ptr<float>());
  return dense;
}

at::Tensor sparse24_int4_linear(const at::Tensor& x, const at::Tensor& codes,
                                const at::Tensor& index, const at::Tensor& scale_offset,
                                int64_t group, int64_t rows) {
  const Weight w = checked_weight(codes, index, scale_offset, group, rows);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.inputs,
              "sparse24_int4_linear: x must be [M, ", w.inputs, "], got ", x.sizes());
  const at::Tensor activations = x.to(at::kFloat).contiguous();
  const int64_t M = activations.size(0);
  if (M > kMaxDirectRows) {
    const at::Tensor dense = sparse24_int4_dequantize(codes, index, scale_offset, group, rows);
    return at::mm(activations, dense.t()).to(x.scalar_type());
  }
  at::Tensor out = at::empty({M, rows}, activations.options());
  direct_linear(activations.data_ptr<float>(), M, w, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("sparse24_int4_linear(Tensor x, Tensor codes, Tensor index, Tensor scale_offset, "
        "int group, int rows) -> Tensor");
  m.def("sparse24_int4_dequantize(Tensor codes, Tensor index, Tensor scale_offset, int group, "
        "int rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) {
  m.impl("sparse24_int4_linear", &sparse24_int4_linear);
  m.impl("sparse24_int4_dequantize", &sparse24_int4_dequantize);
}
